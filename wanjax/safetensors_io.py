"""Streaming safetensors I/O with numpy (bfloat16 and float8 through ml_dtypes).

Why not `safetensors.numpy`: it has no bfloat16, and its `save_file` needs every tensor in memory at once.
Here reads are per tensor (or per leading-axis slice, for stacked layers) and writes stream tensor by tensor
into a temporary file renamed into place at the end, so peak memory is one tensor and a crash never leaves
a file that looks complete. Format: 8-byte little-endian header size, JSON header, raw little-endian data.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def dtype_name(dtype) -> str:
    """safetensors' name of a numpy / ml_dtypes / jax dtype."""
    d = np.dtype(dtype)
    if d not in _NAMES:
        raise ValueError(f"dtype {d} cannot be stored in safetensors (supported: {sorted(_DTYPES)})")
    return _NAMES[d]


@dataclass(frozen=True)
class TensorInfo:
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int


class SafetensorsFile:
    """Header of one .safetensors file; tensors read on demand with plain file reads (no mmap)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) != 8:
                    raise ValueError("file shorter than the 8-byte header size")
                (n,) = struct.unpack("<Q", raw)
                if n > _MAX_HEADER:
                    raise ValueError(f"header size {n} is implausible")
                header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.path}: not a safetensors file ({e})") from None
        size = self.path.stat().st_size
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.tensors: dict[str, TensorInfo] = {}
        data_start = 8 + n
        for name, info in header.items():
            if info["dtype"] not in _DTYPES:
                raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            t = TensorInfo(_DTYPES[info["dtype"]], tuple(info["shape"]), data_start + begin, data_start + end)
            if t.end - t.begin != t.dtype.itemsize * int(np.prod(t.shape)) or t.end > size:
                raise ValueError(f"{self.path}: tensor {name!r} has inconsistent offsets (truncated file?)")
            self.tensors[name] = t

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """The tensor `name`, or only `rows` along its leading axis (a contiguous byte range)."""
        t = self.tensors[name]
        shape, begin = t.shape, t.begin
        if rows is not None:
            start, stop, step = rows.indices(shape[0])
            if step != 1:
                raise ValueError("row slices must be contiguous")
            row_bytes = t.dtype.itemsize * int(np.prod(shape[1:]))
            begin += start * row_bytes
            shape = (stop - start, *shape[1:])
        out = np.empty(shape, dtype=t.dtype)
        with open(self.path, "rb") as f:
            f.seek(begin)
            view = memoryview(out.reshape(-1).view(np.uint8))
            if f.readinto(view) != out.nbytes:
                raise ValueError(f"{self.path}: tensor {name!r} is truncated")
        return out


def write_safetensors(
    path: str | os.PathLike,
    specs: Iterable[tuple[str, np.dtype, tuple[int, ...]]],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write tensors one at a time: `specs` fixes (name, dtype, shape) up front, `produce(name)` makes each.

    The file appears at `path` only once complete (written as `path.partial`, then renamed). Returns bytes
    of tensor data written.
    """
    path = Path(path)
    specs = [(name, np.dtype(dt), tuple(int(s) for s in shape)) for name, dt, shape in specs]
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dt, shape in specs:
        nbytes = dt.itemsize * int(np.prod(shape))
        header[name] = {"dtype": dtype_name(dt), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes, as the reference writer does
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, dt, shape in specs:
                arr = np.asarray(produce(name))
                if arr.shape != shape or arr.dtype != dt:
                    raise ValueError(f"tensor {name!r}: produced {arr.dtype}{list(arr.shape)}, declared {dt}{list(shape)}")
                f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return offset


class TensorStore:
    """Tensors spread over one or more safetensors files (a sharded checkpoint) under one name space."""

    def __init__(self, files: list[SafetensorsFile]):
        self.files = files
        self.where: dict[str, SafetensorsFile] = {}
        for f in files:
            for k in f.keys():
                if k in self.where:
                    raise ValueError(f"tensor {k!r} appears in both {self.where[k].path} and {f.path}")
                self.where[k] = f

    @classmethod
    def from_paths(cls, paths: Iterable[str | os.PathLike]) -> "TensorStore":
        return cls([SafetensorsFile(p) for p in paths])

    @classmethod
    def from_index(cls, index_path: str | os.PathLike) -> "TensorStore":
        """A sharded checkpoint: `*.safetensors.index.json` with a weight_map {tensor: file}."""
        index_path = Path(index_path)
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ValueError(f"{index_path}: not a safetensors index with a 'weight_map' ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (index_path.parent / f).exists()]
        if missing:
            raise FileNotFoundError(f"{index_path}: shard files missing: {missing}")
        store = cls.from_paths(index_path.parent / f for f in files)
        mismatched = [k for k, f in weight_map.items() if k not in store.where or store.where[k].path.name != f]
        if mismatched:
            raise ValueError(f"{index_path}: weight_map disagrees with the shards for {mismatched[:5]}")
        return store

    def keys(self) -> list[str]:
        return list(self.where)

    def info(self, name: str) -> TensorInfo:
        return self.where[name].tensors[name]

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        return self.where[name].read(name, rows)

    @property
    def metadata(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for f in self.files:
            out.update(f.metadata)
        return out


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Group tensors, in order, into shards of at most `max_shard_bytes` (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def write_sharded(
    directory: Path,
    stem: str,
    specs: list[tuple[str, np.dtype, tuple[int, ...]]],
    produce: Callable[[str], np.ndarray],
    *,
    max_shard_bytes: int,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """`{stem}.safetensors`, or `{stem}-0000k-of-0000n.safetensors` + `{stem}.safetensors.index.json` above
    `max_shard_bytes` (diffusers' naming). Returns the file names written."""
    spec_of = {name: (name, dt, shape) for name, dt, shape in specs}
    sizes = [(name, np.dtype(dt).itemsize * int(np.prod(shape))) for name, dt, shape in specs]
    groups = plan_shards(sizes, max_shard_bytes)
    if len(groups) == 1:
        write_safetensors(directory / f"{stem}.safetensors", specs, produce, metadata)
        return [f"{stem}.safetensors"]
    names, weight_map = [], {}
    for i, group in enumerate(groups):
        fname = f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(directory / fname, [spec_of[n] for n in group], produce, metadata)
        names.append(fname)
        weight_map.update({n: fname for n in group})
    index = {"metadata": {"total_size": sum(s for _, s in sizes)}, "weight_map": weight_map}
    (directory / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    names.append(f"{stem}.safetensors.index.json")
    return names

