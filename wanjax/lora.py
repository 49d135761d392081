"""Pure-function LoRA for the Wan transformer: init, shapes, merge, compatibility checks, file I/O.

An adapter is `LoraWeights`: a pytree mirroring the params tree for the adapted Dense layers only, with leaves
A (in, r), B (r, out) and optionally bias (out,) (PEFT's `lora_B.bias`), stacked [L, ...] under "blocks". The
model applies it unmerged (`transformer_forward(..., lora=w)`), y = x W + b + s ((x A) B + bias), s = alpha / r,
so training never forms a weight-sized gradient.

Files: diffusers / PEFT (`transformer.blocks.0.attn1.to_q.lora_A.weight`, alpha in the header metadata),
original Wan / ComfyUI (`diffusion_model.blocks.0.self_attn.q.lora_down.weight` + `.alpha`, `.diff_b`) and
musubi / kohya (`lora_unet_blocks_0_self_attn_q.lora_down.weight`, load only). Loading normalises everything to
one global rank and alpha: per-module alpha / rank is folded into B and smaller ranks are zero-padded, both
exact, and layers missing from a file get zero adapters (also exact).
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from wanjax import safetensors_io as stio
from wanjax import weights
from wanjax.models.config import WanConfig
from wanjax.models.transformer import param_shapes

logger = logging.getLogger(__name__)
F32 = jnp.float32
DEFAULT_TARGETS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
)  # fmt: skip
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
_PEFT_FILE, _PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
_KEY_PREFIXES = ("transformer.", "base_model.model.", "model.diffusion_model.", "diffusion_model.")
# file suffix -> (our tensor, convention). PEFT's lora_B.bias is scaled by alpha/r; ComfyUI's diff_b is not.
_SUFFIXES = (
    (".lora_A.weight", "A"), (".lora_down.weight", "A"), (".lora_B.weight", "B"), (".lora_up.weight", "B"),
    (".lora_B.bias", "bias"), (".diff_b", "diff_b"), (".alpha", "alpha"),
)  # fmt: skip
_BLOCK_RE = re.compile(r"^blocks[._](\d+)[._](.+)$")


@flax.struct.dataclass
class LoraWeights:
    """A LoRA adapter: the "lora" variable collection plus its (static) rank, alpha and target modules."""

    params: dict  # mirrors the params tree: {"blocks": {"attn1": {"to_q": {"A": (L, in, r), "B": (L, r, out)}}}}
    rank: int = flax.struct.field(pytree_node=False)
    alpha: float = flax.struct.field(pytree_node=False)
    targets: tuple[str, ...] = flax.struct.field(pytree_node=False)  # diffusers module names, e.g. "attn1.to_q"

    def scaled_params(self) -> dict:
        """The collection the model reads: B and bias times alpha / rank (PEFT's scaling), A unchanged."""
        s = self.alpha / self.rank
        return jax.tree_util.tree_map_with_path(
            lambda p, x: x if p[-1].key == "A" else (x * s).astype(x.dtype), self.params
        )


# ---------------------------------------------------------------------------------------------------------
# Module names. Canonical target names are diffusers module names, relative to the block for block layers
# ("attn1.to_q", "ffn.net.0.proj") and in full for the rest ("proj_out", "condition_embedder.time_proj").
# ---------------------------------------------------------------------------------------------------------
def _kernels(config: WanConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """{canonical name: (wanjax module path, kernel shape)} for every LoRA-able Dense of `config`."""
    out = {}
    for path, shape in weights.flatten(param_shapes(config)).items():
        if path[-1] != "kernel" or weights.kind_of(path) != "linear":  # patch_embedding is a conv
            continue
        key = weights.wanjax_to_diffusers(path, 0 if path[0] == "blocks" else None).removesuffix(".weight")
        out[key.removeprefix("blocks.0.")] = (path[:-1], shape)
    return out


_kernels_cached = functools.lru_cache(maxsize=16)(_kernels)


@functools.cache
def _module_paths() -> dict[str, tuple[str, ...]]:
    """{canonical name: wanjax module path} of every LoRA-able linear of any Wan variant (taken from a tiny
    config with an image embedder and added K/V, so the list is the model's own, never a hand-kept copy)."""
    tiny = WanConfig(
        num_attention_heads=1, attention_head_dim=6, in_channels=1, out_channels=1, text_dim=2, freq_dim=2,
        ffn_dim=2, num_layers=1, image_dim=2, added_kv_proj_dim=6, pos_embed_seq_len=2,
    )  # fmt: skip
    return {m: path for m, (path, _) in _kernels(tiny).items()}


def _all_modules() -> tuple[str, ...]:
    return tuple(_module_paths())


def _is_top(module: str) -> bool:
    """True for the layers outside the scanned blocks (condition embedder, proj_out)."""
    return _module_paths()[module][0] != "blocks"


def _full_name(module: str, layer: int | None) -> str:
    return module if layer is None else f"blocks.{layer}.{module}"


def _original_name(module: str, layer: int | None) -> str:
    return weights.diffusers_to_original_key(_full_name(module, layer) + ".weight").removesuffix(".weight")


def parse_targets(spec: str | Sequence[str]) -> tuple[str, ...]:
    """SimpleTuner / PEFT target list -> canonical module names. Each name matches as a suffix on diffusers
    module names: "to_q" adapts attn1.to_q and attn2.to_q, "ffn.net.2" the FFN output, "proj_out" the head."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    valid, chosen = _all_modules(), set()
    for name in filter(None, names):
        hits = [m for m in valid if m == name or m.endswith("." + name)]
        if not hits:
            raise ValueError(f"unknown LoRA target {name!r}; valid module names: {', '.join(valid)}")
        chosen.update(hits)
    if not chosen:
        raise ValueError(f"no LoRA targets in {spec!r}")
    return tuple(m for m in valid if m in chosen)


# ---------------------------------------------------------------------------------------------------------
# Init, shapes, merge, checks
# ---------------------------------------------------------------------------------------------------------
def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _adapters(tree: dict, prefix: tuple[str, ...] = ()):
    """(module path, {"A", "B", ["bias"]}) of every adapted layer in a LoRA params tree."""
    if "A" in tree:
        yield prefix, tree
        return
    for k, v in tree.items():
        yield from _adapters(v, prefix + (k,))


def lora_shapes(
    config: WanConfig, rank: int, targets: str | Sequence[str] = DEFAULT_TARGETS, *, bias: bool = False, dtype=F32
) -> dict:
    """The LoRA params tree for `config` as `jax.ShapeDtypeStruct`s (for eval_shape and sharding)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    kernels, tree = _kernels_cached(config), {}
    for m in parse_targets(targets):
        if m not in kernels:
            raise ValueError(f"LoRA target {m!r} is not a layer of this model; its layers: {', '.join(kernels)}")
        path, (*lead, din, dout) = kernels[m]
        leaf = {
            "A": jax.ShapeDtypeStruct((*lead, din, rank), dtype),
            "B": jax.ShapeDtypeStruct((*lead, rank, dout), dtype),
        }
        if bias:
            leaf["bias"] = jax.ShapeDtypeStruct((*lead, dout), dtype)
        _set(tree, path, leaf)
    return tree


def init_lora(
    config: WanConfig,
    rng: jax.Array,
    *,
    rank: int,
    alpha: float | None = None,
    targets: str | Sequence[str] = DEFAULT_TARGETS,
    bias: bool = False,
    dtype=F32,
) -> LoraWeights:
    """A fresh adapter: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform(a=sqrt(5))), B = bias = 0,
    so the adapted model starts as the base model. alpha defaults to rank (scale 1)."""
    targets = parse_targets(targets)
    shapes = lora_shapes(config, rank, targets, bias=bias, dtype=dtype)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(rng, len(leaves))

    def make(key, path, s):
        if path[-1].key != "A":
            return jnp.zeros(s.shape, dtype)
        bound = 1.0 / math.sqrt(s.shape[-2])
        return jax.random.uniform(key, s.shape, F32, -bound, bound).astype(dtype)

    params = jax.tree_util.tree_unflatten(treedef, [make(k, p, s) for k, (p, s) in zip(keys, leaves)])
    return LoraWeights(params, int(rank), float(rank if alpha is None else alpha), targets)


def _check(lora_params: dict, kernels: dict[tuple[str, ...], tuple[int, ...]], names: dict | None = None) -> None:
    """Raise ValueError naming the first adapter whose shapes do not fit `kernels` {module path: kernel shape}."""
    for path, leaf in _adapters(lora_params):
        where = (names or {}).get(path) or "/".join(path)
        got = {k: tuple(v.shape) for k, v in leaf.items()}
        if path not in kernels:
            raise ValueError(f"{where}: this model has no such layer (LoRA shapes {got}); a LoRA for another variant?")
        *lead, din, dout = kernels[path]
        r = got["A"][-1] if len(got["A"]) else 0
        want = {"A": (*lead, din, r), "B": (*lead, r, dout), "bias": (*lead, dout)}
        for k, shape in got.items():
            if k not in want:
                raise ValueError(f"{where}: unknown LoRA tensor {k!r}")
            if shape != want[k]:
                raise ValueError(
                    f"{where}: LoRA {k} has shape {shape}, this model expects {want[k]} "
                    f"(layer kernel {tuple(kernels[path])}); a LoRA for another model size or variant?"
                )


def check_compatible(lora: LoraWeights, config: WanConfig) -> None:
    """ValueError naming the first adapter that does not fit `config` (layer missing, width or depth differs)."""
    _check(lora.params, {p: s for p, s in _kernels_cached(config).values()})


def merge_lora(params: dict, lora: LoraWeights) -> dict:
    """Params with the adapter folded in: W' = W + (alpha/r) A B, b' = b + (alpha/r) bias. Pure; math in
    float32, results in each param's own dtype; the input tree is not modified."""
    kernels = {p[:-1]: s for p, s in weights.flatten(params).items() if p[-1] == "kernel"}
    _check(lora.params, kernels)
    s = lora.alpha / lora.rank

    def copy(tree):  # new dicts, same leaves: the caller's tree stays as it was
        return {k: copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree

    out = copy(params)

    for path, leaf in _adapters(lora.params):
        mod = functools.reduce(lambda t, k: t[k], path, out)
        ab = jnp.matmul(leaf["A"].astype(F32), leaf["B"].astype(F32), precision=jax.lax.Precision.HIGHEST)
        mod["kernel"] = (mod["kernel"].astype(F32) + s * ab).astype(mod["kernel"].dtype)
        if "bias" in leaf:
            mod["bias"] = (mod["bias"].astype(F32) + s * leaf["bias"].astype(F32)).astype(mod["bias"].dtype)
    return out


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------
@functools.cache
def _musubi_names() -> dict[str, str]:
    """kohya module name without its block ("self_attn_q", "head_head") -> original-Wan name ("self_attn.q")."""
    out = {}
    for m in _all_modules():
        orig = _original_name(m, None if _is_top(m) else 0)
        rel = orig if _is_top(m) else orig.removeprefix("blocks.0.")
        out[rel.replace(".", "_")] = rel
    return out


def _module_of(key: str, stem: str, musubi: bool) -> tuple[str, int | None]:
    """(canonical module, layer) of a file's module name in diffusers, original-Wan or kohya naming."""
    m = _BLOCK_RE.match(stem)
    layer, rel = (int(m.group(1)), m.group(2)) if m else (None, stem)
    if musubi:
        rel = _musubi_names().get(rel, rel)
    if rel in _module_paths() and _is_top(rel) == (layer is None):
        return rel, layer
    try:
        name = weights.original_to_diffusers_key(_full_name(rel, layer) + ".weight").removesuffix(".weight")
    except KeyError:
        name = None
    if name is not None:
        rel = name if layer is None else name.removeprefix(f"blocks.{layer}.")
        if rel in _module_paths() and _is_top(rel) == (layer is None):
            return rel, layer
    raise ValueError(
        f"unsupported LoRA key {key!r}: {stem!r} is not a LoRA-able linear layer of the Wan transformer "
        f"(patch_embedding is a conv; valid modules: {', '.join(_all_modules())})"
    )


def _split_key(key: str) -> tuple[str, str, bool]:
    """(module stem, tensor kind, is kohya) of a LoRA file key, or ValueError naming the key."""
    musubi = key.startswith("lora_unet_")
    name = key.removeprefix("lora_unet_")
    for p in _KEY_PREFIXES:
        name = name.removeprefix(p)
    for suffix, kind in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], kind, musubi
    if name.endswith(".diff"):
        raise ValueError(f"unsupported LoRA key {key!r}: full-weight differences (.diff) are not low-rank adapters")
    if "dora_scale" in name or "lora_magnitude_vector" in name:
        raise ValueError(f"unsupported LoRA key {key!r}: DoRA adapters are not supported")
    raise ValueError(f"unsupported LoRA key {key!r}: not a lora_A/B, lora_down/up, alpha or diff_b tensor")


def _resolve(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        for name in (DIFFUSERS_FILE, _PEFT_FILE):
            if (path / name).is_file():
                return path / name
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise ValueError(f"{path}: expected {DIFFUSERS_FILE} or a single .safetensors file, found {len(found)}")
        return found[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such LoRA file")
    return path


def _peft_config(file: stio.SafetensorsFile) -> dict:
    """PEFT's LoraConfig fields from diffusers' header metadata (`transformer.`-prefixed) or an
    adapter_config.json beside the file; {} when there is neither (then alpha = r, PEFT's convention)."""
    raw = file.metadata.get("lora_adapter_metadata")
    if raw:
        try:
            md = json.loads(raw)
        except ValueError as e:
            raise ValueError(f"{file.path}: lora_adapter_metadata is not JSON ({e})") from None
        prefixed = {k.removeprefix("transformer."): v for k, v in md.items() if k.startswith("transformer.")}
        return prefixed or {k: v for k, v in md.items() if "." not in k}  # diffusers itself needs the prefix
    side = file.path.parent / _PEFT_CONFIG
    if file.path.name == _PEFT_FILE and side.is_file():
        return json.loads(side.read_text())
    return {}


def _peft_scale(cfg: dict, module: str, rank: int) -> tuple[float, float] | None:
    """PEFT's (alpha, r) (r -> sqrt(r) with rsLoRA) for `module`, honouring alpha_pattern as PEFT matches it."""
    if "lora_alpha" not in cfg:
        return None
    alpha = cfg["lora_alpha"]
    for pattern, a in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern.lstrip('^')})$", module):
            alpha = a
            break
    return alpha, (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def load_lora(path: str | os.PathLike, *, config: WanConfig | None = None, dtype=F32) -> LoraWeights:
    """Read a LoRA file (diffusers/PEFT, original Wan/ComfyUI or musubi/kohya) as one-rank, one-alpha
    `LoraWeights` in `dtype`. With `config`, also check it fits and give layers absent from the file zero
    adapters; without, the depth is the highest block index in the file + 1."""
    path = _resolve(path)
    file = stio.SafetensorsFile(path)  # ValueError naming the file if unreadable
    keys = file.keys()
    if not any(k.endswith((".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight")) for k in keys):
        raise ValueError(f"{path}: not a LoRA file (no lora_A/lora_B/lora_down/lora_up tensors; keys {keys[:4]})")
    cfg = _peft_config(file)
    if cfg.get("use_dora"):
        raise ValueError(f"{path}: DoRA adapters (use_dora) are not supported")

    entries: dict[tuple[str, int | None], dict] = collections.defaultdict(dict)
    names: dict[tuple[str, int | None], str] = {}
    # All-zero norm `.diff` / `.diff_b` tensors (some ComfyUI / musubi LoRAs ship them, e.g. LightX2V, CausVid) are
    # no-ops: dropped, as diffusers drops norm diffs. Non-zero ones are full-weight differences, not low-rank: refused.
    dropped: list[str] = []
    for key in keys:
        try:
            stem, kind, musubi = _split_key(key)
            module, layer = _module_of(key, stem, musubi)
        except ValueError as e:
            msg = str(e)
            if key.endswith((".diff", ".diff_b")) and "norm" in key:
                diff = file.read(key).astype(np.float64)
                if not diff.any():
                    dropped.append(key)
                    continue
                msg += f" (max |value| {np.abs(diff).max():.3g}; only all-zero norm .diff / .diff_b tensors are skipped)"
            raise ValueError(f"{path}: {msg}") from None
        arr = file.read(key).astype(np.float64)
        entries[(module, layer)][kind] = float(arr.reshape(-1)[0]) if kind == "alpha" else arr
        names.setdefault((module, layer), key)
    if dropped:
        logger.warning("%s: dropped %d all-zero norm .diff/.diff_b tensors (no-ops, as diffusers drops them), e.g. %s",
                       path, len(dropped), ", ".join(dropped[:3]))

    # Per-module scale s_m (alpha tensor > PEFT metadata > 1), folded relative to the most common one.
    scales: dict[tuple[str, int | None], tuple[float, float]] = {}
    for mk, e in entries.items():
        if "A" not in e or "B" not in e or e["A"].ndim != 2 or e["B"].shape[1:] != e["A"].shape[:1]:
            shapes = {k: getattr(v, "shape", ()) for k, v in e.items()}
            raise ValueError(f"{path}: {names[mk]}: module needs lora A (r, in) and B (out, r), got {shapes}")
        r = e["A"].shape[0]
        if "alpha" in e:
            scales[mk] = (e["alpha"], r)
        elif (peft := _peft_scale(cfg, _full_name(*mk), r)) is not None:
            scales[mk] = peft
        else:
            scales[mk] = (r, r)
    rank = max(e["A"].shape[0] for e in entries.values())
    a_c, r_c = collections.Counter(scales.values()).most_common(1)[0][0]
    alpha = a_c if r_c == rank else a_c * rank / r_c
    s_global = alpha / rank

    layers = [layer for (_, layer) in entries if layer is not None]
    depth = config.num_layers if config is not None else (max(layers) + 1 if layers else 0)
    params: dict = {}
    by_module: dict[str, list] = collections.defaultdict(list)
    for (module, layer), e in entries.items():
        if layer is not None and layer >= depth:
            key = names[(module, layer)]
            raise ValueError(f"{path}: {key}: block {layer} is out of range for a {depth}-layer model")
        by_module[module].append((layer, e))
    for module in _all_modules():
        if module not in by_module:
            continue
        items = by_module[module]
        dout, din = items[0][1]["B"].shape[0], items[0][1]["A"].shape[1]
        lead = () if _is_top(module) else (depth,)
        a, b = np.zeros((*lead, din, rank)), np.zeros((*lead, rank, dout))
        bias = np.zeros((*lead, dout)) if any("bias" in e or "diff_b" in e for _, e in items) else None
        for layer, e in items:
            if e["A"].shape[1] != din or e["B"].shape[0] != dout:
                raise ValueError(f"{path}: {names[(module, layer)]}: shapes differ from other layers of {module}")
            al, rl = scales[(module, layer)]
            fold = 1.0 if (al, rl) == (a_c, r_c) else (al / rl) / s_global
            idx = () if layer is None else (layer,)
            a[idx][..., : e["A"].shape[0]] = e["A"].T
            b[idx][: e["A"].shape[0]] = e["B"].T * fold
            if "bias" in e:
                bias[idx] = e["bias"] * fold
            elif "diff_b" in e:
                bias[idx] = e["diff_b"] / s_global
        leaf = {"A": a, "B": b} | ({"bias": bias} if bias is not None else {})
        _set(params, _module_paths()[module], {k: jnp.asarray(v, dtype) for k, v in leaf.items()})

    lora = LoraWeights(params, int(rank), float(alpha), tuple(m for m in _all_modules() if m in by_module))
    if config is not None:
        file_names = {_module_paths()[m]: names[(m, layer)] for (m, layer) in entries}
        try:
            _check(lora.params, {p: s for p, s in _kernels_cached(config).values()}, file_names)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return lora


# ---------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------
def _layers(module: str, arr: np.ndarray):
    """(layer, slice) pairs: per block for stacked modules, (None, arr) for top-level ones."""
    return [(None, arr)] if _is_top(module) else [(i, arr[i]) for i in range(arr.shape[0])]


def lora_file(path: str | os.PathLike) -> Path:
    """The file `save_lora(lora, path)` writes: `path` itself when it ends in `.safetensors` (and is not an existing
    folder); otherwise `path` is a folder (an existing one, one ending in "/", or any name without the suffix, e.g.
    "out" or "out/my-lora") and the file is `path/pytorch_lora_weights.safetensors`, as diffusers'
    `save_lora_weights(save_directory)` writes and `load_lora_weights(save_directory)` reads."""
    text = os.fspath(path)
    p = Path(text)
    as_folder = p.is_dir() or text.endswith(("/", os.sep)) or p.suffix.lower() != ".safetensors"
    return p / DIFFUSERS_FILE if as_folder else p


FORMATS = ("diffusers", "comfyui")  # what save_lora writes


def save_lora(lora: LoraWeights, path: str | os.PathLike, *, format: str = "diffusers") -> Path:
    """Write `lora` for diffusers' `WanPipeline.load_lora_weights` (format="diffusers": PEFT keys, alpha in the
    header metadata) or for ComfyUI / original-Wan tools (format="comfyui": lora_down / lora_up, `.alpha`,
    `.diff_b`). `path` ending in `.safetensors` is the file; any other `path` is a folder (created if needed) that
    gets `pytorch_lora_weights.safetensors` (see `lora_file`). Tensors keep the adapter's dtype. Returns the file."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: expected one of {FORMATS}")
    path = lora_file(path)
    folder = path.parent
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(
            f"{folder}: exists and is not a folder; a LoRA path without the .safetensors suffix names a folder to "
            f"write {DIFFUSERS_FILE} in (give a path ending in .safetensors to write a single file)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    host = jax.device_get(lora.params)
    mods = []
    for m, mpath in _module_paths().items():  # every adapter in the tree, in canonical order
        leaf = functools.reduce(lambda t, k: t.get(k, {}), mpath, host)
        if leaf:
            mods.append((m, leaf))
    s = lora.alpha / lora.rank
    has_bias = any("bias" in leaf for _, leaf in mods)
    tensors: dict[str, np.ndarray] = {}
    for m, leaf in mods:
        a, b = np.asarray(leaf["A"]), np.asarray(leaf["B"])
        bias = np.asarray(leaf["bias"]) if "bias" in leaf else np.zeros(b.shape[:-2] + b.shape[-1:], b.dtype)
        for (layer, al), (_, bl), (_, cl) in zip(_layers(m, a), _layers(m, b), _layers(m, bias)):
            if format == "diffusers":
                key = f"transformer.{_full_name(m, layer)}"
                tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = al.T, bl.T
                if has_bias:
                    tensors[f"{key}.lora_B.bias"] = cl
                continue
            key = f"diffusion_model.{_original_name(m, layer)}"
            tensors[f"{key}.lora_down.weight"] = al.T
            if layer is None:  # diffusers' converter reads `.alpha` only for block layers: fold the scale into up
                tensors[f"{key}.lora_up.weight"] = (bl.T.astype(np.float64) * s).astype(bl.dtype)
            else:
                tensors[f"{key}.lora_up.weight"] = bl.T
                tensors[f"{key}.alpha"] = np.asarray(lora.alpha, np.float32)
            if "bias" in leaf:
                tensors[f"{key}.diff_b"] = (cl.astype(np.float64) * s).astype(cl.dtype)
    metadata = None
    if format == "diffusers":
        alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
        targets = [m for m, _ in mods]
        adapter = {"r": lora.rank, "lora_alpha": alpha, "target_modules": targets, "lora_bias": has_bias}
        # diffusers passes the `transformer.`-prefixed keys, unprefixed, to peft.LoraConfig(**kwargs)
        packed = json.dumps({f"transformer.{k}": v for k, v in adapter.items()})
        metadata = {"format": "pt", "lora_adapter_metadata": packed}
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    specs = [(k, v.dtype, v.shape) for k, v in tensors.items()]
    stio.write_safetensors(path, specs, tensors.__getitem__, metadata)
    return path
