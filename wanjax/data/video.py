"""Videos -> training clips for the caching job, with SimpleTuner's dataset semantics.

A clip is uint8 RGB frames (F, H, W, 3) with F = 4k + 1 (the Wan VAEs compress time 4x, keeping frame 0 alone) and
H, W multiples of `ClipSpec.alignment` (VAE spatial factor x 2, the transformer's patch: 16 px for the Wan2.1 VAE,
32 px for the Wan2.2 VAE). Steps, in order:

1. decode (PyAV); `frame_stride` > 1 keeps every n-th frame (a wanjax option: SimpleTuner has no frame subsampling).
   Frames are turned upright by the stream's display rotation (a display matrix, e.g. phone videos: PyAV
   `frame.rotation` -90 -> 90 degrees clockwise), and the upright size is what steps 3-4 see.
2. frame count, SimpleTuner's rules: fewer than `min_frames` (default `num_frames`) -> skipped "too_short"; more than
   `max_frames` -> skipped "too_long" (SimpleTuner drops long videos, it does not cut them); keep the first
   `num_frames` (all when unset, then rounded down to a multiple of `frame_interval`, SimpleTuner's
   `resolution_frames` bucket rounding); finally the largest 4k + 1 not above that (75 -> 73, as the Wan VAE would
   use only 1 + 4 * 18 of 75 frames anyway).
3. size: filters `minimum_image_size` (unit per `resolution_type`) and min/max aspect ratio; the bucket keeps the
   source aspect ratio (`crop=False`, or `crop_aspect="preserve"`), is square (`crop_aspect="square"`, SimpleTuner's
   default when cropping) or the nearest of `crop_aspect_buckets` ("closest"/"random"). Its area is
   `resolution`^2 pixels ("pixel_area": 480 -> 480 * 480), `resolution` megapixels ("area"), or its short edge is
   `resolution` ("pixel"); each side is rounded to the nearest multiple of `alignment`.
4. every frame is resized (swscale Lanczos, aspect kept) to just cover the bucket, then cropped to it: centred
   (`crop_style` "corner": top-left). With `crop=False` only the rounding residue (< alignment px) is cut.

`to_model_input` turns clips into the VAE's input: float32 (B, 3, F, H, W) in [-1, 1].
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import Union

import av
import numpy as np

TEMPORAL_FACTOR = 4  # both Wan VAEs: latent frames = 1 + (F - 1) // 4
VIDEO_EXTENSIONS = frozenset({"mp4", "mov", "avi", "mkv", "webm", "m4v", "mpg", "mpeg", "wmv", "flv", "ts", "gif"})
IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "jxl", "avif", "heic"})
RESOLUTION_TYPES = ("pixel_area", "area", "pixel")
Source = Union[str, os.PathLike, bytes]


class Skip(Exception):
    """A source that cannot become a training clip. `reason` is a short category for the cache report
    (unreadable, not_a_video, too_short, too_long, too_small, aspect_ratio, missing_caption); `detail` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ClipSpec:
    """How one dataset's sources become clips (SimpleTuner's dataset options, see the module docstring)."""

    resolution: float = 480
    resolution_type: str = "pixel_area"
    crop: bool = False
    crop_aspect: str = "square"  # used only with crop: square | preserve | closest | random
    crop_aspect_buckets: tuple[float, ...] = ()
    crop_style: str = "center"  # center | corner
    minimum_image_size: float | None = None
    minimum_aspect_ratio: float | None = None
    maximum_aspect_ratio: float | None = None
    num_frames: int | None = None
    min_frames: int | None = None
    max_frames: int | None = None
    frame_interval: int = 1
    frame_stride: int = 1
    alignment: int = 16
    image: bool = False  # an image dataset: one frame per source

    def __post_init__(self) -> None:
        problems = []
        if self.resolution_type not in RESOLUTION_TYPES:
            problems.append(f"resolution_type={self.resolution_type!r}: expected one of {RESOLUTION_TYPES}")
        if not self.resolution or self.resolution <= 0:
            problems.append(f"resolution={self.resolution!r} must be > 0")
        if self.crop_aspect not in ("square", "preserve", "closest", "random"):
            problems.append(f"crop_aspect={self.crop_aspect!r}: expected square | preserve | closest | random")
        if self.crop_aspect in ("closest", "random") and self.crop and not self.crop_aspect_buckets:
            problems.append(f"crop_aspect={self.crop_aspect!r} needs crop_aspect_buckets")
        for name in ("num_frames", "min_frames", "max_frames", "frame_interval", "frame_stride", "alignment"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                problems.append(f"{name}={v!r} must be a positive integer")
        if problems:
            raise ValueError("; ".join(problems))


def target_size(width: int, height: int, spec: ClipSpec) -> tuple[int, int]:
    """The bucket (W, H) for a source of width x height."""
    aspect = width / height
    if spec.crop and spec.crop_aspect == "square":
        aspect = 1.0
    elif spec.crop and spec.crop_aspect in ("closest", "random"):
        aspect = min(spec.crop_aspect_buckets, key=lambda b: (abs(b - aspect), b))
    if spec.resolution_type == "pixel":
        short = float(spec.resolution)
        w0, h0 = (short * aspect, short) if aspect >= 1 else (short, short / aspect)
    else:
        area = spec.resolution**2 if spec.resolution_type == "pixel_area" else spec.resolution * 1e6
        w0, h0 = math.sqrt(area * aspect), math.sqrt(area / aspect)
    m = spec.alignment
    return max(m, int(w0 / m + 0.5) * m), max(m, int(h0 / m + 0.5) * m)


def check_size(width: int, height: int, spec: ClipSpec) -> None:
    """SimpleTuner's size and aspect filters on the source; raises Skip."""
    mis = spec.minimum_image_size
    if mis:
        small = {"pixel": min(width, height) < mis, "pixel_area": width * height < mis * mis,
                 "area": width * height < mis * 1e6}[spec.resolution_type]
        if small:
            unit = {"pixel": "px short edge", "pixel_area": f"px area side ({mis * mis:.0f} px area)",
                    "area": "megapixels"}[spec.resolution_type]
            raise Skip("too_small", f"{width}x{height} is below minimum_image_size {mis} {unit}")
    aspect = width / height
    if spec.minimum_aspect_ratio and aspect < spec.minimum_aspect_ratio:
        raise Skip("aspect_ratio", f"aspect {aspect:.3f} below minimum_aspect_ratio {spec.minimum_aspect_ratio}")
    if spec.maximum_aspect_ratio and aspect > spec.maximum_aspect_ratio:
        raise Skip("aspect_ratio", f"aspect {aspect:.3f} above maximum_aspect_ratio {spec.maximum_aspect_ratio}")


def frame_count(total: int, spec: ClipSpec) -> int:
    """How many leading frames (of `total` decoded, after `frame_stride`) form the clip; raises Skip."""
    if total < 1:
        raise Skip("unreadable", "no frames decoded")
    if spec.image:
        return 1
    stride = f" (every {spec.frame_stride}th frame)" if spec.frame_stride > 1 else ""
    min_frames = spec.min_frames if spec.min_frames is not None else spec.num_frames
    if min_frames and total < min_frames:
        raise Skip("too_short", f"{total} frames{stride}, min_frames is {min_frames}")
    if spec.max_frames and total > spec.max_frames:
        raise Skip("too_long", f"{total} frames{stride}, max_frames is {spec.max_frames}")
    n = min(total, spec.num_frames) if spec.num_frames else total
    if not spec.num_frames and spec.frame_interval > 1:
        n = n // spec.frame_interval * spec.frame_interval
        if n < 1:
            raise Skip("too_short", f"{total} frames{stride}, fewer than frame_interval {spec.frame_interval}")
    return (n - 1) // TEMPORAL_FACTOR * TEMPORAL_FACTOR + 1


def latent_frames(frames: int) -> int:
    return 1 + (frames - 1) // TEMPORAL_FACTOR


def _decode_limit(spec: ClipSpec) -> int | None:
    """Frames (after stride) worth decoding: counting stops early unless max_frames needs the full length."""
    if spec.image:
        return 1
    if spec.max_frames or not spec.num_frames:
        return None
    return max(spec.num_frames, spec.min_frames or 0)


class _Resizer:
    """Per-frame resize-to-cover + crop for one source size (swscale, deterministic). `width` x `height` is the
    upright (displayed) size; `turns` quarter turns counterclockwise (np.rot90) make a decoded frame upright."""

    def __init__(self, width: int, height: int, spec: ClipSpec, turns: int = 0):
        self.turns = turns % 4
        check_size(width, height, spec)
        self.w, self.h = target_size(width, height, spec)
        s = max(self.w / width, self.h / height)
        self.cw, self.ch = max(self.w, round(width * s)), max(self.h, round(height * s))
        corner = spec.crop_style == "corner"
        self.y0 = 0 if corner else (self.ch - self.h) // 2
        self.x0 = 0 if corner else (self.cw - self.w) // 2

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        w, h = (self.ch, self.cw) if self.turns % 2 else (self.cw, self.ch)  # the decoded (not upright) orientation
        rgb = frame.reformat(width=w, height=h, format="rgb24", interpolation="LANCZOS").to_ndarray()
        if self.turns:
            rgb = np.rot90(rgb, self.turns)
        return rgb[self.y0 : self.y0 + self.h, self.x0 : self.x0 + self.w]


def _quarter_turns(frame: av.VideoFrame) -> int:
    """np.rot90 turns that make `frame` upright: its display rotation (degrees counterclockwise, PyAV's
    `frame.rotation` from the display matrix) rounded to a multiple of 90."""
    try:
        rotation = float(getattr(frame, "rotation", 0) or 0)
    except (TypeError, ValueError):
        return 0
    return int(round(rotation / 90)) % 4


def _is_image_container(container: av.container.InputContainer) -> bool:
    names = set(container.format.name.split(","))
    return any(n == "image2" or n.endswith("_pipe") for n in names)


def load_clip(source: Source, spec: ClipSpec) -> np.ndarray:
    """Decode a video file (path or bytes) into a clip (F, H, W, 3) uint8; raises Skip for anything unusable."""
    try:
        container = av.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else os.fspath(source))
    except (av.error.FFmpegError, OSError, ValueError, UnicodeDecodeError) as e:
        raise Skip("unreadable", f"cannot open ({type(e).__name__}: {e})") from None
    with container:
        if _is_image_container(container) and not spec.image:
            raise Skip("not_a_video", f"an image ({container.format.name}) where a video is expected")
        if not container.streams.video:
            raise Skip("unreadable", "no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        limit, frames, total, decoded, resize = _decode_limit(spec), [], 0, 0, None
        try:
            for frame in container.decode(stream):
                decoded += 1
                if (decoded - 1) % spec.frame_stride:
                    continue
                if resize is None:
                    turns = _quarter_turns(frame)
                    w, h = (frame.height, frame.width) if turns % 2 else (frame.width, frame.height)
                    resize = _Resizer(w, h, spec, turns)
                keep = limit if limit is not None else spec.num_frames
                if keep is None or len(frames) < keep:
                    frames.append(resize(frame))
                total += 1
                if limit is not None and total >= limit:
                    break
        except av.error.FFmpegError as e:
            if not frames:
                raise Skip("unreadable", f"decoding failed ({type(e).__name__}: {e})") from None
            raise Skip("unreadable", f"decoding failed after {decoded} frames ({type(e).__name__}: {e})") from None
    n = frame_count(total, spec)
    return np.stack(frames[:n])


def prepare_frames(frames: np.ndarray, spec: ClipSpec) -> np.ndarray:
    """Already-decoded frames (F, H, W, 3|1) or one image (H, W, 3|1), uint8 -> a clip; raises Skip."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise Skip("unreadable", f"frames must be uint8, got {frames.dtype}")
    if frames.ndim == 3 and frames.shape[-1] in (1, 3):
        if not spec.image:
            raise Skip("not_a_video", f"a single image {frames.shape} where a video is expected")
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3):
        raise Skip("unreadable", f"frames must be (F, H, W, 3), got {frames.shape}")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    frames = frames[:: spec.frame_stride]
    n = frame_count(len(frames), spec)
    resize = _Resizer(frames.shape[2], frames.shape[1], spec)
    return np.stack([resize(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")) for f in frames[:n]])


def to_model_input(clips: list[np.ndarray]) -> np.ndarray:
    """Clips of one shape (F, H, W, 3) uint8 -> float32 (B, 3, F, H, W) in [-1, 1]."""
    x = np.stack(clips).astype(np.float32)
    return np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)) / np.float32(127.5) - np.float32(1.0)
