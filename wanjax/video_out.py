"""Generated videos -> files: decoded VAE output to uint8 frames, and an mp4 writer (PyAV).

    video = vae_decode(vae_config, vae_params, latents)   # (B, 3, F, H, W) float32 in [-1, 1]
    frames = to_uint8_frames(video)                        # (B, F, H, W, 3) uint8
    write_mp4("out/sample.mp4", frames[0], fps=16)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

PREFERRED_CODECS = ("libx264", "mpeg4")  # H.264 when this PyAV/FFmpeg build has it, MPEG-4 part 2 otherwise


def pipeline_fps(model_index: dict) -> int:
    """The frame rate diffusers' examples export a pipeline's videos at: 24 for Wan2.2 TI2V-5B (its model_index.json
    sets expand_timesteps), else 16."""
    return 24 if model_index.get("expand_timesteps") else 16


def to_uint8_frames(video) -> np.ndarray:
    """(B, 3, F, H, W) in [-1, 1] (numpy or jax, any float dtype) -> (B, F, H, W, 3) uint8.

    diffusers' VideoProcessor: x / 2 + 0.5 clamped to [0, 1], then * 255 rounded (as its PIL path does)."""
    x = np.asarray(video, dtype=np.float32)
    if x.ndim != 5 or x.shape[1] != 3:
        raise ValueError(f"decoded video has shape {x.shape}; expected (B, 3, F, H, W)")
    x = np.clip(x / 2 + 0.5, 0.0, 1.0)
    return np.round(x * 255).astype(np.uint8).transpose(0, 2, 3, 4, 1)


def _open_stream(container, fps: int, width: int, height: int):
    import av

    for codec in PREFERRED_CODECS:
        try:
            stream = container.add_stream(codec, rate=fps)
        except (av.error.FFmpegError, ValueError, KeyError, LookupError):  # codec not in this FFmpeg build
            continue
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18"}  # visually lossless-ish; the default 23 smears small test clips
        else:
            stream.bit_rate = max(2_000_000, width * height * fps * 2)
        return stream
    raise RuntimeError(f"no video encoder available in this PyAV build (tried {', '.join(PREFERRED_CODECS)})")


def write_mp4(path: str | os.PathLike, frames, fps: int = 16) -> Path:
    """Write uint8 RGB frames (F, H, W, 3) to `path` (H.264 via libx264 if available, else MPEG-4), atomically:
    the file appears complete or not at all. H and W must be even (yuv420p). Returns the path."""
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be uint8 (F, H, W, 3) with F >= 1, got {frames.dtype} {frames.shape}")
    f, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"frame size {w}x{h}: width and height must be even for yuv420p video")
    if not isinstance(fps, (int, np.integer)) or fps < 1:
        raise ValueError(f"fps={fps!r}: expected an integer >= 1")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix or '.mp4'}")
    try:
        with av.open(str(tmp), "w", format="mp4" if path.suffix in ("", ".mp4") else None) as container:
            stream = _open_stream(container, int(fps), w, h)
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
