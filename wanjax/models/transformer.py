"""Wan transformer (`WanTransformer3DModel`) in Flax linen, numerically diffusers' own.

Every released variant: Wan2.1 T2V, I2V / FLF2V (image embedder, added K/V, `pos_embed`), Wan2.2 A14B experts and
TI2V-5B (per-token timesteps). Blocks are one `nn.scan` over parameters stacked [num_layers, ...], optionally
rematerialised. Dtypes follow diffusers: matmuls in the weights' dtype (bf16 in training; their gradient
products too, `dot`), float32 for the timestep embedding, modulation, norms and gated residuals.

Token layout inside is channels-last (B, S, D), frame-major then h then w; the public boundary is diffusers'
(B, C, F, H, W).

Runtime options (WanConfig): `attention` picks the kernel (wanjax.models.attention); `remat_policy` none | full |
dots | offload | attention | projections | matmuls. Context parallelism needs no option here: under
`jax.set_mesh(mesh)` with a `context` axis > 1 the tokens are split over it after patchify (`constrain_tokens`) and
self-attention goes through head all-to-alls.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from wanjax import weights
from wanjax.models.attention import dot_product_attention, saves_attention_kernels
from wanjax.models.config import WanConfig
from wanjax.sharding import constrain_tokens, context_size

F32 = jnp.float32
# diffusers' text-encoder context length, hard-coded in its I2V attention (image tokens = context[:, :-512]).
TEXT_CONTEXT_LEN = 512


# ---------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------
@jax.custom_vjp
def dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (..., k) @ w (k, n) of one dtype, accumulated in float32 and rounded once to that dtype; the matmul of
    every linear layer.

    The product writes its result in the operands' dtype (every backend accumulates a bf16 product in float32: the
    cuBLAS / Triton GEMMs, the MXU, XLA:CPU's float32 dot). A float32 result rounded afterwards holds the same values,
    but on a GPU it is a float32 tensor the GEMM writes and another kernel reads back to round it: 4 more bytes of
    memory traffic per output element, for every linear layer's output (the FFN's hidden is 32,760 x 8,960 per block
    of the 1.3B at 480x832x81). The backward is written out so that only what is differentiated is computed or
    saved: the weight gradient, and x for it, only when w is (LoRA A / B, not the frozen base), contracting the
    leading (token) axes directly (autodiff's form made XLA:CPU write each cotangent transposed first: 5-7% of a
    small-model LoRA step); its products are of the operands' dtype too, accumulated in float32.
    """
    return _dot(x, w)


def _dot(x, w):
    if x.dtype != w.dtype:
        raise TypeError(f"dot: operands of one dtype expected, got {x.dtype} and {w.dtype}")
    return _product(x, w, ((x.ndim - 1,), (0,)))


def _product(a, b, contract) -> jax.Array:
    """dot_general(a, b) over `contract` ((a's axes), (b's axes)), no batch axes, in a's dtype (float32 accumulation).

    On CPU a bf16 product is taken with a float32 result and rounded after: XLA:CPU's kernels multiply bf16 operands
    only into float32 and otherwise upcast both operands first (a 4096 x 1536 x 1536 product: 86 ms against 20)."""
    if jax.default_backend() == "cpu" and a.dtype != F32:
        return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=F32).astype(a.dtype)
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=a.dtype)


def _dot_fwd(x, w):  # symbolic_zeros: x and w arrive as CustomVJPPrimal (value, perturbed)
    # the product itself here, not dot (a nested custom_vjp call): remat policies ("dots") must see the dot
    y = _dot(x.value, w.value)
    # saved: w for dx if x is differentiated, x for dw if w is
    return y, (w.value if x.perturbed else None, x.value if w.perturbed else None)


def _dot_bwd(res, g):
    w, x = res
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None
    dtype = (w if w is not None else x).dtype
    g = g.astype(dtype)
    dx = None if w is None else _product(g, w, ((g.ndim - 1,), (1,)))
    dw = None
    if x is not None:
        lead = tuple(range(x.ndim - 1))
        dw = _product(x, g, (lead, lead))
    return dx, dw


dot.defvjp(_dot_fwd, _dot_bwd, symbolic_zeros=True)


class Dense(nn.Module):
    """torch.nn.Linear: y = x W + b, the product accumulated in float32 and written in the output dtype (`dot`).

    The bias is added in that dtype: in bf16 a second rounding where torch's cuBLASLt epilogue adds the bias before
    its one rounding (at most one bf16 ulp apart; identical in float32). The output dtype is x's; with
    `cast_input`, x is first cast to the kernel's dtype (diffusers' `time_embedder`, kept in float32). If the "lora"
    collection holds `A` (in, r) and `B` (r, out) for this layer (and optionally `bias` (out,), PEFT's
    lora_B.bias), the low-rank path (x A) B + bias runs beside the frozen matmul, unmerged, its sum added in the
    output dtype as PEFT adds it: no weight-sized gradient is ever formed. The LoRA scale alpha / r is folded
    into B and bias by the caller (`LoraWeights.scaled_params`).
    """

    features: int
    cast_input: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), F32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), F32)
        if self.cast_input:
            x = x.astype(kernel.dtype)
        y = dot(x, kernel.astype(x.dtype)) + bias.astype(x.dtype)
        if self.has_variable("lora", "A"):
            a = self.get_variable("lora", "A").astype(x.dtype)
            b = self.get_variable("lora", "B").astype(x.dtype)
            up = dot(checkpoint_name(dot(x, a), "lora_down"), b)
            if self.has_variable("lora", "bias"):
                up = up + self.get_variable("lora", "bias").astype(x.dtype)
            y = y + up
        return y


def row_sum_plain(a: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """sum(a * b) (or of a) over the last axis, keepdims: a reduction, which GPU/TPU fuse well."""
    return jnp.sum(a if b is None else a * b, axis=-1, keepdims=True)


def row_sum_dot(a: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """The same sum as a (batched) dot, float32: XLA:CPU fuses a reduction of products over a short minor axis (the
    norms' <= 5120 features) into a kernel ~4x slower than this (the small-model LoRA step: ~5%)."""
    if b is None:
        return jnp.einsum("...d,d->...", a, jnp.ones(a.shape[-1:], a.dtype), preferred_element_type=F32)[..., None]
    return jnp.einsum("...d,...d->...", a, b, preferred_element_type=F32)[..., None]


def _row_sum(a: jax.Array, b: jax.Array | None = None) -> jax.Array:
    return (row_sum_dot if jax.default_backend() == "cpu" else row_sum_plain)(a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def standardize(x: jax.Array, eps: float, center: bool) -> jax.Array:
    """(x - mean) / sqrt(var + eps) over the last axis (`center`: LayerNorm), or x / sqrt(mean(x^2) + eps)
    (RMSNorm), computed and returned in float32 for x of any dtype.

    The backward is written out (dx = r (g - y mean(g y) [- mean(g)]), y the output, r = 1 / sqrt(var + eps)) with
    its row sums as `_row_sum`s; it keeps x in its own dtype and the per-row (mean, r) and recomputes y: autodiff of
    the formula leaves XLA:CPU row reductions of broadcast products it runs slowly (the small-model LoRA step 0.29 ->
    0.23 s), and keeping y would hold a float32 copy of every bf16 norm input."""
    return _standardize_fwd(x, eps, center)[0]


def _standardize_fwd(x, eps, center):
    h = x.astype(F32)
    d = h.shape[-1]
    mean = _row_sum(h) / d if center else None
    if center:
        h = h - mean
    r = jax.lax.rsqrt(_row_sum(h, h) / d + eps)
    return h * r, (x, mean, r)


def _standardize_bwd(eps, center, res, g):
    x, mean, r = res
    h = x.astype(F32)
    out = ((h - mean) if center else h) * r
    d = out.shape[-1]
    dh = g - out * (_row_sum(g, out) / d)
    if center:
        dh = dh - _row_sum(g) / d
    return ((dh * r).astype(x.dtype),)


standardize.defvjp(_standardize_fwd, _standardize_bwd)


class LayerNorm(nn.Module):
    """diffusers' FP32LayerNorm: statistics and affine in float32, output in `out_dtype` (default the input's).

    diffusers normalises `x.float()`; here x goes in in its own dtype (the same float32 arithmetic inside
    `standardize`), so that the backward keeps x, not a float32 copy of it (remat "none" / "dots": one per norm per
    block), and `out_dtype=float32` gives diffusers' float32 result."""

    eps: float
    affine: bool

    @nn.compact
    def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
        dim = x.shape[-1]
        h = standardize(x, self.eps, True)
        if self.affine:
            h = h * self.param("scale", nn.initializers.ones_init(), (dim,), F32).astype(F32)
            h = h + self.param("bias", nn.initializers.zeros_init(), (dim,), F32).astype(F32)
        return h.astype(out_dtype or x.dtype)


class RMSNorm(nn.Module):
    """torch.nn.RMSNorm: normalise and scale in float32, cast back to the input's dtype."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones_init(), (x.shape[-1],), F32)
        h = standardize(x, self.eps, False)  # x in its own dtype, float32 inside (see LayerNorm)
        return (h * scale.astype(F32)).astype(x.dtype)


def _act(fn, x: jax.Array) -> jax.Array:
    """Elementwise activation computed in float32 (torch's internal opmath for half inputs)."""
    return fn(x.astype(F32)).astype(x.dtype)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@jax.custom_vjp
def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU, tanh approximation (diffusers' "gelu-approximate"), computed in float32, returned in x's dtype.

    Its derivative is written out and recomputed from x in the backward: autodiff of the formula keeps float32
    x, x^3 and tanh (4 FFN-sized tensors where activations are saved, remat "none" / "dots")."""
    return jax.nn.gelu(x.astype(F32), approximate=True).astype(x.dtype)


def _gelu_tanh_slope(x: jax.Array) -> jax.Array:
    x = x.astype(F32)
    th = jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3))
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)


def _gelu_tanh_fwd(x):
    return gelu_tanh(x), x


def _gelu_tanh_bwd(x, g):
    return ((_gelu_tanh_slope(x) * g.astype(F32)).astype(x.dtype),)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)
gelu_exact = functools.partial(_act, functools.partial(jax.nn.gelu, approximate=False))
silu = functools.partial(_act, jax.nn.silu)


class MLP(nn.Module):
    """Linear -> activation -> Linear, with diffusers' submodule names given per use.

    FeedForward (`ffn.net.0.proj`, `ffn.net.2`) is named proj_in / proj_out; PixArtAlphaTextProjection and
    TimestepEmbedding are linear_1 / linear_2.
    """

    hidden: int
    out: int
    activation: Any  # elementwise, float32 inside, output in the input's dtype (gelu_tanh, gelu_exact, silu)
    names: tuple[str, str] = ("proj_in", "proj_out")
    cast_input: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = checkpoint_name(Dense(self.hidden, self.cast_input, name=self.names[0])(x), "mlp_hidden")
        h = self.activation(h)
        return checkpoint_name(Dense(self.out, name=self.names[1])(h), "mlp_out")


LINEAR_12 = ("linear_1", "linear_2")


# ---------------------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------------------
def timestep_sinusoid(t: jax.Array, dim: int) -> jax.Array:
    """diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`, float32: [cos, sin]."""
    half = dim // 2
    freqs = jnp.exp(-np.log(10000.0) * jnp.arange(half, dtype=F32) / half)
    args = t.astype(F32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rope_tables(head_dim: int, frames: int, height: int, width: int, theta: float = 10000.0):
    """cos/sin of Wan's 3-axis RoPE per token, (S, head_dim // 2) each, computed in float64 like diffusers."""
    h_dim = w_dim = 2 * (head_dim // 6)
    t_dim = head_dim - h_dim - w_dim

    def axis_angles(dim: int, n: int) -> np.ndarray:
        inv = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        return np.outer(np.arange(n, dtype=np.float64), inv)  # (n, dim/2)

    at, ah, aw = axis_angles(t_dim, frames), axis_angles(h_dim, height), axis_angles(w_dim, width)
    grid = np.concatenate(
        [
            np.broadcast_to(at[:, None, None], (frames, height, width, at.shape[-1])),
            np.broadcast_to(ah[None, :, None], (frames, height, width, ah.shape[-1])),
            np.broadcast_to(aw[None, None, :], (frames, height, width, aw.shape[-1])),
        ],
        axis=-1,
    ).reshape(frames * height * width, head_dim // 2)
    return np.cos(grid).astype(np.float32), np.sin(grid).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of (B, S, H, D) by the token's angles, in float32."""
    pairs = x.astype(F32).reshape(*x.shape[:-1], -1, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


class TimeTextImageEmbedding(nn.Module):
    """diffusers `WanTimeTextImageEmbedding`: temb, timestep_proj, text context, image context."""

    config: WanConfig

    @nn.compact
    def __call__(self, timestep, text, image):
        cfg, dim = self.config, self.config.inner_dim
        dtype = text.dtype
        # time_embedder runs in its own (float32) weights' dtype; temb is then cast to the activation dtype.
        sinus = timestep_sinusoid(timestep, cfg.freq_dim)
        temb = MLP(dim, dim, silu, LINEAR_12, cast_input=True, name="time_embedder")(sinus).astype(dtype)
        timestep_proj = Dense(6 * dim, name="time_proj")(silu(temb))
        ctx = MLP(dim, dim, gelu_tanh, LINEAR_12, name="text_embedder")(text)
        img = None
        if image is not None:
            img = ImageEmbedding(cfg, name="image_embedder")(image.astype(dtype))
        return temb, timestep_proj, ctx, img


class ImageEmbedding(nn.Module):
    """diffusers `WanImageEmbedding`: [pos_embed] -> LayerNorm -> MLP(exact GELU) -> LayerNorm."""

    config: WanConfig

    @nn.compact
    def __call__(self, image: jax.Array) -> jax.Array:
        cfg = self.config
        if cfg.pos_embed_seq_len is not None:
            pos = self.param("pos_embed", nn.initializers.zeros_init(), (1, cfg.pos_embed_seq_len, cfg.image_dim), F32)
            if image.shape[1] * 2 == cfg.pos_embed_seq_len:  # diffusers' form: (2B, L/2) -> (B, L)
                image = image.reshape(-1, cfg.pos_embed_seq_len, image.shape[-1])
            if image.shape[1] != cfg.pos_embed_seq_len:
                raise ValueError(
                    f"encoder_hidden_states_image has {image.shape[1]} tokens; this FLF2V model expects "
                    f"{cfg.pos_embed_seq_len} (or {cfg.pos_embed_seq_len // 2} per image, first/last image pairs)"
                )
            image = image + pos.astype(image.dtype)
        h = LayerNorm(1e-5, True, name="norm1")(image)
        h = MLP(cfg.image_dim, cfg.inner_dim, gelu_exact, name="ff")(h)
        return LayerNorm(1e-5, True, name="norm2")(h)


# ---------------------------------------------------------------------------------------------------------
# Attention and the block
# ---------------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """diffusers `WanAttention` + `WanAttnProcessor` (self- or cross-attention, optional added image K/V)."""

    config: WanConfig
    added_kv: bool = False

    @nn.compact
    def __call__(self, x, context=None, rope=None, image_context=None):
        cfg = self.config
        dim, heads = cfg.inner_dim, cfg.num_attention_heads
        kv_in = x if context is None else context

        def split_heads(t):
            return t.reshape(*t.shape[:-1], heads, cfg.attention_head_dim)

        q = RMSNorm(cfg.eps, name="norm_q")(checkpoint_name(Dense(dim, name="to_q")(x), "q_linear"))
        k = RMSNorm(cfg.eps, name="norm_k")(checkpoint_name(Dense(dim, name="to_k")(kv_in), "k_linear"))
        v = checkpoint_name(Dense(dim, name="to_v")(kv_in), "v_linear")
        q, k, v = split_heads(q), split_heads(k), split_heads(v)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q = checkpoint_name(q, "query_proj")
        k = checkpoint_name(k, "key_proj")
        v = checkpoint_name(v, "value_proj")
        out = dot_product_attention(q, k, v, impl=cfg.attention, self_attention=context is None)
        if self.added_kv:
            k_img = Dense(dim, name="add_k_proj")(image_context)
            k_img = split_heads(RMSNorm(cfg.eps, name="norm_added_k")(k_img))
            v_img = split_heads(Dense(dim, name="add_v_proj")(image_context))
            out = out + dot_product_attention(q, k_img, v_img, impl=cfg.attention)
        out = checkpoint_name(out.reshape(*out.shape[:-2], dim), "attention_out")
        return checkpoint_name(Dense(dim, name="to_out")(out), "out_linear")


class WanBlock(nn.Module):
    """One `WanTransformerBlock`: modulated self-attention, cross-attention, modulated FFN. Scanned."""

    config: WanConfig

    @nn.compact
    def __call__(self, x, context, image_context, timestep_proj, rope_cos, rope_sin):
        cfg, dim = self.config, self.config.inner_dim
        dtype = x.dtype
        x = constrain_tokens(x)  # context parallelism: tokens stay split over `context` through the block
        table = self.param("scale_shift_table", _scaled_normal(dim), (1, 6, dim), F32)
        # (B, 6, D) per sample, or (B, S, 6, D) per token (TI2V); modulation in float32.
        mod = table.astype(F32) + timestep_proj.astype(F32)
        shift, scale, gate, c_shift, c_scale, c_gate = (mod[..., i, :] for i in range(6))
        if mod.ndim == 3:  # per sample: broadcast over tokens
            shift, scale, gate, c_shift, c_scale, c_gate = (t[:, None, :] for t in (shift, scale, gate, c_shift, c_scale, c_gate))

        with jax.named_scope("self_attention"):
            h = (LayerNorm(cfg.eps, False, name="norm1")(x, F32) * (1 + scale) + shift).astype(dtype)
            a = Attention(cfg, name="attn1")(h, rope=(rope_cos, rope_sin))
            x = constrain_tokens((x.astype(F32) + a * gate).astype(dtype))

        with jax.named_scope("cross_attention"):
            h = LayerNorm(cfg.eps, True, name="norm2")(x) if cfg.cross_attn_norm else x
            a = Attention(cfg, added_kv=cfg.added_kv_proj_dim is not None, name="attn2")(
                h, context=context, image_context=image_context
            )
            x = constrain_tokens(x + a)

        with jax.named_scope("ffn"):
            h = (LayerNorm(cfg.eps, False, name="norm3")(x, F32) * (1 + c_scale) + c_shift).astype(dtype)
            f = MLP(cfg.ffn_dim, dim, gelu_tanh, name="ffn")(h)
            x = constrain_tokens((x.astype(F32) + f.astype(F32) * c_gate).astype(dtype))
        return x, None  # scan's (carry, output) form


def _scaled_normal(dim: int):
    """diffusers' init of scale_shift_table: randn / sqrt(dim)."""
    return lambda key, shape, dtype: jax.random.normal(key, shape, dtype) / dim**0.5


# `checkpoint_name` tags in `Attention` that the "offload" policy moves to host memory between forward and backward.
OFFLOADED_NAMES = ("query_proj", "key_proj", "value_proj", "attention_out")
# The linear layers' outputs in the activation dtype (the inputs of the norms, RoPE, activation and residual adds
# that follow them), and each adapter's rank-r (x A): with these and the attention kernels' outputs saved, a block's
# backward recomputes only elementwise ops, no product. "projections" leaves out the FFN's hidden activation (the
# widest tensor, ffn_dim per token) and recomputes its up-projection instead. (A policy saves only what the backward
# reads: the FFN's output, "mlp_out", only where the modulation table is trained, for its gate's gradient.)
PROJECTION_NAMES = ("q_linear", "k_linear", "v_linear", "out_linear", "mlp_out", "lora_down")
MATMUL_NAMES = (*PROJECTION_NAMES, "mlp_hidden")


def _saves_kernels_and(names: tuple[str, ...]):
    """Remat policy: the attention kernels' outputs (`saves_attention_kernels`) and the `checkpoint_name`s `names`."""
    def policy(prim, *args, **params) -> bool:
        if prim.name == "name" and params.get("name") in names:
            return True
        return saves_attention_kernels(prim, *args, **params)

    return policy


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "attention": saves_attention_kernels,
    "projections": _saves_kernels_and(PROJECTION_NAMES),
    "matmuls": _saves_kernels_and(MATMUL_NAMES),
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=list(OFFLOADED_NAMES),
        offload_src="device", offload_dst="pinned_host",
    ),
}


class PatchEmbed(nn.Module):
    """Conv3d(in, D, kernel = stride = patch) applied to flattened patches; kernel in Flax layout (kT, kH, kW, I, O).

    The activation dtype of the whole model is this kernel's dtype (diffusers casts inputs to the model dtype).
    """

    config: WanConfig

    @nn.compact
    def __call__(self, patches: jax.Array) -> jax.Array:
        cfg, dim = self.config, self.config.inner_dim
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (*cfg.patch_size, cfg.in_channels, dim), F32)
        bias = self.param("bias", nn.initializers.zeros_init(), (dim,), F32)
        x = patches.astype(kernel.dtype)
        return dot(x, kernel.reshape(-1, dim)) + bias.astype(x.dtype)


class WanTransformer(nn.Module):
    """The whole model. Inputs channels-last; see `transformer_forward` for the public entry point."""

    config: WanConfig

    @nn.compact
    def __call__(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None):
        cfg = self.config
        dim = cfg.inner_dim
        pt, ph, pw = cfg.patch_size
        b, c, f, hh, ww = hidden_states.shape
        nf, nh, nw = f // pt, hh // ph, ww // pw
        seq = nf * nh * nw

        # 1. Patch embedding: Conv3d(kernel = stride = patch) as one matmul over (pt, ph, pw, c) patch vectors.
        x = hidden_states.reshape(b, c, nf, pt, nh, ph, nw, pw).transpose(0, 2, 4, 6, 3, 5, 7, 1)
        x = PatchEmbed(cfg, name="patch_embedding")(x.reshape(b, seq, pt * ph * pw * c))
        x = constrain_tokens(x)  # context parallelism: from here on tokens are split over `context`
        dtype = x.dtype

        # 2. Conditions. Per-token timesteps (B, S) give per-token temb and modulation (TI2V-5B).
        temb, timestep_proj, context, image_context = TimeTextImageEmbedding(cfg, name="condition_embedder")(
            timestep, encoder_hidden_states.astype(dtype), encoder_hidden_states_image
        )
        timestep_proj = timestep_proj.reshape(*timestep_proj.shape[:-1], 6, dim)
        if timestep_proj.ndim == 4:  # per token (B, S, 6, D): split like the tokens
            timestep_proj = constrain_tokens(timestep_proj)
        if image_context is not None and cfg.added_kv_proj_dim is None:
            context = jnp.concatenate([image_context, context], axis=1)  # image tokens first, plain cross-attn
            image_context = None

        # 3. Blocks, scanned over stacked parameters.
        cos, sin = (jnp.asarray(t) for t in rope_tables(cfg.attention_head_dim, nf, nh, nw))
        block_cls = WanBlock
        if cfg.remat_policy != "none":
            block_cls = nn.remat(WanBlock, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
        blocks = nn.scan(
            block_cls,
            variable_axes={"params": 0, "lora": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,) * 5,
            length=cfg.num_layers,
        )(cfg, name="blocks")
        x, _ = blocks(x, context, image_context, timestep_proj, cos, sin)

        # 4. Output: modulated norm with temb itself (not time_proj), projection, unpatchify.
        table = self.param("scale_shift_table", _scaled_normal(dim), (1, 2, dim), F32)
        out_mod = table.astype(F32) + temb.astype(F32)[..., None, :]  # (B, 2, D) or (B, S, 2, D)
        shift, scale = out_mod[..., 0, :], out_mod[..., 1, :]
        if out_mod.ndim == 3:
            shift, scale = shift[:, None], scale[:, None]
        x = (LayerNorm(cfg.eps, False, name="norm_out")(x, F32) * (1 + scale) + shift).astype(dtype)
        x = Dense(cfg.out_channels * pt * ph * pw, name="proj_out")(x)
        x = x.reshape(b, nf, nh, nw, pt, ph, pw, cfg.out_channels)
        return x.transpose(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, cfg.out_channels, nf * pt, nh * ph, nw * pw)


# ---------------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------------
def _check_inputs(cfg: WanConfig, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image):
    if hidden_states.ndim != 5 or hidden_states.shape[1] != cfg.in_channels:
        raise ValueError(
            f"hidden_states has shape {tuple(hidden_states.shape)}; expected (B, {cfg.in_channels}, F, H, W)"
        )
    b, _, f, h, w = hidden_states.shape
    pt, ph, pw = cfg.patch_size
    if f % pt or h % ph or w % pw:
        raise ValueError(f"hidden_states (F, H, W) = {(f, h, w)} must be divisible by patch_size {cfg.patch_size}")
    seq = (f // pt) * (h // ph) * (w // pw)
    if timestep.shape not in ((b,), (b, seq)):
        raise ValueError(f"timestep has shape {tuple(timestep.shape)}; expected ({b},) or per-token ({b}, {seq})")
    if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b or encoder_hidden_states.shape[2] != cfg.text_dim:
        raise ValueError(
            f"encoder_hidden_states has shape {tuple(encoder_hidden_states.shape)}; expected ({b}, L, {cfg.text_dim})"
        )
    if max(f // pt, h // ph, w // pw) > cfg.rope_max_seq_len:
        raise ValueError(f"latent grid {(f // pt, h // ph, w // pw)} exceeds rope_max_seq_len={cfg.rope_max_seq_len}")
    if cfg.added_kv_proj_dim is not None and encoder_hidden_states_image is None:
        raise ValueError("this I2V model (added_kv_proj_dim set) needs encoder_hidden_states_image")
    if encoder_hidden_states_image is not None and not cfg.has_image_embedder:
        raise ValueError("encoder_hidden_states_image given, but this model has no image embedder (image_dim=None)")
    if encoder_hidden_states_image is not None and encoder_hidden_states_image.shape[-1] != cfg.image_dim:
        raise ValueError(
            f"encoder_hidden_states_image has shape {tuple(encoder_hidden_states_image.shape)}; "
            f"expected (B, N, {cfg.image_dim})"
        )


def transformer_forward(
    config: WanConfig,
    params: dict,
    hidden_states: jax.Array,
    timestep: jax.Array,
    encoder_hidden_states: jax.Array,
    *,
    encoder_hidden_states_image: jax.Array | None = None,
    lora: Any = None,
) -> jax.Array:
    """Velocity of the Wan transformer, diffusers layout in and out. Pure; wrap in `jax.jit` as is.

    hidden_states (B, C_in, F, H, W); timestep (B,) in [0, 1000] or per-token (B, S); encoder_hidden_states
    (B, L, text_dim); I2V: encoder_hidden_states_image (B, N, image_dim). Returns (B, C_out, F, H, W) in the
    weights' dtype. `lora=None` is the base model; otherwise an adapter object whose `scaled_params()` gives the
    "lora" collection (A and alpha/r-scaled B per adapted layer, mirroring the params tree).
    """
    _check_inputs(config, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image)
    variables = {"params": params}
    if lora is not None:
        variables["lora"] = lora.scaled_params()
    return WanTransformer(config).apply(
        variables, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image
    )


def param_shapes(config: WanConfig, dtype=None) -> dict:
    """The params pytree of `config` as `jax.ShapeDtypeStruct`s, without allocating anything: float32, or with
    `dtype` each leaf in the dtype `load_transformer(..., dtype=dtype)` gives it (diffusers' float32 modules stay
    float32 under a half dtype)."""
    pt, ph, pw = config.patch_size
    b = 1
    # one token per `context` device, so a mesh in effect (even while tracing under jit) can split the dummy input
    x = jax.ShapeDtypeStruct((b, config.in_channels, pt * context_size(), ph, pw), F32)
    t = jax.ShapeDtypeStruct((b,), F32)
    ctx = jax.ShapeDtypeStruct((b, 1, config.text_dim), F32)
    img = None
    if config.has_image_embedder:
        n = config.pos_embed_seq_len or 1
        img = jax.ShapeDtypeStruct((b, n, config.image_dim), F32)
    model = WanTransformer(config)
    shapes = jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a), x, t, ctx, img)["params"]
    if dtype is None:
        return shapes

    def leaf(path, s):
        names = weights.path_names(path)
        return jax.ShapeDtypeStruct(s.shape, weights.target_dtype(names, s.dtype, dtype))

    return jax.tree_util.tree_map_with_path(leaf, shapes)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _random_leaf(key, shape, dtype):
    return (jax.random.normal(key, shape, F32) * 0.02).astype(dtype)


def init_params(config: WanConfig, rng: jax.Array, dtype=F32) -> dict:
    """Random parameters (normal, scale 0.02) for tests, demos and benchmarks, in the dtypes `load_transformer`
    gives a model loaded in `dtype`. One compiled draw per leaf, straight into its dtype: no float32 copy of a
    bfloat16 leaf is ever held (a 14B's stacked FFN kernel is 11 GB in float32; a benchmark's peak memory counts it)."""
    leaves, treedef = jax.tree_util.tree_flatten(param_shapes(config, dtype))
    keys = jax.random.split(rng, len(leaves))
    out = [_random_leaf(k, tuple(s.shape), s.dtype) for k, s in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(treedef, out)
