"""Name and layout maps between diffusers, wanjax and original-Wan / ComfyUI transformer weights. Pure functions.

- diffusers: `blocks.3.attn1.to_q.weight` (out, in), Conv3d (O, I, kT, kH, kW).
- wanjax: the Flax params tree, blocks stacked on a leading layer axis: ("blocks", "attn1", "to_q", "kernel")
  (L, in, out); flattened to `blocks/attn1/to_q/kernel` in wanjax checkpoints.
- original Wan / ComfyUI: `blocks.3.self_attn.q.weight`, optionally prefixed `model.diffusion_model.` or
  `diffusion_model.`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import jax
import ml_dtypes
import numpy as np

from wanjax.models.config import WanConfig

# diffusers module path <-> wanjax module path, where they differ.
_MODULE_RENAMES = (
    ("to_out.0", "to_out"),
    ("ffn.net.0.proj", "ffn.proj_in"),
    ("ffn.net.2", "ffn.proj_out"),
    ("ff.net.0.proj", "ff.proj_in"),
    ("ff.net.2", "ff.proj_out"),
)
_PARAM_LEAVES = ("scale_shift_table", "pos_embed")  # nn.Parameters with no module of their own
# diffusers' `_keep_in_fp32_modules` for Wan: kept in float32 when a model is loaded in half precision.
KEEP_FP32_SEGMENTS = frozenset({"time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"})

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class KeyMap:
    """Where one diffusers tensor lives in the wanjax tree, and how its layout changes."""

    path: tuple[str, ...]  # wanjax params path
    layer: int | None  # index on the stacked axis for block tensors
    kind: str  # "linear" (transpose), "conv" (O,I,t,h,w -> t,h,w,I,O) or "copy"


def _rename(module: str, forward: bool) -> str:
    for d, w in _MODULE_RENAMES:
        a, b = (d, w) if forward else (w, d)
        if module == a or module.endswith("." + a):
            return module[: len(module) - len(a)] + b
    return module


def diffusers_to_wanjax(key: str) -> KeyMap:
    """Map a diffusers state-dict key to its wanjax params path (raises KeyError for non-Wan names)."""
    layer = None
    m = _BLOCK_RE.match(key)
    rest = key
    if m:
        layer, rest = int(m.group(1)), m.group(2)
    module, _, leaf = rest.rpartition(".")
    if leaf in _PARAM_LEAVES or rest in _PARAM_LEAVES:
        path = tuple(filter(None, _rename(module, True).split("."))) + (leaf,) if module else (leaf,)
        kind = "copy"
    elif leaf in ("weight", "bias") and module:
        mod = _rename(module, True)
        last = mod.split(".")[-1]
        if last.startswith("norm"):
            path, kind = tuple(mod.split(".")) + ("scale" if leaf == "weight" else "bias",), "copy"
        elif mod == "patch_embedding":
            path, kind = (mod, "kernel" if leaf == "weight" else "bias"), ("conv" if leaf == "weight" else "copy")
        else:
            path, kind = tuple(mod.split(".")) + ("kernel" if leaf == "weight" else "bias",), (
                "linear" if leaf == "weight" else "copy"
            )
    else:
        raise KeyError(key)
    if layer is not None:
        path = ("blocks",) + path
    return KeyMap(path, layer, kind)


def wanjax_to_diffusers(path: tuple[str, ...], layer: int | None = None) -> str:
    """Inverse of `diffusers_to_wanjax`: the diffusers key of a wanjax param (layer `layer` if stacked)."""
    parts = list(path)
    stacked = parts[0] == "blocks"
    if stacked:
        parts = parts[1:]
        if layer is None:
            raise ValueError(f"{'/'.join(path)} is stacked over layers: give a layer index")
    leaf = parts[-1]
    module = ".".join(parts[:-1])
    if leaf in _PARAM_LEAVES:
        key = f"{_rename(module, False)}.{leaf}" if module else leaf
    else:
        d_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
        key = f"{_rename(module, False)}.{d_leaf}"
    return f"blocks.{layer}.{key}" if stacked else key


def to_wanjax_layout(array: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return array.T
    if kind == "conv":
        return array.transpose(2, 3, 4, 1, 0)
    return array


def to_diffusers_layout(array: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return array.T
    if kind == "conv":
        return array.transpose(4, 3, 0, 1, 2)
    return array


def diffusers_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    """The diffusers shape of one (unstacked) wanjax tensor of `shape`."""
    return to_diffusers_layout(np.empty(shape, dtype=np.uint8), kind).shape


def keeps_fp32(path: tuple[str, ...]) -> bool:
    return any(seg in KEEP_FP32_SEGMENTS for seg in path)


_HALF = (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))


def target_dtype(path: tuple[str, ...], stored, dtype) -> np.dtype:
    """The dtype a param gets when the model is loaded (or built) in `dtype`: dtype=None keeps what is stored; a
    half dtype keeps diffusers' float32 modules (`KEEP_FP32_SEGMENTS`) in float32."""
    if dtype is None:
        return np.dtype(stored)
    if np.dtype(dtype) in _HALF and keeps_fp32(path):
        return np.dtype(np.float32)
    return np.dtype(dtype)


def kind_of(path: tuple[str, ...]) -> str:
    """Layout kind of a wanjax param path."""
    if path[-1] == "kernel":
        return "conv" if path[-2] == "patch_embedding" else "linear"
    return "copy"


def expected_diffusers_shapes(wanjax_shapes: dict, num_layers: int) -> dict[str, tuple[int, ...]]:
    """Every diffusers key a model with these wanjax param shapes has, with its diffusers shape."""
    out = {}
    for path, shape in flatten(wanjax_shapes).items():
        kind = kind_of(path)
        if path[0] == "blocks":
            for i in range(num_layers):
                out[wanjax_to_diffusers(path, i)] = diffusers_shape(tuple(shape[1:]), kind)
        else:
            out[wanjax_to_diffusers(path)] = diffusers_shape(tuple(shape), kind)
    return out


def path_names(path) -> tuple[str, ...]:
    """A jax key path (from `jax.tree_util.*_with_path`) as a params path: ("blocks", "attn1", "to_q", "kernel")."""
    return tuple(getattr(k, "key", str(k)) for k in path)


def leaves_by_path(tree) -> dict[tuple[str, ...], object]:
    """{params path: leaf} of a pytree of arrays, ShapeDtypeStructs or shardings."""
    return {path_names(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{path: shape} of a nested dict of arrays / ShapeDtypeStructs."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = tuple(v.shape)
    return out


# ---------------------------------------------------------------------------------------------------------
# Original Wan / ComfyUI names
# ---------------------------------------------------------------------------------------------------------
_ORIG_TOP = (
    ("patch_embedding", "patch_embedding"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.head", "proj_out"),
    ("head.modulation", "scale_shift_table"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
)
_ORIG_BLOCK = (
    ("modulation", "scale_shift_table"),
    ("norm3", "norm2"),  # the original's affine cross-attention norm is diffusers' norm2
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
    *((f"self_attn.{o}", f"attn1.{d}") for o, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))),
    *((f"self_attn.{n}", f"attn1.{n}") for n in ("norm_q", "norm_k")),
    *((f"cross_attn.{o}", f"attn2.{d}") for o, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))),
    *((f"cross_attn.{n}", f"attn2.{n}") for n in ("norm_q", "norm_k")),
    ("cross_attn.k_img", "attn2.add_k_proj"),
    ("cross_attn.v_img", "attn2.add_v_proj"),
    ("cross_attn.norm_k_img", "attn2.norm_added_k"),
)
ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def strip_original_prefix(key: str) -> str:
    for p in ORIGINAL_PREFIXES:
        if key.startswith(p):
            return key[len(p) :]
    return key


def _swap_module(key: str, table, src: int) -> str:
    """Rename the module part of `key` (after an optional blocks.N.) with the first matching table entry."""
    m = _BLOCK_RE.match(key)
    head, rest = (f"blocks.{m.group(1)}.", m.group(2)) if m else ("", key)
    for pair in table if m else _ORIG_TOP:
        a, b = pair[src], pair[1 - src]
        if rest == a or rest.startswith(a + "."):
            return head + b + rest[len(a) :]
    raise KeyError(key)


def original_to_diffusers_key(key: str) -> str:
    """`blocks.0.self_attn.q.weight` (any ComfyUI prefix) -> `blocks.0.attn1.to_q.weight`."""
    return _swap_module(strip_original_prefix(key), _ORIG_BLOCK, 0)


def diffusers_to_original_key(key: str) -> str:
    """Inverse of `original_to_diffusers_key` (without a prefix)."""
    return _swap_module(key, _ORIG_BLOCK, 1)


def looks_original(keys) -> bool:
    """True for original-Wan / ComfyUI names (self_attn / head.head / time_embedding), False for diffusers."""
    names = {strip_original_prefix(k) for k in keys}
    return any(k.startswith(("head.head", "time_embedding.", "text_embedding.")) or ".self_attn." in k for k in names)


# ---------------------------------------------------------------------------------------------------------
# Config inference for single files (which carry no config)
# ---------------------------------------------------------------------------------------------------------
RELEASED_HEAD_DIM = 128


def infer_config(shapes: dict[str, tuple[int, ...]], *, source: str = "checkpoint", **overrides) -> WanConfig:
    """A WanConfig from diffusers-named tensor shapes. Heads = D / 128 (every released model) unless overridden."""

    def need(key):
        if key not in shapes:
            raise ValueError(f"{source}: not a Wan transformer checkpoint: tensor {key!r} is missing")
        return shapes[key]

    d, c_in, *patch = need("patch_embedding.weight")
    if len(patch) != 3:
        raise ValueError(f"{source}: patch_embedding.weight has shape {need('patch_embedding.weight')}; expected (D, C, t, h, w)")
    layers = sorted({int(m.group(1)) for k in shapes if (m := _BLOCK_RE.match(k))})
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"{source}: block indices {layers[:8]}... are not 0..N-1")
    cfg = dict(
        patch_size=tuple(patch),
        in_channels=c_in,
        out_channels=need("proj_out.weight")[0] // math.prod(patch),
        text_dim=need("condition_embedder.text_embedder.linear_1.weight")[1],
        freq_dim=need("condition_embedder.time_embedder.linear_1.weight")[1],
        ffn_dim=need("blocks.0.ffn.net.0.proj.weight")[0],
        num_layers=len(layers),
        cross_attn_norm="blocks.0.norm2.weight" in shapes,
    )
    if "condition_embedder.image_embedder.norm1.weight" in shapes:
        cfg["image_dim"] = shapes["condition_embedder.image_embedder.norm1.weight"][0]
    if "blocks.0.attn2.add_k_proj.weight" in shapes:
        cfg["added_kv_proj_dim"] = shapes["blocks.0.attn2.add_k_proj.weight"][1]
    if "condition_embedder.image_embedder.pos_embed" in shapes:
        cfg["pos_embed_seq_len"] = shapes["condition_embedder.image_embedder.pos_embed"][1]
    cfg.update(overrides)
    if "num_attention_heads" not in overrides:
        head_dim = overrides.get("attention_head_dim", RELEASED_HEAD_DIM)
        if d % head_dim:
            raise ValueError(
                f"{source}: width {d} is not a multiple of head_dim {head_dim}; pass num_attention_heads / attention_head_dim"
            )
        cfg["num_attention_heads"], cfg["attention_head_dim"] = d // head_dim, head_dim
    return WanConfig(**cfg)
