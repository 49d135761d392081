"""Loading and saving the Wan VAE in diffusers' format (`AutoencoderKLWan` folders), tensor by tensor.

The wanjax params tree mirrors diffusers' module names: a diffusers key is the tree path joined with ".",
where a module name's `_<n>` list indices become `.<n>.` ("down_blocks_0_resnets_1" -> "down_blocks.0.resnets.1")
and `kernel` is `weight`. Layouts: Conv3d (O, I, t, h, w) <-> (t, h, w, I, O), Conv2d (O, I, h, w) <-> (h, w, I, O),
WanRMS_norm gamma (C, 1, 1[, 1]) <-> (C,).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from wanjax import safetensors_io as stio
from wanjax import weights
from wanjax.models.vae import VaeConfig, init_vae_params, vae_param_shapes
from wanjax.transformer_io import DEFAULT_MAX_SHARD_BYTES, DIFFUSERS_STEM, _AtomicDir, _natural_key, _open_store

__all__ = [
    "diffusers_key",
    "diffusers_shapes",
    "init_vae_params",
    "load_vae",
    "save_vae",
    "to_diffusers_layout",
    "to_wanjax_layout",
]

Path_ = tuple[str, ...]


def diffusers_key(path: Path_) -> str:
    """The diffusers state-dict key of a wanjax VAE param path."""
    *modules, leaf = path
    name = ".".join(re.sub(r"_(\d+)(_|$)", lambda m: f".{m[1]}" + ("." if m[2] else ""), p) for p in modules)
    return f"{name}.{'weight' if leaf == 'kernel' else leaf}"


def diffusers_shape(shape: tuple[int, ...], path: Path_) -> tuple[int, ...]:
    """The diffusers shape of a wanjax param of `shape` at `path`."""
    if path[-1] == "kernel":
        return (shape[-1], shape[-2], *shape[:-2])
    if path[-1] == "gamma":  # the attention block's norm is an image norm (C, 1, 1)
        return (shape[0], 1, 1) if path[-2] == "norm" else (shape[0], 1, 1, 1)
    return tuple(shape)


def to_wanjax_layout(arr: np.ndarray, path: Path_) -> np.ndarray:
    if path[-1] == "kernel":
        return arr.transpose(*range(2, arr.ndim), 1, 0)
    if path[-1] == "gamma":
        return arr.reshape(arr.shape[0])
    return arr


def to_diffusers_layout(arr: np.ndarray, path: Path_) -> np.ndarray:
    if path[-1] == "kernel":
        return arr.transpose(arr.ndim - 1, arr.ndim - 2, *range(arr.ndim - 2))
    return arr.reshape(diffusers_shape(arr.shape, path))


def _unflat(flat: dict[Path_, object]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def diffusers_shapes(config: VaeConfig) -> dict[str, tuple[Path_, tuple[int, ...]]]:
    """{diffusers key: (wanjax path, diffusers shape)} for every param the config has."""
    return {diffusers_key(p): (p, diffusers_shape(s.shape, p)) for p, s in weights.leaves_by_path(vae_param_shapes(config)).items()}


def _describe(keys: list[str], expected: dict | None = None) -> str:
    shown = ", ".join(f"{k} {list(expected[k][1])}" if expected else k for k in keys[:8])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")


def _vae_folder(path: str | os.PathLike, subfolder: str | None) -> Path:
    p = Path(path)
    if subfolder and (p / subfolder / "config.json").exists():
        return p / subfolder
    if (p / "config.json").exists() and not (p / "model_index.json").exists():
        return p
    want = f"{p / subfolder / 'config.json'} (pipeline folder) or " if subfolder else ""
    raise FileNotFoundError(
        f"{p}: not a Wan VAE folder: expected {want}{p / 'config.json'} + {DIFFUSERS_STEM}.safetensors"
    )


def load_vae(
    path: str | os.PathLike, *, subfolder: str | None = "vae", dtype: jnp.dtype | None = jnp.float32
) -> tuple[VaeConfig, dict]:
    """Load (config, params) from a diffusers pipeline folder (`path/subfolder`) or a VAE model folder
    (config.json + diffusion_pytorch_model[.safetensors | -0000k-of-0000n.safetensors + index]).

    Missing, unexpected and wrongly shaped tensors are errors naming them. `dtype`: the params' dtype (None keeps
    the stored one), which is also the activations' dtype (norms and accumulation stay float32).
    """
    folder = _vae_folder(path, subfolder)
    cfg_path = folder / "config.json"
    config = VaeConfig.from_diffusers(json.loads(cfg_path.read_text()), source=str(cfg_path))
    store = _open_store(folder, DIFFUSERS_STEM)
    expected = diffusers_shapes(config)
    missing = sorted(set(expected) - set(store.keys()), key=_natural_key)
    extra = sorted(set(store.keys()) - set(expected), key=_natural_key)
    if missing or extra:
        raise ValueError(
            f"{folder}: missing tensors [{_describe(missing, expected)}]; unexpected tensors [{_describe(extra)}]"
        )
    for key, (_, shape) in expected.items():
        if tuple(store.info(key).shape) != shape:
            raise ValueError(
                f"{folder}: tensor {key!r} has shape {list(store.info(key).shape)}, expected {list(shape)}"
            )
    flat = {}
    for key, (p, _) in expected.items():
        arr = to_wanjax_layout(store.read(key), p)
        flat[p] = jnp.asarray(arr if dtype is None else arr.astype(jnp.dtype(dtype)))
    return config, _unflat(flat)


def save_vae(
    config: VaeConfig, params: dict, path: str | os.PathLike, *, overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:  # fmt: skip
    """Write a diffusers folder (config.json + safetensors in the params' dtypes) that
    `AutoencoderKLWan.from_pretrained(path)` loads; the folder appears only once complete."""
    if jax.process_index() != 0:
        return
    leaves, expected = weights.leaves_by_path(params), weights.leaves_by_path(vae_param_shapes(config))
    if set(leaves) != set(expected):
        missing = sorted("/".join(p) for p in set(expected) - set(leaves))
        extra = sorted("/".join(p) for p in set(leaves) - set(expected))
        raise ValueError(f"params do not match the config: missing {missing[:8]}, unexpected {extra[:8]}")
    for p, s in expected.items():
        if tuple(leaves[p].shape) != s.shape:
            raise ValueError(f"params: {'/'.join(p)} has shape {tuple(leaves[p].shape)}, expected {s.shape}")
    by_key = {diffusers_key(p): p for p in expected}
    specs = [(k, np.dtype(leaves[p].dtype), diffusers_shape(expected[p].shape, p)) for k, p in by_key.items()]
    specs.sort(key=lambda s: _natural_key(s[0]))

    def produce(key: str) -> np.ndarray:
        p = by_key[key]
        return np.ascontiguousarray(to_diffusers_layout(np.asarray(jax.device_get(leaves[p])), p))

    with _AtomicDir(Path(path), overwrite) as tmp:
        stio.write_sharded(
            tmp, DIFFUSERS_STEM, specs, produce, max_shard_bytes=max_shard_bytes, metadata={"format": "pt"}
        )
        (tmp / "config.json").write_text(json.dumps(config.to_diffusers(), indent=2))
