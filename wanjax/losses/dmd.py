"""DMD (distribution matching distillation, DMD2 form): pure functions for the student rollout, the score
timestep window, the generator (distribution-matching) loss and the critic (fake score) loss.

One frozen base serves three roles: teacher = base, student G = base + LoRA_g, critic = base + LoRA_f. A
`Denoiser` is `(adapter or None, x_t, sigma (B,), context) -> velocity`, the same transformer every time.
Notation: x_t = (1 - sigma) x0 + sigma eps, v = eps - x0, x0 = x_t - sigma v, t = 1000 sigma. Loss math in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from wanjax import optim
from wanjax.schedules import shift_sigma

Denoiser = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class DMDConfig:
    """SimpleTuner's `distillation_config` keys for DMD, typed (see docs/spec/distillation.md)."""

    denoising_steps: tuple[float, ...] = (1000.0, 757.0, 522.0)  # student timesteps, descending
    shift: float = 5.0  # flow_schedule_shift: student sigma_i = s(t_i / 1000)
    generator_update_interval: int = 1  # in optimizer steps
    real_score_guidance_scale: float = 3.0  # teacher CFG: v_u + g (v_c - v_u)
    fake_score_guidance_scale: float = 0.0  # critic CFG; 0 = conditional only
    min_timestep_ratio: float = 0.02
    max_timestep_ratio: float = 0.98
    timestep_shift: float = 1.0  # shift of the score-timestep draw
    min_score_timestep: float = 0.0
    ts_schedule: bool = False  # lower bound of the window = the next student step
    ts_schedule_max: bool = False  # upper bound of the window = the exit step
    last_step_only: bool = False
    flow_matching_weight: float = 0.0  # optional generator flow-matching loss on real latents (SimpleTuner: always on)

    def __post_init__(self):
        steps = tuple(float(t) for t in self.denoising_steps)
        object.__setattr__(self, "denoising_steps", steps)
        if not steps or any(a <= b for a, b in zip(steps, steps[1:])) or steps[0] > 1000 or steps[-1] <= 0:
            raise ValueError(f"dmd_denoising_steps {steps}: expected strictly descending timesteps in (0, 1000]")
        if not 0 <= self.min_timestep_ratio < self.max_timestep_ratio <= 1:
            raise ValueError(f"min/max_timestep_ratio {self.min_timestep_ratio}/{self.max_timestep_ratio}: "
                             "expected 0 <= min < max <= 1")
        if self.generator_update_interval < 1:
            raise ValueError("generator_update_interval must be >= 1")


def student_sigmas(cfg: DMDConfig) -> np.ndarray:
    """sigma_i = s(t_i / 1000) with S = flow_schedule_shift (NOT s(1 - t/1000): SimpleTuner's inversion)."""
    return np.asarray([shift_sigma(t / 1000.0, cfg.shift) for t in cfg.denoising_steps], np.float32)


def x0_from_velocity(x_t: jax.Array, sigma: jax.Array, v: jax.Array) -> jax.Array:
    """x0 = x_t - sigma v (NOT (x_t - sigma v) / (1 - sigma))."""
    return x_t - _bcast(sigma, x_t) * v


def renoise(x0: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
    s = _bcast(sigma, x0)
    return (1 - s) * x0 + s * noise


def _bcast(sigma: jax.Array, like: jax.Array) -> jax.Array:
    sigma = jnp.asarray(sigma, jnp.float32)
    return sigma.reshape(sigma.shape + (1,) * (like.ndim - sigma.ndim))


def guided(denoise: Denoiser, adapter, x_t, sigma, cond, uncond, scale: float, *, zero_is_off: bool = False
           ) -> jax.Array:
    """v_u + g (v_c - v_u) in one batched pass. The conditional prediction alone when that is what the formula gives
    (g = 1), without uncond, or at g = 0 with `zero_is_off` (the critic's fake_score_guidance_scale: 0 = off);
    otherwise g = 0 is the unconditional prediction (the teacher's real_score_guidance_scale, as the formula)."""
    if uncond is None or scale == 1.0 or (zero_is_off and scale == 0.0):
        return denoise(adapter, x_t, sigma, cond).astype(jnp.float32)
    b = x_t.shape[0]
    v = denoise(adapter, jnp.concatenate([x_t, x_t]), jnp.concatenate([sigma, sigma]),
                jnp.concatenate([cond, uncond])).astype(jnp.float32)
    v_c, v_u = v[:b], v[b:]
    return v_u + scale * (v_c - v_u)


def sample_exit(rng: jax.Array, cfg: DMDConfig) -> jax.Array:
    """The student step whose output gets the gradient: uniform over steps, or the last with last_step_only."""
    n = len(cfg.denoising_steps)
    if cfg.last_step_only:
        return jnp.asarray(n - 1, jnp.int32)
    return jax.random.randint(rng, (), 0, n, jnp.int32)


def rollout(denoise: Denoiser, adapter, noise: jax.Array, cond, sigmas: jax.Array, exit_k: jax.Array,
            rng: jax.Array) -> jax.Array:
    """Backward simulation without gradient: the student's input at step k, starting from pure noise.

    x = eps; for i < k: x0 = x - sigma_i G(x, t_i); x = (1 - sigma_{i+1}) x0 + sigma_{i+1} eps_i.
    Runs exactly k student forwards: one branch per exit step (`lax.switch`), each unrolled. (A while loop with a
    traced trip count deadlocks XLA:CPU's multi-device collectives; a conditional does not.)
    """
    n = sigmas.shape[0]
    noise = noise.astype(jnp.float32)

    def steps(k):
        def run(x):
            for i in range(k):
                s = jnp.full((x.shape[0],), sigmas[i])
                x0 = x0_from_velocity(x, s, denoise(adapter, x, s, cond).astype(jnp.float32))
                eps = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
                x = renoise(x0, eps, jnp.full((x.shape[0],), sigmas[i + 1]))
            return x
        return run

    return jax.lax.switch(exit_k, [steps(k) for k in range(n)], noise)


def score_sigma(rng: jax.Array, batch: int, cfg: DMDConfig, sigmas: jax.Array, exit_k: jax.Array) -> jax.Array:
    """Score timestep per sample: u ~ U(min_ratio, max_ratio), t = 1000 s(u) with S = timestep_shift, clamped to
    >= min_score_timestep; ts_schedule raises the lower bound to the next student step (0 after the last),
    ts_schedule_max lowers the upper bound to the exit step. Returns sigma = t / 1000, shape (batch,)."""
    S = cfg.timestep_shift

    def inv(y):  # s^{-1}: the u whose shifted value is y
        return y / (S - (S - 1) * y)

    lo = jnp.asarray(cfg.min_timestep_ratio, jnp.float32)
    hi = jnp.asarray(cfg.max_timestep_ratio, jnp.float32)
    n = sigmas.shape[0]
    if cfg.ts_schedule:
        nxt = jnp.where(exit_k + 1 < n, sigmas[jnp.minimum(exit_k + 1, n - 1)], 0.0)
        lo = jnp.maximum(lo, inv(nxt))
    if cfg.ts_schedule_max:
        hi = jnp.minimum(hi, inv(sigmas[exit_k]))
    hi = jnp.maximum(hi, lo)
    u = lo + (hi - lo) * jax.random.uniform(rng, (batch,), jnp.float32)
    t = jnp.maximum(1000.0 * shift_sigma(u, S), cfg.min_score_timestep)
    return jnp.clip(t / 1000.0, 1e-4, 1.0)


def dmd_gradient(x_gen: jax.Array, x0_fake: jax.Array, x0_real: jax.Array) -> jax.Array:
    """(x0_fake - x0_real) / mean_{C,F,H,W} |x_gen - x0_real|, per sample, NaNs zeroed."""
    norm = jnp.mean(jnp.abs(x_gen - x0_real), axis=tuple(range(1, x_gen.ndim)), keepdims=True)
    return jnp.nan_to_num((x0_fake - x0_real) / norm)


def generator_loss(x_gen: jax.Array, grad: jax.Array) -> jax.Array:
    """0.5 * mean((x_gen - sg(x_gen - grad))^2): its gradient w.r.t. x_gen is grad / numel."""
    target = jax.lax.stop_gradient(x_gen - grad)
    return 0.5 * jnp.mean(jnp.square(x_gen - target))


def dmd_generator_loss(
    gen_params, denoise: Denoiser, gen_adapter: Callable, critic_adapter, x_k: jax.Array, sigma_k: jax.Array,
    cond, uncond, rng: jax.Array, cfg: DMDConfig, sigmas: jax.Array, exit_k: jax.Array,
) -> tuple[jax.Array, dict]:
    """Distribution-matching loss of the student's output at exit step k (the only step with gradient)."""
    b = x_k.shape[0]
    s_k = jnp.full((b,), sigma_k)
    x_gen = x0_from_velocity(x_k, s_k, denoise(gen_adapter(gen_params), x_k, s_k, cond).astype(jnp.float32))
    k_sigma, k_noise = jax.random.split(rng)
    sigma = score_sigma(k_sigma, b, cfg, sigmas, exit_k)
    x_t = renoise(jax.lax.stop_gradient(x_gen), jax.random.normal(k_noise, x_gen.shape), sigma)
    v_fake = guided(denoise, critic_adapter, x_t, sigma, cond, uncond, cfg.fake_score_guidance_scale,
                    zero_is_off=True)
    v_real = guided(denoise, None, x_t, sigma, cond, uncond, cfg.real_score_guidance_scale)  # teacher: NO adapter
    x0_fake = jax.lax.stop_gradient(x0_from_velocity(x_t, sigma, v_fake))
    x0_real = jax.lax.stop_gradient(x0_from_velocity(x_t, sigma, v_real))
    grad = dmd_gradient(jax.lax.stop_gradient(x_gen), x0_fake, x0_real)
    loss = generator_loss(x_gen, grad)
    return loss, {"x_gen": x_gen, "score_sigma_mean": sigma.mean()}


def critic_loss(critic_params, denoise: Denoiser, critic_adapter: Callable, x_gen: jax.Array, cond,
                rng: jax.Array, cfg: DMDConfig, sigmas: jax.Array, exit_k: jax.Array) -> jax.Array:
    """Flow-matching loss of the critic on the student's (gradient-free) samples: it learns the fake score."""
    b = x_gen.shape[0]
    k_sigma, k_noise = jax.random.split(rng)
    sigma = score_sigma(k_sigma, b, cfg, sigmas, exit_k)
    x_gen = jax.lax.stop_gradient(x_gen)
    eps = jax.random.normal(k_noise, x_gen.shape, jnp.float32)
    v = denoise(critic_adapter(critic_params), renoise(x_gen, eps, sigma), sigma, cond).astype(jnp.float32)
    return jnp.mean(jnp.square(v - (eps - x_gen)))


def student_sample(denoise: Denoiser, adapter, noise: jax.Array, cond, sigmas: jax.Array, rng: jax.Array) -> jax.Array:
    """The DMD student sampler: x0 at each step, re-noised with fresh noise to the next step; last returns x0."""
    x = noise.astype(jnp.float32)
    n = sigmas.shape[0]
    for i in range(n):
        s = jnp.full((x.shape[0],), sigmas[i])
        x0 = x0_from_velocity(x, s, denoise(adapter, x, s, cond).astype(jnp.float32))
        if i == n - 1:
            return x0
        eps = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
        x = renoise(x0, eps, jnp.full((x.shape[0],), sigmas[i + 1]))
    return x


# ---------------------------------------------------------------------------------------------------------
# One optimizer step: generator every `generator_update_interval` steps, critic every step
# ---------------------------------------------------------------------------------------------------------

@flax.struct.dataclass
class DMDState:
    step: jax.Array  # optimizer steps taken (int32)
    gen: dict  # student LoRA params
    gen_opt: Any
    critic: dict  # fake-score LoRA params
    critic_opt: Any
    ema: dict | None  # EMA of the student LoRA, or None
    rng: jax.Array


@flax.struct.dataclass
class DMDFrozen:
    params: dict  # the ONE frozen base: teacher, and the body of student and critic
    uncond: jax.Array  # (L, D) negative- or empty-prompt embedding for CFG


def _step_keys(state: DMDState) -> list[jax.Array]:
    """k_exit, k_noise, k_roll, k_gen, k_critic, k_fm of this optimizer step (both phases derive the same)."""
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    return list(jax.random.split(rng, 6))


def _denoiser(forward: Callable, frozen: DMDFrozen) -> Callable:
    def denoise(adapter, x, sigma, ctx):
        return forward(frozen.params, adapter, x, 1000.0 * sigma, ctx)

    return denoise


def dmd_generator_phase(
    state: DMDState,
    frozen: DMDFrozen,
    batch: dict,
    *,
    forward: Callable,  # (base_params, adapter or None, x, t (B,), context) -> velocity
    gen_adapter: Callable,  # params -> adapter object
    critic_adapter: Callable,
    cfg: DMDConfig,
    gen_optimizer: optax.GradientTransformation,
    max_latent_frames: int | None = None,
    fm_loss: Callable | None = None,  # (gen_params, batch, rng) -> loss, for flow_matching_weight > 0
) -> tuple[DMDState, dict]:
    """First half of a DMD2 step: backward simulation, then (every N-th step) the generator update. Returns the
    state with the new student (step not advanced) and the carry for `dmd_critic_phase`: the pre-update student's
    sample `x_gen` and the generator's metrics."""
    denoise = _denoiser(forward, frozen)
    k_exit, k_noise, k_roll, k_gen, _, k_fm = _step_keys(state)
    cond = batch["prompt_embeds"].astype(jnp.float32)
    uncond = jnp.broadcast_to(frozen.uncond.astype(jnp.float32)[None], cond.shape)
    shape = batch["latents"].shape
    if max_latent_frames is not None and shape[2] > max_latent_frames:  # num_training_frames
        shape = (*shape[:2], max_latent_frames, *shape[3:])
    sigmas = jnp.asarray(student_sigmas(cfg))
    exit_k = sample_exit(k_exit, cfg)
    noise = jax.random.normal(k_noise, shape, jnp.float32)
    x_k = jax.lax.stop_gradient(rollout(denoise, gen_adapter(state.gen), noise, cond, sigmas, exit_k, k_roll))
    sigma_k = sigmas[exit_k]
    update_gen = (state.step % cfg.generator_update_interval) == 0

    def gen_total(params):
        loss, aux = dmd_generator_loss(params, denoise, gen_adapter, critic_adapter(state.critic), x_k, sigma_k,
                                       cond, uncond, k_gen, cfg, sigmas, exit_k)
        if fm_loss is not None and cfg.flow_matching_weight > 0:
            loss = loss + cfg.flow_matching_weight * fm_loss(params, batch, k_fm)
        return loss, aux

    def update(_):
        (loss, aux), grads = jax.value_and_grad(gen_total, has_aux=True)(state.gen)
        updates, opt = optim.update_at(gen_optimizer, grads, state.gen_opt, state.gen, state.step)
        return optax.apply_updates(state.gen, updates), opt, loss, optax.global_norm(grads), aux["x_gen"]

    def skip(_):
        s = jnp.full((shape[0],), sigma_k)
        x_gen = x0_from_velocity(x_k, s, denoise(gen_adapter(state.gen), x_k, s, cond).astype(jnp.float32))
        nan = jnp.asarray(jnp.nan, jnp.float32)
        return state.gen, state.gen_opt, nan, nan, x_gen

    gen, gen_opt, dmd_loss, gen_norm, x_gen = jax.lax.cond(update_gen, update, skip, None)
    carry = {"x_gen": x_gen, "dmd_loss": dmd_loss, "generator_grad_norm": gen_norm,
             "generator_updated": update_gen.astype(jnp.float32), "exit_step": exit_k.astype(jnp.float32)}
    return state.replace(gen=gen, gen_opt=gen_opt), carry


def dmd_critic_phase(
    state: DMDState,
    frozen: DMDFrozen,
    batch: dict,
    carry: dict,
    *,
    forward: Callable,
    critic_adapter: Callable,
    cfg: DMDConfig,
    critic_optimizer: optax.GradientTransformation,
    schedule: Callable,
    ema_update: Callable | None = None,
) -> tuple[DMDState, dict]:
    """Second half: the critic's flow loss on the (pre-update) student's sample `carry["x_gen"]` (no gradient into
    the student), its update, the student EMA; advances the step. Returns (state, the step's metrics)."""
    denoise = _denoiser(forward, frozen)
    k_exit, _, _, _, k_critic, _ = _step_keys(state)
    cond = batch["prompt_embeds"].astype(jnp.float32)
    sigmas = jnp.asarray(student_sigmas(cfg))
    exit_k = sample_exit(k_exit, cfg)
    c_loss, c_grads = jax.value_and_grad(critic_loss)(state.critic, denoise, critic_adapter, carry["x_gen"], cond,
                                                      k_critic, cfg, sigmas, exit_k)
    c_updates, critic_opt = critic_optimizer.update(c_grads, state.critic_opt, state.critic)
    critic = optax.apply_updates(state.critic, c_updates)
    ema = state.ema if ema_update is None else ema_update(state.ema, optim.eval_params(state.gen_opt, state.gen),
                                                          state.step + 1)
    metrics = {
        "dmd_loss": carry["dmd_loss"], "fake_score_loss": c_loss, "generator_grad_norm": carry["generator_grad_norm"],
        "fake_score_grad_norm": optax.global_norm(c_grads), "generator_updated": carry["generator_updated"],
        "exit_step": carry["exit_step"], "lr": schedule(state.step),
    }
    new = state.replace(step=state.step + 1, critic=critic, critic_opt=critic_opt, ema=ema)
    return new, metrics


def dmd_step(
    state: DMDState,
    frozen: DMDFrozen,
    batch: dict,
    *,
    forward: Callable,  # (base_params, adapter or None, x, t (B,), context) -> velocity
    gen_adapter: Callable,  # params -> adapter object
    critic_adapter: Callable,
    cfg: DMDConfig,
    gen_optimizer: optax.GradientTransformation,
    critic_optimizer: optax.GradientTransformation,
    schedule: Callable,
    ema_update: Callable | None = None,
    max_latent_frames: int | None = None,
    fm_loss: Callable | None = None,  # (gen_params, batch, rng) -> loss, for flow_matching_weight > 0
) -> tuple[DMDState, dict]:
    """DMD2: critic updated every optimizer step, generator on every N-th (N = generator_update_interval).
    The composition of `dmd_generator_phase` and `dmd_critic_phase` (the trainer runs them as two programs, so
    the generator's and the critic's saved activations are never live at once)."""
    state, carry = dmd_generator_phase(state, frozen, batch, forward=forward, gen_adapter=gen_adapter,
                                       critic_adapter=critic_adapter, cfg=cfg, gen_optimizer=gen_optimizer,
                                       max_latent_frames=max_latent_frames, fm_loss=fm_loss)
    return dmd_critic_phase(state, frozen, batch, carry, forward=forward, critic_adapter=critic_adapter, cfg=cfg,
                            critic_optimizer=critic_optimizer, schedule=schedule, ema_update=ema_update)
