"""Flow-matching LoRA training: the loss and one optimizer step, pure functions under jit.

x_t = (1 - sigma) x0 + sigma eps, target v = eps - x0, loss = per-sample mean of (v_pred - v)^2, then the
batch mean (SimpleTuner's default, no weighting). A dropped caption uses the cached embedding of "" (not zeros).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from wanjax import optim, schedules
from wanjax.lora import LoraWeights
from wanjax.models.config import WanConfig
from wanjax.models.transformer import transformer_forward


@dataclasses.dataclass(frozen=True)
class FlowMatchingConfig:
    """Sigma sampling and caption dropout (SimpleTuner's options, typed)."""

    sampler: str = "logit_normal"  # logit_normal | uniform | beta
    shift: float = 3.0
    auto_shift: bool = False
    logit_std: float = 1.0  # flow_sigmoid_scale
    beta_alpha: float = 2.0
    beta_beta: float = 2.0
    caption_dropout_probability: float = 0.1


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Static description of the trained adapter (the arrays live in TrainState.lora)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]

    def wrap(self, params: dict) -> LoraWeights:
        return LoraWeights(params=params, rank=self.rank, alpha=self.alpha, targets=self.targets)


@flax.struct.dataclass
class Frozen:
    """Non-trainable inputs of a step: the base transformer and the empty-prompt embedding (L, D)."""

    params: dict
    empty_prompt_embeds: jax.Array


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # optimizer steps taken (int32 scalar)
    lora: dict  # trainable LoRA params (float32)
    opt_state: Any
    ema: dict | None  # EMA of the LoRA params, or None
    rng: jax.Array  # base key data; each step folds in `step`


def flow_matching_loss(
    lora_params: dict,
    frozen: Frozen,
    batch: dict,
    rng: jax.Array,
    *,
    model: WanConfig,
    lora: LoraSpec,
    fm: FlowMatchingConfig,
) -> tuple[jax.Array, dict]:
    """Mean flow-matching loss of one micro-batch {"latents": (B,C,F,H,W), "prompt_embeds": (B,L,D)}."""
    x0 = batch["latents"].astype(jnp.float32)
    b = x0.shape[0]
    k_sigma, k_noise, k_drop = jax.random.split(rng, 3)
    pt, ph, pw = model.patch_size
    seq_len = (x0.shape[2] // pt) * (x0.shape[3] // ph) * (x0.shape[4] // pw)
    # auto shift (only when flow_schedule_shift <= 0, SimpleTuner's precedence): mu is linear in the token
    # count, clamped to diffusers' [256, 4096] range so long videos do not extrapolate to absurd shifts.
    sigma = schedules.sample_sigmas(
        k_sigma, b, sampler=fm.sampler, shift=fm.shift, logit_std=fm.logit_std, beta_alpha=fm.beta_alpha,
        beta_beta=fm.beta_beta, seq_len=min(max(seq_len, 256), 4096), auto_shift=fm.auto_shift,
    )
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    xt = schedules.add_noise(x0, noise, sigma)
    drop = jax.random.uniform(k_drop, (b,)) < fm.caption_dropout_probability
    text = jnp.where(drop[:, None, None], frozen.empty_prompt_embeds[None].astype(jnp.float32),
                     batch["prompt_embeds"].astype(jnp.float32))
    v = transformer_forward(model, frozen.params, xt, sigma * 1000.0, text, lora=lora.wrap(lora_params))
    err = jnp.square(v.astype(jnp.float32) - schedules.velocity_target(x0, noise))
    per_sample = err.reshape(b, -1).mean(axis=1)
    return per_sample.mean(), {"sigma_mean": sigma.mean(), "caption_dropped": drop.mean()}


def train_step(
    state: TrainState,
    frozen: Frozen,
    batch: dict,
    *,
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array],
    ema_update: Callable | None = None,
    accum: int = 1,
) -> tuple[TrainState, dict]:
    """One optimizer step over a global batch of accum x B items: gradients averaged over `accum` micro-batches.

    Micro-batch i holds items {j * accum + i}: reshaping (B * accum) -> (B, accum) and swapping axes keeps every
    device's rows on that device (no resharding), and the split depends only on global item order, so any
    device or process count sees the same micro-batches.
    """
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    batch = jax.tree_util.tree_map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)

    def micro(carry, xs):
        i, mb = xs
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.lora, frozen, mb, jax.random.fold_in(rng, i))
        loss_sum, aux_sum, grad_sum = carry
        add = lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)  # noqa: E731
        return (loss_sum + loss, add(aux_sum, aux), add(grad_sum, grads)), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.lora)
    aux0 = {"sigma_mean": jnp.zeros(()), "caption_dropped": jnp.zeros(())}
    (loss, aux, grads), _ = jax.lax.scan(micro, (jnp.zeros(()), aux0, zeros), (jnp.arange(accum), batch))
    loss, grads = loss / accum, jax.tree_util.tree_map(lambda g: g / accum, grads)
    aux = jax.tree_util.tree_map(lambda a: a / accum, aux)
    updates, opt_state = optim.update_at(optimizer, grads, state.opt_state, state.lora, state.step)
    lora = optax.apply_updates(state.lora, updates)
    ema = state.ema if ema_update is None else ema_update(state.ema, optim.eval_params(opt_state, lora), state.step + 1)
    metrics = {"loss": loss, "lr": schedule(state.step), "grad_norm": optax.global_norm(grads), **aux}
    return state.replace(step=state.step + 1, lora=lora, opt_state=opt_state, ema=ema), metrics
