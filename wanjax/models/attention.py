"""Attention kernels for the Wan transformer, picked by platform, and its context parallelism.

Wan attention has no mask and no causality: plain softmax(q k^T / sqrt(d)) v. Layout (B, S, heads, head_dim).
- "xla": XLA's fused dot-product attention (logits and softmax in float32), every platform.
- "cudnn": cuDNN flash attention on NVIDIA GPUs (bf16/fp16 only, head_dim a multiple of 8, <= 128).
- "splash": Pallas splash (flash) attention on TPU (`jax.experimental.pallas.ops.tpu.splash_attention`). On other
  backends it runs in Pallas interpret mode: slow, for tests only.
- "auto": cuDNN on GPU for half precision (when the head size suits it), splash on TPU, XLA otherwise.

Context parallelism (a `context` mesh axis > 1 in the mesh set with `jax.set_mesh`, see wanjax.sharding): self-
attention constrains q/k/v to be split over heads instead of tokens, so XLA turns the layout switch into an
all-to-all before the kernel and another after it (DeepSpeed-Ulysses); cross-attention keeps the queries split
over tokens and replicates the short text keys. The Pallas/cuDNN kernels cannot be partitioned by XLA, so under a
multi-device mesh they run inside `jax.shard_map` on each device's block of those layouts.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from wanjax import sharding

logger = logging.getLogger(__name__)

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
_KERNELS = ("xla", "cudnn", "splash")
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

# Splash tiles. Wan's self-attention runs over 10^4-10^5 tokens with head_dim 128; large tiles keep the MXU busy and
# amortise the HBM -> VMEM copies (MaxDiffusion uses 512-2048 on v5p/v6e). Capped by the (padded) sequence lengths
# so short keys (512 text tokens) are not padded to a full tile. Tunable, numerics-neutral.
SPLASH_BLOCK_Q = 512
SPLASH_BLOCK_KV = 1024
SPLASH_BLOCK_KV_COMPUTE = 512
_LANES = 128  # TPU lane width: every tile is a multiple of it


def resolve_attention_impl(
    impl: str, dtype, head_dim: int | None = None, seq_lens: tuple[int, ...] = (), backend: str | None = None
) -> str:
    """The concrete kernel `impl` means on `backend` (default: JAX's default backend) for inputs of `dtype`.

    "auto" takes cuDNN only where JAX's cuDNN flash attention accepts the shapes: head_dim a multiple of 8 up to
    128, and (JAX checks this for every training call, as if a bias were given) even sequence lengths `seq_lens`
    (e.g. Wan I2V's 257 CLIP image tokens are odd: that attention runs on XLA).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {impl!r}: expected one of {ATTENTION_IMPLS}")
    if impl != "auto":
        return impl
    backend = jax.default_backend() if backend is None else backend
    cudnn_shapes = (head_dim is None or (head_dim % 8 == 0 and head_dim <= 128)) and all(n % 2 == 0 for n in seq_lens)
    if backend == "gpu" and jnp.dtype(dtype) in _HALF and cudnn_shapes:
        return "cudnn"
    if backend == "tpu":
        return "splash"
    return "xla"


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "auto", self_attention: bool = False
) -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) v over (B, S, H, D) arrays; returns (B, S_q, H, D) in q's dtype.

    `self_attention` picks the context-parallel layout: True switches q/k/v from token- to head-split (all-to-all)
    around the kernel; False keeps the queries token-split and replicates k/v over `context` (right for the short
    text keys of cross-attention; correct, only costlier, for any k/v). Without a mesh with a `context` axis > 1
    it changes nothing.
    """
    mesh = sharding.current_mesh()
    cp = sharding.context_size(mesh)
    q_len = q.shape[1] if self_attention else q.shape[1] // cp  # what the kernel sees per device
    impl = resolve_attention_impl(impl, q.dtype, q.shape[-1], (q_len, k.shape[1]))
    if impl == "cudnn":
        if jnp.dtype(q.dtype) not in _HALF:
            raise ValueError(f"attention='cudnn' needs bfloat16/float16 inputs, got {q.dtype}; use 'xla' or 'auto'")
        if jax.default_backend() != "gpu":
            backend = jax.default_backend()
            raise ValueError(f"attention='cudnn' needs an NVIDIA GPU (backend is {backend!r}); use 'auto'")
    with jax.named_scope(f"attention_{impl}"):
        if mesh is None or (mesh.size == 1) or (impl != "splash" and cp == 1):
            # Single device, or kernels XLA partitions itself (XLA: anything; cuDNN: batch / heads).
            out = _kernel(impl, q, k, v)
        else:
            q_spec, kv_spec, out_spec = sharding.attention_specs(mesh, q.shape, self_attention=self_attention)
            if self_attention and cp > 1:
                # Pin the token-split layout first, so the switch to heads is one all-to-all per tensor (not an
                # all-gather of the sequence followed by a slice, which XLA may pick otherwise).
                q, k, v = (sharding.constrain_tokens(x) for x in (q, k, v))
            if impl == "xla":
                put = lambda x, spec: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))  # noqa: E731
                q, k, v = put(q, q_spec), put(k, kv_spec), put(v, kv_spec)
                out = put(_kernel(impl, q, k, v), out_spec)
            else:
                out = jax.shard_map(
                    functools.partial(_kernel, impl), mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec),
                    out_specs=out_spec, check_vma=False,
                )(q, k, v)
        if cp > 1:  # back to tokens split over `context` (the second all-to-all for self-attention)
            out = sharding.constrain_tokens(out)
        return out


def _kernel(impl: str, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    if impl == "splash":
        interpret = jax.default_backend() != "tpu"
        if interpret:
            _warn_interpret(jax.default_backend())
        return splash_attention(q, k, v, interpret=interpret)
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)


@functools.lru_cache(maxsize=None)
def _warn_interpret(backend: str) -> None:
    logger.warning("attention='splash' on %s runs the TPU kernel in Pallas interpret mode (slow; for tests)", backend)


# ---------------------------------------------------------------------------------------------------------
# TPU splash attention
# ---------------------------------------------------------------------------------------------------------
def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _tile(n: int, block: int) -> tuple[int, int]:
    """(tile, padded length) for a sequence of n: the tile is `block` or, for short sequences, n rounded to lanes."""
    tile = min(block, _round_up(n, _LANES))
    return tile, _round_up(n, tile)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, q_len: int, kv_len: int, block_q: int, block_kv: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    kv_compute = SPLASH_BLOCK_KV_COMPUTE if block_kv % SPLASH_BLOCK_KV_COMPUTE == 0 else block_kv
    block_sizes = sa.BlockSizes(
        block_q=block_q, block_kv=block_kv, block_kv_compute=kv_compute,
        block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=kv_compute,
        use_fused_bwd_kernel=True,
    )
    mask = sa.MultiHeadMask([sa.FullMask((q_len, kv_len)) for _ in range(heads)])

    def build():  # per device block (inside shard_map when sharded): no head / q-sequence shards here
        kernel = sa.make_splash_mha(mask, block_sizes=block_sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
        return jax.tree_util.tree_map(np.asarray, kernel)  # block-mask tables as host constants

    # The kernel is first built while a model is being traced (scan, remat, shard_map), where its tables would
    # be tracers of that trace; JAX's trace state is per thread, so build it on a fresh thread: plain constants
    # that any later trace can reuse from this cache. (Building takes ~0.1-2 s for 10^4-10^5 tokens.)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(build).result()


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool = False) -> jax.Array:
    """Pallas splash attention over (B, S, H, D) arrays (one device's block); the `splash` kernel.

    The kernel wants (H, S, D) per example, sequences in whole tiles and pre-scaled queries (it applies no
    1/sqrt(d)). Padded key slots get segment id 0 and real ones 1 (queries all 1), so no real query sees a pad and
    no row is empty (padded query rows attend the real keys and are dropped).
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, q_len, heads, d = q.shape
    kv_len = k.shape[1]
    block_q, q_pad = _tile(q_len, SPLASH_BLOCK_Q)
    block_kv, kv_pad = _tile(kv_len, SPLASH_BLOCK_KV)
    kernel = _splash_kernel(heads, q_pad, kv_pad, block_q, block_kv, interpret)
    q = (q.astype(jnp.float32) * (1.0 / math.sqrt(d))).astype(q.dtype)

    def to_kernel(x, pad):  # (B, S, H, D) -> (B, H, S + pad, D)
        x = x.transpose(0, 2, 1, 3)
        return jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) if pad else x

    q, k, v = to_kernel(q, q_pad - q_len), to_kernel(k, kv_pad - kv_len), to_kernel(v, kv_pad - kv_len)
    if kv_pad != kv_len:
        segments = sa.SegmentIds(q=jnp.ones((q_pad,), jnp.int32), kv=(jnp.arange(kv_pad) < kv_len).astype(jnp.int32))
        out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(q, k, v, segments)
    else:
        out = jax.vmap(kernel)(q, k, v)
    return out[:, :, :q_len].transpose(0, 2, 1, 3).astype(q.dtype)
