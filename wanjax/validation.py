"""Validation videos during training: sample each validation prompt with the method's own sampler, decode with
the JAX VAE, write `output_dir/validation/step_<N>_<name>[_ema][_<W>x<H>].mp4` and log them to wandb.

SimpleTuner's keys: `validation_step_interval` (0 = off), `validation_prompt`, `validation_negative_prompt`
(CFG's unconditional prompt; "" when unset, as WanPipeline does), `validation_prompt_library` (JSON
{nickname: prompt} or {nickname: {"prompt": ...}}), `validation_guidance`, `validation_num_inference_steps`,
`validation_num_video_frames`, `validation_resolution` ("WxH", an int for square, or a comma-separated list),
`validation_seed`, `ema_validation` ("none": trained weights; "ema_only": the EMA weights when kept;
"comparison": both). wanjax's: `validation_scheduler` ("unipc" | "euler", LoRA runs), `validation_flow_shift`
(None: the pipeline's scheduler_config), `validation_fps`.

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
import json
import logging
import re
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
    fps: int


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "prompt"


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


def prompt_library(path: str) -> dict[str, str]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValidationConfigError(f"validation_prompt_library={path!r}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise ValidationConfigError(f"validation_prompt_library={path!r}: expected an object {{nickname: prompt}}")
    out = {}
    for name, v in data.items():
        text = v.get("prompt") if isinstance(v, dict) else v
        if not isinstance(text, str) or not text.strip():
            raise ValidationConfigError(f"validation_prompt_library={path!r}: entry {name!r} has no prompt text")
        out[str(name)] = text
    return out


def settings_from_config(config) -> ValidationSettings | None:
    """The validation settings, checked (ValidationConfigError names the key); None when validation is off."""
    interval = int(config.validation_step_interval or 0)
    if interval <= 0:
        return None
    prompts: list[tuple[str, str]] = []
    if config.validation_prompt:
        prompts.append(("validation", str(config.validation_prompt)))
    lib = config.validation_prompt_library
    if lib and str(lib).lower() not in ("false", "none", "true"):
        prompts += [(_safe_name(k), v) for k, v in prompt_library(str(lib)).items()]
    if not prompts:
        raise ValidationConfigError(f"validation_step_interval={interval} but there is no validation_prompt or "
                                    "validation_prompt_library: nothing to validate")
    names = [n for n, _ in prompts]
    if len(set(names)) != len(names):
        raise ValidationConfigError(f"validation prompt nicknames {names} collide after making them file-safe")
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
        if w % 16 or h % 16:
            raise ValidationConfigError(f"validation_resolution {w}x{h}: width and height must be multiples of 16 "
                                        "(the VAE's 8x downsampling times the 2x2 patch)")
    steps = int(config.validation_num_inference_steps)
    if steps < 1:
        raise ValidationConfigError(f"validation_num_inference_steps={steps}: expected >= 1")
    if config.validation_scheduler not in ("unipc", "euler"):
        raise ValidationConfigError(f"validation_scheduler={config.validation_scheduler!r}: expected unipc | euler")
    shift = config.validation_flow_shift
    if shift is not None and not float(shift) > 0:
        raise ValidationConfigError(f"validation_flow_shift={shift}: expected > 0")
    return ValidationSettings(
        interval=interval, prompts=tuple(prompts), negative_prompt=str(config.validation_negative_prompt or ""),
        guidance=float(config.validation_guidance), steps=steps, sizes=sizes, frames=frames,
        seed=int(config.validation_seed if config.validation_seed is not None else config.seed), ema=ema,
        scheduler=str(config.validation_scheduler), flow_shift=None if shift is None else float(shift),
        fps=int(config.validation_fps))


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


def _pipeline_flow_shift(pipeline: Path) -> float:
    from wanjax.schedulers import DEFAULT_FLOW_SHIFT, config_flow_shift

    try:
        return config_flow_shift(json.loads((pipeline / "scheduler" / "scheduler_config.json").read_text()))
    except (OSError, ValueError):
        return DEFAULT_FLOW_SHIFT


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
        self.flow_shift = settings.flow_shift if settings.flow_shift is not None else _pipeline_flow_shift(root)
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
                    video_key = name + ("_ema" if ema else "") + (f"_{w}x{h}" if len(self.s.sizes) > 1 else "")
                    path = self.dir / f"step_{step:06d}_{video_key}.mp4"
                    if jax.process_index() == 0:
                        video_out.write_mp4(path, frames, fps=self.s.fps)
                    videos.append(Video(video_key, prompt, path))
        self.videos = videos
        if jax.process_index() == 0 and videos:
            with open(self.dir / "videos.jsonl", "a") as f:  # one line per round: step -> files
                f.write(json.dumps({"step": int(step), "files": [v.path.name for v in videos]}) + "\n")
        return videos


def method_sampler_kwargs(v: Validator) -> dict[str, Any]:
    """What a LoRA run's `wanjax.sample` call takes from the validation settings."""
    return {"scheduler": v.s.scheduler, "num_inference_steps": v.s.steps, "guidance_scale": v.s.guidance,
            "flow_shift": v.flow_shift}
