"""Attention kernels for the Wan transformer, picked by platform, and its context parallelism.

Wan attention has no mask and no causality: plain softmax(q k^T / sqrt(d)) v. Layout (B, S, heads, head_dim).
- "xla": XLA's fused dot-product attention (logits and softmax in float32), every platform.
- "cpu": the same math in XLA ops with the backward written out (`softmax_attention`): heads-major products, the
  row logsumexp saved and the probabilities recomputed from it, and the softmax-backward row sum taken as
  sum(dO * O) over head_dim instead of sum(dP * P) over the keys. Runs anywhere; the default on CPU, where
  XLA:CPU's fusions of the autodiff'd "xla" backward are slow (small-model LoRA step 0.44 s -> 0.23 s).
- "cudnn": cuDNN flash attention on NVIDIA GPUs (bf16/fp16 only, head_dim a multiple of 8, <= 128).
- "splash": Pallas splash (flash) attention on TPU (`jax.experimental.pallas.ops.tpu.splash_attention`). On other
  backends it runs in Pallas interpret mode: slow, for tests only.
- "auto": cuDNN on GPU for half precision (when the head size suits it), splash on TPU, "cpu" on CPU, XLA
  otherwise.

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
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import NamedSharding

from wanjax import sharding

logger = logging.getLogger(__name__)

ATTENTION_IMPLS = ("auto", "xla", "cpu", "cudnn", "splash")
_XLA_PARTITIONED = ("xla", "cpu")  # kernels made of XLA ops: XLA partitions them itself under a mesh
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

# What each kernel's backward reads from its forward beyond q, k, v: the output and the softmax statistics. The remat
# policy "attention" (`saves_attention_kernels`) keeps exactly these, so a rematerialised block does not run the
# kernel's forward again. `cpu`: its checkpoint names; `cudnn`: the outputs of JAX's cuDNN forward primitive
# (output, softmax stats); `splash`: the outputs of the Pallas forward kernel (output, logsumexp). `xla` (autodiff
# through XLA ops, whose residual is the (S_q, S_k) probabilities) saves nothing: it is recomputed as under "full".
KERNEL_RESIDUAL_NAMES = ("attention_kernel_out", "attention_kernel_lse")
_CUDNN_FORWARD_PRIMITIVE = "dot_product_attention_fwd_wrapper"
_SPLASH_FORWARD_KERNEL = "splash_mha_fwd"  # prefix of the pallas_call's name ("..._residuals" when differentiated)

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
    if backend == "cpu":
        return "cpu"
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
            # Single device, or kernels XLA partitions itself (XLA ops: anything; cuDNN: batch / heads).
            out = _kernel(impl, q, k, v)
        else:
            q_spec, kv_spec, out_spec = sharding.attention_specs(mesh, q.shape, self_attention=self_attention)
            if self_attention and cp > 1:
                # Pin the token-split layout first, so the switch to heads is one all-to-all per tensor (not an
                # all-gather of the sequence followed by a slice, which XLA may pick otherwise).
                q, k, v = (sharding.constrain_tokens(x) for x in (q, k, v))
            if impl in _XLA_PARTITIONED:
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


def saves_attention_kernels(prim, *_, **params) -> bool:
    """Remat policy (jax.checkpoint's `policy`): save the attention kernels' forward outputs that their backward
    reads (see KERNEL_RESIDUAL_NAMES), recompute everything else."""
    if prim.name == "name":  # checkpoint_name
        return params.get("name") in KERNEL_RESIDUAL_NAMES
    if prim.name == _CUDNN_FORWARD_PRIMITIVE:
        return True
    if prim.name == "pallas_call":
        return str(params.get("name", "")).startswith(_SPLASH_FORWARD_KERNEL)
    return False


def _kernel(impl: str, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    if impl == "splash":
        interpret = jax.default_backend() != "tpu"
        if interpret:
            _warn_interpret(jax.default_backend())
        return splash_attention(q, k, v, interpret=interpret)
    if impl == "cpu":
        return softmax_attention(q, k, v)
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)


# ---------------------------------------------------------------------------------------------------------
# XLA ops with a hand-written backward ("cpu")
# ---------------------------------------------------------------------------------------------------------
_F32 = jnp.float32


@jax.custom_vjp
def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v over (B, S, H, D) arrays with the backward written out; the `cpu` kernel.

    Precision as jax.nn.dot_product_attention's XLA path: logits scaled, soft-maxed and accumulated in float32,
    probabilities cast to v's dtype for the products (normalised after the product, as flash attention does).
    Heads-major products; forward residuals q, k, v, the output and the row logsumexp (B, H, S_q, 1), never the
    (S_q, S_k) probabilities, which the backward recomputes from the logsumexp.
    """
    return _softmax_attention_fwd(q, k, v)[0]


def _heads_major(x: jax.Array) -> jax.Array:  # (B, S, H, D) <-> (B, H, S, D)
    return jnp.swapaxes(x, 1, 2)


def _scaled_logits(qh: jax.Array, kh: jax.Array) -> jax.Array:
    logits = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, preferred_element_type=_F32)
    return logits * jnp.asarray(1.0 / math.sqrt(qh.shape[-1]), _F32)


def _softmax_attention_fwd(q, k, v):
    qh, kh, vh = _heads_major(q), _heads_major(k), _heads_major(v)
    logits = _scaled_logits(qh, kh)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - row_max)
    row_sum = jnp.sum(p, axis=-1, keepdims=True)
    oh = (jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), vh, preferred_element_type=_F32) / row_sum).astype(q.dtype)
    # named for the remat policy "attention"; the output is taken from the named value, so that saving it suffices
    oh = checkpoint_name(oh, KERNEL_RESIDUAL_NAMES[0])
    lse = checkpoint_name(row_max + jnp.log(row_sum), KERNEL_RESIDUAL_NAMES[1])
    return _heads_major(oh), (qh, kh, vh, oh, lse)


def _softmax_attention_bwd(res, d_out):
    qh, kh, vh, oh, lse = res
    scale = 1.0 / math.sqrt(qh.shape[-1])
    doh = _heads_major(d_out)
    p = jnp.exp(_scaled_logits(qh, kh) - lse)
    # softmax backward: dS = P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(dO * O): a sum over D, not S_k
    delta = jnp.sum(doh.astype(_F32) * oh.astype(_F32), axis=-1, keepdims=True)
    dp = jnp.einsum("bhqd,bhkd->bhqk", doh, vh, preferred_element_type=_F32)
    ds = p * (dp - delta)
    dq = jnp.einsum("bhqk,bhkd->bhqd", ds.astype(kh.dtype), kh, preferred_element_type=_F32) * scale
    dk = jnp.einsum("bhqk,bhqd->bhkd", ds.astype(qh.dtype), qh, preferred_element_type=_F32) * scale
    dv = jnp.einsum("bhqk,bhqd->bhkd", p.astype(doh.dtype), doh, preferred_element_type=_F32)
    return tuple(_heads_major(g).astype(x.dtype) for g, x in ((dq, qh), (dk, kh), (dv, vh)))


softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


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
