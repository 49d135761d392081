"""DCM (phase-wise consistency distillation, semantic + fine): pure functions for the Euler grid, the phases, the
consistency loss, the adversarial detail loss, the frozen-base features and discriminator heads, one optimizer
step, and the few-step student sampler.

One frozen base serves every role: teacher = base (no adapter), student = base + LoRA, consistency target = base +
EMA of the LoRA (or the student without gradient), discriminator features = base. A `Denoiser` is
`(adapter or None, x_t, sigma (B,), context) -> velocity`. Notation: x_t = (1 - sigma) x0 + sigma eps, v = eps - x0,
t = 1000 sigma, tau_j = s(j / E) the grid, p_m = floor(m E / M) the phase boundaries. Loss math in float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from wanjax.models.config import WanConfig
from wanjax.models.transformer import (
    _REMAT_POLICIES,
    Dense,
    LayerNorm,
    PatchEmbed,
    TimeTextImageEmbedding,
    WanBlock,
    _check_inputs,
    rope_tables,
)
from wanjax import optim
from wanjax.schedules import shift_sigma

F32 = jnp.float32
Denoiser = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]
MODES = ("semantic", "fine")
TARGETS = ("ema", "student")


@dataclasses.dataclass(frozen=True)
class DCMConfig:
    """The DCM options, typed (docs/spec/distillation.md); built from `distillation_config` by methods/dcm.py."""

    mode: str = "semantic"  # "semantic": consistency loss only; "fine": + adversarial loss on the detail intervals
    euler_steps: int = 50  # E, teacher Euler steps on the grid
    shift: float = 17.0  # S of the grid tau_j = s(j / E) (flow_schedule_shift)
    multiphase: int = 4  # M phases = student steps
    distill_cfg: float = 5.0  # teacher CFG v_u + w (v_c - v_u) (FastVideo's v_c + w' (v_c - v_u) is w = w' + 1)
    huber_c: float = 1e-3  # pseudo-Huber c
    temporal_weight: float = 1.0  # lambda_t of the temporal-coherence term
    temporal_stride: int = 3  # d, latent frames between compared frames
    target: str = "ema"  # consistency target: "ema" of the student adapter, or "student" (no gradient)
    target_decay: float = 0.95  # EMA decay of the target, updated every step
    dual_experts: bool = False  # two adapters: semantic (high noise) + detail (low noise)
    expert_boundary: float = 0.7  # intervals j >= boundary * E belong to the semantic expert (rounded to phases)
    adv_weight: float = 0.1  # generator loss = consistency + adv_weight * L_G (fine mode)
    adv_sigma_range: float = 0.7  # sigma_adv from grid points [b, b + range * E) (the original's 35 of 50)
    hinge_weight: float = 5.0  # L_G = hinge_weight * hinge + feature_matching_weight * MSE(f_fake, sg(f_real))
    feature_matching_weight: float = 10.0
    head_stride: int = 2  # discriminator heads on the outputs of blocks 0, stride, 2 stride, ...
    disc_width: int = 1024  # channels of the discriminator heads
    disc_groups: int = 32  # GroupNorm groups
    caption_dropout_probability: float = 0.0  # dropped captions use the empty-prompt embedding

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: expected one of {MODES}")
        if self.target not in TARGETS:
            raise ValueError(f"target_model={self.target!r}: expected one of {TARGETS}")
        if self.euler_steps < 1 or not 1 <= self.multiphase <= self.euler_steps:
            raise ValueError(f"euler_steps={self.euler_steps}, multiphase={self.multiphase}: expected "
                             "1 <= multiphase <= euler_steps")
        if self.shift <= 0:
            raise ValueError(f"flow_schedule_shift={self.shift}: DCM's grid needs a static shift > 0")
        if not 0 <= self.target_decay < 1:
            raise ValueError(f"ema_target_decay={self.target_decay}: expected 0 <= decay < 1")
        if self.temporal_stride < 1 or self.temporal_weight < 0 or self.huber_c <= 0:
            raise ValueError("temporal_frame_stride >= 1, temporal_loss_weight >= 0 and pseudo_huber_c > 0 required")
        if not 0 < self.expert_boundary < 1:
            raise ValueError(f"expert_boundary={self.expert_boundary}: expected 0 < boundary < 1")
        if (self.dual_experts or self.fine) and split_index(self) < 1:
            raise ValueError(f"expert_boundary={self.expert_boundary} with multiphase={self.multiphase}: no phase "
                             "lies below the boundary, so the detail expert / adversarial range would be empty")
        if self.fine:
            if not 0 < self.adv_sigma_range <= 1 or self.adv_weight < 0 or self.head_stride < 1:
                raise ValueError("fine mode: 0 < adv_sigma_range <= 1, adv_weight >= 0, discriminator_head_stride >= 1")
            if self.disc_width < 1 or self.disc_width % self.disc_groups:
                raise ValueError(f"discriminator_width={self.disc_width} must be a positive multiple of the "
                                 f"{self.disc_groups} GroupNorm groups")

    @property
    def fine(self) -> bool:
        return self.mode == "fine"


# ---------------------------------------------------------------------------------------------------------
# Grid, phases, experts, the student sampler
# ---------------------------------------------------------------------------------------------------------
def dcm_grid(cfg: DCMConfig) -> np.ndarray:
    """tau_j = s(j / E), j = 0..E (tau_0 = 0, tau_E = 1), float32."""
    return shift_sigma(np.arange(cfg.euler_steps + 1, dtype=np.float64) / cfg.euler_steps, cfg.shift).astype(np.float32)


def phase_boundaries(cfg: DCMConfig) -> np.ndarray:
    """p_m = floor(m E / M), m = 0..M (int32)."""
    return (np.arange(cfg.multiphase + 1, dtype=np.int64) * cfg.euler_steps // cfg.multiphase).astype(np.int32)


def phase_floor(j: jax.Array, boundaries: np.ndarray) -> jax.Array:
    """b(j) = max{p_m : p_m < j} for intervals j >= 1 (elementwise)."""
    p = jnp.asarray(boundaries, jnp.int32)
    j = jnp.asarray(j, jnp.int32)
    return jnp.max(jnp.where(p < j[..., None], p, 0), axis=-1)


def split_index(cfg: DCMConfig) -> int:
    """Last interval of the detail range: s = b(ceil(boundary * E)). Intervals j > s are semantic.

    The boundary is rounded down to a phase floor, so every phase (one sampler step) has one expert and every
    j >= boundary * E is semantic; the sampler switches experts at the same place."""
    j_k = max(1, math.ceil(cfg.expert_boundary * cfg.euler_steps - 1e-9))
    return int(max(p for p in phase_boundaries(cfg) if p < j_k))


def dcm_student_sigmas(cfg: DCMConfig) -> np.ndarray:
    """The student's sigmas, descending with the final 0: [tau_{p_M}, ..., tau_{p_1}, 0]."""
    return dcm_grid(cfg)[phase_boundaries(cfg)[::-1]]


def dcm_student_experts(cfg: DCMConfig) -> tuple[str, ...]:
    """Per student step, the adapter that runs it: "semantic" while the step starts above the split, else
    "detail" (always "semantic", the only adapter, without dual experts)."""
    tops = phase_boundaries(cfg)[::-1][:-1]
    if not cfg.dual_experts:
        return ("semantic",) * len(tops)
    s = split_index(cfg)
    return tuple("semantic" if int(p) > s else "detail" for p in tops)


def dcm_sample(denoise: Denoiser, adapters: dict, noise: jax.Array, cond: jax.Array, cfg: DCMConfig) -> jax.Array:
    """The DCM student sampler: Euler over the phase floors from noise, x <- x + (sigma_next - sigma) v_S, with
    `adapters[dcm_student_experts(cfg)[i]]` at step i ({"semantic": a} or {"semantic": a, "detail": b})."""
    sigmas, experts = dcm_student_sigmas(cfg), dcm_student_experts(cfg)
    x = noise.astype(F32)
    for i, name in enumerate(experts):
        s = jnp.full((x.shape[0],), sigmas[i], F32)
        x = euler_step(x, s, jnp.full_like(s, sigmas[i + 1]), denoise(adapters[name], x, s, cond).astype(F32))
    return x


# ---------------------------------------------------------------------------------------------------------
# Consistency (semantic) loss
# ---------------------------------------------------------------------------------------------------------
def _bcast(sigma: jax.Array, like: jax.Array) -> jax.Array:
    sigma = jnp.asarray(sigma, F32)
    return sigma.reshape(sigma.shape + (1,) * (like.ndim - sigma.ndim))


def euler_step(x: jax.Array, sigma: jax.Array, sigma_to: jax.Array, v: jax.Array) -> jax.Array:
    """x + (sigma_to - sigma) v: a latent moved along the velocity (never a velocity compared with a latent)."""
    return x + _bcast(sigma_to - sigma, x) * v


def teacher_velocity(denoise: Denoiser, x: jax.Array, sigma: jax.Array, cond, uncond, w: float) -> jax.Array:
    """Frozen base WITHOUT adapter, CFG v_u + w (v_c - v_u) in one batched pass (w = 1: conditional only)."""
    if w == 1.0:
        return denoise(None, x, sigma, cond).astype(F32)
    b = x.shape[0]
    v = denoise(None, jnp.concatenate([x, x]), jnp.concatenate([sigma, sigma]),
                jnp.concatenate([cond, uncond])).astype(F32)
    return v[b:] + w * (v[:b] - v[b:])


def pseudo_huber(a: jax.Array, b: jax.Array, c: float) -> jax.Array:
    return jnp.mean(jnp.sqrt(jnp.square(a - b) + c * c) - c)


def temporal_coherence(a: jax.Array, b: jax.Array, d: int) -> jax.Array:
    """MSE of frame differences at distance d (axis 2 = latent frames); 0 when F <= d."""
    if a.shape[2] <= d:
        return jnp.zeros((), F32)
    return jnp.mean(jnp.square((a[:, :, d:] - a[:, :, :-d]) - (b[:, :, d:] - b[:, :, :-d])))


def consistency_target(denoise: Denoiser, target_adapter, x0, eps, j, cond, uncond, cfg: DCMConfig):
    """Student input x_j and its consistency target x_hat at the phase floor (no gradient).

    x_j = (1 - tau_j) x0 + tau_j eps; one teacher Euler step to tau_{j-1}; then the target adapter's jump to the
    phase floor tau_b unless j - 1 is the floor. Returns (x_j, x_hat, b)."""
    tau = jnp.asarray(dcm_grid(cfg))
    b = phase_floor(j, phase_boundaries(cfg))
    t_j, t_prev, t_b = tau[j], tau[j - 1], tau[b]
    x_j = _bcast(1 - t_j, x0) * x0 + _bcast(t_j, x0) * eps
    x_prev = euler_step(x_j, t_j, t_prev, teacher_velocity(denoise, x_j, t_j, cond, uncond, cfg.distill_cfg))
    v_target = denoise(target_adapter, x_prev, t_prev, cond).astype(F32)
    at_floor = (j - 1 == b).reshape(j.shape + (1,) * (x_prev.ndim - 1))
    x_hat = jnp.where(at_floor, x_prev, euler_step(x_prev, t_prev, t_b, v_target))
    return jax.lax.stop_gradient(x_j), jax.lax.stop_gradient(x_hat), b


def student_jump(denoise: Denoiser, adapter, x_j: jax.Array, t_j: jax.Array, t_b: jax.Array, cond) -> jax.Array:
    """x_S = x_j + (tau_b - tau_j) v_S(x_j, tau_j): the student's jump to the phase floor, a latent."""
    return euler_step(x_j, t_j, t_b, denoise(adapter, x_j, t_j, cond).astype(F32))


def semantic_loss(x_s: jax.Array, x_hat: jax.Array, cfg: DCMConfig) -> tuple[jax.Array, dict]:
    """pseudo-Huber(x_S, x_hat) + lambda_t * temporal coherence: latents against latents."""
    huber = pseudo_huber(x_s, x_hat, cfg.huber_c)
    temporal = temporal_coherence(x_s, x_hat, cfg.temporal_stride)
    return huber + cfg.temporal_weight * temporal, {"semantic_loss": huber, "temporal_loss": temporal}


# ---------------------------------------------------------------------------------------------------------
# Fine mode: frozen-base features, discriminator heads, hinge losses
# ---------------------------------------------------------------------------------------------------------
def token_grid(shape: Sequence[int], patch_size: Sequence[int]) -> tuple[int, int, int]:
    """(F', H', W') of a (B, C, F, H, W) latent: derived from the shape, never a fixed resolution."""
    return tuple(int(n) // int(p) for n, p in zip(shape[2:], patch_size))


def feature_layers(num_layers: int, stride: int) -> tuple[int, ...]:
    """Blocks whose outputs feed a discriminator head: 0, stride, 2 stride, ... (the original's `i % 2 == 0`)."""
    return tuple(range(0, num_layers, stride))


def base_features(config: WanConfig, params: dict, x: jax.Array, t: jax.Array, context: jax.Array, *,
                  stride: int) -> tuple[list[jax.Array], jax.Array]:
    """The frozen base (no adapter) at x, t: hidden tokens (B, S, D) after blocks 0, stride, ... and the final output.

    Runs the transformer's own modules on slices of its stacked params, so the final output equals
    `transformer_forward(config, params, x, t, context)` (T2V models, per-sample timesteps)."""
    _check_inputs(config, x, t, context, None)
    if config.has_image_embedder:
        raise ValueError("DCM fine mode supports text-to-video bases (no image embedder)")
    b, c, f, hh, ww = x.shape
    pt, ph, pw = config.patch_size
    nf, nh, nw = token_grid(x.shape, config.patch_size)
    dim = config.inner_dim
    patches = x.reshape(b, c, nf, pt, nh, ph, nw, pw).transpose(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, nf * nh * nw, -1)
    h = PatchEmbed(config).apply({"params": params["patch_embedding"]}, patches)
    temb, tproj, ctx, _ = TimeTextImageEmbedding(config).apply(
        {"params": params["condition_embedder"]}, t, context.astype(h.dtype), None)
    tproj = tproj.reshape(*tproj.shape[:-1], 6, dim)
    cos, sin = (jnp.asarray(a) for a in rope_tables(config.attention_head_dim, nf, nh, nw))
    block = WanBlock(config)

    def one(h, p):
        return block.apply({"params": p}, h, ctx, None, tproj, cos, sin)[0]

    if config.remat_policy != "none":
        one = jax.checkpoint(one, policy=_REMAT_POLICIES[config.remat_policy], prevent_cse=False)

    layers = config.num_layers
    groups, rest = divmod(layers, stride)
    blocks = params["blocks"]

    def group(h, gp):  # `stride` blocks; the first one's output is a feature
        feat = None
        for k in range(stride):
            h = one(h, jax.tree_util.tree_map(lambda a, k=k: a[k], gp))
            feat = h if k == 0 else feat
        return h, feat

    stacked = jax.tree_util.tree_map(lambda a: a[: groups * stride].reshape(groups, stride, *a.shape[1:]), blocks)
    h, feats = jax.lax.scan(group, h, stacked)
    features = [feats[i] for i in range(groups)]
    for k in range(rest):
        h = one(h, jax.tree_util.tree_map(lambda a, k=k: a[groups * stride + k], blocks))
        if k == 0:
            features.append(h)

    out_mod = params["scale_shift_table"].astype(F32) + temb.astype(F32)[..., None, :]
    shift, scale = out_mod[:, 0][:, None], out_mod[:, 1][:, None]
    h = (LayerNorm(config.eps, False).apply({}, h.astype(F32)) * (1 + scale) + shift).astype(h.dtype)
    h = Dense(config.out_channels * pt * ph * pw).apply({"params": params["proj_out"]}, h)
    h = h.reshape(b, nf, nh, nw, pt, ph, pw, config.out_channels)
    out = h.transpose(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, config.out_channels, f, hh, ww)
    return features, out


class DiscriminatorHead(nn.Module):
    """1x1 conv (C -> width) -> GroupNorm -> LeakyReLU -> residual [1x1 conv -> GroupNorm -> LeakyReLU] -> 1x1
    conv (-> 1), channels-last on (N, H', W', C); a 1x1 conv is a Dense over channels. Float32."""

    width: int
    groups: int

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        h = nn.Dense(self.width, name="conv_in")(h.astype(F32))
        h = nn.leaky_relu(nn.GroupNorm(self.groups, epsilon=1e-5, name="norm_in")(h), 0.2)
        r = nn.GroupNorm(self.groups, epsilon=1e-5, name="norm_res")(nn.Dense(self.width, name="conv_res")(h))
        h = h + nn.leaky_relu(r, 0.2)
        return nn.Dense(1, name="conv_out")(h)


class Discriminator(nn.Module):
    """One head per feature: tokens (B, F' H' W', C) -> (B F', H', W', C) -> logits, returned as (B, F' H' W')."""

    num_heads: int
    width: int
    groups: int

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], grid: tuple[int, int, int]) -> list[jax.Array]:
        nf, nh, nw = grid
        out = []
        for i, tokens in enumerate(features[: self.num_heads]):
            b = tokens.shape[0]
            h = tokens.reshape(b * nf, nh, nw, tokens.shape[-1])
            out.append(DiscriminatorHead(self.width, self.groups, name=f"head_{i}")(h).reshape(b, -1))
        return out


def masked_mean(per_sample: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over the samples with mask 1 (0 when none)."""
    return jnp.sum(per_sample * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def discriminator_loss(real_logits: Sequence[jax.Array], fake_logits: Sequence[jax.Array], mask) -> jax.Array:
    """L_D = mean_i [ mean relu(1 + D_i(fake)) + mean relu(1 - D_i(real)) ] over the masked samples."""
    terms = [masked_mean(jax.nn.relu(1 + f).mean(-1), mask) + masked_mean(jax.nn.relu(1 - r).mean(-1), mask)
             for r, f in zip(real_logits, fake_logits)]
    return sum(terms) / len(terms)


def generator_hinge(fake_logits: Sequence[jax.Array], mask) -> jax.Array:
    """mean_i mean relu(1 - D_i(fake)) over the masked samples."""
    return sum(masked_mean(jax.nn.relu(1 - f).mean(-1), mask) for f in fake_logits) / len(fake_logits)


def adversarial_sigmas(rng: jax.Array, b: jax.Array, cfg: DCMConfig) -> tuple[jax.Array, jax.Array]:
    """sigma_adv = tau_k, k ~ U{b, ..., b + n - 1}, n = min(round(range E), E - b + 1); sigma_end = tau_b."""
    tau = jnp.asarray(dcm_grid(cfg))
    n = jnp.minimum(max(1, round(cfg.adv_sigma_range * cfg.euler_steps)), cfg.euler_steps - b + 1)
    k = b + jnp.minimum(jnp.floor(jax.random.uniform(rng, b.shape) * n).astype(jnp.int32), n - 1)
    return tau[k], tau[b]


def adversarial_mix(x: jax.Array, eps: jax.Array, sigma_adv: jax.Array, sigma_end: jax.Array) -> jax.Array:
    """((1 - sigma_adv) x + (sigma_adv - sigma_end) eps) / (1 - sigma_end): x at the floor re-noised to sigma_adv."""
    return (_bcast(1 - sigma_adv, x) * x + _bcast(sigma_adv - sigma_end, x) * eps) / _bcast(1 - sigma_end, x)


# ---------------------------------------------------------------------------------------------------------
# One optimizer step
# ---------------------------------------------------------------------------------------------------------
@flax.struct.dataclass
class DCMState:
    step: jax.Array  # optimizer steps taken (int32)
    gen: dict  # the student LoRA (the semantic expert when dual)
    gen_opt: Any
    target: dict | None  # EMA target of `gen` (target "ema"), else None
    detail: dict | None  # dual experts: the detail expert LoRA
    detail_opt: Any
    detail_target: dict | None
    disc: dict | None  # fine mode: discriminator heads
    disc_opt: Any
    ema: dict | None  # use_ema: SimpleTuner's EMA of `gen` (exported at the end), else None
    detail_ema: dict | None
    rng: jax.Array


@flax.struct.dataclass
class DCMFrozen:
    params: dict  # the ONE frozen base: teacher, feature extractor, and the body of every adapter
    uncond: jax.Array  # (L, D) negative- or empty-prompt embedding (teacher CFG)
    empty: jax.Array  # (L, D) empty-prompt embedding (caption dropout)


ADV_METRICS = ("adv_g_loss", "adv_d_loss", "feature_matching_loss", "discriminator_grad_norm", "adv_fraction")


def dcm_step(
    state: DCMState,
    frozen: DCMFrozen,
    batch: dict,
    *,
    forward: Callable,  # (base_params, adapter or None, x, t (B,), context) -> velocity
    features: Callable | None,  # (base_params, x, t, context) -> (hidden tokens list, output); fine mode
    disc_apply: Callable | None,  # (disc_params, features, grid) -> logits list; fine mode
    wrap: Callable,  # adapter params -> adapter object
    cfg: DCMConfig,
    optimizer: optax.GradientTransformation,
    disc_optimizer: optax.GradientTransformation | None,
    schedule: Callable,
    patch_size: tuple[int, int, int],
    ema_update: Callable | None = None,
) -> tuple[DCMState, dict]:
    """One DCM step: the expert owning this step's intervals is updated on the consistency loss (+ the
    adversarial loss in fine mode, then one discriminator step); EMA targets follow every step."""

    def denoise(adapter, x, sigma, ctx):
        return forward(frozen.params, adapter, x, 1000.0 * sigma, ctx).astype(F32)

    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    k_int, k_eps, k_drop, k_adv, k_adv_eps = jax.random.split(rng, 5)
    x0 = batch["latents"].astype(F32)
    bsz = x0.shape[0]
    drop = jax.random.uniform(k_drop, (bsz,)) < cfg.caption_dropout_probability
    cond = jnp.where(drop[:, None, None], frozen.empty.astype(F32)[None], batch["prompt_embeds"].astype(F32))
    uncond = jnp.broadcast_to(frozen.uncond.astype(F32)[None], cond.shape)
    eps = jax.random.normal(k_eps, x0.shape, F32)
    s, E = split_index(cfg), cfg.euler_steps
    grid = token_grid(x0.shape, patch_size)
    nan = jnp.asarray(jnp.nan, F32)

    def train(params, opt_state, target, j, adv: bool, disc, disc_opt):
        target_adapter = wrap(jax.lax.stop_gradient(params) if target is None else target)
        x_j, x_hat, b = consistency_target(denoise, target_adapter, x0, eps, j, cond, uncond, cfg)
        tau = jnp.asarray(dcm_grid(cfg))
        t_j, t_b = tau[j], tau[b]
        if adv:
            mask = (j <= s).astype(F32)
            sigma_adv, sigma_end = adversarial_sigmas(k_adv, b, cfg)
            eps_adv = jax.random.normal(k_adv_eps, x0.shape, F32)
            real = adversarial_mix(x_hat, eps_adv, sigma_adv, sigma_end)
            real_feats, real_out = jax.lax.stop_gradient(features(frozen.params, real, 1000.0 * sigma_adv, cond))

        def loss_fn(p):
            x_s = student_jump(denoise, wrap(p), x_j, t_j, t_b, cond)
            total, aux = semantic_loss(x_s, x_hat, cfg)
            if adv:
                fake = adversarial_mix(x_s, eps_adv, sigma_adv, sigma_end)
                fake_feats, fake_out = features(frozen.params, fake, 1000.0 * sigma_adv, cond)
                hinge = generator_hinge(disc_apply(disc, fake_feats, grid), mask)
                fm_per = jnp.square(fake_out.astype(F32) - real_out.astype(F32)).reshape(bsz, -1).mean(1)
                fm = masked_mean(fm_per, mask)
                l_g = cfg.hinge_weight * hinge + cfg.feature_matching_weight * fm
                total = total + cfg.adv_weight * l_g
                aux.update(adv_g_loss=l_g, feature_matching_loss=fm,
                           fake_feats=[jax.lax.stop_gradient(f) for f in fake_feats])
            return total, aux

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optim.update_at(optimizer, grads, opt_state, params, state.step)
        params = optax.apply_updates(params, updates)
        metrics = {"dcm_loss": loss, "semantic_loss": aux["semantic_loss"], "temporal_loss": aux["temporal_loss"],
                   "grad_norm": optax.global_norm(grads), "interval_mean": j.astype(F32).mean()}
        if adv:
            def d_loss(dp):
                real_logits, fake_logits = disc_apply(dp, real_feats, grid), disc_apply(dp, aux["fake_feats"], grid)
                return discriminator_loss(real_logits, fake_logits, mask)

            l_d, d_grads = jax.value_and_grad(d_loss)(disc)
            d_updates, disc_opt = disc_optimizer.update(d_grads, disc_opt, disc)
            disc = optax.apply_updates(disc, d_updates)
            some = jnp.sum(mask) > 0
            metrics.update(adv_g_loss=jnp.where(some, aux["adv_g_loss"], nan), adv_d_loss=jnp.where(some, l_d, nan),
                           feature_matching_loss=jnp.where(some, aux["feature_matching_loss"], nan),
                           discriminator_grad_norm=optax.global_norm(d_grads), adv_fraction=mask.mean())
        elif cfg.fine:
            metrics.update({k: (jnp.zeros((), F32) if k == "adv_fraction" else nan) for k in ADV_METRICS})
        return params, opt_state, disc, disc_opt, metrics

    if cfg.dual_experts:
        k_expert, k_j = jax.random.split(k_int)
        is_detail = jax.random.uniform(k_expert) < s / E  # P(detail) = share of the detail intervals
        j = jax.random.randint(k_j, (bsz,), jnp.where(is_detail, 1, s + 1), jnp.where(is_detail, s, E) + 1)

        def semantic(_):
            g, go, d, do, m = train(state.gen, state.gen_opt, state.target, j, False, state.disc, state.disc_opt)
            return g, go, state.detail, state.detail_opt, d, do, m

        def detail(_):
            g, go, d, do, m = train(state.detail, state.detail_opt, state.detail_target, j, cfg.fine, state.disc,
                                    state.disc_opt)
            return state.gen, state.gen_opt, g, go, d, do, m

        gen, gen_opt, det, det_opt, disc, disc_opt, metrics = jax.lax.cond(is_detail, detail, semantic, None)
        metrics["expert"] = is_detail.astype(F32)
    else:
        j = jax.random.randint(k_int, (bsz,), 1, E + 1)
        gen, gen_opt, disc, disc_opt, metrics = train(state.gen, state.gen_opt, state.target, j, cfg.fine,
                                                      state.disc, state.disc_opt)
        det, det_opt = state.detail, state.detail_opt

    def follow(t, p):  # EMA target: t <- t + (1 - decay) (p - t), every step
        return None if t is None else jax.tree_util.tree_map(lambda a, b: a + (1 - cfg.target_decay) * (b - a), t, p)

    new = state.replace(
        step=state.step + 1, gen=gen, gen_opt=gen_opt, detail=det, detail_opt=det_opt, disc=disc, disc_opt=disc_opt,
        target=follow(state.target, gen), detail_target=follow(state.detail_target, det),
        ema=state.ema if ema_update is None else ema_update(state.ema, optim.eval_params(gen_opt, gen), state.step + 1),
        detail_ema=state.detail_ema if ema_update is None or det is None else ema_update(
            state.detail_ema, optim.eval_params(det_opt, det), state.step + 1),
    )
    metrics["lr"] = schedule(state.step)
    return new, metrics
