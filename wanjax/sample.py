"""Text-to-video sampling: WanPipeline's denoising loop in JAX, and the `python -m wanjax.sample` command.

`sample(config, params, latents, prompt_embeds, ...)` is `WanPipeline.__call__(..., output_type="latent")` from
given initial latents and prompt embeddings: same timesteps, same scheduler arithmetic (wanjax.schedulers), same
dtypes (latents float32, the transformer input and prompt embeddings in the transformer's dtype, CFG in the
model output's dtype), classifier-free guidance `uncond + g (cond - uncond)` when guidance_scale > 1, and Wan2.2's
two experts (transformer for t >= boundary_ratio * 1000, transformer_2 below). The whole loop is one jitted
`lax.fori_loop`: one compilation per (shapes, step count, scheduler kind, CFG on/off, one or two experts, LoRA
structure); guidance scales, flow_shift and the boundary are traced values. Params may be sharded: nothing here
places arrays on devices.

    python -m wanjax.sample --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --prompt "a cat surfing" --out cat.mp4
    python -m wanjax.sample --tiny --prompt "a red square" --out tmp/x.mp4 --num_inference_steps 2

`wanjax.sample` is both this module and the function: `wanjax.sample(config, params, ...)` calls `sample` (see the
end of the file).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import logging
import os
import sys
import types
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from wanjax import schedulers
from wanjax.model_source import looks_like_repo_id, two_experts
from wanjax.models.config import WanConfig
from wanjax.models.transformer import transformer_forward

logger = logging.getLogger(__name__)

F32 = jnp.float32
NUM_TRAIN_TIMESTEPS = 1000
# Progress callbacks of running `sample` calls, by token: the jitted loop reports (token, step) through
# jax.debug.callback, so a new callback (a fresh tqdm bar) never recompiles the loop.
_PROGRESS: dict[int, Callable[[int], None]] = {}
_TOKENS = itertools.count()


def _report(token, step) -> None:
    fn = _PROGRESS.get(int(token))
    if fn is not None:
        fn(int(step))


def _times(scalar: jax.Array, v: jax.Array) -> jax.Array:
    """torch's `python float * tensor`: computed in float32, rounded to v's dtype."""
    return (scalar.astype(F32) * v.astype(F32)).astype(v.dtype)


def _model_dtype(params: dict):
    return params["patch_embedding"]["kernel"].dtype


@functools.partial(jax.jit, static_argnames=("config", "cfg", "batched_cfg", "two_experts", "with_progress"))
def _denoise(config, params, params_2, lora, lora_2, latents, ctx, neg, scheduler, guidance, guidance_2, boundary,
             token, *, cfg: bool, batched_cfg: bool, two_experts: bool, with_progress: bool):
    dtype = _model_dtype(params)
    ctx = ctx.astype(dtype)
    neg = None if neg is None else neg.astype(dtype)
    timesteps = jnp.asarray(scheduler.timesteps, F32)
    b = latents.shape[0]

    def velocity(p, adapter, g, x_in, t):
        fwd = functools.partial(transformer_forward, config, p, lora=adapter)
        if not cfg:
            return fwd(x_in, t, ctx)
        if batched_cfg:  # cond and uncond in one pass of batch 2B (per sample the same math as two passes)
            v_c, v_u = jnp.split(fwd(jnp.concatenate([x_in, x_in]), jnp.concatenate([t, t]),
                                     jnp.concatenate([ctx, neg])), 2)
        else:
            v_c, v_u = fwd(x_in, t, ctx), fwd(x_in, t, neg)
        return v_u + _times(g, v_c - v_u)  # diffusers: in the model's dtype

    def body(i, carry):
        x, state = carry
        t_i = timesteps[i]
        t = jnp.full((b,), t_i, F32)  # WanPipeline: t.expand(batch)
        x_in = x.astype(dtype)  # latents.to(transformer_dtype)
        if two_experts:
            v = jax.lax.cond(t_i >= boundary,
                             lambda: velocity(params, lora, guidance, x_in, t),
                             lambda: velocity(params_2, lora_2, guidance_2, x_in, t).astype(dtype))
        else:
            v = velocity(params, lora, guidance, x_in, t)
        x, state = scheduler.step(state, v, i, x)
        if with_progress:
            jax.debug.callback(_report, token, i)
        return x.astype(F32), state

    x = latents.astype(F32)
    x, _ = jax.lax.fori_loop(0, timesteps.shape[0], body, (x, scheduler.init_state(x)))
    return x


def sample(
    config: WanConfig,
    params: dict,
    latents: jax.Array,
    prompt_embeds: jax.Array,
    *,
    negative_prompt_embeds: jax.Array | None = None,
    scheduler: str = "unipc",
    num_inference_steps: int = 50,
    guidance_scale: float = 5.0,
    flow_shift: float = 3.0,
    lora: Any = None,
    params_2: dict | None = None,
    lora_2: Any = None,
    boundary_ratio: float | None = None,
    guidance_scale_2: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> jax.Array:
    """Denoise `latents` (B, C, T, h, w) (the initial noise) into clean latents, float32, as WanPipeline does.

    prompt_embeds (B, L, text_dim) from `text_io.encode_prompts`; negative_prompt_embeds (B or 1, L', text_dim):
    CFG runs when guidance_scale > 1 (diffusers' rule) and negatives are given (without them the loop runs the
    conditional model only, with a warning: WanPipeline would encode "" as the negative prompt).
    `scheduler`: "unipc" (WanPipeline's UniPCMultistepScheduler, flow mode, order 2) or "euler"
    (FlowMatchEulerDiscreteScheduler); `flow_shift` is its shift. `lora`: an adapter as `transformer_forward`
    takes it (`LoraWeights`, e.g. from `load_lora`) or None.
    Wan2.2 two experts: `boundary_ratio` with `params_2` (transformer_2, same config) and optionally `lora_2`;
    steps with t >= boundary_ratio * 1000 use params / lora / guidance_scale, the others params_2 / lora_2 /
    guidance_scale_2 (default guidance_scale). `progress(i)` is called on the host after each step i (0-based),
    e.g. a tqdm bar's update; with it, this call blocks until the loop is done.
    """
    if config.image_conditioning:
        raise ValueError(f"this is an image-to-video model ({config.image_conditioning}): wanjax samples "
                         "text-to-video models only (no image conditioning)")
    guidance_scale = float(guidance_scale)
    if boundary_ratio is None:
        if guidance_scale_2 is not None:
            raise ValueError("guidance_scale_2 is only used with boundary_ratio (two experts), as in diffusers")
        if params_2 is not None or lora_2 is not None:
            raise ValueError("params_2 / lora_2 (a second expert) need boundary_ratio to say when to switch")
    else:
        if not 0.0 <= float(boundary_ratio) <= 1.0:
            raise ValueError(f"boundary_ratio={boundary_ratio!r}: expected a number in [0, 1]")
        if params_2 is None:
            raise ValueError("boundary_ratio is set but params_2 (transformer_2) is missing")
    guidance_2 = guidance_scale if guidance_scale_2 is None else float(guidance_scale_2)
    if latents.ndim != 5 or latents.shape[1] != config.in_channels:
        raise ValueError(f"latents have shape {tuple(latents.shape)}; expected (B, {config.in_channels}, T, h, w)")
    b = latents.shape[0]
    if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != b or prompt_embeds.shape[2] != config.text_dim:
        raise ValueError(f"prompt_embeds have shape {tuple(prompt_embeds.shape)}; expected ({b}, L, {config.text_dim})")
    cfg = guidance_scale > 1.0 and negative_prompt_embeds is not None
    if guidance_scale > 1.0 and negative_prompt_embeds is None:
        logger.warning("guidance_scale %s > 1 but no negative_prompt_embeds: sampling without CFG", guidance_scale)
    neg = None
    if cfg:
        neg = negative_prompt_embeds
        if neg.ndim != 3 or neg.shape[0] not in (1, b) or neg.shape[2] != config.text_dim:
            raise ValueError(f"negative_prompt_embeds have shape {tuple(neg.shape)}; "
                             f"expected (1 or {b}, L, {config.text_dim})")
        neg = jnp.broadcast_to(neg, (b, *neg.shape[1:]))
    sched = schedulers.make_scheduler(scheduler, num_inference_steps, flow_shift)
    boundary = np.float32((boundary_ratio or 0.0) * NUM_TRAIN_TIMESTEPS)
    token = next(_TOKENS) if progress is not None else 0
    if progress is not None:
        _PROGRESS[token] = progress
    try:
        out = _denoise(
            config, params, params_2, lora, lora_2, latents, prompt_embeds, neg, sched, np.float32(guidance_scale),
            np.float32(guidance_2), boundary, np.int32(token), cfg=cfg,
            batched_cfg=cfg and neg.shape == prompt_embeds.shape, two_experts=boundary_ratio is not None,
            with_progress=progress is not None,
        )
        if progress is not None:
            out.block_until_ready()
            jax.effects_barrier()  # every host callback has run
    finally:
        _PROGRESS.pop(token, None)
    return out


# =========================================================================================================
# Command line
# =========================================================================================================
PIPELINE_PARTS = ("transformer", "vae", "text_encoder", "tokenizer")
TINY_DEFAULT_SIZE = (32, 48, 9)  # (height, width, frames) for --tiny: 3 latent frames of 4 x 6
DEFAULT_SIZE = (480, 832, 81)  # WanPipeline's defaults


OUT_SUFFIXES = (".mp4",)  # video_out.write_mp4 writes H.264 / MPEG-4 part 2 into an MP4 container
DEFAULT_OUT_NAME = "sample.mp4"  # the file written into an --out folder


class UsageError(ValueError):
    """A bad command-line value: printed as `error: ...`, exit status 2."""


def resolve_out(out: str) -> Path:
    """The video file for `--out`, checked before anything is loaded: a path ending in "/" or an existing folder
    means `<folder>/sample.mp4`; otherwise it must end in .mp4. The parent folder is created (UsageError when that
    fails or it is not writable). An existing file is overwritten."""
    path = Path(out)
    if out.endswith(("/", os.sep)) or path.is_dir():
        path = path / DEFAULT_OUT_NAME
    elif path.suffix.lower() not in OUT_SUFFIXES:
        raise UsageError(f"--out {out}: expected a {' or '.join(OUT_SUFFIXES)} file (or a folder, for "
                         f"<folder>/{DEFAULT_OUT_NAME}); other containers are not supported")
    if path.is_dir():
        raise UsageError(f"--out {out}: {path} is a folder; expected a {' or '.join(OUT_SUFFIXES)} file")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create the folder {parent} ({e.strerror or e})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: the folder {parent} is not writable")
    return path


def check_video_size(height: int, width: int, num_frames: int, *, temporal: int = 4, multiple: int = 16) -> None:
    """UsageError unless num_frames = temporal * k + 1 and height, width are positive multiples of `multiple`
    (the VAE's spatial factor times the transformer's patch: 16 for Wan2.1, 32 for the Wan2.2 VAE)."""
    if num_frames < 1 or (num_frames - 1) % temporal:
        lo = (max(num_frames, 1) - 1) // temporal * temporal + 1
        raise UsageError(f"num_frames={num_frames}: expected {temporal}k+1 frames (e.g. {lo} or {lo + temporal})")
    for name, v in (("height", height), ("width", width)):
        if v < multiple or v % multiple:
            raise UsageError(f"{name}={v}: expected a positive multiple of {multiple}")


def latent_shape(batch: int, channels: int, height: int, width: int, num_frames: int, *, temporal: int = 4,
                 spatial: int = 8) -> tuple[int, int, int, int, int]:
    """WanPipeline.prepare_latents' shape: (B, C, (F - 1) // temporal + 1, H // spatial, W // spatial)."""
    return (batch, channels, (num_frames - 1) // temporal + 1, height // spatial, width // spatial)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m wanjax.sample", description="Text-to-video with a Wan pipeline.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="diffusers Wan pipeline folder (transformer/ vae/ text_encoder/ tokenizer/) "
                                     "or a hub repo id (org/name)")
    src.add_argument("--tiny", action="store_true", help="the embedded tiny random pipeline (offline; built once)")
    p.add_argument("--tiny_dir", default="cache/tiny-wan", help="where --tiny builds/reuses its assets")
    p.add_argument("--lora", help="LoRA file (diffusers/PEFT, original Wan/ComfyUI or musubi) for the transformer")
    p.add_argument("--lora_2", help="LoRA for transformer_2 (Wan2.2 two-expert pipelines)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative_prompt", default="", help='default "" as in WanPipeline')
    p.add_argument("--out", required=True,
                   help=f"output video file ({', '.join(OUT_SUFFIXES)}); a folder (existing, or a path ending in /) "
                        f"gets {DEFAULT_OUT_NAME} inside it. Checked (and its folder created) before loading models")
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=5.0)
    p.add_argument("--guidance_scale_2", type=float, default=None, help="transformer_2's guidance (two experts)")
    p.add_argument("--flow_shift", type=float, default=None,
                   help="default: the pipeline's scheduler_config.json flow_shift (else 3.0)")
    p.add_argument("--scheduler", choices=schedulers.SCHEDULERS, default="unipc")
    p.add_argument("--height", type=int, default=None, help=f"default {DEFAULT_SIZE[0]} ({TINY_DEFAULT_SIZE[0]} with --tiny)")
    p.add_argument("--width", type=int, default=None, help=f"default {DEFAULT_SIZE[1]} ({TINY_DEFAULT_SIZE[1]} with --tiny)")
    p.add_argument("--num_frames", type=int, default=None,
                   help=f"4k+1; default {DEFAULT_SIZE[2]} ({TINY_DEFAULT_SIZE[2]} with --tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="transformer and text encoder dtype; default bfloat16 (float32 with --tiny)")
    p.add_argument("--fps", type=int, default=None,
                   help="frame rate of the .mp4 (default: 24 for a TI2V-5B pipeline, whose model_index.json sets "
                        "expand_timesteps, as its diffusers examples export; else 16)")
    return p


def _resolve_model(model: str) -> Path:
    path = Path(model)
    if not path.exists():
        if not looks_like_repo_id(model):
            raise UsageError(f"--model {model}: no such folder (and not a hub repo id 'org/name')")
        import huggingface_hub as hf

        parts = [*PIPELINE_PARTS, "transformer_2", "scheduler"]
        path = Path(hf.snapshot_download(model, allow_patterns=["model_index.json", *(f"{s}/*" for s in parts)]))
    if not path.is_dir():
        raise UsageError(f"--model {model}: not a folder; expected a diffusers Wan pipeline folder")
    missing = [s for s in PIPELINE_PARTS if not (path / s).is_dir()]
    if missing:
        raise UsageError(f"--model {path}: missing subfolder(s) {', '.join(missing)}; a diffusers Wan pipeline folder "
                         f"has {', '.join(PIPELINE_PARTS)}")
    return path


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("jax").setLevel(logging.WARNING)
    try:
        return _run(args)
    except (UsageError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from wanjax import text_io, tiny, vae_io, video_out
    from wanjax.lora import load_lora
    from wanjax.models.vae import vae_decode
    from wanjax.transformer_io import load_transformer

    height, width, frames = (
        d if v is None else v for v, d in zip((args.height, args.width, args.num_frames),
                                             TINY_DEFAULT_SIZE if args.tiny else DEFAULT_SIZE))
    if args.num_inference_steps < 1:
        raise UsageError(f"--num_inference_steps {args.num_inference_steps}: expected >= 1")
    if args.flow_shift is not None and not args.flow_shift > 0:
        raise UsageError(f"--flow_shift {args.flow_shift}: expected > 0")
    if args.fps is not None and args.fps < 1:
        raise UsageError(f"--fps {args.fps}: expected >= 1")
    for flag in ("lora", "lora_2"):
        if getattr(args, flag) and not Path(getattr(args, flag)).exists():
            raise UsageError(f"--{flag} {getattr(args, flag)}: no such file")
    out_path = resolve_out(args.out)
    model = tiny.ensure_assets(args.tiny_dir) / "pipeline" if args.tiny else _resolve_model(args.model)
    dtype = jnp.dtype(args.dtype or ("float32" if args.tiny else "bfloat16"))

    # Sizes first (cheap): the VAE config says its scale factors, the transformer config its patch.
    vae_cfg_json = _read_json(model / "vae" / "config.json")
    from wanjax.models.vae import VaeConfig

    vae_config = VaeConfig.from_diffusers(vae_cfg_json, source=str(model / "vae" / "config.json"))
    index = _read_json(model / "model_index.json")
    tr_cfg = WanConfig.from_diffusers(_read_json(model / "transformer" / "config.json"),
                                      source=str(model / "transformer" / "config.json"))
    if tr_cfg.image_conditioning:
        raise UsageError(f"{model / 'transformer'}: an image-to-video model ({tr_cfg.image_conditioning}); "
                         "wanjax.sample runs text-to-video pipelines only")
    check_video_size(height, width, frames, temporal=vae_config.temporal_factor,
                     multiple=vae_config.spatial_factor * tr_cfg.patch_size[1])
    boundary_ratio = index.get("boundary_ratio")
    two = two_experts(index)
    if args.guidance_scale_2 is not None and not two:
        raise UsageError("--guidance_scale_2 needs a two-expert pipeline (model_index.json boundary_ratio + "
                         "transformer_2)")
    if args.lora_2 and not two:
        raise UsageError("--lora_2 needs a two-expert pipeline (model_index.json boundary_ratio + transformer_2)")
    # LoRAs before any weights: one for another architecture is a usage error, found in seconds
    loras = {}
    for flag in ("lora", "lora_2"):
        if getattr(args, flag):
            try:
                loras[flag] = load_lora(getattr(args, flag), config=tr_cfg)
            except ValueError as e:
                raise UsageError(f"--{flag}: {e}") from None
    sched_cfg = _read_json(model / "scheduler" / "scheduler_config.json")
    flow_shift = args.flow_shift or schedulers.config_flow_shift(sched_cfg)

    # Models. Several devices: the transformer(s) FSDP-sharded over all of them.
    mesh = None
    if jax.device_count() > 1:
        from wanjax.sharding import make_mesh

        mesh = make_mesh()
    config, params = load_transformer(model, subfolder="transformer", dtype=dtype, mesh=mesh)
    params_2 = None
    if two:
        _, params_2 = load_transformer(model, subfolder="transformer_2", dtype=dtype, mesh=mesh)
    lora, lora_2 = loras.get("lora"), loras.get("lora_2")
    t5_config, t5_params, tokenizer = text_io.load_text_encoder(model, dtype=dtype)
    cfg = args.guidance_scale > 1.0
    embeds = text_io.encode_prompts(t5_config, t5_params, tokenizer, [args.prompt] + [args.negative_prompt] * cfg)
    del t5_params
    prompt_embeds, negative = embeds[:1], (embeds[1:] if cfg else None)

    shape = latent_shape(1, config.in_channels, height, width, frames, temporal=vae_config.temporal_factor,
                         spatial=vae_config.spatial_factor)
    latents = jax.random.normal(jax.random.key(args.seed), shape, F32)
    from wanjax.sharding import use_mesh

    activation_mesh = use_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    with activation_mesh, tqdm(total=args.num_inference_steps, desc="denoising",
                               disable=jax.process_index() != 0) as bar:
        latents = sample(config, params, latents, prompt_embeds, negative_prompt_embeds=negative,
                         scheduler=args.scheduler, num_inference_steps=args.num_inference_steps,
                         guidance_scale=args.guidance_scale, flow_shift=flow_shift, lora=lora, params_2=params_2,
                         lora_2=lora_2, boundary_ratio=boundary_ratio if two else None,
                         guidance_scale_2=args.guidance_scale_2, progress=lambda i: bar.update(1))
    del params, params_2
    # vae_decode un-normalises (z * std + mean with the VAE config's latents_mean / latents_std) as WanPipeline
    # does before vae.decode, then decodes; the output is (B, 3, F, H, W) in [-1, 1].
    vae_config, vae_params = vae_io.load_vae(model)
    video = vae_decode(vae_config, vae_params, latents)
    frames_u8 = video_out.to_uint8_frames(video)[0]
    if jax.process_index() == 0:
        out = video_out.write_mp4(out_path, frames_u8, fps=args.fps or video_out.pipeline_fps(index))
        print(json.dumps({"video": str(out), "frames": int(frames_u8.shape[0]), "height": int(frames_u8.shape[1]),
                          "width": int(frames_u8.shape[2]), "steps": args.num_inference_steps,
                          "scheduler": args.scheduler, "flow_shift": flow_shift}))
    return 0


# `wanjax.sample` is a module (it must be, for `python -m wanjax.sample`) and must also be callable as the
# sampling function (`wanjax.sample(config, params, ...)`): Python looks `__call__` up on the module's class, so
# the module object gets a ModuleType subclass whose __call__ forwards to `sample`.
class _CallableModule(types.ModuleType):
    __call__ = staticmethod(lambda *a, **k: sample(*a, **k))


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
