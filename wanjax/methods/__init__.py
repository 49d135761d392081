"""Training methods the trainer runs: each builds its state, its pure step and what it exports.

`wanjax/train.py` does the orchestration every method shares (config checks, mesh, the frozen base, data,
checkpoints, the loop, metrics); a method module turns the resolved context into a `Method`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax


@dataclasses.dataclass(frozen=True)
class Context:
    """What the trainer resolved before building a method: typed, checked, nothing computed yet."""

    config: Any  # the ml_collections config (read by method builders only, never by steps)
    model: Any  # WanConfig of the frozen base
    base: dict  # the frozen base params, sharded
    text_embeds: dict[str, jax.Array]  # cached embeddings: "empty" (L, D), optionally "negative"
    lora_targets: tuple[str, ...]
    lora_alpha: float
    init_lora: Any  # LoraWeights to start from, or None
    optim: Any  # OptimConfig of the main (student / LoRA) optimizer
    fm: Any  # FlowMatchingConfig

    def lora_spec(self):
        """The trained adapter's rank / alpha / targets: the `init_lora` file's when starting from one."""
        from wanjax.losses.flow_matching import LoraSpec

        if self.init_lora is not None:
            return LoraSpec(rank=self.init_lora.rank, alpha=self.init_lora.alpha, targets=self.init_lora.targets)
        return LoraSpec(rank=int(self.config.lora_rank), alpha=self.lora_alpha, targets=self.lora_targets)

    def init_lora_params(self, spec, key: jax.Array) -> dict:
        """Starting LoRA params (float32): the `init_lora` file's, else A random / B zero."""
        import jax.numpy as jnp

        from wanjax import lora as lora_lib

        if self.init_lora is not None:
            return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), self.init_lora.params)
        return lora_lib.init_lora(self.model, key, rank=spec.rank, alpha=spec.alpha, targets=spec.targets).params


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    init_state: Callable[[jax.Array], Any]  # rng key -> state pytree with an int32 `.step`
    step: Callable[[Any, Any, dict], tuple[Any, dict]]  # (state, frozen, batch) -> (state, metrics); pure
    frozen: Any  # non-trainable step input (base params, embeddings); not donated, not checkpointed
    exports: Callable[[Any, bool], dict[str, Any]]  # (state, final) -> {file stem: LoraWeights}
    meta: dict  # JSON recorded with every checkpoint (adapter shapes for export_lora.py)
    loss_key: str = "loss"  # the metric summarised as the run's losses
    # validation: (state, ema: bool, noise (1,C,T,h,w), cond (1,L,D), uncond (1,L,D), key, validator) -> latents,
    # with the method's own sampler (wanjax.validation); None: no validation videos
    sample: Callable[..., Any] | None = None
    # optional (phase_1 (state, frozen, batch) -> (state, carry), phase_2 (state, frozen, batch, carry) ->
    # (state, metrics)) whose composition is `step`: the trainer compiles them as two programs so their
    # activations are never live at once (DMD: generator update, then critic update)
    phases: tuple[Callable[..., Any], Callable[..., Any]] | None = None


def build(name: str, ctx: Context) -> Method:
    if name == "lora":
        from wanjax.methods.flow_matching import build as build_fm

        return build_fm(ctx)
    if name == "dmd":
        from wanjax.methods.dmd import build as build_dmd

        return build_dmd(ctx)
    if name == "dcm":
        from wanjax.methods.dcm import build as build_dcm

        return build_dcm(ctx)
    raise ValueError(f"distillation_method={name!r}: expected None (LoRA flow matching), 'dmd' or 'dcm'")
