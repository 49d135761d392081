"""The Wan transformer's architecture config: diffusers' `WanTransformer3DModel` config.json, typed.

Field names and defaults are diffusers' own so a `config.json` maps one to one. Two runtime options
(`attention`: auto | xla | cpu | cudnn | splash, `remat_policy`: none | full | dots | offload | attention |
projections | matmuls) are wanjax's and never written to a diffusers config.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax

from wanjax.models.attention import ATTENTION_IMPLS

logger = logging.getLogger(__name__)

# Keys diffusers writes into config.json that carry no architecture.
_DIFFUSERS_BOOKKEEPING = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}
# Keys older diffusers / Wan configs carried that the current model ignores.
_IGNORED_LEGACY = {"window_size", "add_img_emb", "model_type"}

# Remat of each block: "none" keeps every activation; "full" saves nothing (recompute the block in backward);
# "dots" saves matmul outputs; "offload" saves the named attention tensors (q, k, v, attention output) in pinned
# host memory and recomputes the rest (device memory of "full", less recompute; needs host offload support:
# GPU/TPU, and XLA:CPU where the copies are no-ops). "dots" and "offload" still re-run the attention kernels (their
# softmax statistics are not saved); "attention" saves each attention kernel's output and softmax statistics
# (`attention.saves_attention_kernels`; not for the `xla` kernel) and recomputes the rest: the attention core,
# most of a long clip's forward FLOPs, is not run twice, for ~2 S D activations per block. "projections" also saves
# the attention layers' linear outputs (q, k, v, out; ~6 S D more) and recomputes the FFN's up-projection;
# "matmuls" saves the FFN's hidden activation too (S F more) and recomputes no product at all, only elementwise ops
# (norms, RoPE, GELU, modulation): 1.3B LoRA at 480x832x81, 49.5 GiB against 62.8 for "none" (CPU compiler).
REMAT_POLICIES = ("none", "full", "dots", "offload", "attention", "projections", "matmuls")
RUNTIME_FIELDS = frozenset({"attention", "remat_policy"})


@dataclasses.dataclass(frozen=True)
class WanConfig:
    """Architecture of a Wan transformer (diffusers names) plus wanjax runtime options."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None
    # wanjax runtime options (not part of the architecture, not saved to diffusers configs)
    attention: str = "auto"
    remat_policy: str = "none"

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must have 3 entries (t, h, w), got {self.patch_size}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention={self.attention!r}: expected one of {ATTENTION_IMPLS}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}: expected one of {REMAT_POLICIES}")
        if self.attention_head_dim < 6 or self.attention_head_dim % 2:
            raise ValueError(f"attention_head_dim={self.attention_head_dim}: RoPE needs an even head_dim >= 6")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def has_image_embedder(self) -> bool:
        return self.image_dim is not None

    @property
    def image_conditioning(self) -> str:
        """Why this is an image-to-video model, which wanjax does not train or sample ("": text-to-video, TI2V-5B
        included: its image enters as clean latent frames, not as extra channels)."""
        if self.in_channels != self.out_channels:
            return f"in_channels {self.in_channels} != out_channels {self.out_channels}"
        return f"image_dim {self.image_dim}" if self.has_image_embedder else ""

    # -- diffusers config.json <-> WanConfig -------------------------------------------------------------
    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any], *, source: str = "config") -> "WanConfig":
        """Build from a diffusers `config.json` dict; unknown architecture keys are refused."""
        arch = {f.name for f in dataclasses.fields(cls)} - RUNTIME_FIELDS
        kwargs, unknown = {}, []
        for key, value in cfg.items():
            if key in arch:
                kwargs[key] = tuple(value) if key == "patch_size" else value
            elif key in _DIFFUSERS_BOOKKEEPING or key in _IGNORED_LEGACY:
                continue
            else:
                unknown.append(key)
        if unknown:
            raise ValueError(
                f"{source}: unknown WanTransformer3DModel config keys {sorted(unknown)}; expected a subset of {sorted(arch)}"
            )
        cls_name = cfg.get("_class_name")
        if cls_name is not None and cls_name != "WanTransformer3DModel":
            raise ValueError(f"{source}: _class_name is {cls_name!r}, expected 'WanTransformer3DModel'")
        return cls(**kwargs)

    def to_diffusers(self) -> dict[str, Any]:
        """The config.json diffusers' `WanTransformer3DModel.from_pretrained` reads."""
        out: dict[str, Any] = {"_class_name": "WanTransformer3DModel"}
        for f in dataclasses.fields(self):
            if f.name in RUNTIME_FIELDS:
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes) -> "WanConfig":
        return dataclasses.replace(self, **changes)


# A config is static structure under jit: it has no array leaves and is hashed into the cache key, so
# `jax.jit(transformer_forward)(config, params, ...)` needs no static_argnums.
jax.tree_util.register_static(WanConfig)
