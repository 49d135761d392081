"""Validation videos during training: sample each validation prompt with the method's own sampler, decode with
the JAX VAE, write `output_dir/validation/step_<N>_<name>[_ema][_<W>x<H>].mp4` and log them to wandb.

SimpleTuner's keys: `validation_step_interval` (0 = off), `validation_prompt`, `validation_negative_prompt`
(CFG's unconditional prompt; "" when unset, as WanPipeline does), `validation_prompt_library` (JSON
{nickname: prompt} or {nickname: {"prompt": ...}}), `validation_guidance`, `validation_num_inference_steps`,
`validation_num_video_frames`, `validation_resolution` ("WxH", an int for square, or a comma-separated list;
multiples of 16 at parse time, and of 2 x the pipeline VAE's spatial factor (the transformer's patch) once its
config is read: 32 for the Wan2.2 VAE; with `mesh.context` > 1 a clip's tokens, latent frames x latent height / 2
x latent width / 2, must also divide by `context`, as in training: refused when the Validator is built),
`validation_seed`, `ema_validation` ("none": trained weights; "ema_only": the EMA weights when kept; "comparison":
both). wanjax's: `validation_scheduler` ("unipc" | "euler", LoRA runs), `validation_flow_shift` (None: the
pipeline's scheduler_config), `validation_fps`.

File names: a nickname keeps its letters, digits and marks in any script (NFC), `_`, `.` and `-`; every other run
of characters (path separators, spaces, control and shell/filesystem-unsafe characters) becomes one `_`; the name
is cut to 100 bytes of UTF-8 on a character boundary. When the files of two nicknames would still coincide (also
ignoring case, for case-insensitive filesystems, and counting the `_ema` / `_<W>x<H>` suffixes), the one needing no
change (else the earlier) keeps the name and the other gets `-<first 6 hex of sha1(nickname)>`.

Samplers: LoRA runs use `wanjax.sample` (WanPipeline's loop); DMD students the re-noising sampler over their
sigmas; DCM students Euler over their phase floors (with the detail expert when dual) -- the methods' `sample`.
`validation_num_inference_steps` applies to LoRA runs only: a student always takes its own step count.

Prompt embeddings come from the cache's validation_prompts.safetensors when it holds the same text (the caching
job writes it); other prompts are encoded once at start with the pipeline's UMT5 (loaded, used, dropped). The
initial noise of prompt i is normal(fold_in(key(validation_seed), i)), so every validation round starts from the
same noise and the videos of successive steps are comparable. All processes sample (params may be sharded);
process 0 writes the files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import unicodedata
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wanjax.data import records

logger = logging.getLogger(__name__)

EMA_CHOICES = ("none", "ema_only", "comparison")


class ValidationConfigError(ValueError):
    """A validation setting cannot be used as written."""


@dataclasses.dataclass(frozen=True)
class ValidationSettings:
    interval: int
    prompts: tuple[tuple[str, str], ...]  # (file-safe name, prompt text)
    negative_prompt: str
    guidance: float
    steps: int
    sizes: tuple[tuple[int, int], ...]  # (width, height) pixels
    frames: int
    seed: int
    ema: str
    scheduler: str
    flow_shift: float | None
    fps: int | None  # None: the pipeline's (video_out.pipeline_fps)
    context: int = 1  # the training mesh's `context` axis size: each clip's tokens must divide by it


NAME_MAX_BYTES = 100  # a nickname's part of a file name, UTF-8 (file systems allow 255 bytes in all)
_SUFFIX_HEX = 6


def _truncate_utf8(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` of UTF-8, on a character boundary."""
    raw = text.encode("utf-8")
    return text if len(raw) <= max_bytes else raw[:max_bytes].decode("utf-8", "ignore")


def _name_char_ok(ch: str) -> bool:
    if ch.isascii():  # ASCII as before: letters, digits, "_", ".", "-"
        return ch.isalnum() or ch in "_.-"
    return unicodedata.category(ch)[0] in "LMN"  # letters, marks, numbers of any script; not symbols/format chars


def _safe_name(name: str) -> str:
    """A nickname as a file-name part: Unicode letters/digits/marks kept, each run of anything else (path
    separators, spaces, control and filesystem-unsafe characters) one "_", at most NAME_MAX_BYTES of UTF-8."""
    name = unicodedata.normalize("NFC", name)
    out, bad = [], False
    for ch in name:
        if _name_char_ok(ch):
            out.append(ch)
            bad = False
        elif not bad:
            out.append("_")
            bad = True
    safe = "".join(out).strip("_")
    return _truncate_utf8(safe, NAME_MAX_BYTES).strip("_") or "prompt"


def video_key(name: str, ema: bool, size: tuple[int, int], sizes) -> str:
    """A validation video's key, its file name after the `step_<N>_` prefix: the prompt's name, `_ema` for the EMA
    weights, `_<W>x<H>` when `sizes` lists several."""
    return name + ("_ema" if ema else "") + (f"_{size[0]}x{size[1]}" if len(sizes) > 1 else "")


def _video_keys(name: str, ema: str, sizes) -> set[str]:
    """The `Validator.run` video keys of prompt `name` (`video_key`), casefolded: two keys equal here would be one
    file on a case-insensitive file system."""
    variants = (False,) if ema == "none" else (False, True)  # "ema_only" without EMA weights renders the trained ones
    return {video_key(name, e, size, sizes).casefold() for e in variants for size in (sizes or [(0, 0)])}


def _tag(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:_SUFFIX_HEX]


def file_names(nicknames: list[str], *, ema: str = "none", sizes=()) -> list[str]:
    """File-safe, distinct names for `nicknames` (see the module docstring): `_safe_name`, then a nickname whose
    videos would share a file with an earlier claimed one gets `-<sha1(nickname)[:6]>` (stable whatever the order);
    nicknames that `_safe_name` leaves unchanged claim first, so a literal name is never the one renamed."""
    bases = [_safe_name(n) for n in nicknames]
    order = sorted(range(len(nicknames)), key=lambda i: (bases[i] != nicknames[i], i))
    owner: dict[str, int] = {}  # casefolded video key -> index of the nickname holding it
    out: list[str] = [""] * len(nicknames)
    for i in order:
        stem = _truncate_utf8(bases[i], NAME_MAX_BYTES - 1 - _SUFFIX_HEX).rstrip("_")
        candidates = [bases[i]] + [f"{stem}-{_tag(x)}" for x in (nicknames[i], f"{i}:{nicknames[i]}")]
        for name in candidates:
            if not _video_keys(name, ema, sizes) & owner.keys():
                break
        else:
            j = owner[min(_video_keys(bases[i], ema, sizes) & owner.keys())]
            raise ValidationConfigError(f"validation prompt nicknames {nicknames[j]!r} and {nicknames[i]!r} make the "
                                        f"same video file name {bases[i]!r} even with a suffix: rename one of them")
        if name != bases[i]:
            logger.warning("validation prompt nickname %r: its video files would coincide with those of %r (as %r, "
                           "counting _ema / _WxH suffixes and ignoring case): named %r instead", nicknames[i],
                           nicknames[owner[min(_video_keys(bases[i], ema, sizes) & owner.keys())]], bases[i], name)
        owner.update(dict.fromkeys(_video_keys(name, ema, sizes), i))
        out[i] = name
    return out


def parse_resolution(value) -> tuple[tuple[int, int], ...]:
    """SimpleTuner's validation_resolution: "832x480" (W x H), 480 (square), or a comma-separated list."""
    parts = [p.strip() for p in str(value).split(",") if p.strip()] if not isinstance(value, int) else [str(value)]
    out = []
    for p in parts:
        m = re.fullmatch(r"(\d+)\s*[xX]\s*(\d+)", p)
        if m:
            out.append((int(m.group(1)), int(m.group(2))))
        elif p.isdigit():
            out.append((int(p), int(p)))
        else:
            raise ValidationConfigError(f"validation_resolution={value!r}: expected 'WIDTHxHEIGHT', an int or a "
                                        "comma-separated list of them")
    if not out:
        raise ValidationConfigError(f"validation_resolution={value!r}: empty")
    return tuple(out)


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads' object_pairs_hook for prompt libraries: a key given twice is a ValueError."""
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:  # json.loads would keep the last silently: a prompt would vanish from validation
            raise ValueError(f"key {k!r} appears twice")
        seen[k] = v
    return seen


def prompt_library(path: str, key: str = "validation_prompt_library") -> dict[str, str]:
    """A prompt library file {nickname: prompt or {"prompt": ...}} (UTF-8, a BOM ignored) as nickname -> text, for
    validation and the caching job; ValidationConfigError naming `key` and the file when it is unreadable, not a
    JSON object, names a nickname twice, or has an entry without prompt text."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"), object_pairs_hook=no_duplicate_keys)
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValidationConfigError(f"{key}={path!r}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ValidationConfigError(f"{key}={path!r}: expected a JSON object {{name: prompt}}, got "
                                    f"{type(data).__name__}")
    out = {}
    for name, v in data.items():
        text = v.get("prompt") if isinstance(v, dict) else v
        if not isinstance(text, str) or not text.strip():
            raise ValidationConfigError(f"{key}={path!r}: entry {name!r} has no prompt text (expected a non-empty "
                                        "string or {\"prompt\": ...})")
        out[str(name)] = text
    return out


def settings_from_config(config) -> ValidationSettings | None:
    """The validation settings, checked (ValidationConfigError names the key); None when validation is off."""
    interval = int(config.validation_step_interval or 0)
    if interval <= 0:
        return None
    prompts: list[tuple[str, str]] = []  # (nickname, text); file-safe names below, once sizes and EMA are known
    if config.validation_prompt:
        prompts.append(("validation", str(config.validation_prompt)))
    lib = config.validation_prompt_library
    if lib and str(lib).lower() not in ("false", "none", "true"):
        prompts += list(prompt_library(str(lib)).items())
    if not prompts:
        raise ValidationConfigError(f"validation_step_interval={interval} but there is no validation_prompt or "
                                    "validation_prompt_library: nothing to validate")
    ema = str(config.ema_validation or "none")
    if ema not in EMA_CHOICES:
        raise ValidationConfigError(f"ema_validation={ema!r}: expected one of {EMA_CHOICES}")
    frames = int(config.validation_num_video_frames)
    if frames < 1:
        raise ValidationConfigError(f"validation_num_video_frames={frames}: expected >= 1 (Wan clips have 4k+1 frames)")
    if (frames - 1) % 4:  # WanPipeline rounds the same way, with a warning (the DCM seed asks for 16)
        logger.warning("validation_num_video_frames=%d is not 4k+1: rounded to %d, as WanPipeline does", frames,
                       frames // 4 * 4 + 1)
        frames = frames // 4 * 4 + 1
    sizes = parse_resolution(config.validation_resolution)
    for w, h in sizes:
        if w < 16 or h < 16 or w % 16 or h % 16:  # every Wan VAE: Validator checks the pipeline's own multiple
            raise ValidationConfigError(f"validation_resolution {w}x{h}: width and height must be multiples of 16 "
                                        "(the VAE's 8x downsampling times the 2x2 patch), at least 16")
    if len(set(sizes)) != len(sizes):  # the same size twice would write the same files twice
        logger.warning("validation_resolution=%r lists a size twice: each is rendered once", config.validation_resolution)
        sizes = tuple(dict.fromkeys(sizes))
    names = file_names([n for n, _ in prompts], ema=ema, sizes=sizes)
    prompts = [(name, text) for name, (_, text) in zip(names, prompts)]
    steps = int(config.validation_num_inference_steps)
    if steps < 1:
        raise ValidationConfigError(f"validation_num_inference_steps={steps}: expected >= 1")
    guidance = float(config.validation_guidance)
    if not math.isfinite(guidance):  # inf: NaN latents, a black video; nan: CFG silently off
        raise ValidationConfigError(f"validation_guidance={guidance}: expected a finite number (<= 1: no CFG)")
    if config.validation_scheduler not in ("unipc", "euler"):
        raise ValidationConfigError(f"validation_scheduler={config.validation_scheduler!r}: expected unipc | euler")
    shift = config.validation_flow_shift
    if shift is not None and not (math.isfinite(float(shift)) and float(shift) > 0):
        raise ValidationConfigError(f"validation_flow_shift={shift}: expected a finite number > 0")
    fps = config.validation_fps
    if fps is not None and (not ((isinstance(fps, int) and not isinstance(fps, bool)) or (
            isinstance(fps, float) and fps.is_integer())) or fps < 1):
        raise ValidationConfigError(f"validation_fps={fps!r}: expected an integer >= 1")  # not at every round
    return ValidationSettings(
        interval=interval, prompts=tuple(prompts), negative_prompt=str(config.validation_negative_prompt or ""),
        guidance=guidance, steps=steps, sizes=sizes, frames=frames,
        seed=int(config.validation_seed if config.validation_seed is not None else config.seed), ema=ema,
        scheduler=str(config.validation_scheduler), flow_shift=None if shift is None else float(shift),
        fps=None if fps is None else int(fps),
        context=mesh_context_size(config))


def mesh_context_size(config) -> int:
    """The `context` axis size of the trainer's mesh, `make_mesh(**config.mesh)` (-1: the devices the other axes
    leave); 1 when the sizes do not fit the devices (the trainer refuses those itself)."""
    from wanjax.sharding import make_mesh

    try:
        return int(make_mesh(**dict(config.get("mesh") or {})).shape["context"])
    except ValueError:
        return 1


def check_video_size(settings: ValidationSettings, vae_config, patch_size=(1, 2, 2)) -> None:
    """Refuse sizes the pipeline cannot render (ValidationConfigError naming the key, the value and the multiple):
    width and height multiples of lcm(2 x the VAE's spatial factor, its spatial factor x the transformer's patch)
    -- the caching job's alignment, 16 for Wan2.1's 8x VAE, 32 for Wan2.2's 16x -- and latent frames a multiple
    of the transformer's temporal patch; under context parallelism (`settings.context` > 1) each clip's tokens
    (latent frames x latent height / patch x latent width / patch) a multiple of the `context` axis size."""
    sf, tf = int(vae_config.spatial_factor), int(vae_config.temporal_factor)
    pt, ph, pw = (int(p) for p in patch_size)
    mh, mw = math.lcm(2 * sf, sf * ph), math.lcm(2 * sf, sf * pw)
    why = f"2 x the VAE's {sf}x spatial downsampling" + (f", its {ph}x{pw} patch" if max(ph, pw) > 2 else "")
    for w, h in settings.sizes:
        if w % mw or h % mh:
            near = f"{max(mw, round(w / mw) * mw)}x{max(mh, round(h / mh) * mh)}"
            need = f"multiples of {mw}" if mw == mh else f"multiples of {mw} (width) and {mh} (height)"
            raise ValidationConfigError(f"validation_resolution {w}x{h}: width and height must be {need} for this "
                                        f"pipeline ({why}); e.g. {near}")
    latent_frames = (settings.frames - 1) // tf + 1
    if latent_frames % pt:
        raise ValidationConfigError(f"validation_num_video_frames={settings.frames}: {latent_frames} latent frames "
                                    f"(the VAE's {tf}x), not a multiple of the transformer's temporal patch {pt}")
    c = int(settings.context)
    if c > 1:  # the transformer splits each clip's tokens over `context`: sampling would fail at every round
        for w, h in settings.sizes:
            grid = (latent_frames // pt, h // sf // ph, w // sf // pw)
            if math.prod(grid) % c:
                step = pt * (c // math.gcd(grid[1] * grid[2], c))  # a latent frame count that fits
                frames = (-(-latent_frames // step) * step - 1) * tf + 1
                raise ValidationConfigError(
                    f"validation_resolution {w}x{h}, validation_num_video_frames={settings.frames}: "
                    f"{' x '.join(map(str, grid))} = {math.prod(grid)} tokens per clip, not divisible by "
                    f"mesh.context={c} (context parallelism splits each clip's tokens over it); e.g. "
                    f"validation_num_video_frames={frames}")


def pipeline_root(model: str, parts: tuple[str, ...]) -> Path:
    """The diffusers pipeline folder holding `parts` (e.g. vae/) for `pretrained_model_name_or_path`: the folder
    itself or the parent of a transformer folder; a hub id is fetched with huggingface_hub (those parts only)."""
    p = Path(model)
    if p.exists():
        for root in (p, p.parent):
            if (root / "model_index.json").is_file() and all((root / x).is_dir() for x in parts):
                return root
        raise ValidationConfigError(f"pretrained_model_name_or_path={model!r}: validation needs a diffusers pipeline "
                                    f"folder with {', '.join(x + '/' for x in parts)} (set validation_step_interval=0 "
                                    "to train without validation videos)")
    import huggingface_hub as hf

    try:
        return Path(hf.snapshot_download(model, allow_patterns=["model_index.json", *(f"{x}/*" for x in parts)]))
    except Exception as e:  # offline, unknown repo, auth: many exception types
        raise ValidationConfigError(f"pretrained_model_name_or_path={model!r}: fetching {list(parts)} for validation "
                                    f"failed ({type(e).__name__}: {e})") from None


def _read_vae_config(pipeline: Path):
    from wanjax.models.vae import VaeConfig

    path = pipeline / "vae" / "config.json"
    try:
        return VaeConfig.from_diffusers(json.loads(path.read_text(encoding="utf-8")), source=str(path))
    except (OSError, ValueError, TypeError) as e:
        raise ValidationConfigError(f"{path}: unreadable VAE config ({e}); validation reads it for the video "
                                    "sizes the pipeline can render") from None


def _pipeline_flow_shift(pipeline: Path) -> float:
    from wanjax.schedulers import DEFAULT_FLOW_SHIFT, config_flow_shift

    try:
        return config_flow_shift(json.loads((pipeline / "scheduler" / "scheduler_config.json").read_text()))
    except (OSError, ValueError):
        return DEFAULT_FLOW_SHIFT


def _pipeline_fps(pipeline: Path) -> int:
    from wanjax.model_source import read_model_index
    from wanjax.video_out import pipeline_fps

    return pipeline_fps(read_model_index(pipeline) or {})


def prompt_embeddings(texts: list[str], *, cache_dir: str | Path, pipeline: str, text_len: int,
                      text_dtype=jnp.float32) -> np.ndarray:
    """(len(texts), text_len, D) float32: the cache's embedding of each text when it has it, else UMT5's."""
    cached = {t: np.asarray(e, np.float32) for t, e in records.read_prompt_embeds(cache_dir).items()}
    missing = sorted({t for t in texts if t not in cached})
    if missing:
        from wanjax import text_io

        root = pipeline_root(pipeline, ("text_encoder", "tokenizer"))
        logger.info("validation: encoding %d prompt(s) not in the cache with %s/text_encoder", len(missing), root)
        t5_config, t5_params, tokenizer = text_io.load_text_encoder(root, dtype=text_dtype)
        emb, lengths = text_io.encode_prompts(t5_config, t5_params, tokenizer, missing, return_lengths=True)
        del t5_params
        for t, e, n in zip(missing, np.asarray(emb, np.float32), np.asarray(lengths)):
            cached[t] = e[: int(n)]
    return np.stack([records.pad_tokens(cached[t], text_len) for t in texts])


@dataclasses.dataclass(frozen=True)
class Video:
    key: str  # "<name>[_ema][_<W>x<H>]": the file name after the step prefix, and the wandb key
    prompt: str
    path: Path


class Validator:
    """Built once before the loop (embeddings, VAE, noise); `run(step, method, state)` renders one round."""

    def __init__(self, settings: ValidationSettings, *, output_dir: str | Path, pipeline: str,
                 cache_dir: str | Path, text_len: int, model_config, vae_dtype=jnp.float32):
        """`pipeline`: pretrained_model_name_or_path (a pipeline folder, a transformer folder inside one, or a hub
        id); its vae/ and scheduler/ are read, text_encoder/ only for prompts the cache does not hold."""
        from wanjax.vae_io import load_vae

        self.s = settings
        self.dir = Path(output_dir) / "validation"
        root = pipeline_root(pipeline, ("vae",))
        # the VAE's config first (one small JSON): sizes this pipeline cannot render are refused before UMT5 runs
        check_video_size(settings, _read_vae_config(root), tuple(getattr(model_config, "patch_size", (1, 2, 2))))
        self.flow_shift = settings.flow_shift if settings.flow_shift is not None else _pipeline_flow_shift(root)
        self.fps = settings.fps or _pipeline_fps(root)
        texts = [t for _, t in settings.prompts] + [settings.negative_prompt]
        emb = prompt_embeddings(texts, cache_dir=cache_dir, pipeline=pipeline, text_len=text_len)
        self.cond, self.uncond = jnp.asarray(emb[:-1]), jnp.asarray(emb[-1:])
        self.vae_config, self.vae_params = load_vae(root, dtype=vae_dtype)
        self.channels = model_config.in_channels
        self.videos: list[Video] = []  # the latest round's

    def _noise(self, i: int, width: int, height: int) -> jax.Array:
        c = self.vae_config
        shape = (1, self.channels, (self.s.frames - 1) // c.temporal_factor + 1, height // c.spatial_factor,
                 width // c.spatial_factor)
        return jax.random.normal(jax.random.fold_in(jax.random.key(self.s.seed), i), shape, jnp.float32)

    def variants(self, has_ema: bool) -> list[bool]:
        """The weights to render: False = trained, True = EMA."""
        if self.s.ema == "none" or not has_ema:
            return [False]
        return [True] if self.s.ema == "ema_only" else [False, True]

    def run(self, step: int, method, state) -> list[Video]:
        from wanjax import video_out
        from wanjax.models.vae import vae_decode

        if method.sample is None:
            return []
        has_ema = getattr(state, "ema", None) is not None
        videos = []
        for ema in self.variants(has_ema):
            for w, h in self.s.sizes:
                for i, (name, prompt) in enumerate(self.s.prompts):
                    noise = self._noise(i, w, h)
                    key = jax.random.fold_in(jax.random.key(self.s.seed + 1), i)
                    latents = method.sample(state, ema, noise, self.cond[i : i + 1], self.uncond, key, self)
                    frames = video_out.to_uint8_frames(vae_decode(self.vae_config, self.vae_params, latents))[0]
                    vkey = video_key(name, ema, (w, h), self.s.sizes)
                    path = self.dir / f"step_{step:06d}_{vkey}.mp4"
                    if jax.process_index() == 0:
                        video_out.write_mp4(path, frames, fps=self.fps)
                    videos.append(Video(vkey, prompt, path))
        self.videos = videos
        if jax.process_index() == 0 and videos:
            with open(self.dir / "videos.jsonl", "a") as f:  # one line per round: step -> files
                f.write(json.dumps({"step": int(step), "files": [v.path.name for v in videos]}) + "\n")
        return videos


def method_sampler_kwargs(v: Validator) -> dict[str, Any]:
    """What a LoRA run's `wanjax.sample` call takes from the validation settings."""
    return {"scheduler": v.s.scheduler, "num_inference_steps": v.s.steps, "guidance_scale": v.s.guidance,
            "flow_shift": v.flow_shift}
