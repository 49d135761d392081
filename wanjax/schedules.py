"""Flow-matching sigma / timestep math: shift, training-time sigma sampling, and the sampling schedules.

Conventions (see the flow-matching spec): sigma in [0, 1], timestep t = 1000 * sigma, x_t = (1 - sigma) x0 + sigma eps,
the model predicts the velocity v = eps - x0. The sampling schedules reproduce diffusers' schedulers exactly (same
dtypes, same rounding), so a LoRA trained here samples the same way in diffusers.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
Sampler = Literal["logit_normal", "uniform", "beta"]
SAMPLERS: tuple[str, ...] = ("logit_normal", "uniform", "beta")


def shift_sigma(sigma, shift: float):
    """s(u) = S u / (1 + (S - 1) u): moves mass towards high noise for S > 1. Works on floats, numpy and jax arrays."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def auto_shift(
    seq_len: int,
    *,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Resolution-dependent shift S = exp(mu), mu linear in the token count (diffusers' `calculate_shift`).

    mu = seq_len * m + b with m = (max_shift - base_shift) / (max_seq_len - base_seq_len), b = base_shift - m *
    base_seq_len. Like diffusers there is no clamp: token counts past `max_seq_len` extrapolate linearly (a 480x832x81
    video, 32,760 tokens, gives S ~ 404). exp(mu) used as a plain shift is the same map as diffusers'
    `FlowMatchEulerDiscreteScheduler._time_shift_exponential(mu, 1.0, t)` (= e^mu / (e^mu + 1/t - 1)), and it is how
    SimpleTuner applies `flow_schedule_auto_shift`. The caller chooses `seq_len`: the spec counts tokens as
    F * (H/2) * (W/2) of the latent; SimpleTuner uses (H * W) // 4 of the latent's last two axes, i.e. one frame.
    """
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return math.exp(seq_len * m + b)


def _resolve_shift(shift: float | None, use_auto: bool, seq_len: int | None) -> float | None:
    # SimpleTuner's precedence (apply_flow_schedule_shift): a static shift > 0 wins; auto only without one.
    if shift is not None and shift > 0:
        return float(shift)
    if use_auto:
        if seq_len is None:
            raise ValueError("auto_shift=True needs seq_len (the latent token count)")
        return auto_shift(seq_len)
    return None


def sample_sigmas(
    rng: jax.Array,
    batch: int,
    *,
    sampler: Sampler = "logit_normal",
    shift: float | None = 3.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    beta_alpha: float = 2.0,
    beta_beta: float = 2.0,
    seq_len: int | None = None,
    auto_shift: bool = False,
) -> jax.Array:
    """Training sigmas, shape (batch,) float32, SimpleTuner's samplers then the shift.

    - "logit_normal" (SimpleTuner's default "sigmoid" schedule): sigmoid(logit_mean + logit_std * n), n ~ N(0, 1);
      `logit_std` is SimpleTuner's `flow_sigmoid_scale` (default 1.0); SimpleTuner has no mean (0.0 here).
    - "uniform" (`flow_use_uniform_schedule`): U[0, 1).
    - "beta" (`flow_use_beta_schedule`): Beta(`flow_beta_schedule_alpha`, `flow_beta_schedule_beta`), defaults 2, 2.
    Then s(sigma) with S = `shift` (`flow_schedule_shift`, SimpleTuner default 3.0) when it is > 0; with shift None or
    <= 0 and `auto_shift`, S = auto_shift(seq_len) (`flow_schedule_auto_shift`); otherwise no shift. The shift maps
    [0, 1] onto itself; values lie in (0, 1) up to float32 rounding at the ends. All options are static: jit with
    `functools.partial` (only `rng` traced).
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if sampler == "logit_normal":
        n = jax.random.normal(rng, (batch,), jnp.float32)
        sigma = jax.nn.sigmoid(logit_mean + logit_std * n)
    elif sampler == "uniform":
        sigma = jax.random.uniform(rng, (batch,), jnp.float32)
    elif sampler == "beta":
        sigma = jax.random.beta(rng, beta_alpha, beta_beta, (batch,), jnp.float32)
    else:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
    s = _resolve_shift(shift, auto_shift, seq_len)
    if s is not None:
        sigma = shift_sigma(sigma, jnp.float32(s))
    return sigma.astype(jnp.float32)


def _torch_f32_shift(sigma: np.ndarray, shift: float) -> np.ndarray:
    # torch evaluates `shift * t / (1 + (shift - 1) * t)` on a float32 tensor with Python scalars cast to float32.
    sigma = sigma.astype(np.float32)
    return (np.float32(shift) * sigma) / (np.float32(1.0) + np.float32(shift - 1) * sigma)


def euler_schedule(num_steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """FlowMatchEulerDiscreteScheduler(shift=S).set_timesteps(N): (timesteps (N,) float32, sigmas (N+1,) float32).

    sigma_min = s(1/1000) computed in float32 as the scheduler's __init__ does; t = linspace(1000, 1000 sigma_min, N)
    in float64; sigma = s(t / 1000) (the shift is applied a second time, as in diffusers), cast to float32;
    timesteps = float32 sigma * 1000; sigmas gets a trailing 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    train_t = np.linspace(1, NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS, dtype=np.float32)[::-1]
    train_sigmas = _torch_f32_shift(train_t / np.float32(NUM_TRAIN_TIMESTEPS), shift)
    sigma_min, sigma_max = float(train_sigmas[-1]), float(train_sigmas[0])
    t = np.linspace(sigma_max * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, num_steps)
    sigmas = shift_sigma(t / NUM_TRAIN_TIMESTEPS, float(shift)).astype(np.float32)
    timesteps = sigmas * np.float32(NUM_TRAIN_TIMESTEPS)
    return timesteps, np.concatenate([sigmas, np.zeros(1, np.float32)])


def unipc_schedule(num_steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=S).set_timesteps(N).

    Returns (timesteps (N,) int64, sigmas (N+1,) float32): sigma = s(linspace(1, 1/1000, N + 1)[:-1]) in float64, the
    first nudged to 1 - 1e-6 when within 1e-6 of 1, timesteps = int64(sigma * 1000) (truncation), final sigma 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sigmas = np.linspace(1, 1 / NUM_TRAIN_TIMESTEPS, num_steps + 1)[:-1]
    sigmas = shift_sigma(sigmas, float(shift))
    if np.fabs(sigmas[0] - 1) < 1e-6:
        sigmas[0] -= 1e-6
    timesteps = (sigmas * NUM_TRAIN_TIMESTEPS).astype(np.int64)
    return timesteps, np.concatenate([sigmas, [0.0]]).astype(np.float32)


def _bcast(sigma, ndim: int) -> jax.Array:
    sigma = jnp.asarray(sigma)
    if sigma.ndim == 0:
        return sigma
    if sigma.ndim != 1:
        raise ValueError(f"sigma must be a scalar or (B,), got shape {sigma.shape}")
    return sigma.reshape((-1,) + (1,) * (ndim - 1))


def add_noise(x0: jax.Array, noise: jax.Array, sigma) -> jax.Array:
    """x_t = (1 - sigma) x0 + sigma noise; sigma scalar or (B,), broadcast over (B, C, F, H, W)."""
    s = _bcast(sigma, x0.ndim)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """The flow-matching regression target v = noise - x0."""
    return noise - x0


def x0_from_velocity(xt: jax.Array, sigma, v: jax.Array) -> jax.Array:
    """x0_hat = x_t - sigma v (not (x_t - sigma v) / (1 - sigma)); sigma scalar or (B,)."""
    return xt - _bcast(sigma, xt.ndim) * v
