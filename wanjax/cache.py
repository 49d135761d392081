"""The caching job: videos + captions -> the trainer's latent cache (format: wanjax/data/records.py).

    python -m wanjax.cache --config configs/lora.py[:variant] --config.data_backend_config=multidatabackend.json

Reads `data_backend_config` (SimpleTuner's dataset list, wanjax/data/sources.py), writes `cache_dir`, encodes with
the VAE and UMT5 of `pretrained_model_name_or_path` (vae/, text_encoder/, tokenizer/; wanjax/encoders.py). Optional
config keys: cache_shard_size (32 items), vae_batch_size (1, per local device), text_encoder_batch_size (1),
cache_dtype (bf16 | fp16 | fp32), cache_decode_threads (4), validation_prompt, validation_negative_prompt,
validation_prompt_library.

Multi-process (jax.distributed; `cache_dir` on a filesystem every process sees): item i of the discovered list
(deterministic order) belongs to process i % P. A process works through its share in chunks of cache_shard_size
items: decode (threads) -> group by clip shape -> VAE in fixed-size batches (the last one padded, so a bucket
compiles once) -> text encoder in fixed-size batches -> one shard `records-p<p>-<seq>.array_record` (renamed from
`.partial` when complete), then its done-list `progress/records-p<p>-<seq>.json` (atomic: keys, buckets, datasets,
per-record fingerprints, the run number);
the process's skipped files go to `progress/skipped-p<p>.json`. After a barrier process 0 checks that every item is
cached or skipped and writes empty_prompt.safetensors, validation_prompts.safetensors, cache_report.json,
index.safetensors and manifest.json last (write_manifest over all done-lists, in shard-name order).

Determinism: with one clip per device (vae_batch_size 1) and text_encoder_batch_size 1, every item is encoded by the
same program whatever its neighbours, so any process count gives bit-identical records. Larger per-device batches
are faster but XLA may pick other kernels for them (e.g. CPU convolutions differ in the last bits at batch 8 vs 1).

Prompts datasets (`dataset_type: "prompts"`, for DMD): each prompt becomes a record with its embedding and the latent
shape of the configured clip size, no latents; the manifest marks the dataset `"latents": false`, and the trainer
refuses such a cache for methods that train on real latents.

Resume: a rerun (with any process count) skips the keys of every done-list and retries skipped files (they may have
been fixed); a crash loses at most the chunk in flight (its `.partial` shard is deleted on restart; a shard renamed
but without its done-list is redone and the orphan removed at the merge). Settings
that shape latents (dataset options, encoder sizes, dtype) are kept in progress/settings.json and a rerun with other
values is refused.

Changed items (wanjax/data/fingerprints.py): each record's done-list entry holds a fingerprint of its item as
encoded -- size and mtime_ns of the media file and a hash of the caption text (prompts datasets: of the prompt; TFDS:
the caption only, not compared as it is known only after loading). A caption edited or a video replaced at the same
path makes `pending` ask for the job, which re-encodes exactly those items into new shards; the newest record of a
key (latest run) is the active one, the older ones stay on disk, inactive (counted as `replaced` in the report).
Records in done-lists written before fingerprints were recorded have none and count as unchanged (no mass re-encode
after an upgrade; edits to those items are noticed only once they are re-encoded for another reason).

Active records: the manifest covers every complete shard, but only records of items found now are active (trained
on). Records of items no longer current -- a dataset disabled or removed from data_backend_config, a file deleted,
an item outside `max_num_samples` -- stay on disk, marked inactive in index.safetensors and counted as `stale` in the
report; nothing is ever deleted, and listing them again needs no re-encoding, only a new manifest. `pending` reports
a cache whose active records differ from the items found now, so the trainer reruns the job (which encodes only
what is missing, then rewrites the manifest).

Before anything is encoded the job reads every caption / table / prompt file (UTF-8, a leading BOM ignored) and the
validation prompt library, so a bad file fails the run before the encoders are loaded.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np

from wanjax.data import records, sources
from wanjax.data.fingerprints import caption_hash, changed_items, item_fingerprint, latest_records
from wanjax.data.records import ShardInfo, ShardWriter
from wanjax.data.video import Skip, latent_frames, to_model_input
from wanjax.encoders import Encoders, load_encoders  # called as this module's load_encoders (tests patch it here)

log = logging.getLogger("wanjax.cache")
PROGRESS_DIR = "progress"
REPORT_FILE = "cache_report.json"
DTYPES = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16, "fp32": np.float32}


class CacheConfigError(ValueError):
    """A setting or dataset list that cannot work; raised before any encoding."""


class CacheError(RuntimeError):
    """The job ran but cannot produce a usable cache (nothing usable, unfinished shares, changed settings)."""


@dataclass
class CacheReport:
    cache_dir: Path
    candidates: int  # files / records considered
    cached: int  # usable records in the cache
    skipped: dict[str, dict[str, str]]  # key -> {dataset, path, reason, detail}
    stale: int = 0  # records of items no longer in the dataset list
    replaced: int = 0  # older records of items re-encoded after their file or caption changed (kept, inactive)
    encoded_here: int = 0  # records this process encoded in this run
    notes: list[dict[str, str]] = field(default_factory=list)
    manifest: Any = None  # records.Manifest (process 0)

    def counts(self) -> dict[str, int]:
        return dict(sorted(collections.Counter(s["reason"] for s in self.skipped.values()).items()))

    def summary(self) -> str:
        why = ", ".join(f"{n} {r}" for r, n in self.counts().items())
        skipped = f" ({len(self.skipped)} skipped: {why})" if self.skipped else ""
        stale = f", {self.stale} stale" if self.stale else ""
        stale += f", {self.replaced} replaced" if self.replaced else ""
        return (f"cached {self.cached} of {self.candidates} items{skipped}{stale} -> {self.cache_dir}; "
                f"details: {self.cache_dir / REPORT_FILE}")


@dataclass(frozen=True)
class _Options:
    shard_size: int
    vae_batch_size: int
    text_batch_size: int
    dtype: str
    threads: int

    @classmethod
    def from_config(cls, config) -> "_Options":
        def get(k, default):
            v = config.get(k, None)
            return default if v is None else v

        o = cls(int(get("cache_shard_size", 32)), int(get("vae_batch_size", 1)),
                int(get("text_encoder_batch_size", 1)), str(get("cache_dtype", "bf16")),
                int(get("cache_decode_threads", 4)))
        if min(o.shard_size, o.vae_batch_size, o.text_batch_size, o.threads) < 1 or o.dtype not in DTYPES:
            raise CacheConfigError(f"cache options {o}: sizes must be >= 1, cache_dtype one of {sorted(DTYPES)}")
        return o


# =============================================================================================================
# the job
# =============================================================================================================
def build_cache(config, *, encoders: Encoders | None = None, process_index: int | None = None,
                process_count: int | None = None) -> CacheReport:
    """Cache `config.data_backend_config` into `config.cache_dir` (see the module docstring). Without `encoders`,
    the VAE and UMT5 are loaded only when this process has items to encode (or process 0 must re-embed the prompt
    side files); a rerun that only rewrites the manifest takes the encoder sizes from progress/settings.json. Raises
    CacheConfigError for bad settings, CacheError when nothing usable remains (after writing cache_report.json)."""
    import jax

    p = jax.process_index() if process_index is None else int(process_index)
    n_proc = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= p < n_proc:
        raise CacheConfigError(f"process_index {p} must be in [0, process_count {n_proc})")
    if not config.get("data_backend_config"):
        raise CacheConfigError("data_backend_config is not set: point it at a SimpleTuner multidatabackend.json "
                               "(or tfds:NAME[:split])")
    if not config.get("cache_dir"):
        raise CacheConfigError("cache_dir is not set")
    opts = _Options.from_config(config)
    cache_dir = Path(config.cache_dir)
    library_notes: list[dict[str, str]] = []
    library = _prompt_library(config, library_notes)  # a bad library fails here, not after hours of encoding
    with _dataset_errors(config):
        datasets, notes = _read_datasets(config)
        found = sources.discover(datasets)
    found.notes[:0] = notes + library_notes
    if p == 0:
        for n in found.notes:
            log.warning("[dataset %s] %s: %s", n["dataset"], n["key"], n["note"])
    if not found.items:
        report = CacheReport(cache_dir, len(found.skipped), 0, dict(found.skipped), notes=found.notes)
        if p == 0:
            cache_dir.mkdir(parents=True, exist_ok=True)
            _write_report(report, datasets)
        raise CacheError(f"no usable items: {report.summary()}")
    work = cache_dir / PROGRESS_DIR
    # the encoders are loaded only when something must be encoded: a rerun that only rewrites the manifest takes
    # their sizes from progress/settings.json (UMT5-XXL alone is ~11 GB)
    loaded: list[Encoders] = [] if encoders is None else [encoders]

    def real_encoders() -> Encoders:
        if not loaded:
            loaded.append(_load_configured(config, opts))
        return loaded[0]

    stand_in = None if encoders is not None else _stored_encoders(cache_dir)
    encoders = stand_in or real_encoders()
    datasets = sources.with_alignment(datasets, 2 * encoders.spatial_factor)
    for d in datasets:
        if d.type == "prompts" and any(x % (2 * encoders.spatial_factor) for x in d.prompt_size[1:]):
            raise CacheConfigError(f"dataset {d.id}: height={d.prompt_size[1]}, width={d.prompt_size[2]} must be "
                                   f"multiples of {2 * encoders.spatial_factor} (the VAE's {encoders.spatial_factor}x "
                                   "downsampling times the transformer's 2x2 patch)")
    work.mkdir(parents=True, exist_ok=True)
    _check_settings(work, _settings(datasets, encoders, opts), write=p == 0)

    progress = _Progress(cache_dir, p)
    shards = _shard_infos(cache_dir)
    latest = latest_records(shards)
    changed = changed_items(found.items, shards, latest)
    if changed and p == 0:
        k = next(iter(changed))
        log.warning("%d cached items changed since they were encoded (e.g. %s: %s): re-encoded into new shards, "
                    "their old records kept on disk, inactive", len(changed), k, changed[k])
    done = set(latest) - set(changed)
    mine = [it for i, it in enumerate(found.items) if i % n_proc == p and it.key not in done]
    log.info("process %d/%d: %d of its items to encode (%d cached before)", p, n_proc, len(mine),
             sum(1 for i, it in enumerate(found.items) if i % n_proc == p) - len(mine))
    if mine and encoders is stand_in:
        encoders = real_encoders()
        _check_settings(work, _settings(datasets, encoders, opts), write=p == 0)  # the sizes it really has
    run = 1 + max((s.run for s in shards), default=0)  # later than every shard written before this run
    encoded = _Worker(cache_dir, p, encoders, {d.id: d for d in datasets}, opts, progress, run).run(mine)

    if p != 0 and jax.process_count() == 1:  # shares run one after another (process_count given): no merge here
        own = {k for i in _shard_infos(cache_dir) if i.name.startswith(progress.prefix + "-") for k in i.keys}
        return CacheReport(cache_dir, len(found.items) + len(found.skipped), len(own), dict(progress.skipped),
                           encoded_here=encoded, notes=found.notes)
    _barrier("wanjax-cache-encoded")
    error: Exception | None = None
    report = None
    if p == 0:
        try:
            report = _merge(cache_dir, found, datasets, encoders, config, opts, n_proc, library,
                            real_encoders if encoders is stand_in else None)
        except Exception as e:  # the others wait at the barrier below: tell them through the report file
            error = e
            _write_json(cache_dir / REPORT_FILE, {"error": f"{type(e).__name__}: {e}"})
    _barrier("wanjax-cache-merged")
    if error is not None:
        raise error
    if report is None:
        report = _read_report(cache_dir)
    report.encoded_here = encoded
    if report.cached == 0:
        raise CacheError(f"no usable items: {report.summary()}")
    return report


def _read_datasets(config) -> tuple[list[sources.DatasetSpec], list]:
    """The enabled datasets of `config.data_backend_config` (and notes), with the trainer-level defaults."""
    defaults = {k: config.get(k, None) for k in ("resolution", "resolution_type", "minimum_image_size")}
    return sources.read_datasets(config.data_backend_config, defaults)


@contextlib.contextmanager
def _dataset_errors(config):
    """A DatasetConfigError as CacheConfigError naming data_backend_config."""
    try:
        yield
    except sources.DatasetConfigError as e:
        raise CacheConfigError(f"data_backend_config={config.data_backend_config!r}: {e}") from None


def pending(config) -> str | None:
    """Why `config.cache_dir` must be (re)built for `config.data_backend_config`, or None when it is current: a
    manifest exists, every dataset is cached with today's settings and repeats, every file found is cached or was
    skipped by the last run (a file fixed since is retried by `python -m wanjax.cache`), and the manifest's active
    records are exactly the cached items found now (a dataset disabled or removed, a file deleted or an item
    outside max_num_samples needs a new manifest that stops training on its records; one listed again needs a
    manifest that trains on it again; neither re-encodes anything). A cached item whose caption or media file
    (size, mtime) changed since it was encoded is named for re-encoding (a record without a fingerprint, from an
    older job, counts as unchanged). Reads file lists, captions and file stats, no media and no encoders; the trainer
    calls it to skip loading the encoders when nothing changed. Changed settings are left to build_cache, which
    refuses them."""
    cache_dir = Path(config.cache_dir)
    settings_path = cache_dir / PROGRESS_DIR / "settings.json"
    if not (cache_dir / records.MANIFEST).is_file():
        return "no cache yet"
    if not settings_path.is_file():  # written by other means (e.g. wanjax.tiny's synthetic latents): nothing to compare
        log.warning("%s was not made by wanjax.cache (no %s): used as it is, data_backend_config is not checked",
                    cache_dir, settings_path.relative_to(cache_dir))
        return None
    old = json.loads(settings_path.read_text())
    with _dataset_errors(config):
        datasets, _ = _read_datasets(config)
    datasets = sources.with_alignment(datasets, 2 * int(old["encoders"]["spatial_factor"]))
    fingerprints = json.loads(json.dumps({d.id: d.fingerprint() for d in datasets}))
    dtype = _Options.from_config(config).dtype
    if old.get("cache_dtype") != dtype:
        return f"cache_dtype {old.get('cache_dtype')} -> {dtype}"
    changed = [d for d, fp in fingerprints.items() if old.get("datasets", {}).get(d) != fp]
    if changed:
        return f"datasets {changed} are new or their settings changed"
    manifest = records.read_manifest(cache_dir)
    repeats = [d.id for d in datasets if d.id in manifest.datasets and manifest.datasets[d.id].repeats != d.repeats]
    if repeats:  # (a dataset no longer listed keeps its records: build_cache reports them as stale)
        return f"repeats of datasets {repeats} changed"
    shards = _shard_infos(cache_dir)
    latest = latest_records(shards)
    skipped_before = set(_read_report(cache_dir).skipped) if (cache_dir / REPORT_FILE).is_file() else set()
    with _dataset_errors(config):
        found = sources.discover(datasets)
    new = [it.key for it in found.items if it.key not in latest and it.key not in skipped_before]
    if new:
        return f"{len(new)} files not cached yet (e.g. {new[0]})"
    changed = changed_items(found.items, shards, latest)
    retry = {k: why for k, why in changed.items() if k not in skipped_before}  # skipped last time: like new files
    if retry:
        k = next(iter(retry))
        return f"{len(retry)} cached items changed since they were encoded (e.g. {k}: {retry[k]}): to re-encode"
    names = [s.name for s in shards]
    want = {(names[latest[it.key][0]], latest[it.key][1]): it.key for it in found.items
            if it.key in latest and it.key not in changed}
    have = _active_records(manifest, shards)
    if isinstance(have, str):
        return have
    want_keys, have_keys = set(want.values()), set(have.values())
    gone = sorted({k for r, k in have.items() if r not in want and k not in want_keys})
    back = sorted({k for r, k in want.items() if r not in have and k not in have_keys})
    older = sorted({k for r, k in want.items() if r not in have and k in have_keys})
    why = []
    if gone:
        why.append(f"{len(gone)} cached records are trained on but no longer in the dataset list (e.g. {gone[0]}: "
                   "dataset disabled or removed, file deleted, or outside max_num_samples)")
    if back:
        why.append(f"{len(back)} cached records are in the dataset list but not trained on (e.g. {back[0]})")
    if older:
        why.append(f"{len(older)} items are trained on from an older record, not their latest (e.g. {older[0]})")
    return "; ".join(why) + ": the manifest must be rewritten (nothing is re-encoded)" if why else None


def _active_records(manifest: records.Manifest, shards: list[ShardInfo]) -> dict[tuple[str, int], str] | str:
    """(shard name, position) -> key of the records `manifest` trains on, or why they cannot be told (then the merge
    must run)."""
    by_name = {s.name: s for s in shards}
    for name, n in zip(manifest.shards, manifest.shard_items):
        if name not in by_name or len(by_name[name].keys) != n:
            return f"{manifest.path} lists shard {name} ({n} records) without a matching done-list in {PROGRESS_DIR}/"
    try:
        active = records.read_record_index(manifest).active
    except ValueError as e:
        return str(e)
    rows = ((name, i, k) for name in manifest.shards for i, k in enumerate(by_name[name].keys))
    return {(name, i): k for (name, i, k), on in zip(rows, active) if on}


def _barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _settings(datasets: list[sources.DatasetSpec], enc: Encoders, opts: _Options) -> dict[str, Any]:
    return json.loads(json.dumps({
        "datasets": {d.id: d.fingerprint() for d in datasets},
        "encoders": {"latent_channels": enc.latent_channels, "text_dim": enc.text_dim, "text_len": enc.text_len,
                     "spatial_factor": enc.spatial_factor},
        "cache_dtype": opts.dtype,
        "encoder_name": enc.name,  # not compared: for a rerun that encodes nothing (see _stored_encoders)
    }))


def _check_settings(work: Path, settings: dict[str, Any], write: bool) -> None:
    path = work / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [k for k in ("encoders", "cache_dtype") if old.get(k) != settings[k]]
        changed += [f"dataset {d!r}" for d, fp in settings["datasets"].items()
                    if d in old.get("datasets", {}) and old["datasets"][d] != fp]
        if changed:
            raise CacheError(f"{work.parent} was cached with other settings ({', '.join(changed)} changed; see "
                             f"{path}): use a new cache_dir, or delete this one to rebuild")
        settings = {**settings, "datasets": {**old.get("datasets", {}), **settings["datasets"]}}
    if write:
        _write_json(path, settings)


def _load_configured(config, opts: _Options) -> Encoders:
    from wanjax.model_source import resolve_model

    try:
        pipeline = resolve_model(config).pipeline
    except ValueError as e:
        raise CacheConfigError(str(e)) from None
    return load_encoders(pipeline, vae_batch_size=opts.vae_batch_size, text_batch_size=opts.text_batch_size)


def _not_loaded(*_: Any) -> Any:
    raise RuntimeError("wanjax.cache: encoders used before they were loaded (a stand-in from settings.json)")


def _stored_encoders(cache_dir: Path) -> Encoders | None:
    """A stand-in with the sizes the cache was encoded with (progress/settings.json; the name from there, else from
    the manifest's source) and no encode functions, or None when the cache has no settings yet."""
    try:
        s = json.loads((cache_dir / PROGRESS_DIR / "settings.json").read_text())
        e = s["encoders"]
        name = s.get("encoder_name")
        if name is None:
            try:
                name = str(records.read_manifest(cache_dir).source.get("encoders", ""))
            except ValueError:
                name = ""
        return Encoders(_not_loaded, _not_loaded, latent_channels=int(e["latent_channels"]),
                        text_dim=int(e["text_dim"]), spatial_factor=int(e["spatial_factor"]),
                        text_len=int(e["text_len"]), name=name)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


# -- per-process progress ---------------------------------------------------------------------------------------
def _shard_infos(cache_dir: Path) -> list[ShardInfo]:
    """Every complete shard with its done-list (progress/<shard>.json, written after the shard), by name."""
    infos = []
    for f in sorted((cache_dir / PROGRESS_DIR).glob("records-p*.json")):
        info = ShardInfo.from_json(json.loads(f.read_text()))
        if (cache_dir / info.name).is_file():
            infos.append(info)
    return infos


class _Progress:
    """This process's done-lists (one progress/<shard>.json per complete shard) and skipped files
    (progress/skipped-p<p>.json, this run's verdicts only: skipped files are retried on every run)."""

    def __init__(self, cache_dir: Path, process: int):
        self.cache_dir, self.process = cache_dir, process
        self.prefix = f"records-p{process:03d}"
        self.skipped: dict[str, dict[str, str]] = {}
        self.skip_path = cache_dir / PROGRESS_DIR / f"skipped-p{process:03d}.json"
        for stale in cache_dir.glob(f"{self.prefix}-*.partial"):  # the chunk in flight when a run died
            stale.unlink()
        own = [i.name for i in _shard_infos(cache_dir) if i.name.startswith(self.prefix + "-")]
        self.next_seq = 1 + max((int(n[len(self.prefix) + 1 :].split(".")[0]) for n in own), default=-1)
        self.save_skipped()

    def shard_done(self, info: ShardInfo) -> None:
        _write_json(self.cache_dir / PROGRESS_DIR / (info.name.rsplit(".", 1)[0] + ".json"), info.to_json())

    def save_skipped(self) -> None:
        _write_json(self.skip_path, {"process": self.process, "skipped": self.skipped})


# -- encoding --------------------------------------------------------------------------------------------------
class _Worker:
    """Encodes one process's items chunk by chunk: one shard + one progress update per chunk."""

    def __init__(self, cache_dir: Path, process: int, enc: Encoders, datasets: dict, opts: _Options,
                 progress: _Progress, run: int = 0):
        self.enc, self.datasets, self.opts, self.progress = enc, datasets, opts, progress
        self.dtype = DTYPES[opts.dtype]
        self.writer = ShardWriter(cache_dir, prefix=progress.prefix, latent_channels=enc.latent_channels,
                                  text_dim=enc.text_dim, text_len=enc.text_len, shard_size=2**31,
                                  start_seq=progress.next_seq, on_close=progress.shard_done, run=run)
        self.texts: list[tuple[sources.Item, str, np.ndarray]] = []
        self.fingerprints: dict[str, dict[str, Any]] = {}
        self.encoded = 0
        self.bar = None

    def _skip(self, item: sources.Item, s: Skip) -> None:
        self.progress.skipped[item.key] = {"dataset": item.dataset, "path": item.path or item.key,
                                           "reason": s.reason, "detail": s.detail}
        self.bar.update(1)

    def run(self, items: list[sources.Item]) -> int:
        import jax
        from tqdm import tqdm

        self.bar = tqdm(total=len(items), unit="item", desc="caching", dynamic_ncols=True,
                        disable=jax.process_index() != 0 or not items)
        with self.bar:
            for start in range(0, len(items), self.opts.shard_size):
                self._chunk(items[start : start + self.opts.shard_size])
        return self.encoded

    def _latent_shape(self, ds: sources.DatasetSpec) -> tuple[int, int, int, int]:
        """The latent shape a prompts dataset's clip size gives (what the VAE would produce for it)."""
        f, h, w = ds.prompt_size
        sf = self.enc.spatial_factor
        return self.enc.latent_channels, latent_frames(f), h // sf, w // sf

    def _chunk(self, chunk: list[sources.Item]) -> None:
        pending: dict[tuple, list] = collections.defaultdict(list)
        skips = len(self.progress.skipped)
        for item in chunk:  # taken before decoding: a file replaced meanwhile reads as changed on the next run
            self.fingerprints[item.key] = item_fingerprint(item) or {}
        prompts = [it for it in chunk if self.datasets[it.dataset].type == "prompts"]
        for item in prompts:  # nothing to decode: text only, with the configured latent shape
            self.texts.append((item, item.caption, self._latent_shape(self.datasets[item.dataset])))
        chunk = [it for it in chunk if self.datasets[it.dataset].type != "prompts"]
        for item, result in sources.load_many(chunk, self.datasets, self.opts.threads):
            if isinstance(result, Skip):
                self._skip(item, result)
                continue
            clip, caption = result
            group = pending[clip.shape]
            group.append((item, clip, caption))
            if len(group) == self.enc.video_batch_size:
                self._encode_videos(pending.pop(clip.shape))
        for shape in sorted(pending):
            self._encode_videos(pending[shape])
        self._encode_texts(final=True)
        self.writer.flush()
        if skips != len(self.progress.skipped):
            self.progress.save_skipped()

    def _encode_videos(self, group: list) -> None:
        b, n = self.enc.video_batch_size, len(group)
        clips = [c for _, c, _ in group] + [group[-1][1]] * (b - n)
        lat = np.asarray(self.enc.encode_video(to_model_input(clips)))
        f, h, w = clips[0].shape[:3]
        sf = self.enc.spatial_factor
        want = (b, self.enc.latent_channels, latent_frames(f), h // sf, w // sf)
        if lat.shape != want:
            raise CacheError(f"encode_video returned {lat.shape} for clips {(b, 3, f, h, w)}; expected {want}")
        for (item, _, caption), row in zip(group, lat):
            if not np.isfinite(row).all():
                self._skip(item, Skip("non_finite", "the VAE produced NaN/Inf latents"))
            else:
                self.texts.append((item, caption, row))
        self._encode_texts()

    def _encode_texts(self, final: bool = False) -> None:
        tb = self.enc.text_batch_size
        while len(self.texts) >= tb or (final and self.texts):
            batch, self.texts = self.texts[:tb], self.texts[tb:]
            emb, lengths = _encode_prompts(self.enc, [c for _, c, _ in batch])
            for (item, caption, lat), e, n in zip(batch, emb, lengths):
                example = {"key": item.key, "dataset": item.dataset, "caption": caption,
                           "prompt_embeds": e[:n].astype(self.dtype),
                           "fingerprint": {**self.fingerprints.pop(item.key, {}), "caption": caption_hash(caption)}}
                if isinstance(lat, tuple):  # a prompts dataset: the latent shape only
                    example["latent_shape"] = lat
                else:
                    example["latents"] = lat.astype(self.dtype)
                self.writer.add(example)
                self.encoded += 1
                self.bar.update(1)


def _encode_prompts(enc: Encoders, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encode in fixed-size batches (padded with ""), so every call has one shape."""
    tb, embs, lens = enc.text_batch_size, [], []
    for i in range(0, len(prompts), tb):
        part = prompts[i : i + tb]
        emb, n = enc.encode_text(part + [""] * (tb - len(part)))
        emb, n = np.asarray(emb), np.asarray(n).astype(np.int64).reshape(-1)
        if emb.shape != (tb, enc.text_len, enc.text_dim) or n.shape != (tb,) or n.min() < 1 or n.max() > enc.text_len:
            raise CacheError(f"encode_text returned {emb.shape} / lengths {n.tolist()}; expected "
                             f"({tb}, {enc.text_len}, {enc.text_dim}) and lengths in [1, {enc.text_len}]")
        embs.append(emb[: len(part)])
        lens.append(n[: len(part)])
    return np.concatenate(embs), np.concatenate(lens)


# -- merge (process 0) -----------------------------------------------------------------------------------------
def _merge(cache_dir: Path, found: sources.Discovery, datasets: list, enc: Encoders, config, opts: _Options,
           n_proc: int, library: dict[str, str], load: Callable[[], Encoders] | None = None) -> CacheReport:
    shards = _shard_infos(cache_dir)
    latest = latest_records(shards)
    # an item changed since its latest record was encoded (its re-encoding skipped, e.g. the new file is corrupt)
    # is not trained on from the old record
    fresh = set(latest) - set(changed_items(found.items, shards, latest))
    current = [it.key for it in found.items]
    current_set = set(current)
    skipped = dict(found.skipped)
    for f in sorted((cache_dir / PROGRESS_DIR).glob("skipped-p*.json")):
        d = json.loads(f.read_text())
        if d["process"] < n_proc:  # files of processes not in this run hold old verdicts
            skipped.update({k: v for k, v in d["skipped"].items() if k not in fresh})
    missing = [k for k in current if k not in fresh and k not in skipped]
    if missing:
        raise CacheError(f"{len(missing)} items are neither cached nor skipped (e.g. {missing[:3]}): a process has "
                         "not finished its share; rerun the job to resume")
    listed = {s.name for s in shards}
    for f in [*cache_dir.glob("records-p*.array_record*"), *(cache_dir / PROGRESS_DIR).glob("records-p*.json")]:
        if f.name not in listed and f.name.replace(".json", ".array_record") not in listed:
            f.unlink()  # leftovers of crashed runs: shards without a done-list, done-lists without a shard
    active = current_set & fresh
    flags = [k in active and latest[k] == (si, pos) for si, s in enumerate(shards) for pos, k in enumerate(s.keys)]
    stale = collections.Counter(d for s in shards for k, d in zip(s.keys, s.datasets) if k not in current_set)
    replaced = sum(1 for (k, on) in zip((k for s in shards for k in s.keys), flags) if k in current_set and not on)
    report = CacheReport(cache_dir, len(current) + len(found.skipped), len(active),
                         {k: skipped[k] for k in sorted(skipped) if k not in fresh},
                         stale=sum(stale.values()), replaced=replaced, notes=found.notes)
    # datasets no longer listed keep their repeats and kind (their records stay, inactive, for a later re-listing)
    try:
        old = records.read_manifest(cache_dir).datasets
    except ValueError:
        old = {}
    settings = cache_dir / PROGRESS_DIR / "settings.json"
    ever = json.loads(settings.read_text()).get("datasets", {}) if settings.is_file() else {}
    ids = {d.id for d in datasets}
    repeats = {k: old[k].repeats for k in stale if k not in ids and k in old}
    repeats.update({d.id: d.repeats for d in datasets})
    prompt_only = [d.id for d in datasets if d.type == "prompts"]
    prompt_only += [k for k in stale if k not in ids and (ever.get(k) or {}).get("type") == "prompts"]
    (cache_dir / records.MANIFEST).unlink(missing_ok=True)  # incomplete while the index is rewritten
    if active:
        _write_prompt_files(cache_dir, enc, library, DTYPES[opts.dtype], load)
        report.manifest = records.write_manifest(
            cache_dir, shards, latent_channels=enc.latent_channels, text_dim=enc.text_dim, text_len=enc.text_len,
            datasets=repeats, prompt_only=prompt_only, active_records=flags,
            source={"generator": "wanjax.cache", "encoders": enc.name, "cache_dtype": opts.dtype,
                    "data_backend_config": str(config.data_backend_config)})
    if report.stale:
        log.warning("%d cached records belong to items no longer in the dataset list (%s; a dataset disabled or "
                    "removed, a file deleted, or outside max_num_samples): kept on disk, not trained on; listing "
                    "them again needs no re-encoding", report.stale, dict(sorted(stale.items())))
    _write_report(report, datasets, dict(sorted(stale.items())))
    return report


def _write_report(report: CacheReport, datasets: list, stale: dict[str, int] | None = None) -> None:
    per_ds = collections.defaultdict(lambda: {"skipped": 0})
    for s in report.skipped.values():
        per_ds[s["dataset"]]["skipped"] += 1
    man = report.manifest
    for d in datasets:
        per_ds[d.id].update(repeats=d.repeats, cached=man.datasets[d.id].active if man and d.id in man.datasets else 0)
    _write_json(report.cache_dir / REPORT_FILE, {
        "summary": report.summary(), "candidates": report.candidates, "cached": report.cached,
        "skipped_count": len(report.skipped), "stale": report.stale, "stale_by_dataset": dict(stale or {}),
        "replaced": report.replaced,
        "skipped_by_reason": report.counts(),
        "datasets": dict(per_ds), "buckets": dict(man.active_buckets) if man else {},
        "skipped": [{"key": k, **v} for k, v in report.skipped.items()], "config_notes": report.notes})


def _read_report(cache_dir: Path) -> CacheReport:
    data = json.loads((cache_dir / REPORT_FILE).read_text())
    if "error" in data:
        raise CacheError(f"process 0 failed to finish the cache: {data['error']}")
    skipped = {s.pop("key"): s for s in data["skipped"]}
    return CacheReport(cache_dir, data["candidates"], data["cached"], skipped, data["stale"],
                       data.get("replaced", 0), notes=data["config_notes"])


def _prompt_library(config, notes: list) -> dict[str, str]:
    """The prompts to embed into validation_prompts.safetensors (name -> text); CacheConfigError naming the key and
    file for a library that is not a JSON object {name: prompt or {"prompt": ...}}."""
    out = {}
    for k in ("validation_prompt", "validation_negative_prompt"):
        if config.get(k, None):
            out[k] = str(config.get(k))
    key = "validation_prompt_library" if config.get("validation_prompt_library", None) else "user_prompt_library"
    lib = config.get(key, None)
    if isinstance(lib, str) and lib.lower() not in ("false", "none", "true", ""):
        from wanjax.validation import ValidationConfigError, prompt_library  # validation reads the same file

        try:
            out.update({f"library/{name}": text for name, text in prompt_library(lib, key).items()})
        except ValidationConfigError as e:
            raise CacheConfigError(str(e)) from None
    elif lib is True or (isinstance(lib, str) and lib.lower() == "true"):
        notes.append({"dataset": "-", "key": "validation_prompt_library",
                      "note": "SimpleTuner's built-in prompt library is not shipped; give a JSON file of prompts"})
    return out


def _write_prompt_files(cache_dir: Path, enc: Encoders, library: dict[str, str], dtype,
                        load: Callable[[], Encoders] | None = None) -> None:
    """empty_prompt.safetensors ("empty": the true-length embedding of "") and validation_prompts.safetensors
    (one true-length embedding per name of `library`, see _prompt_library; texts in the metadata). Kept when already
    written for the same texts. `enc` may be a stand-in without encode functions: then `load()` gives the real
    encoders when a file must be (re)written."""
    wanted = {records.EMPTY_PROMPT_FILE: {"empty": ""}}
    if library:
        wanted[records.VALIDATION_PROMPTS_FILE] = library
    from wanjax.safetensors_io import SafetensorsFile

    for fname, prompts in wanted.items():
        path, meta = cache_dir / fname, {"prompts": json.dumps(prompts, ensure_ascii=False), "encoders": enc.name,
                                         "text_dim": str(enc.text_dim), "dtype": np.dtype(dtype).name}
        if path.is_file():
            try:
                if SafetensorsFile(path).metadata == meta:
                    continue
            except (OSError, ValueError):
                pass
        if load is not None:
            enc = load()
            meta.update(encoders=enc.name, text_dim=str(enc.text_dim))
        emb, lens = _encode_prompts(enc, list(prompts.values()))
        records.write_text_embeds(path, {k: e[:n].astype(dtype) for k, e, n in zip(prompts, emb, lens)}, meta)


# =============================================================================================================
# command line
# =============================================================================================================
def main(argv: list[str] | None = None) -> int:
    from wanjax import cli

    parsed = cli.parse(argv, prog="wanjax.cache")
    if isinstance(parsed, int):
        return parsed
    config, _ = parsed
    cli.setup_logging()
    if (code := cli.start_jax(config)) is not None:
        return code
    import jax

    try:
        report = build_cache(config)
    except CacheConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
