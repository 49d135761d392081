"""Attention kernels for the Wan transformer, picked by platform.

Wan attention has no mask and no causality: plain softmax(q k^T / sqrt(d)) v. Layout (B, S, heads, head_dim).
- "xla": XLA's fused dot-product attention (logits and softmax in float32), every platform.
- "cudnn": cuDNN flash attention on NVIDIA GPUs (bf16/fp16 only).
- "auto": cuDNN on GPU for half precision, XLA otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def resolve_attention_impl(impl: str, dtype) -> str:
    """The concrete kernel `impl` means on the current default backend for inputs of `dtype`."""
    if impl != "auto":
        return impl
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "auto") -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) v over (B, S, H, D) arrays; returns (B, S_q, H, D) in q's dtype."""
    impl = resolve_attention_impl(impl, q.dtype)
    if impl not in ("xla", "cudnn"):
        raise ValueError(f"attention implementation {impl!r}: expected 'auto', 'xla' or 'cudnn'")
    with jax.named_scope(f"attention_{impl}"):
        return jax.nn.dot_product_attention(q, k, v, implementation=impl)
