"""Loading and saving Wan transformers: every checkpoint route, streamed tensor by tensor.

A `ParamReader` gives one wanjax param (a path in the params tree, optionally a range of stacked layers) as a
host numpy array in wanjax layout, whatever the checkpoint is: a diffusers model or pipeline folder, an
original-Wan / ComfyUI single file, a wanjax checkpoint, or params already in memory. Loading places each
param straight into its target sharding; writing streams each tensor to disk. Nothing ever holds more than
one stacked tensor beyond the output itself.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from wanjax import safetensors_io as stio
from wanjax import weights
from wanjax.model_source import looks_like_repo_id
from wanjax.models.config import WanConfig
from wanjax.models.transformer import param_shapes

logger = logging.getLogger(__name__)

WANJAX_INDEX = "wanjax_transformer.json"
WANJAX_FORMAT = "wanjax-transformer"
WANJAX_STEM = "params"
DIFFUSERS_STEM = "diffusion_pytorch_model"
DEFAULT_MAX_SHARD_BYTES = 10 * 1024**3  # diffusers' save_pretrained default ("10GB")
# diffusers' `_keys_to_ignore_on_load_unexpected` for Wan.
_IGNORED_UNEXPECTED = re.compile(r"norm_added_q")


class ParamReader(Protocol):
    config: WanConfig
    source: str

    def dtype(self, path: tuple[str, ...]) -> np.dtype: ...

    def read(self, path: tuple[str, ...], layers: slice | None = None) -> np.ndarray: ...


def _flat_name(path: tuple[str, ...]) -> str:
    return "/".join(path)


def _shapes(config: WanConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    return weights.flatten(param_shapes(config))


def _describe(missing: list[str], expected: dict) -> str:
    shown = ", ".join(f"{k} {list(expected[k])}" for k in missing[:8])
    return shown + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")


# ---------------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------------
class DiffusersReader:
    """diffusers-named tensors (a model folder, a pipeline subfolder, or a single file with either naming)."""

    def __init__(self, store: stio.TensorStore, config: WanConfig, names: dict[str, str], source: str):
        self.store, self.config, self.names, self.source = store, config, names, source
        expected = weights.expected_diffusers_shapes(param_shapes(config), config.num_layers)
        missing = sorted(set(expected) - set(names))
        extra = sorted(k for k in set(names) - set(expected) if not _IGNORED_UNEXPECTED.search(k))
        if missing:
            raise ValueError(f"{source}: missing tensors for this config: {_describe(missing, expected)}")
        if extra:
            raise ValueError(f"{source}: unexpected tensors (not part of a Wan transformer with this config): {extra[:8]}")
        for key, shape in expected.items():
            got = store.info(names[key]).shape
            if tuple(got) != tuple(shape):
                raise ValueError(f"{source}: tensor {names[key]!r} has shape {list(got)}, expected {list(shape)}")

    def _key(self, path, layer=None) -> str:
        return self.names[weights.wanjax_to_diffusers(path, layer)]

    def dtype(self, path):
        return self.store.info(self._key(path, 0 if path[0] == "blocks" else None)).dtype

    def read(self, path, layers=None):
        kind = weights.kind_of(path)
        if path[0] != "blocks":
            return np.ascontiguousarray(weights.to_wanjax_layout(self.store.read(self._key(path)), kind))
        idx = range(self.config.num_layers)[layers if layers is not None else slice(None)]
        first = weights.to_wanjax_layout(self.store.read(self._key(path, idx[0])), kind)
        out = np.empty((len(idx), *first.shape), first.dtype)
        out[0] = first
        for j, i in enumerate(idx[1:], start=1):
            out[j] = weights.to_wanjax_layout(self.store.read(self._key(path, i)), kind)
        return out


class WanjaxReader:
    """A wanjax checkpoint: `wanjax_transformer.json` + `params*.safetensors` in wanjax (stacked) layout."""

    def __init__(self, directory: Path):
        self.source = str(directory)
        meta = json.loads((directory / WANJAX_INDEX).read_text())
        if meta.get("format") != WANJAX_FORMAT:
            raise ValueError(f"{directory / WANJAX_INDEX}: format is {meta.get('format')!r}, expected {WANJAX_FORMAT!r}")
        self.config = WanConfig.from_diffusers(meta["config"], source=str(directory / WANJAX_INDEX))
        self.store = _open_store(directory, WANJAX_STEM)
        expected = {_flat_name(p): s for p, s in _shapes(self.config).items()}
        missing = sorted(set(expected) - set(self.store.keys()))
        extra = sorted(set(self.store.keys()) - set(expected))
        if missing or extra:
            raise ValueError(f"{directory}: missing {_describe(missing, expected)}; unexpected {extra[:8]}")
        for name, shape in expected.items():
            if tuple(self.store.info(name).shape) != tuple(shape):
                raise ValueError(f"{directory}: tensor {name!r} has shape {list(self.store.info(name).shape)}, expected {list(shape)}")

    def dtype(self, path):
        return self.store.info(_flat_name(path)).dtype

    def read(self, path, layers=None):
        return self.store.read(_flat_name(path), layers if path[0] == "blocks" else None)


class ArrayReader:
    """Params already in memory (jax or numpy arrays); multi-host arrays are gathered per tensor."""

    def __init__(self, config: WanConfig, params: dict, source: str = "params"):
        self.config, self.source = config, source
        self.leaves = weights.leaves_by_path(params)
        # params spread over several hosts: every process must join each gather, process 0 writes
        self.collective = any(isinstance(v, jax.Array) and not v.is_fully_addressable for v in self.leaves.values())
        expected = _shapes(config)
        if set(expected) != set(self.leaves):
            missing = sorted(map(_flat_name, set(expected) - set(self.leaves)))
            extra = sorted(map(_flat_name, set(self.leaves) - set(expected)))
            raise ValueError(f"params do not match the config: missing {missing[:8]}, unexpected {extra[:8]}")
        for path, shape in expected.items():
            if tuple(self.leaves[path].shape) != shape:
                raise ValueError(f"params: {_flat_name(path)} has shape {self.leaves[path].shape}, expected {shape}")

    def dtype(self, path):
        return np.dtype(self.leaves[path].dtype)

    def read(self, path, layers=None):
        leaf = self.leaves[path]
        if layers is not None:
            leaf = leaf[layers]
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            from jax.experimental import multihost_utils

            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        return np.asarray(leaf)


def _open_store(directory: Path, stem: str) -> stio.TensorStore:
    index = directory / f"{stem}.safetensors.index.json"
    if index.exists():
        return stio.TensorStore.from_index(index)
    single = directory / f"{stem}.safetensors"
    if single.exists():
        return stio.TensorStore.from_paths([single])
    raise FileNotFoundError(f"{directory}: neither {single.name} nor {index.name} found")


def _diffusers_folder(directory: Path, overrides: dict) -> DiffusersReader:
    cfg_path = directory / "config.json"
    config = WanConfig.from_diffusers(json.loads(cfg_path.read_text()), source=str(cfg_path)).replace(**overrides)
    store = _open_store(directory, DIFFUSERS_STEM)
    return DiffusersReader(store, config, {k: k for k in store.keys()}, str(directory))


def _single_file(path: Path, overrides: dict) -> DiffusersReader:
    store = stio.TensorStore.from_paths([path])
    keys = store.keys()
    names: dict[str, str] = {}
    original = weights.looks_original(keys)
    for k in keys:
        try:
            d = weights.original_to_diffusers_key(k) if original else weights.strip_original_prefix(k)
        except KeyError:
            raise ValueError(f"{path}: tensor {k!r} is not part of a Wan transformer (original/ComfyUI names)") from None
        names[d] = k
    shapes = {d: store.info(k).shape for d, k in names.items()}
    config = weights.infer_config(shapes, source=str(path), **overrides)
    return DiffusersReader(store, config, names, str(path))


def _download(repo_id: str, subfolder: str | None, expert: str) -> tuple[Path, str | None]:
    """Fetch only the transformer part of a hub repo (model or pipeline) with huggingface_hub."""
    import huggingface_hub as hf
    from huggingface_hub.errors import EntryNotFoundError

    try:
        hf.hf_hub_download(repo_id, "model_index.json")
        sub = subfolder or expert
        patterns = [f"{sub}/*.json", f"{sub}/*.safetensors", "model_index.json"]
    except EntryNotFoundError:  # a model repo (or offline: snapshot_download then tries the local cache)
        sub = subfolder
        prefix = f"{subfolder}/" if subfolder else ""
        patterns = [f"{prefix}config.json", f"{prefix}{DIFFUSERS_STEM}*"]
    return Path(hf.snapshot_download(repo_id, allow_patterns=patterns)), sub


def _one_line(e: BaseException, limit: int = 500) -> str:
    text = " ".join(str(e).split())  # hub errors span several lines
    return text if len(text) <= limit else text[: limit - 3] + "..."


def open_reader(path: str | os.PathLike, *, subfolder: str | None = None, expert: str = "transformer",
                **overrides) -> ParamReader:
    """The reader for any checkpoint `load_transformer` accepts (see there). `expert`: the subfolder read when `path`
    is a pipeline and `subfolder` is None ("transformer_2": Wan 2.2 A14B's low-noise expert)."""
    spath = str(path)
    if looks_like_repo_id(spath):
        # "org/name" that is not a local path: a hub repo id, or a local path mistyped / not created yet
        try:
            local, subfolder = _download(spath, subfolder, expert)
        except Exception as e:  # offline, no such repo, gated, network: say both what was tried and why
            raise FileNotFoundError(
                f"{spath}: no such local file or directory, and fetching it as hub repo id {spath!r} failed "
                f"({type(e).__name__}: {_one_line(e)})"
            ) from e
        return open_reader(local, subfolder=subfolder, **overrides)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory (and not a hub repo id 'org/name')")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise ValueError(f"{p}: single-file checkpoints must be .safetensors")
        return _single_file(p, overrides)
    if subfolder is None and (p / "model_index.json").exists():
        subfolder = expert
    if subfolder is not None:
        if not (p / subfolder).is_dir():
            raise FileNotFoundError(f"{p}: pipeline folder has no {subfolder!r} subfolder")
        p = p / subfolder
    if (p / WANJAX_INDEX).exists():
        if overrides:
            raise ValueError(f"{p}: a wanjax checkpoint carries its config; overrides {sorted(overrides)} not allowed")
        return WanjaxReader(p)
    if (p / "config.json").exists():
        return _diffusers_folder(p, overrides)
    raise ValueError(
        f"{p}: not a Wan checkpoint: expected {WANJAX_INDEX}, a diffusers config.json + safetensors, "
        f"a pipeline model_index.json, or a .safetensors file"
    )


# ---------------------------------------------------------------------------------------------------------
# Loading into device arrays
# ---------------------------------------------------------------------------------------------------------
def materialize(reader: ParamReader, *, dtype=jnp.bfloat16, shardings=None) -> dict:
    """Device params from a reader. With `shardings` (a tree of Shardings), each device receives only its slice,
    read for the layers it holds: the full model is never assembled on one host or device."""
    shapes = param_shapes(reader.config)
    flat_shard = None
    if shardings is not None:
        flat_shard = weights.leaves_by_path(shardings)

    def load(path_keys, leaf):
        path = weights.path_names(path_keys)
        dt = weights.target_dtype(path, reader.dtype(path), dtype)
        if flat_shard is None:
            # Block per tensor: async transfers would otherwise keep many host buffers alive at once.
            return jax.device_put(reader.read(path).astype(dt, copy=False)).block_until_ready()

        def callback(index):
            layers = index[0] if path[0] == "blocks" else None
            host = reader.read(path, layers)
            rest = index[1:] if layers is not None else index
            return np.ascontiguousarray(host[(slice(None),) * (layers is not None) + tuple(rest)].astype(dt, copy=False))

        return jax.make_array_from_callback(tuple(leaf.shape), flat_shard[path], callback).block_until_ready()

    return jax.tree_util.tree_map_with_path(load, shapes)


def load_transformer(
    path: str | os.PathLike,
    *,
    subfolder: str | None = None,
    dtype=jnp.bfloat16,
    shardings=None,
    mesh=None,
    **config_overrides,
) -> tuple[WanConfig, dict]:
    """Load a Wan transformer as (config, params).

    `path`: a wanjax checkpoint folder, a diffusers model folder (config.json + safetensors, sharded with an index
    or not), a diffusers pipeline folder (`subfolder` picks "transformer" or "transformer_2"; default
    "transformer"), an original-Wan or ComfyUI single `.safetensors` file (config inferred from shapes; heads =
    D / 128), or a hub repo id (downloaded with huggingface_hub). `dtype`: parameter dtype (None keeps the
    stored dtypes; half precision keeps diffusers' float32 modules in float32). `mesh` shards params with
    wanjax's logical rules; `shardings` gives them explicitly. `config_overrides` sets architecture fields a
    single file cannot tell (e.g. `num_attention_heads`) or runtime options (`attention`, `remat_policy`).
    """
    runtime = {k: config_overrides.pop(k) for k in ("attention", "remat_policy") if k in config_overrides}
    reader = open_reader(path, subfolder=subfolder, **config_overrides)
    if mesh is not None and shardings is None:
        from wanjax.sharding import param_shardings

        shardings = param_shardings(param_shapes(reader.config), mesh)
    params = materialize(reader, dtype=dtype, shardings=shardings)
    return reader.config.replace(**runtime), params


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------
class _AtomicDir:
    """Write a folder under a temporary name, rename it into place only when complete.

    The temporary folder is `.{name}.partial-{pid}` beside `dst`. A writer that was killed leaves its partial
    folder behind; on start, partial folders of the same `dst` whose pid is not a running process on this host
    are removed (and logged); so is the `.{name}.old-{pid}` a writer killed while swapping left, or, when `dst` is
    missing, it is put back. Those of a running process are left alone, so a second writer started on this host
    cannot delete a running one's work. Across hosts sharing a filesystem, one writer per `dst` at a time is
    assumed (a multi-host save writes from process 0 only): the pid of a writer running on another host means
    nothing here, and its partial folder would be taken for a stale one.
    """

    def __init__(self, dst: Path, overwrite: bool):
        self.dst = Path(dst)
        if self.dst.exists() and not self.dst.is_dir():
            raise NotADirectoryError(f"{self.dst}: exists and is not a folder; the output must be a folder "
                                     f"(a new path, or an existing folder with --overwrite / overwrite=True)")
        if self.dst.exists() and any(self.dst.iterdir()) and not overwrite:
            raise FileExistsError(f"{self.dst} exists and is not empty (pass overwrite=True / --overwrite)")
        self.tmp = self.dst.with_name(f".{self.dst.name}.partial-{os.getpid()}")

    def _remove_stale(self) -> None:
        parent, name = self.dst.parent, self.dst.name
        if not parent.is_dir():
            return
        for p in sorted(parent.iterdir()):
            kind, _, pid = p.name[len(name) + 2:].partition("-") if p.name.startswith(f".{name}.") else ("", "", "")
            if kind not in ("partial", "old") or not pid.isdigit() or p == self.tmp or _pid_running(int(pid)):
                continue
            if kind == "old" and not self.dst.exists() and p.is_dir():
                # killed between moving the previous output aside and moving the new one in: put it back
                logger.warning("restoring %s from %s: an earlier writer (pid %s) stopped while replacing it",
                               self.dst, p, pid)
                os.replace(p, self.dst)
                continue
            logger.warning("removing %s: %s output of an earlier writer (pid %s) that did not finish", p,
                           "partial" if kind == "partial" else "the replaced", pid)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    def __enter__(self) -> Path:
        self._remove_stale()
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.dst.exists():
            old = self.dst.with_name(f".{self.dst.name}.old-{os.getpid()}")
            os.replace(self.dst, old)
            os.replace(self.tmp, self.dst)
            shutil.rmtree(old)
        else:
            os.replace(self.tmp, self.dst)
        return False


def _pid_running(pid: int) -> bool:
    """Whether a process with this id runs on this host (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: someone else's process
        return True
    return True


def _out_dtype(reader: ParamReader, path, dtype) -> np.dtype:
    return weights.target_dtype(path, reader.dtype(path), dtype)


def _follow(specs, produce) -> None:
    """Non-writing processes of a multi-host save: take part in every gather, write nothing."""
    for name, _, _ in specs:
        produce(name)


def write_diffusers(reader: ParamReader, dst, *, dtype=None, max_shard_bytes=DEFAULT_MAX_SHARD_BYTES, overwrite=False):
    """A diffusers model folder (config.json + safetensors, sharded above `max_shard_bytes`), one layer at a time."""
    if jax.process_index() != 0 and not getattr(reader, "collective", False):
        return
    specs, where = [], {}
    for path, shape in _shapes(reader.config).items():
        kind = weights.kind_of(path)
        dt = _out_dtype(reader, path, dtype)
        layers = range(reader.config.num_layers) if path[0] == "blocks" else [None]
        for layer in layers:
            key = weights.wanjax_to_diffusers(path, layer)
            inner = shape[1:] if layer is not None else shape
            specs.append((key, dt, weights.diffusers_shape(inner, kind)))
            where[key] = (path, layer, kind, dt)
    specs.sort(key=lambda s: _natural_key(s[0]))

    def produce(key):
        path, layer, kind, dt = where[key]
        if layer is None:
            arr = reader.read(path)
        else:
            arr = reader.read(path, slice(layer, layer + 1))[0]
        return np.ascontiguousarray(weights.to_diffusers_layout(arr, kind)).astype(dt, copy=False)

    if jax.process_index() != 0:
        return _follow(specs, produce)
    with _AtomicDir(Path(dst), overwrite) as tmp:
        stio.write_sharded(tmp, DIFFUSERS_STEM, specs, produce, max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(reader.config.to_diffusers(), indent=2))


def write_wanjax(reader: ParamReader, dst, *, dtype=None, max_shard_bytes=DEFAULT_MAX_SHARD_BYTES, overwrite=False):
    """A wanjax checkpoint (stacked layout), one param at a time."""
    if jax.process_index() != 0 and not getattr(reader, "collective", False):
        return
    shapes = _shapes(reader.config)
    specs = [(_flat_name(p), _out_dtype(reader, p, dtype), s) for p, s in shapes.items()]
    by_name = {_flat_name(p): p for p in shapes}

    def produce(name):
        path = by_name[name]
        return reader.read(path).astype(_out_dtype(reader, path, dtype), copy=False)

    if jax.process_index() != 0:
        return _follow(specs, produce)
    with _AtomicDir(Path(dst), overwrite) as tmp:
        stio.write_sharded(tmp, WANJAX_STEM, specs, produce, max_shard_bytes=max_shard_bytes)
        meta = {"format": WANJAX_FORMAT, "version": 1, "config": reader.config.to_diffusers()}
        (tmp / WANJAX_INDEX).write_text(json.dumps(meta, indent=2))


def save_transformer(config: WanConfig, params: dict, path, *, dtype=None, max_shard_bytes=DEFAULT_MAX_SHARD_BYTES, overwrite=False):
    """Write `params` as a diffusers folder that `WanTransformer3DModel.from_pretrained(path)` loads."""
    write_diffusers(ArrayReader(config, params), path, dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite)


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]

