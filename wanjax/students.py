"""Few-step student samplers over the Wan transformer (pure JAX; jit-able, one compile per step count).

`renoise_sample`: the DMD student. x = noise; per step i: x0 = x - sigma_i v(x, 1000 sigma_i); last step returns
x0, otherwise x = (1 - sigma_{i+1}) x0 + sigma_{i+1} eps_i (diffusers' FlowMatchEulerDiscreteScheduler with
`stochastic_sampling=True`).
`euler_sample`: the DCM student. Euler x <- x + (sigma_next - sigma) v over the step sigmas, then to 0
(`stochastic_sampling=False`); optionally a second adapter (DCM's detail expert) for the steps that start at
sigma <= switch_sigma (the trainer's rule, `losses.dcm.dcm_student_experts`), or for the steps a per-step expert
list (the run's meta `student.experts`, e.g. ["semantic", "semantic", "detail", "detail"]) names "detail".

`sigmas` are the N model-evaluation sigmas, descending in (0, 1], as diffusers' `set_timesteps(sigmas=...)` takes
them; the terminal 0 is implied (a concrete grid that ends in 0, as the spec writes DCM's, has it dropped). The
loops are unrolled over N, so sigmas may be traced (jit them as an argument: one compile per N).
The transformer sees t = 1000 sigma (float32), as in training. Latents are float32 throughout.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from wanjax.losses.dmd import Denoiser, renoise, x0_from_velocity
from wanjax.models.config import WanConfig
from wanjax.models.transformer import transformer_forward

F32 = jnp.float32


def step_sigmas(sigmas) -> jax.Array | np.ndarray:
    """The N step sigmas. Concrete input: float32 numpy, a trailing 0 dropped, checked strictly descending in
    (0, 1]. Traced input is returned as is (it must already hold the N step sigmas, no terminal 0)."""
    if isinstance(sigmas, jax.core.Tracer):
        return sigmas
    s = np.asarray(sigmas, np.float32).reshape(-1)
    if s.size > 1 and s[-1] == 0:
        s = s[:-1]
    if s.size == 0 or s[0] > 1 or s[-1] <= 0 or np.any(np.diff(s) >= 0):
        raise ValueError(f"student sigmas {np.asarray(sigmas).tolist()}: expected strictly descending in (0, 1]")
    return s


def _sigma_vec(sigmas, i: int, batch: int) -> jax.Array:
    return jnp.full((batch,), sigmas[i], F32)


def renoise_loop(
    denoise: Denoiser,
    adapter: Any,
    noise: jax.Array,
    context: Any,
    sigmas,
    rng: jax.Array | None = None,
    noises: jax.Array | Sequence[jax.Array] | None = None,
) -> jax.Array:
    """The DMD student loop over any `denoise(adapter, x, sigma (B,), context) -> v`. eps_i = noises[i] (i < N-1;
    a further entry, as diffusers draws N, is ignored), else normal(fold_in(rng, i)) as `dmd.student_sample`."""
    sigmas = step_sigmas(sigmas)
    n = sigmas.shape[0]
    if noises is None and rng is None and n > 1:
        raise ValueError("renoise sampling needs `rng` or `noises` (one per step but the last)")
    if noises is not None and len(noises) < n - 1:
        raise ValueError(f"{len(noises)} noises for {n} steps: need at least {n - 1}")
    x = noise.astype(F32)
    b = x.shape[0]
    for i in range(n):
        s = _sigma_vec(sigmas, i, b)
        x0 = x0_from_velocity(x, s, denoise(adapter, x, s, context).astype(F32))
        if i == n - 1:
            return x0
        if noises is not None:
            eps = jnp.asarray(noises[i], F32).reshape(x.shape)
        else:
            eps = jax.random.normal(jax.random.fold_in(rng, i), x.shape, F32)
        x = renoise(x0, eps, _sigma_vec(sigmas, i + 1, b))
    return x


def check_experts(experts: Sequence[str] | None, n: int) -> list[str] | None:
    """A per-step expert list (the run's meta `student.experts`) for `n` student steps, checked: n entries, each
    "semantic" or "detail" (ValueError otherwise). None stays None."""
    if experts is None:
        return None
    experts = [str(e) for e in experts]
    if len(experts) != n or not set(experts) <= {"semantic", "detail"}:
        raise ValueError(f"experts={experts}: expected {n} entries, each 'semantic' or 'detail'")
    return experts


def euler_loop(
    denoise: Denoiser,
    adapter: Any,
    noise: jax.Array,
    context: Any,
    sigmas,
    adapter_switch: Any = None,
    switch_sigma: float | None = None,
    experts: Sequence[str] | None = None,
) -> jax.Array:
    """Euler from noise: x <- x + (sigma_{i+1} - sigma_i) v, sigma_N = 0. With `adapter_switch` (the detail
    expert): step i uses it when `experts[i] == "detail"` (the per-step list of the run's meta, which wins when
    given), else when sigma_i <= switch_sigma (as the trainer assigns steps; a `lax.cond` when the sigmas are
    traced); the other steps use `adapter`."""
    if adapter_switch is None and (switch_sigma is not None or (experts is not None and "detail" in experts)):
        raise ValueError("switch_sigma / a 'detail' expert step needs a second adapter (adapter_switch)")
    if adapter_switch is not None and switch_sigma is None and experts is None:
        raise ValueError("a second adapter needs switch_sigma or the per-step experts list")
    sigmas = step_sigmas(sigmas)
    n = sigmas.shape[0]
    experts = check_experts(experts, n)
    x = noise.astype(F32)
    b = x.shape[0]
    for i in range(n):
        s = _sigma_vec(sigmas, i, b)
        if adapter_switch is None:
            v = denoise(adapter, x, s, context)
        elif experts is not None:
            v = denoise(adapter_switch if experts[i] == "detail" else adapter, x, s, context)
        elif isinstance(sigmas, np.ndarray):
            v = denoise(adapter_switch if sigmas[i] <= switch_sigma else adapter, x, s, context)
        else:
            v = jax.lax.cond(sigmas[i] <= switch_sigma,
                             lambda x, s: denoise(adapter_switch, x, s, context).astype(F32),
                             lambda x, s: denoise(adapter, x, s, context).astype(F32), x, s)
        nxt = sigmas[i + 1] if i + 1 < n else 0.0
        x = x + (jnp.asarray(nxt, F32) - jnp.asarray(sigmas[i], F32)) * v.astype(F32)
    return x


def transformer_denoiser(
    config: WanConfig,
    params: dict,
    *,
    negative_prompt_embeds: jax.Array | None = None,
    guidance_scale: float = 1.0,
) -> Denoiser:
    """`denoise(lora, x, sigma, prompt_embeds)`: the transformer at t = 1000 sigma; with guidance_scale > 1 (as
    diffusers: CFG only above 1) v_u + g (v_c - v_u), both halves in one batched pass."""
    cfg = guidance_scale > 1.0
    if cfg and negative_prompt_embeds is None:
        raise ValueError("guidance_scale > 1 needs negative_prompt_embeds")

    def denoise(lora, x, sigma, ctx):
        t = 1000.0 * sigma.astype(F32)
        if not cfg:
            return transformer_forward(config, params, x, t, ctx, lora=lora).astype(F32)
        neg = jnp.broadcast_to(negative_prompt_embeds, ctx.shape[:1] + negative_prompt_embeds.shape[-2:])
        if neg.shape != ctx.shape:
            raise ValueError(f"negative_prompt_embeds {neg.shape} must match prompt_embeds {ctx.shape}")
        xx = jnp.concatenate([x, x])  # the model casts to its weights' dtype, as diffusers does
        v = transformer_forward(config, params, xx, jnp.concatenate([t, t]), jnp.concatenate([ctx, neg]),
                                lora=lora).astype(F32)
        v_c, v_u = jnp.split(v, 2)
        return v_u + guidance_scale * (v_c - v_u)

    return denoise


def renoise_sample(
    config: WanConfig,
    params: dict,
    noise: jax.Array,
    prompt_embeds: jax.Array,
    sigmas,
    rng: jax.Array | None = None,
    *,
    lora: Any = None,
    negative_prompt_embeds: jax.Array | None = None,
    guidance_scale: float = 1.0,
    noises: jax.Array | Sequence[jax.Array] | None = None,
) -> jax.Array:
    """DMD student sample (float32 latents, shape of `noise`). `noises[i]` (shape of `noise`) re-noises to
    sigma_{i+1}; without it, eps_i = normal(fold_in(rng, i))."""
    denoise = transformer_denoiser(config, params, negative_prompt_embeds=negative_prompt_embeds,
                                   guidance_scale=guidance_scale)
    return renoise_loop(denoise, lora, noise, prompt_embeds, sigmas, rng, noises)


def euler_sample(
    config: WanConfig,
    params: dict,
    noise: jax.Array,
    prompt_embeds: jax.Array,
    sigmas,
    *,
    lora: Any = None,
    lora_switch: Any = None,
    switch_sigma: float | None = None,
    experts: Sequence[str] | None = None,
    negative_prompt_embeds: jax.Array | None = None,
    guidance_scale: float = 1.0,
) -> jax.Array:
    """DCM student sample (float32 latents): Euler over `sigmas` then to 0; `lora_switch` (the detail expert) for
    the steps `experts` (meta `student.experts`) names "detail", else for the steps at sigma <= switch_sigma."""
    denoise = transformer_denoiser(config, params, negative_prompt_embeds=negative_prompt_embeds,
                                   guidance_scale=guidance_scale)
    return euler_loop(denoise, lora, noise, prompt_embeds, sigmas, lora_switch, switch_sigma, experts)
