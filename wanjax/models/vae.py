"""Wan VAE (diffusers `AutoencoderKLWan`, Wan2.1 and Wan2.2) in Flax linen, numerically diffusers' own.

diffusers streams a clip through the model: the first frame alone, then chunks of 4 frames (decode: one latent
frame at a time), each causal conv prepending a cache of the previous chunk's last 2 input frames. Here every
temporal op takes the same cache from the linen "cache" collection, so the model runs either

- whole sequence (`chunk=None`): one call over all frames, the caches are zeros = the causal front padding;
- chunked (default `chunk=1`, diffusers' algorithm): the first (latent) frame, then `lax.scan` over chunks of
  `chunk` latent frames carrying the caches, so activations are held for one chunk only;

and both equal diffusers (a chunk of any size is exact, the causal ops only look back through the caches).
Optional spatial tiling (`tiling=Tiling(...)`) is diffusers' `enable_tiling()`: overlapping tiles, each through
the model (tiles of one shape in a `lax.map`), blended exactly as diffusers blends them.

Layout inside is channels-last (B, T, H, W, C); the public boundary is diffusers' (B, C, F, H, W). Activations
run in the params' dtype (float32 by default), convs accumulate in float32, norms normalise in float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

F32 = jnp.float32
_BOOKKEEPING = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}
_IGNORED_LEGACY = {"clip_output"}  # older Wan VAE configs; diffusers always clamps now
# fmt: off
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
# fmt: on


@dataclasses.dataclass(frozen=True)
class VaeConfig:
    """diffusers' `AutoencoderKLWan` config (same field names and defaults: the Wan2.1 VAE)."""

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0  # inference only: never applied
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int | None = 4
    scale_factor_spatial: int | None = 8

    def __post_init__(self):
        casts = {"dim_mult": int, "attn_scales": float, "temperal_downsample": bool, "latents_mean": float}
        for name, cast in {**casts, "latents_std": float}.items():
            object.__setattr__(self, name, tuple(cast(v) for v in getattr(self, name)))
        n, p = len(self.dim_mult), self.patch_size or 1
        problems = []
        if len(self.temperal_downsample) != n - 1:
            problems.append(f"temperal_downsample {self.temperal_downsample} needs len(dim_mult) - 1 = {n - 1} entries")
        if sum(self.temperal_downsample) > 2:
            problems.append(
                f"temperal_downsample {self.temperal_downsample}: at most 2 temporal steps (4-frame chunks)"
            )
        if self.attn_scales:
            problems.append(f"attn_scales={self.attn_scales} is unsupported (diffusers' encoder cannot run it either)")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            problems.append(
                f"latents_mean/std have {len(self.latents_mean)}/{len(self.latents_std)} entries, not z_dim"
            )
        if self.in_channels % (p * p) or self.out_channels % (p * p):
            problems.append(f"in/out_channels {self.in_channels}/{self.out_channels} not divisible by patch_size^2")
        if self.scale_factor_spatial not in (None, self.spatial_factor):
            problems.append(
                f"scale_factor_spatial={self.scale_factor_spatial}, the architecture's is {self.spatial_factor}"
            )
        if self.scale_factor_temporal not in (None, self.temporal_factor):
            problems.append(
                f"scale_factor_temporal={self.scale_factor_temporal}, the architecture's is {self.temporal_factor}"
            )
        if problems:
            raise ValueError(f"invalid AutoencoderKLWan config (z_dim={self.z_dim}): " + "; ".join(problems))

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1) * (self.patch_size or 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def video_channels(self) -> int:
        return self.in_channels // (self.patch_size or 1) ** 2

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any], *, source: str = "config") -> VaeConfig:
        """Build from a diffusers VAE `config.json` dict; unknown keys are refused by name."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in cfg if k not in fields and k not in _BOOKKEEPING | _IGNORED_LEGACY)
        if unknown:
            raise ValueError(
                f"{source}: unknown AutoencoderKLWan config keys {unknown}; expected a subset of {sorted(fields)}"
            )
        name = cfg.get("_class_name")
        if name is not None and name != "AutoencoderKLWan":
            raise ValueError(f"{source}: _class_name is {name!r}, expected 'AutoencoderKLWan'")
        return cls(**{k: v for k, v in cfg.items() if k in fields})

    def to_diffusers(self) -> dict[str, Any]:
        """The config.json diffusers' `AutoencoderKLWan.from_pretrained` reads."""
        out: dict[str, Any] = {"_class_name": "AutoencoderKLWan"}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


jax.tree_util.register_static(VaeConfig)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """diffusers' `enable_tiling()` arguments and defaults, in pixels; multiples of the spatial factor."""

    tile_sample_min_height: int = 256
    tile_sample_min_width: int = 256
    tile_sample_stride_height: int = 192
    tile_sample_stride_width: int = 192

    @property
    def tile(self) -> tuple[int, int]:
        return self.tile_sample_min_height, self.tile_sample_min_width

    @property
    def stride(self) -> tuple[int, int]:
        return self.tile_sample_stride_height, self.tile_sample_stride_width


# ---------------------------------------------------------------------------------------------------------
# Layers (channels-last)
# ---------------------------------------------------------------------------------------------------------
def _acc(dtype) -> jnp.dtype:
    """Accumulation / island dtype: float32 for half inputs, else the input's (float64 for exactness tests)."""
    return jnp.promote_types(dtype, F32)


def _act(x: jax.Array) -> jax.Array:
    return jax.nn.silu(x.astype(_acc(x.dtype))).astype(x.dtype)


def _conv(x, kernel, bias, stride, padding) -> jax.Array:
    """N(D)HWC conv in x's dtype with float32 accumulation and bias."""
    dn = ("NDHWC", "DHWIO", "NDHWC") if kernel.ndim == 5 else ("NHWC", "HWIO", "NHWC")
    acc = _acc(x.dtype)
    y = lax.conv_general_dilated(
        x, kernel.astype(x.dtype), stride, padding, dimension_numbers=dn, preferred_element_type=acc
    )
    return (y + bias.astype(acc)).astype(x.dtype)


class CausalConv3d(nn.Module):
    """`WanCausalConv3d`: time padding 2*p_t at the front only, filled from the "cache" collection (the last
    2*p_t input frames of the previous chunk; zeros at the start or when the collection is not mutable)."""

    features: int
    kernel: tuple[int, int, int] = (3, 3, 3)
    padding: tuple[int, int, int] = (1, 1, 1)
    stride: tuple[int, int, int] = (1, 1, 1)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kt, kh, kw = self.kernel
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (kt, kh, kw, x.shape[-1], self.features), F32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), F32)
        pt, ph, pw = self.padding
        if pt:
            prev = jnp.zeros((x.shape[0], 2 * pt, *x.shape[2:]), x.dtype)
            if self.is_mutable_collection("cache"):
                cache = self.variable("cache", "frames", lambda: prev)
                prev = cache.value
            x = jnp.concatenate([prev, x], axis=1)
            if self.is_mutable_collection("cache"):
                cache.value = x[:, -2 * pt :]
        b, t, h, w, _ = x.shape
        if t < kt:  # a first chunk too short for this (temporal) conv: no output frames
            ho, wo = (h + 2 * ph - kh) // self.stride[1] + 1, (w + 2 * pw - kw) // self.stride[2] + 1
            return jnp.zeros((b, 0, ho, wo, self.features), x.dtype)
        return _conv(x, kernel, bias, self.stride, [(0, 0), (ph, ph), (pw, pw)])


class Conv2d(nn.Module):
    """torch Conv2d applied per frame to (N, H, W, C)."""

    features: int
    size: int = 3
    stride: int = 1
    padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, f = self.size, self.features
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], f), F32)
        bias = self.param("bias", nn.initializers.zeros_init(), (f,), F32)
        return _conv(x, kernel, bias, (self.stride, self.stride), self.padding)


class RMSNorm(nn.Module):
    """`WanRMS_norm`: L2-normalise over channels in float32 (eps 1e-12), times sqrt(C) * gamma."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        gamma = self.param("gamma", nn.initializers.ones_init(), (c,), F32)
        h = x.astype(_acc(x.dtype))
        h = h / jnp.maximum(jnp.sqrt(jnp.sum(h * h, axis=-1, keepdims=True)), 1e-12)
        return h.astype(x.dtype) * (c**0.5) * gamma.astype(x.dtype)


def _per_frame(fn, x: jax.Array) -> jax.Array:
    b, t = x.shape[:2]
    y = fn(x.reshape(b * t, *x.shape[2:]))
    return y.reshape(b, t, *y.shape[1:])


class ResidualBlock(nn.Module):
    """`WanResidualBlock`: norm-silu-conv twice plus a (1x1x1 conv when widths differ) shortcut."""

    out_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = x
        if x.shape[-1] != self.out_dim:
            h = CausalConv3d(self.out_dim, (1, 1, 1), (0, 0, 0), name="conv_shortcut")(x)
        x = CausalConv3d(self.out_dim, name="conv1")(_act(RMSNorm(name="norm1")(x)))
        x = CausalConv3d(self.out_dim, name="conv2")(_act(RMSNorm(name="norm2")(x)))
        return x + h


class AttentionBlock(nn.Module):
    """`WanAttentionBlock`: per-frame single-head self-attention over H*W with 1x1 conv projections."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        y = RMSNorm(name="norm")(x).reshape(b * t, h, w, c)
        qkv = Conv2d(3 * c, 1, padding=((0, 0), (0, 0)), name="to_qkv")(y).reshape(b * t, h * w, 3 * c)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        acc = _acc(x.dtype)
        logits = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=acc) / np.sqrt(c)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        o = jnp.einsum("nqk,nkc->nqc", probs, v, preferred_element_type=acc).astype(x.dtype)
        o = Conv2d(c, 1, padding=((0, 0), (0, 0)), name="proj")(o.reshape(b * t, h, w, c))
        return o.reshape(b, t, h, w, c) + x


class MidBlock(nn.Module):
    """`WanMidBlock`: resnet, attention, resnet."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        x = ResidualBlock(dim, name="resnets_0")(x)
        x = AttentionBlock(name="attentions_0")(x)
        return ResidualBlock(dim, name="resnets_1")(x)


class Resample(nn.Module):
    """`WanResample`. `first`: this call starts the clip (diffusers' first chunk), where upsample3d passes
    frame 0 through alone and downsample3d keeps frame 0 as is before its stride-2 time conv."""

    mode: str
    out_dim: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, first: bool) -> jax.Array:
        b, _, h, w, c = x.shape
        if self.mode == "upsample3d":
            y = CausalConv3d(2 * c, (3, 1, 1), (1, 0, 0), name="time_conv")(x[:, 1:] if first else x)
            y = y.reshape(b, -1, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, -1, h, w, c)
            x = jnp.concatenate([x[:, :1], y], axis=1) if first else y
        if self.mode.startswith("upsample"):
            out = self.out_dim or c // 2
            def up(f):  # nearest-exact, scale 2
                return jnp.repeat(jnp.repeat(f, 2, axis=1), 2, axis=2)

            return _per_frame(lambda f: Conv2d(out, 3, name="resample_1")(up(f)), x)
        x = _per_frame(lambda f: Conv2d(c, 3, 2, ((0, 1), (0, 1)), name="resample_1")(f), x)
        if self.mode == "downsample3d":
            conv = CausalConv3d(c, (3, 1, 1), (0, 0, 0), (2, 1, 1), name="time_conv")
            last = x[:, -1:]
            if first:
                y = jnp.concatenate([x[:, :1], conv(x)], axis=1)
            else:
                y = conv(jnp.concatenate([self.get_variable("cache", "last"), x], axis=1))
            if self.is_mutable_collection("cache"):
                self.put_variable("cache", "last", last)
            x = y
        return x


def avg_down(x: jax.Array, out_dim: int, ft: int, fs: int) -> jax.Array:
    """`AvgDown3D`: front-pad time to a multiple of ft, fold (ft, fs, fs) into channels, mean over groups."""
    x = jnp.pad(x, ((0, 0), ((-x.shape[1]) % ft, 0), (0, 0), (0, 0), (0, 0)))
    b, t, h, w, c = x.shape
    x = x.reshape(b, t // ft, ft, h // fs, fs, w // fs, fs, c).transpose(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, t // ft, h // fs, w // fs, out_dim, c * ft * fs * fs // out_dim).mean(-1)


def dup_up(x: jax.Array, out_dim: int, ft: int, fs: int, first: bool) -> jax.Array:
    """`DupUp3D`: repeat channels, unfold them into (ft, fs, fs); the first chunk drops ft - 1 frames."""
    b, t, h, w, c = x.shape
    x = jnp.repeat(x, out_dim * ft * fs * fs // c, axis=-1).reshape(b, t, h, w, out_dim, ft, fs, fs)
    x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, t * ft, h * fs, w * fs, out_dim)
    return x[:, ft - 1 :] if first else x


class Encoder(nn.Module):
    """`WanEncoder3d` (with `WanResidualDownBlock`s for Wan2.2); returns the 2 * z_dim moments."""

    config: VaeConfig

    @nn.compact
    def __call__(self, x: jax.Array, first: bool) -> jax.Array:
        cfg = self.config
        dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
        x = CausalConv3d(dims[0], name="conv_in")(x)
        k = 0
        for i, out_dim in enumerate(dims[1:]):
            down = i != len(cfg.dim_mult) - 1
            mode = ("downsample3d" if cfg.temperal_downsample[i] else "downsample2d") if down else None
            if cfg.is_residual:
                shortcut = avg_down(x, out_dim, 2 if mode == "downsample3d" else 1, 2 if down else 1)
                for r in range(cfg.num_res_blocks):
                    x = ResidualBlock(out_dim, name=f"down_blocks_{i}_resnets_{r}")(x)
                if down:
                    x = Resample(mode, name=f"down_blocks_{i}_downsampler")(x, first)
                x = x + shortcut
                continue
            for _ in range(cfg.num_res_blocks):
                x = ResidualBlock(out_dim, name=f"down_blocks_{k}")(x)
                k += 1
            if down:
                x = Resample(mode, name=f"down_blocks_{k}")(x, first)
                k += 1
        x = MidBlock(name="mid_block")(x)
        x = _act(RMSNorm(name="norm_out")(x))
        return CausalConv3d(2 * cfg.z_dim, name="conv_out")(x)


class Decoder(nn.Module):
    """`WanDecoder3d` (with `WanResidualUpBlock`s for Wan2.2); returns (patchified) pixels."""

    config: VaeConfig

    @nn.compact
    def __call__(self, x: jax.Array, first: bool) -> jax.Array:
        cfg = self.config
        base = cfg.decoder_base_dim or cfg.base_dim
        dims = [base * u for u in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        t_up = cfg.temperal_downsample[::-1]
        x = CausalConv3d(dims[0], name="conv_in")(x)
        x = MidBlock(name="mid_block")(x)
        for i, out_dim in enumerate(dims[1:]):
            up = i != len(cfg.dim_mult) - 1
            mode = ("upsample3d" if t_up[i] else "upsample2d") if up else None
            name = f"up_blocks_{i}"
            shortcut = x
            for r in range(cfg.num_res_blocks + 1):
                x = ResidualBlock(out_dim, name=f"{name}_resnets_{r}")(x)
            if up and cfg.is_residual:
                x = Resample(mode, out_dim, name=f"{name}_upsampler")(x, first)
                x = x + dup_up(shortcut, out_dim, 2 if mode == "upsample3d" else 1, 2, first)
            elif up:
                x = Resample(mode, name=f"{name}_upsamplers_0")(x, first)
        x = _act(RMSNorm(name="norm_out")(x))
        return CausalConv3d(cfg.out_channels, name="conv_out")(x)


class WanVAE(nn.Module):
    """`AutoencoderKLWan`'s modules: encoder, quant_conv, post_quant_conv, decoder."""

    config: VaeConfig

    def setup(self):
        z = self.config.z_dim
        self.encoder = Encoder(self.config)
        self.quant_conv = CausalConv3d(2 * z, (1, 1, 1), (0, 0, 0))
        self.post_quant_conv = CausalConv3d(z, (1, 1, 1), (0, 0, 0))
        self.decoder = Decoder(self.config)

    def encode(self, x: jax.Array, first: bool) -> jax.Array:
        return self.quant_conv(self.encoder(x, first))[..., : self.config.z_dim]  # the mean ("mode")

    def decode(self, z: jax.Array, first: bool) -> jax.Array:
        return self.decoder(self.post_quant_conv(z), first)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x, True), True)


# ---------------------------------------------------------------------------------------------------------
# Params
# ---------------------------------------------------------------------------------------------------------
def vae_param_shapes(config: VaeConfig) -> dict:
    """The params tree as `jax.ShapeDtypeStruct`s (traced, nothing computed)."""
    s = config.spatial_factor // (config.patch_size or 1)
    dummy = jax.ShapeDtypeStruct((1, 1 + config.temporal_factor, s, s, config.in_channels), F32)
    return jax.eval_shape(lambda k, x: dict(WanVAE(config).init(k, x)["params"]), jax.random.key(0), dummy)


@jax.jit
def init_vae_params(config: VaeConfig, rng: jax.Array) -> dict:
    """Random float32 params in `load_vae`'s layout: kernels ~ N(0, 1 / fan_in), zero biases, unit gammas.

    One normal draw sliced into every kernel: one RNG kernel to compile instead of one per parameter."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(vae_param_shapes(config))
    noise = jax.random.normal(rng, (sum(s.size for p, s in leaves if p[-1].key == "kernel"),), F32)
    out, offset = [], 0
    for path, s in leaves:
        if path[-1].key == "kernel":
            out.append(noise[offset : offset + s.size].reshape(s.shape) / np.sqrt(s.size // s.shape[-1]))
            offset += s.size
        else:
            out.append((jnp.ones if path[-1].key == "gamma" else jnp.zeros)(s.shape, F32))
    return jax.tree_util.tree_unflatten(treedef, out)


# ---------------------------------------------------------------------------------------------------------
# Streaming: whole sequence or lax.scan over chunks carrying the causal caches
# ---------------------------------------------------------------------------------------------------------
def _stream(config: VaeConfig, params: dict, x: jax.Array, method, step: int, chunk: int | None) -> jax.Array:
    """Run `method` over frames x (B, T, H, W, C): frame 0 first, then chunks of `step * chunk` frames."""
    model = WanVAE(config)
    if chunk is None:
        return model.apply({"params": params}, x, True, method=method)
    y0, state = model.apply({"params": params}, x[:, :1], True, method=method, mutable=["cache"])

    def run(cache, xs):
        y, new = model.apply({"params": params, "cache": cache}, xs, False, method=method, mutable=["cache"])
        return new["cache"], y

    rest, size = x[:, 1:], step * chunk
    n = rest.shape[1] // size
    cache, outs = state["cache"], [y0]
    if n:
        body = jnp.moveaxis(rest[:, : n * size].reshape(x.shape[0], n, size, *x.shape[2:]), 1, 0)
        cache, ys = lax.scan(run, cache, body)
        outs.append(jnp.moveaxis(ys, 0, 1).reshape(x.shape[0], -1, *ys.shape[3:]))
    if rest.shape[1] > n * size:  # a shorter last chunk
        outs.append(run(cache, rest[:, n * size :])[1])
    return jnp.concatenate(outs, axis=1)


# ---------------------------------------------------------------------------------------------------------
# Spatial tiling (diffusers' tiled_encode / tiled_decode)
# ---------------------------------------------------------------------------------------------------------
def _blend(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
    """diffusers' blend_v / blend_h: the first `extent` rows of b fade in from a's last rows."""
    e = min(a.shape[axis], b.shape[axis], extent)
    if e == 0:
        return b
    w = np.arange(e) / e
    shape = [1] * b.ndim
    shape[axis] = e
    acc = _acc(b.dtype)  # torch: tensor * python float, the scalar rounded to the op's float32 / float64
    wa, wb = (jnp.asarray(v, acc).reshape(shape) for v in (1 - w, w))
    part = functools.partial(lax.slice_in_dim, axis=axis)
    head = part(a, a.shape[axis] - e, a.shape[axis]).astype(acc) * wa + part(b, 0, e).astype(acc) * wb
    return jnp.concatenate([head.astype(b.dtype), part(b, e, b.shape[axis])], axis=axis)


def _tiled(fn, x: jax.Array, tile: tuple[int, int], stride: tuple[int, int], out_tile: tuple[int, int],
           out_stride: tuple[int, int], size: tuple[int, int]) -> jax.Array:  # fmt: skip
    """diffusers' tiling: tiles of x (B, T, H, W, C) every `stride`, through fn, blended over the overlap
    `out_tile - out_stride`, cropped to `size`. Tiles of one shape run one after another in a `lax.map`:
    one compiled body per tile shape (at most 4 here), one tile's activations in memory."""
    h, w = x.shape[2:4]
    rows, cols = range(0, h, stride[0]), range(0, w, stride[1])
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i in rows:
        for j in cols:
            groups.setdefault((min(tile[0], h - i), min(tile[1], w - j)), []).append((i, j))
    out = {}
    for (th, tw), where in groups.items():
        stack = jnp.stack([x[:, :, i : i + th, j : j + tw] for i, j in where])
        res = lax.map(fn, stack)
        out.update({pos: res[n] for n, pos in enumerate(where)})
    grid = [[out[(i, j)] for j in cols] for i in rows]
    result_rows = []
    for r in range(len(grid)):
        for c in range(len(grid[r])):  # in place, like diffusers: later tiles blend with blended neighbours
            t = grid[r][c]
            if r:
                t = _blend(grid[r - 1][c], t, out_tile[0] - out_stride[0], axis=2)
            if c:
                t = _blend(grid[r][c - 1], t, out_tile[1] - out_stride[1], axis=3)
            grid[r][c] = t
        result_rows.append(jnp.concatenate([t[:, :, : out_stride[0], : out_stride[1]] for t in grid[r]], axis=3))
    return jnp.concatenate(result_rows, axis=2)[:, :, : size[0], : size[1]]


def _check_options(config: VaeConfig, chunk: int | None, tiling: Tiling | None) -> None:
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk={chunk!r}: expected a positive number of latent frames or None")
    s = config.spatial_factor
    if tiling is not None and (
        any(v <= 0 or v % s for v in dataclasses.astuple(tiling)) or any(map(int.__gt__, tiling.stride, tiling.tile))
    ):
        raise ValueError(f"{tiling}: sizes must be positive multiples of the spatial factor {s}, strides <= tiles")


def _div(hw: tuple[int, int], r: int) -> tuple[int, int]:
    return hw[0] // r, hw[1] // r


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------
def patchify(x: jax.Array, p: int | None) -> jax.Array:
    """diffusers' pixel patchify, channels-last: (B, T, H, W, C) -> (B, T, H/p, W/p, C*p*p), c*p*p + pw*p + ph."""
    if not p or p == 1:
        return x
    b, t, h, w, c = x.shape
    x = x.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 6, 5, 3)
    return x.reshape(b, t, h // p, w // p, c * p * p)


def unpatchify(x: jax.Array, p: int | None) -> jax.Array:
    """Inverse of `patchify`."""
    if not p or p == 1:
        return x
    b, t, h, w, cpp = x.shape
    x = x.reshape(b, t, h, w, cpp // (p * p), p, p).transpose(0, 1, 2, 6, 3, 5, 4)
    return x.reshape(b, t, h * p, w * p, cpp // (p * p))


def _stats(config: VaeConfig, dtype) -> tuple[jax.Array, jax.Array]:
    shape = (1, config.z_dim, 1, 1, 1)
    return tuple(jnp.asarray(v, dtype).reshape(shape) for v in (config.latents_mean, config.latents_std))


def check_video_shape(config: VaeConfig, shape: tuple[int, ...]) -> None:
    """ValueError unless `shape` is (B, C, 4k+1, H, W) with C and H, W what the VAE takes."""
    c, s = config.video_channels, config.spatial_factor
    if len(shape) != 5 or shape[1] != c or (shape[2] - 1) % 4 or shape[3] % s or shape[4] % s or 0 in shape:
        raise ValueError(f"video shape {tuple(shape)}: expected (B, {c}, 4k+1, H, W) with H and W divisible by {s}")


@functools.partial(jax.jit, static_argnames=("chunk", "tiling"))
def vae_encode(
    config: VaeConfig, params: dict, video: jax.Array, *, chunk: int | None = 1, tiling: Tiling | None = None
) -> jax.Array:
    """Normalised latent means (B, z_dim, 1 + (F-1)/4, H/s, W/s), float32, of a video (B, 3, F, H, W) in [-1, 1].

    As pipelines use it: `(mode - latents_mean) / latents_std`. `chunk`: latent frames per scan step (1 =
    diffusers' 4-frame chunks; None = the whole clip in one pass, fastest, most memory). `tiling`: diffusers'
    spatial tiling, applied when the video is larger than a tile.
    """
    check_video_shape(config, video.shape)
    _check_options(config, chunk, tiling)
    p = config.patch_size or 1
    dtype = params["encoder"]["conv_in"]["kernel"].dtype
    x = patchify(jnp.moveaxis(video, 1, -1).astype(dtype), p)
    encode = functools.partial(_stream, config, params, method=WanVAE.encode, step=4, chunk=chunk)
    if tiling is not None and (video.shape[3] > tiling.tile[0] or video.shape[4] > tiling.tile[1]):
        # As diffusers does: the patchified video is cut with the pixel tile sizes.
        r = config.spatial_factor // p
        mu = _tiled(
            encode, x, tiling.tile, tiling.stride, _div(tiling.tile, r), _div(tiling.stride, r), _div(x.shape[2:4], r)
        )
    else:
        mu = encode(x)
    mean, std = _stats(config, _acc(dtype))
    return (jnp.moveaxis(mu, -1, 1).astype(_acc(dtype)) - mean) / std


def check_latents_shape(config: VaeConfig, shape: tuple[int, ...]) -> None:
    """ValueError unless `shape` is (B, z_dim, T, h, w)."""
    if len(shape) != 5 or shape[1] != config.z_dim or 0 in shape:
        raise ValueError(f"latents shape {tuple(shape)}: expected (B, {config.z_dim}, T, h, w)")


@functools.partial(jax.jit, static_argnames=("chunk", "tiling"))
def vae_decode(
    config: VaeConfig, params: dict, latents: jax.Array, *, chunk: int | None = 1, tiling: Tiling | None = None
) -> jax.Array:
    """Video (B, 3, 1 + 4(T-1), h*s, w*s) in [-1, 1], float32, from normalised latents (B, z_dim, T, h, w).

    Un-normalise, post_quant_conv, decode, clamp. `chunk`: latent frames per scan step (1 = diffusers; None =
    whole clip at once). `tiling`: diffusers' spatial tiling, applied when the latents are larger than a tile.
    """
    check_latents_shape(config, latents.shape)
    _check_options(config, chunk, tiling)
    dtype = params["decoder"]["conv_in"]["kernel"].dtype
    mean, std = _stats(config, _acc(dtype))
    z = jnp.moveaxis(latents.astype(_acc(dtype)) * std + mean, 1, -1).astype(dtype)
    decode = functools.partial(_stream, config, params, method=WanVAE.decode, step=1, chunk=chunk)
    p, s = config.patch_size or 1, config.spatial_factor
    h, w = z.shape[2:4]
    if tiling is not None and (h > tiling.tile[0] // s or w > tiling.tile[1] // s):
        # Outputs are patchified pixels (p = 1 for Wan2.1), unpatchified after blending, as diffusers does.
        tile, stride, size = _div(tiling.tile, s), _div(tiling.stride, s), (h * s // p, w * s // p)
        out = _tiled(decode, z, tile, stride, _div(tiling.tile, p), _div(tiling.stride, p), size)
    else:
        out = decode(z)
    return jnp.moveaxis(jnp.clip(unpatchify(out, p), -1.0, 1.0), -1, 1).astype(_acc(dtype))
