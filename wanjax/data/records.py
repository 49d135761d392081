"""The on-disk latent cache: the contract between the caching job (writer) and the trainer (reader), plus
`write_synthetic_cache`, a tiny random cache in the real format for `:tiny` configs and tests.

A cache directory holds
  *.array_record                       ArrayRecord shards, `group_size:1` (cheap random access), uncompressed
                                       (latents do not compress), listed by name in the manifest. `CacheWriter`
                                       names them records-00000-of-0000N (renamed from `.partial` when the whole
                                       cache is closed); the caching job's per-process `ShardWriter`s name them
                                       records-p000-00000 ... (each renamed from `.partial` once complete) and
                                       `write_manifest` joins them.
  index.safetensors                    per-record int32 `bucket` and `dataset` ids (names in its metadata), so the
                                       trainer groups records by shape without reading them, and uint8 `active`
                                       (1: trained on; absent in older caches: every record is active).
  manifest.json                        written LAST (temp + rename): a directory without it is an incomplete cache.
                                       Counts (`items`, per dataset `items`, per bucket `count`) are of the records
                                       on disk; `active_items`, per dataset `active` and per bucket `active` count
                                       the records the trainer uses (written only when some record is inactive;
                                       absent: all of them).
  empty_prompt.safetensors, validation_prompts.safetensors   side files of the caching job (`write_text_embeds`).

Record format (version 1): each ArrayRecord record is one safetensors blob -- 8-byte little-endian header size,
JSON header padded with spaces to 8 bytes, raw little-endian tensor bytes -- so any record written to a file opens
with any safetensors reader. `__metadata__` = {"format": "wanjax-record-1", "key", "dataset", "caption"}; tensors
`latents` (C, F, H, W), `prompt_embeds` (T, D) with T the prompt's true token count (the zero padding up to
`text_len` is not stored; readers pad it back with exact zeros), optional `image_embeds`. A prompt-only record
(a `prompts` dataset, for DMD) has no `latents`; its `__metadata__` carries `latent_shape` ("CxFxHxW") instead,
and readers give it as `latent_shape`. Tensors keep the dtype
they were given (float32 / float16 / bfloat16 ...), so reads are bit-exact.

Active records: the caching job keeps records of items that left the dataset list (a dataset disabled or removed, a
file deleted, an item outside `max_num_samples`) on disk but marks them inactive, so they are not trained on and
listing them again needs no re-encoding, only a new manifest. An item re-encoded after its media file or caption
changed has several records under one key; only the newest is active. `bucket_members` (the epoch plan) uses active
records only; `CacheSource` still reads any record by its global index.
"""

from __future__ import annotations

import bisect
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import ml_dtypes
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from wanjax.safetensors_io import SafetensorsFile, dtype_name, write_safetensors

FORMAT = "wanjax-cache"
VERSION = 1
RECORD_FORMAT = "wanjax-record-1"
MANIFEST = "manifest.json"
INDEX = "index.safetensors"
EMPTY_PROMPT_FILE = "empty_prompt.safetensors"
VALIDATION_PROMPTS_FILE = "validation_prompts.safetensors"
_WRITER_OPTIONS = "group_size:1,uncompressed"
_TENSORS = ("latents", "prompt_embeds", "image_embeds")
_DTYPES = {
    dtype_name(d): np.dtype(d)
    for d in (np.float64, np.float32, np.float16, ml_dtypes.bfloat16, np.int64, np.int32, np.int16, np.int8, np.uint8)
}


def bucket_key(shape: tuple[int, ...]) -> str:
    """Name of a latent shape bucket: (16, 21, 60, 104) -> "16x21x60x104"."""
    return "x".join(str(int(s)) for s in shape)


def bucket_shape(key: str) -> tuple[int, ...]:
    return tuple(int(s) for s in key.split("x"))


def check_example(example: Mapping[str, Any], *, latent_channels: int, text_dim: int, text_len: int
                  ) -> tuple[tuple[int, ...], np.ndarray | None, np.ndarray]:
    """(latent shape, latents or None, prompt_embeds) of an example to write; ValueError naming its key."""
    key = example.get("key")
    emb = np.asarray(example.get("prompt_embeds"))
    if emb.ndim != 2 or emb.shape[1] != text_dim or emb.shape[0] > text_len:
        raise ValueError(f"{key}: prompt_embeds must be (T<={text_len}, D={text_dim}), got {emb.shape}")
    if example.get("latents") is None and example.get("latent_shape") is not None:
        lat, shape = None, tuple(int(x) for x in example["latent_shape"])
    else:
        lat = np.asarray(example.get("latents"))
        shape = lat.shape
    if len(shape) != 4 or shape[0] != latent_channels or min(shape) < 1:
        raise ValueError(f"{key}: latents must be (C={latent_channels}, F, H, W), got {shape}")
    return shape, lat, emb


# -- one record --------------------------------------------------------------------------------------------
def encode_record(example: Mapping[str, Any]) -> bytes:
    """Serialize one example (see module docstring) to the bytes of one record."""
    meta = {"format": RECORD_FORMAT}
    for name in ("key", "dataset", "caption"):
        if not isinstance(example.get(name), str):
            raise ValueError(f"example field {name!r} must be a str, got {type(example.get(name)).__name__}")
        meta[name] = example[name]
    if example.get("latents") is None:
        if example.get("latent_shape") is None:
            raise ValueError(f"{example['key']}: an example needs latents or, prompt-only, a latent_shape")
        meta["latent_shape"] = bucket_key(example["latent_shape"])
    header: dict[str, Any] = {"__metadata__": meta}
    arrays, offset = [], 0
    for name in _TENSORS:
        if example.get(name) is None:
            continue
        arr = np.ascontiguousarray(np.asarray(example[name]))
        header[name] = {"dtype": dtype_name(arr.dtype), "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        arrays.append(arr)
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return b"".join([struct.pack("<Q", len(blob)), blob, *(a.reshape(-1).view(np.uint8).tobytes() for a in arrays)])


def decode_record(raw: bytes, *, text_len: int | None = None) -> dict[str, Any]:
    """Inverse of `encode_record`. With `text_len`, prompt_embeds are zero-padded to (text_len, D) and
    `prompt_length` (the true token count) is added. Arrays are read-only views of `raw` unless padded."""
    try:
        (n,) = struct.unpack_from("<Q", raw, 0)
        header = json.loads(bytes(raw[8 : 8 + n]))
        meta = header.pop("__metadata__")
        if meta.get("format") != RECORD_FORMAT:
            raise ValueError(f"record format {meta.get('format')!r}, expected {RECORD_FORMAT!r}")
        out: dict[str, Any] = {k: meta[k] for k in ("key", "dataset", "caption")}
        if "latent_shape" in meta:
            out["latent_shape"] = bucket_shape(meta["latent_shape"])
        for name, info in header.items():
            dt, shape = _DTYPES[info["dtype"]], tuple(info["shape"])
            begin, end = info["data_offsets"]
            if end - begin != dt.itemsize * int(np.prod(shape)) or 8 + n + end > len(raw):
                raise ValueError(f"tensor {name!r} has inconsistent offsets")
            out[name] = np.frombuffer(raw, dtype=dt, count=int(np.prod(shape)), offset=8 + n + begin).reshape(shape)
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"not a wanjax record ({type(e).__name__}: {e})") from None
    if text_len is not None:
        emb = out["prompt_embeds"]
        out["prompt_embeds"], out["prompt_length"] = pad_tokens(emb, text_len), emb.shape[0]
    return out


# -- manifest ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetInfo:
    repeats: int  # SimpleTuner semantics: each item is seen repeats + 1 times per epoch
    items: int  # records on disk
    latents: bool = True  # False: a prompts dataset (records hold prompt embeddings and a latent shape only)
    active: int | None = None  # records trained on (None: all `items`); the rest belong to items no longer listed

    def __post_init__(self) -> None:
        if self.active is None:
            object.__setattr__(self, "active", self.items)


@dataclass(frozen=True)
class Manifest:
    directory: Path
    latent_channels: int
    text_dim: int
    text_len: int
    datasets: dict[str, DatasetInfo]
    buckets: dict[str, int]  # "CxFxHxW" -> record count
    shards: tuple[str, ...]
    shard_items: tuple[int, ...]
    items: int  # records on disk
    source: dict[str, Any] = field(default_factory=dict)
    active_items: int | None = None  # records trained on (None: all `items`)
    active_buckets: dict[str, int] | None = None  # "CxFxHxW" -> active record count (None: `buckets`)

    def __post_init__(self) -> None:
        if self.active_items is None:
            object.__setattr__(self, "active_items", self.items)
        if self.active_buckets is None:
            object.__setattr__(self, "active_buckets", dict(self.buckets))

    @property
    def path(self) -> Path:
        return self.directory / MANIFEST

    @property
    def prompt_only(self) -> list[str]:
        """Datasets whose active records have no latents (prompts datasets)."""
        return sorted(k for k, d in self.datasets.items() if not d.latents and d.active)


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """Read and check `directory/manifest.json`; ValueError naming the file and the problem otherwise."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path}: missing -- {directory} is not a wanjax cache, or its caching job has not finished "
                         "(the manifest is written last)")
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise ValueError(f"{path}: format is {got!r}, expected {FORMAT!r}")
    if m.get("version") != VERSION:
        raise ValueError(f"{path}: cache format version {m.get('version')!r}; this wanjax reads version {VERSION}")
    try:
        man = Manifest(
            directory=directory,
            latent_channels=int(m["latent_channels"]),
            text_dim=int(m["text_dim"]),
            text_len=int(m["text_len"]),
            datasets={k: DatasetInfo(int(v["repeats"]), int(v["items"]), bool(v.get("latents", True)),
                                     int(v.get("active", v["items"])))
                      for k, v in m["datasets"].items()},
            buckets={str(k): int(v["count"]) for k, v in m["buckets"].items()},
            shards=tuple(str(s) for s in m["shards"]),
            shard_items=tuple(int(n) for n in m["shard_items"]),
            items=int(m["items"]),
            source=dict(m.get("source") or {}),
            active_items=int(m.get("active_items", m["items"])),
            active_buckets={str(k): int(v.get("active", v["count"])) for k, v in m["buckets"].items()},
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
    problems = []
    if len(man.shards) != len(man.shard_items):
        problems.append(f"{len(man.shards)} shards but {len(man.shard_items)} shard_items")
    for what, total in (("shard_items", sum(man.shard_items)), ("bucket counts", sum(man.buckets.values())),
                        ("dataset items", sum(d.items for d in man.datasets.values()))):
        if total != man.items:
            problems.append(f"{what} sum to {total}, items is {man.items}")
    for what, total in (("bucket active counts", sum(man.active_buckets.values())),
                        ("dataset active counts", sum(d.active for d in man.datasets.values()))):
        if total != man.active_items:
            problems.append(f"{what} sum to {total}, active_items is {man.active_items}")
    over = [k for k, d in man.datasets.items() if not 0 <= d.active <= d.items]
    over += [k for k, n in man.active_buckets.items() if not 0 <= n <= man.buckets[k]]
    if over or not 0 <= man.active_items <= man.items:
        problems.append(f"active counts outside [0, items] (datasets/buckets {over}, active_items "
                        f"{man.active_items} of {man.items})")
    if any(d.repeats < 0 for d in man.datasets.values()):
        problems.append("negative repeats")
    missing = [s for s in man.shards if not (directory / s).is_file()]
    if missing:
        problems.append(f"shard files missing: {missing}")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return man


def validate_cache(manifest: Manifest, *, latent_channels: int, text_dim: int, text_len: int | None = None) -> None:
    """Refuse a cache the model cannot use. Cheap: run it before building the model or compiling anything."""
    problems = []
    if manifest.latent_channels != latent_channels:
        problems.append(f"latents have {manifest.latent_channels} channels, the model expects {latent_channels}")
    if manifest.text_dim != text_dim:
        problems.append(f"prompt embeddings have {manifest.text_dim} features, the model expects {text_dim}")
    if text_len is not None and manifest.text_len != text_len:
        problems.append(f"prompts are padded to {manifest.text_len} tokens, the model expects {text_len}")
    if problems:
        raise ValueError(f"{manifest.path}: " + "; ".join(problems))


@dataclass(frozen=True)
class RecordIndex:
    """Per-record bucket and dataset ids and active flags, in global record order (shard order, then position)."""

    buckets: list[str]
    bucket: np.ndarray  # int32 [items]: index into `buckets`
    datasets: list[str]
    dataset: np.ndarray  # int32 [items]: index into `datasets`
    active: np.ndarray  # bool [items]: trained on (False: the record's item is no longer in the dataset list)


def read_record_index(manifest: Manifest) -> RecordIndex:
    path = manifest.directory / INDEX
    try:
        f = SafetensorsFile(path)
        bucket = f.read("bucket")
        active = f.read("active").astype(bool) if "active" in f.keys() else np.ones(len(bucket), bool)
        idx = RecordIndex(json.loads(f.metadata["buckets"]), bucket,
                          json.loads(f.metadata["datasets"]), f.read("dataset"), active)
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: unreadable record index ({type(e).__name__}: {e})") from None
    n = manifest.items
    counts = dict(zip(idx.buckets, np.bincount(idx.bucket, minlength=len(idx.buckets)).tolist()))
    if len(idx.bucket) != n or len(idx.dataset) != n or len(idx.active) != n or counts != manifest.buckets:
        raise ValueError(f"{path}: disagrees with {manifest.path} (records or bucket counts differ)")
    active = dict(zip(idx.buckets, np.bincount(idx.bucket[idx.active], minlength=len(idx.buckets)).tolist()))
    if {k: active.get(k, 0) for k in manifest.active_buckets} != manifest.active_buckets:
        raise ValueError(f"{path}: disagrees with {manifest.path} (active records per bucket: index {active}, "
                         f"manifest {manifest.active_buckets})")
    if not set(idx.datasets) <= set(manifest.datasets):
        raise ValueError(f"{path}: datasets {sorted(set(idx.datasets) - set(manifest.datasets))} not in the manifest")
    return idx


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- writing -----------------------------------------------------------------------------------------------
class CacheWriter:
    """Append examples to a new cache; `close()` makes it complete (shards renamed, index, manifest last).

    Until `close()` returns, the directory holds only `*.partial` shards and no manifest, so an interrupted
    job never leaves a cache that looks usable.
    """

    def __init__(self, directory: str | os.PathLike, *, latent_channels: int, text_dim: int, text_len: int = 512,
                 shard_size: int = 256):
        self.directory = Path(directory)
        if (self.directory / MANIFEST).exists():
            raise ValueError(f"{self.directory / MANIFEST} exists: {self.directory} already holds a complete cache")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.latent_channels, self.text_dim, self.text_len = latent_channels, text_dim, text_len
        self.shard_size = shard_size
        self._keys: set[str] = set()
        self._order: list[str] = []
        self._bucket_ids: dict[str, int] = {}
        self._dataset_ids: dict[str, int] = {}
        self._bucket: list[int] = []
        self._dataset: list[int] = []
        self._shard_items: list[int] = []
        self._prompt_only: set[str] = set()
        self._writer: ArrayRecordWriter | None = None
        self._closed = False

    def _partial(self, i: int) -> Path:
        return self.directory / f"records-{i:05d}.array_record.partial"

    def add(self, example: Mapping[str, Any]) -> int:
        """Append one example {key, dataset, caption, latents (C,F,H,W), prompt_embeds (T,D)[, image_embeds]}.
        prompt_embeds holds only the T real tokens (T <= text_len). Returns the record's global index."""
        if self._closed:
            raise ValueError("CacheWriter is closed")
        key = example.get("key")
        shape, lat, emb = check_example(example, latent_channels=self.latent_channels, text_dim=self.text_dim,
                                        text_len=self.text_len)
        if key in self._keys:
            raise ValueError(f"duplicate key {key!r}")
        raw = encode_record({**example, "latents": lat, "latent_shape": shape, "prompt_embeds": emb})
        if lat is None:
            self._prompt_only.add(example["dataset"])
        if self._writer is None:
            self._writer = ArrayRecordWriter(str(self._partial(len(self._shard_items))), _WRITER_OPTIONS)
            self._shard_items.append(0)
        self._writer.write(raw)
        self._shard_items[-1] += 1
        if self._shard_items[-1] == self.shard_size:
            self._close_shard()
        self._keys.add(key)
        self._order.append(key)
        self._bucket.append(self._bucket_ids.setdefault(bucket_key(shape), len(self._bucket_ids)))
        self._dataset.append(self._dataset_ids.setdefault(example["dataset"], len(self._dataset_ids)))
        return len(self._bucket) - 1

    def _close_shard(self) -> None:
        if self._writer is not None:
            if not self._writer.ok():
                raise OSError(f"{self._partial(len(self._shard_items) - 1)}: ArrayRecord write failed")
            self._writer.close()
            self._writer = None

    def close(self, datasets: Mapping[str, int] | None = None, source: Mapping[str, Any] | None = None) -> Manifest:
        """Finish the cache. `datasets` maps dataset id -> repeats (ids without items are listed with 0 items;
        ids with items but no entry get repeats 0); `source` is free-form provenance stored in the manifest."""
        if self._closed:
            raise ValueError(f"CacheWriter for {self.directory} is already closed")
        self._close_shard()
        self._closed = True
        n = len(self._shard_items)
        names = [f"records-{i:05d}-of-{n:05d}.array_record" for i in range(n)]
        for i, name in enumerate(names):
            os.replace(self._partial(i), self.directory / name)
        buckets, ds_names = list(self._bucket_ids), list(self._dataset_ids)
        shards, start = [], 0
        for name, count in zip(names, self._shard_items):
            rows = range(start, start + count)
            shards.append(ShardInfo(name, tuple(self._order[i] for i in rows),
                                    tuple(buckets[self._bucket[i]] for i in rows),
                                    tuple(ds_names[self._dataset[i]] for i in rows)))
            start += count
        return write_manifest(self.directory, shards, latent_channels=self.latent_channels, text_dim=self.text_dim,
                              text_len=self.text_len, datasets=datasets, source=source,
                              prompt_only=self._prompt_only)


@dataclass(frozen=True)
class ShardInfo:
    """One complete shard file and, per record in file order, its key, latent-shape bucket and dataset id.

    `fingerprints`: per record, what its item looked like when it was encoded (the caching job's JSON object, e.g.
    media size / mtime and a hash of the caption) or None; empty in done-lists written before fingerprints were
    recorded. `run`: the caching run that wrote the shard (0 for older done-lists); when several shards hold a record
    of one key, the one of the latest run is the current one."""

    name: str
    keys: tuple[str, ...]
    buckets: tuple[str, ...]
    datasets: tuple[str, ...]
    fingerprints: tuple[Any, ...] = ()
    run: int = 0

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name, "keys": list(self.keys), "buckets": list(self.buckets),
               "datasets": list(self.datasets)}
        if any(f is not None for f in self.fingerprints):
            out["fingerprints"] = list(self.fingerprints)
        if self.run:
            out["run"] = self.run
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ShardInfo":
        info = cls(str(d["name"]), tuple(d["keys"]), tuple(d["buckets"]), tuple(d["datasets"]),
                   tuple(d.get("fingerprints") or ()), int(d.get("run", 0)))
        if not len(info.keys) == len(info.buckets) == len(info.datasets):
            raise ValueError(f"shard {info.name}: keys, buckets and datasets differ in length")
        if info.fingerprints and len(info.fingerprints) != len(info.keys):
            raise ValueError(f"shard {info.name}: {len(info.fingerprints)} fingerprints for {len(info.keys)} keys")
        return info

    def fingerprint(self, i: int) -> Any:
        """Record i's fingerprint, None when not recorded."""
        return self.fingerprints[i] if self.fingerprints else None


def write_manifest(directory: str | os.PathLike, shards: Sequence[ShardInfo], *, latent_channels: int, text_dim: int,
                   text_len: int, datasets: Mapping[str, int] | None = None,
                   source: Mapping[str, Any] | None = None, prompt_only: Sequence[str] = (),
                   active_records: Sequence[bool] | None = None) -> Manifest:
    """Make `directory` a complete cache over `shards` (files already complete, in this global record order):
    writes index.safetensors, then manifest.json last (atomically). `datasets`: id -> repeats, as for
    `CacheWriter.close`; `prompt_only`: ids of datasets without latents; `active_records`: one flag per record in
    global order, the records to train on (None: all); the others stay on disk, marked inactive. Keys must be unique
    within a shard and among the active records (an item re-encoded after its file or caption changed has several
    records: only one of them may be active)."""
    directory = Path(directory)
    n_records = sum(len(s.keys) for s in shards)
    flags = [True] * n_records if active_records is None else [bool(a) for a in active_records]
    if len(flags) != n_records:
        raise ValueError(f"active_records has {len(flags)} flags for {n_records} records")
    seen: set[str] = set()
    it = iter(flags)
    for s in shards:
        on = [k for k in s.keys if next(it)]
        dup = seen.intersection(on)
        if dup or len(set(on)) != len(on) or len(set(s.keys)) != len(s.keys):
            raise ValueError(f"{directory}: duplicate record keys across shards (e.g. {sorted(dup)[:3]} in {s.name}); "
                             "was the cache written by two jobs at once?")
        seen.update(on)
    bucket_ids: dict[str, int] = {}
    dataset_ids: dict[str, int] = {}
    bucket = [bucket_ids.setdefault(b, len(bucket_ids)) for s in shards for b in s.buckets]
    dataset = [dataset_ids.setdefault(d, len(dataset_ids)) for s in shards for d in s.datasets]
    buckets, ds_names = list(bucket_ids), list(dataset_ids)
    arrays = {"bucket": np.asarray(bucket, np.int32), "dataset": np.asarray(dataset, np.int32),
              "active": np.asarray(flags, np.uint8)}
    names_meta = {"buckets": json.dumps(buckets), "datasets": json.dumps(ds_names)}
    write_safetensors(directory / INDEX, [(k, a.dtype, a.shape) for k, a in arrays.items()],
                      arrays.__getitem__, metadata=names_meta)
    repeats = dict(datasets or {})
    on = arrays["active"].astype(bool)

    def count(ids: np.ndarray, names: list[str], mask: np.ndarray | None = None) -> dict[str, int]:
        return dict(zip(names, np.bincount(ids if mask is None else ids[mask], minlength=len(names)).tolist()))

    ds_items, ds_active = count(arrays["dataset"], ds_names), count(arrays["dataset"], ds_names, on)
    b_items, b_active = count(arrays["bucket"], buckets), count(arrays["bucket"], buckets, on)
    some_off = not on.all()  # all active: the manifest reads as before (older readers use it unchanged)
    manifest = {
        "format": FORMAT, "version": VERSION,
        "latent_channels": latent_channels, "text_dim": text_dim, "text_len": text_len,
        "datasets": {k: {"repeats": int(repeats.get(k, 0)), "items": ds_items.get(k, 0),
                         **({"active": ds_active.get(k, 0)} if some_off else {}),
                         "latents": k not in set(prompt_only)}
                     for k in sorted(set(ds_names) | set(repeats))},
        "buckets": {k: {"count": b_items[k], **({"active": b_active[k]} if some_off else {})}
                    for k in sorted(buckets)},
        "shards": [s.name for s in shards], "shard_items": [len(s.keys) for s in shards], "items": len(bucket),
        **({"active_items": int(on.sum())} if some_off else {}),
        "source": dict(source or {}),
    }
    _write_json_atomic(directory / MANIFEST, manifest)
    return read_manifest(directory)


class ShardWriter:
    """Append records to shards `{prefix}-{seq:05d}.array_record`, each written as `.partial` and renamed when
    it holds `shard_size` records or on `flush()`; `on_close(ShardInfo)` runs after each rename. Shards are
    independent of each other, so several writers (one per process) can fill one directory; `write_manifest`
    then joins them. Records are checked like `CacheWriter.add`. An example's optional `fingerprint` (JSON) goes to
    the shard's `ShardInfo.fingerprints`, not into the record; `run` is stored as `ShardInfo.run`."""

    def __init__(self, directory: str | os.PathLike, *, prefix: str, latent_channels: int, text_dim: int,
                 text_len: int = 512, shard_size: int = 256, start_seq: int = 0, on_close=None, run: int = 0):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix, self.shard_size, self.seq, self.on_close = prefix, shard_size, start_seq, on_close
        self.run = run
        self.latent_channels, self.text_dim, self.text_len = latent_channels, text_dim, text_len
        self._writer: ArrayRecordWriter | None = None
        self._rows: list[tuple[str, str, str, Any]] = []

    def name(self, seq: int) -> str:
        return f"{self.prefix}-{seq:05d}.array_record"

    def add(self, example: Mapping[str, Any]) -> None:
        key = example.get("key")
        shape, lat, emb = check_example(example, latent_channels=self.latent_channels, text_dim=self.text_dim,
                                        text_len=self.text_len)
        raw = encode_record({**example, "latents": lat, "latent_shape": shape, "prompt_embeds": emb})
        if self._writer is None:
            self._writer = ArrayRecordWriter(str(self.directory / (self.name(self.seq) + ".partial")), _WRITER_OPTIONS)
        self._writer.write(raw)
        self._rows.append((key, bucket_key(shape), example["dataset"], example.get("fingerprint")))
        if len(self._rows) == self.shard_size:
            self.flush()

    def flush(self) -> ShardInfo | None:
        """Close the open shard (if it has records): rename it complete, call `on_close`, return its info."""
        if self._writer is None:
            return None
        partial = self.directory / (self.name(self.seq) + ".partial")
        if not self._writer.ok():
            raise OSError(f"{partial}: ArrayRecord write failed")
        self._writer.close()
        self._writer = None
        os.replace(partial, self.directory / self.name(self.seq))
        keys, buckets, datasets, fps = (tuple(col) for col in zip(*self._rows))
        info = ShardInfo(self.name(self.seq), keys, buckets, datasets,
                         fps if any(f is not None for f in fps) else (), self.run)
        self._rows, self.seq = [], self.seq + 1
        if self.on_close is not None:
            self.on_close(info)
        return info


# -- reading -----------------------------------------------------------------------------------------------
class CacheSource:
    """Random-access view of a cache for grain: `source[i]` is record i decoded, prompt_embeds padded to
    text_len, plus `index`. Shards are checked against the manifest up front (a truncated shard fails here)."""

    def __init__(self, directory: str | os.PathLike, manifest: Manifest | None = None):
        import grain  # deferred: the writer side does not need grain

        self.manifest = manifest or read_manifest(directory)
        paths = [self.manifest.directory / s for s in self.manifest.shards]
        for path, expected in zip(paths, self.manifest.shard_items):
            problem = None
            try:
                reader = ArrayRecordReader(str(path))
                if not reader.ok():  # closing a failed reader raises its (often empty) error; let it be collected
                    problem = "not a readable ArrayRecord file"
                elif (found := reader.num_records()) != expected:
                    problem = f"{found} records"
                if problem is None or reader.ok():
                    reader.close()
            except RuntimeError as e:
                problem = f"not a readable ArrayRecord file ({e})"
            if problem:
                raise ValueError(f"{path}: {problem}, the manifest says {expected} records (truncated or corrupt "
                                 "shard; re-run the caching job)")
        self._ends = list(np.cumsum(self.manifest.shard_items).tolist())
        self._paths = paths
        # "path[0:n]" spares grain from reopening every shard to count its records
        ranges = [f"{p}[0:{n}]" for p, n in zip(paths, self.manifest.shard_items)]
        self._source = grain.sources.ArrayRecordDataSource(ranges) if self.manifest.items else None

    def __len__(self) -> int:
        return self.manifest.items

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for a cache of {len(self)}")
        shard = bisect.bisect_right(self._ends, index)
        try:
            example = decode_record(self._source[index], text_len=self.manifest.text_len)
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"{self._paths[shard]}: record {index} ({e})") from None
        example["index"] = index
        return example


# -- side files --------------------------------------------------------------------------------------------
def write_text_embeds(
    path: str | os.PathLike, embeds: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> None:
    """Named text embeddings (e.g. the empty prompt, validation prompts) to one safetensors file, dtypes kept."""
    arrays = {k: np.asarray(v) for k, v in embeds.items()}
    write_safetensors(path, [(k, a.dtype, a.shape) for k, a in arrays.items()], arrays.__getitem__,
                      metadata=dict(metadata or {}))


def read_text_embeds(path: str | os.PathLike) -> dict[str, np.ndarray]:
    f = SafetensorsFile(path)
    return {k: f.read(k) for k in f.keys()}


def read_prompt_embeds(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Prompt text -> its true-length embedding, for every prompt the caching job stored in the side files
    (validation_prompts.safetensors, empty_prompt.safetensors; their "prompts" metadata maps names to texts)."""
    out: dict[str, np.ndarray] = {}
    for fname in (VALIDATION_PROMPTS_FILE, EMPTY_PROMPT_FILE):
        path = Path(directory) / fname
        if not path.is_file():
            continue
        f = SafetensorsFile(path)
        names = json.loads((f.metadata or {}).get("prompts", "{}"))
        for name, text in names.items():
            if name in f.keys():
                out.setdefault(text, f.read(name))
    return out


def pad_tokens(embeds: np.ndarray, text_len: int) -> np.ndarray:
    """A true-length (T, D) prompt embedding zero-padded to (text_len, D), as the text encoder's output is."""
    if embeds.shape[0] > text_len:
        raise ValueError(f"prompt_embeds has {embeds.shape[0]} tokens, more than text_len {text_len}")
    padded = np.zeros((text_len, embeds.shape[1]), embeds.dtype)
    padded[: embeds.shape[0]] = embeds
    return padded


# -- sample data ------------------------------------------------------------------------------------------
def write_synthetic_cache(
    directory: str | os.PathLike,
    *,
    num_items: int = 8,
    latent_channels: int = 16,
    text_dim: int = 32,
    text_len: int = 512,
    shapes: Sequence[tuple[int, int, int]] = ((2, 4, 6), (3, 4, 4)),
    datasets: dict[str, int] | None = None,
    dtype: Any = ml_dtypes.bfloat16,
    image_embeds_shape: tuple[int, int] | None = None,
    shard_size: int = 4,
    seed: int = 0,
) -> Manifest:
    """Write `num_items` random examples. Item i has latent shape (C, *shapes[i % len(shapes)]), dataset
    list(datasets)[(i // len(shapes)) % len(datasets)] (`datasets`: {id: repeats}, default {"synthetic": 0}), so
    every bucket mixes the datasets, and a true prompt length in [1, min(text_len, 24)]. Deterministic in `seed`."""
    datasets = {"synthetic": 0} if datasets is None else dict(datasets)
    ids = list(datasets)
    rng = np.random.default_rng(seed)
    writer = CacheWriter(directory, latent_channels=latent_channels, text_dim=text_dim, text_len=text_len,
                         shard_size=shard_size)
    for i in range(num_items):
        fhw = tuple(shapes[i % len(shapes)])
        t = int(rng.integers(1, min(text_len, 24) + 1))
        example = {
            "key": f"synthetic/{i:06d}.mp4",
            "dataset": ids[(i // len(shapes)) % len(ids)],
            "caption": f"synthetic clip {i}",
            "latents": rng.standard_normal((latent_channels, *fhw), np.float32).astype(dtype),
            "prompt_embeds": rng.standard_normal((t, text_dim), np.float32).astype(dtype),
        }
        if image_embeds_shape is not None:
            example["image_embeds"] = rng.standard_normal(image_embeds_shape, np.float32).astype(dtype)
        writer.add(example)
    return writer.close(datasets=datasets, source={"generator": "write_synthetic_cache", "seed": seed})
