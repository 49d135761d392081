#!/usr/bin/env python
"""Run an exported wanjax few-step student (a diffusers-format LoRA) in diffusers' WanPipeline.

`WanPipeline.__call__` only calls `scheduler.set_timesteps(num_inference_steps)`, and
`FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...)` shifts custom sigmas by its `shift`, so the student's
sigmas are installed by `FixedSigmasScheduler`: shift 1 (exact for float32 sigmas), no dynamic shifting, its
`set_timesteps` ignores what the pipeline passes except N (which must equal the number of student steps).
  dmd: stochastic_sampling=True: x0 = x - sigma v; x = (1 - sigma_next) x0 + sigma_next noise (last step: x0).
  dcm: stochastic_sampling=False: Euler x + (sigma_next - sigma) v, sigma_next = 0 after the last step.
Per-step noise of the dmd student: diffusers' `step` draws `randn_tensor(sample.shape, generator)`, and the pipeline
passes no generator to `step`. The scheduler here uses `step_noises[i]` when given (wanjax's `noises=`), else its
own torch generator. With `--seed S` the CLI draws everything from one CPU `torch.Generator().manual_seed(S)`:
draw 0 is the initial latents, draw i + 1 the noise of step i (`torch_noises` gives the same draws to wanjax).

  python scripts/run_student_diffusers.py --model PIPELINE_DIR --lora student.safetensors --kind dmd \
      --sigmas 1.0,0.94,0.85 --prompt "a cat" --out latents.npy      # or video.mp4 (needs the pipeline's VAE)

DCM dual experts (`--lora-switch detail_expert_lora_weights.safetensors`): the detail expert runs the steps the
run's meta `student.experts` names "detail" (`--experts semantic,semantic,detail,detail`), else the steps that
start at sigma <= `--switch-sigma` (the trainer's rule). Videos are written with wanjax.video_out (PyAV), `--fps`
(16; Wan2.2 TI2V-5B: 24).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Sequence

import numpy as np
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

_SCHEDULER_MODULE = sys.modules[FlowMatchEulerDiscreteScheduler.__module__]


def parse_sigmas(sigmas: str | Sequence[float]) -> list[float]:
    """The N step sigmas (float32 values), strictly descending in (0, 1]; a trailing 0 is dropped."""
    if isinstance(sigmas, str):
        sigmas = [float(s) for s in sigmas.replace(" ", "").split(",") if s]
    s = np.asarray(sigmas, np.float32).reshape(-1)
    if s.size > 1 and s[-1] == 0:
        s = s[:-1]
    if s.size == 0 or s[0] > 1 or s[-1] <= 0 or np.any(np.diff(s) >= 0):
        raise ValueError(f"student sigmas {list(sigmas)}: expected strictly descending in (0, 1]")
    return [float(x) for x in s]


@contextlib.contextmanager
def _given_randn(noise: torch.Tensor):
    """Within the block, the scheduler module's `randn_tensor` returns `noise` (shape-checked)."""
    original = _SCHEDULER_MODULE.randn_tensor

    def fixed(shape, generator=None, device=None, dtype=None, layout=None):
        if tuple(shape) != tuple(noise.shape):
            raise ValueError(f"step noise has shape {tuple(noise.shape)}, the scheduler needs {tuple(shape)}")
        return noise.to(device=device, dtype=dtype)

    _SCHEDULER_MODULE.randn_tensor = fixed
    try:
        yield
    finally:
        _SCHEDULER_MODULE.randn_tensor = original


class FixedSigmasScheduler(FlowMatchEulerDiscreteScheduler):
    """FlowMatchEulerDiscreteScheduler that always runs the student's sigmas (see the module docstring)."""

    student_sigmas: list[float]
    step_noises: torch.Tensor | None = None  # (N - 1 or N, *latents.shape): noise of step i (the last is unused)
    noise_generator: torch.Generator | None = None

    @classmethod
    def for_student(cls, sigmas: str | Sequence[float], *, stochastic: bool, step_noises=None,
                    generator: torch.Generator | None = None) -> "FixedSigmasScheduler":
        sched = cls(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, stochastic_sampling=stochastic)
        sched.student_sigmas = parse_sigmas(sigmas)
        if step_noises is not None:
            sched.step_noises = torch.as_tensor(np.asarray(step_noises, np.float32))
        sched.noise_generator = generator
        return sched

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, **kwargs) -> None:
        if any(kwargs.get(k) is not None for k in ("sigmas", "timesteps", "mu")):
            raise ValueError(f"FixedSigmasScheduler runs its own sigmas; got {sorted(kwargs)}")
        n = len(self.student_sigmas)
        if num_inference_steps not in (None, n):
            raise ValueError(f"num_inference_steps={num_inference_steps}, but the student has {n} steps")
        super().set_timesteps(sigmas=self.student_sigmas, device=device)
        want = torch.tensor(self.student_sigmas + [0.0], dtype=torch.float32)
        if not torch.equal(self.sigmas.cpu(), want):  # guard: no shift / stretch / karras may touch them
            raise RuntimeError(f"diffusers changed the student sigmas: {self.sigmas.tolist()} != {want.tolist()}")

    def step(self, model_output, timestep, sample, *args, **kwargs):
        if not self.config.stochastic_sampling:
            return super().step(model_output, timestep, sample, *args, **kwargs)
        if self.step_noises is None:
            if kwargs.get("generator") is None and self.noise_generator is not None:
                kwargs["generator"] = self.noise_generator
            return super().step(model_output, timestep, sample, *args, **kwargs)
        if self.step_index is None:
            self._init_step_index(timestep)
        i = self.step_index
        if i < len(self.step_noises):
            noise = self.step_noises[i]
        elif float(self.sigmas[i + 1]) == 0.0:
            noise = torch.zeros(sample.shape)  # the last step: (1 - 0) x0 + 0 * noise
        else:
            raise ValueError(f"no step noise for step {i} (have {len(self.step_noises)})")
        with _given_randn(noise):
            return super().step(model_output, timestep, sample, *args, **kwargs)


def torch_noises(seed: int, shape: Sequence[int], count: int) -> np.ndarray:
    """`count` successive `torch.randn(shape)` draws of a CPU `torch.Generator().manual_seed(seed)`, as
    diffusers' `randn_tensor` makes them (float32); stacked (count, *shape)."""
    g = torch.Generator().manual_seed(seed)
    return np.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32).numpy() for _ in range(count)])


def load_student(pipe: WanPipeline, lora: str, lora_switch: str | None = None) -> tuple[str, str | None]:
    """Load the student LoRA (and the second expert's) into `pipe.transformer`; returns the adapter names."""
    if getattr(pipe, "transformer_2", None) is not None:
        raise ValueError("two-transformer (Wan2.2 A14B) pipelines are not supported: a student adapts one base")
    pipe.load_lora_weights(lora, adapter_name="student")
    if lora_switch is None:
        return "student", None
    pipe.load_lora_weights(lora_switch, adapter_name="student_switch")
    return "student", "student_switch"


def run_student(
    pipe: WanPipeline,
    *,
    kind: str,
    sigmas: str | Sequence[float],
    latents: torch.Tensor | np.ndarray,
    prompt: str | list[str] | None = None,
    prompt_embeds: torch.Tensor | np.ndarray | None = None,
    step_noises=None,
    generator: torch.Generator | None = None,
    adapters: tuple[str, str] | None = None,
    switch_sigma: float | None = None,
    experts: Sequence[str] | None = None,
    output_type: str = "latent",
):
    """Run the student: kind "dmd" (re-noising) or "dcm" (Euler) over `sigmas`, from `latents` (B, C, F, H, W),
    without CFG. dmd noise: `step_noises` (N - 1 or N, *latents.shape), else `generator`, else torch's global RNG.
    Dual experts: `adapters=(first, second)` (loaded names); the second (detail) runs the steps `experts` (the
    run's meta `student.experts`) names "detail", else those with sigma <= switch_sigma (as the trainer).
    Returns what the pipeline returns for `output_type` ("latent": the float32 latents tensor)."""
    if kind not in ("dmd", "dcm"):
        raise ValueError(f"kind={kind!r}: expected 'dmd' or 'dcm'")
    if (adapters is None) != (switch_sigma is None and experts is None):
        raise ValueError("dual experts need both adapters=(first, second) and switch_sigma or experts")
    sig = parse_sigmas(sigmas)
    if experts is not None:
        from wanjax.students import check_experts

        experts = check_experts(experts, len(sig))
    pipe.scheduler = FixedSigmasScheduler.for_student(sig, stochastic=kind == "dmd", step_noises=step_noises,
                                                      generator=generator)
    latents = torch.as_tensor(np.asarray(latents, np.float32)) if isinstance(latents, np.ndarray) else latents
    if isinstance(prompt_embeds, np.ndarray):
        prompt_embeds = torch.from_numpy(np.asarray(prompt_embeds, np.float32))
    _, _, f, h, w = latents.shape
    callback = None
    if adapters is not None:
        def expert(i: int) -> str:
            detail = experts[i] == "detail" if experts is not None else sig[i] <= switch_sigma
            return adapters[1] if detail else adapters[0]

        def callback(pipeline, i, t, kw):  # after step i: the adapter for step i + 1
            if i + 1 < len(sig):
                pipeline.set_adapters(expert(i + 1))
            return {}

        pipe.set_adapters(expert(0))
    with torch.no_grad():
        return pipe(
            prompt=prompt, prompt_embeds=prompt_embeds, num_frames=(f - 1) * pipe.vae_scale_factor_temporal + 1,
            height=h * pipe.vae_scale_factor_spatial, width=w * pipe.vae_scale_factor_spatial,
            num_inference_steps=len(sig), guidance_scale=1.0, latents=latents, output_type=output_type,
            callback_on_step_end=callback, return_dict=False,
        )[0]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="diffusers Wan pipeline folder (or hub id)")
    p.add_argument("--lora", required=True, help="the student LoRA (diffusers format)")
    p.add_argument("--kind", required=True, choices=("dmd", "dcm"))
    p.add_argument("--sigmas", required=True, help='the student step sigmas, e.g. "1.0,0.94,0.85"')
    p.add_argument("--lora-switch", help="dcm dual experts: the detail expert's LoRA (steps at sigma <= "
                                          "--switch-sigma, or those --experts names 'detail')")
    p.add_argument("--switch-sigma", type=float, help="the run's meta student.switch_sigma")
    p.add_argument("--experts", help="the run's meta student.experts, e.g. semantic,semantic,detail,detail "
                                     "(wins over --switch-sigma)")
    p.add_argument("--prompt", default="")
    p.add_argument("--prompt-embeds", help=".npy (B, L, text_dim) text embeddings instead of --prompt")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--seed", type=int, default=0, help="initial latents = draw 0, step i noise = draw i + 1")
    p.add_argument("--noise", help=".npy initial latents (B, C, F, H, W), e.g. the ones wanjax sampled from")
    p.add_argument("--step-noises", help=".npy (N - 1 or N, B, C, F, H, W) dmd step noises (wanjax's noises=)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True, help=".npy (latents) or .mp4 (decoded video)")
    p.add_argument("--fps", type=int, default=None,
                   help="frame rate of an .mp4 (default: the pipeline's, 24 for Wan2.2 TI2V-5B, else 16)")
    a = p.parse_args(argv)
    if (a.lora_switch is None) != (a.switch_sigma is None and a.experts is None):
        p.error("--lora-switch goes with --switch-sigma and/or --experts")
    if not a.out.endswith((".npy", ".mp4")):
        p.error(f"--out {a.out}: expected a .npy (latents) or .mp4 (video) file")
    if a.fps is not None and a.fps < 1:
        p.error(f"--fps {a.fps}: expected >= 1")
    experts = [e for e in a.experts.replace(" ", "").split(",") if e] if a.experts else None

    skip = {}  # components this run does not need are not loaded
    if a.prompt_embeds:
        skip.update(tokenizer=None, text_encoder=None)
    if a.out.endswith(".npy"):
        skip.update(vae=None)
    pipe = WanPipeline.from_pretrained(a.model, torch_dtype=getattr(torch, a.dtype), **skip).to(a.device)
    if "vae" in skip:  # the latent shape still follows the VAE's compression (16x spatial for Wan2.2 TI2V-5B)
        try:
            vae = AutoencoderKLWan.load_config(a.model, subfolder="vae")
            pipe.vae_scale_factor_temporal = vae.get("scale_factor_temporal", 4)
            pipe.vae_scale_factor_spatial = vae.get("scale_factor_spatial", 8)
        except OSError:
            pass  # no VAE in the folder: WanPipeline's defaults (4, 8)
    first, second = load_student(pipe, a.lora, a.lora_switch)
    embeds = torch.from_numpy(np.load(a.prompt_embeds).astype(np.float32)).to(a.device) if a.prompt_embeds else None
    g = torch.Generator().manual_seed(a.seed)
    if a.noise:
        latents = torch.from_numpy(np.load(a.noise).astype(np.float32))
    else:
        batch = 1 if embeds is None else embeds.shape[0]
        shape = (batch, pipe.transformer.config.in_channels, (a.frames - 1) // pipe.vae_scale_factor_temporal + 1,
                 a.height // pipe.vae_scale_factor_spatial, a.width // pipe.vae_scale_factor_spatial)
        latents = torch.randn(shape, generator=g, dtype=torch.float32)
    out = run_student(
        pipe, kind=a.kind, sigmas=a.sigmas, latents=latents.to(a.device),
        prompt=None if embeds is not None else a.prompt, prompt_embeds=embeds,
        step_noises=np.load(a.step_noises) if a.step_noises else None, generator=g,
        adapters=(first, second) if second else None, switch_sigma=a.switch_sigma, experts=experts,
        output_type="latent" if a.out.endswith(".npy") else "np",
    )
    if a.out.endswith(".npy"):
        np.save(a.out, out.float().cpu().numpy())
    else:  # "np": (B, F, H, W, 3) floats in [0, 1]; rounded to uint8 as diffusers' PIL path does
        from wanjax import video_out

        frames = np.round(np.clip(np.asarray(out[0], np.float32), 0.0, 1.0) * 255).astype(np.uint8)
        video_out.write_mp4(a.out, frames, fps=a.fps or video_out.pipeline_fps(dict(pipe.config)))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
