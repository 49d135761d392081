"""Training input: cached latents -> per-process batches with one latent shape each, resumable exactly (grain).

The plan of an epoch is a pure function of (cache, seed, epoch, global batch size, repeats): per shape bucket,
every active record appears repeats + 1 times (SimpleTuner semantics; records the caching job marked inactive,
i.e. of items no longer in the dataset list, are not planned), the list is permuted with a seed derived from
(seed, epoch, bucket) and cut into global batches (the remainder is dropped, or with drop_remainder=False padded
from the start of the bucket's permuted list; a bucket smaller than one global batch contributes nothing), then the
order of all batches is permuted with a seed from (seed, epoch). Every epoch has the same number of batches; with
num_epochs=None the stream is infinite.

Multi-host: process p loads items [p*b, (p+1)*b) of every global batch (b = global_batch_size // process_count),
so all processes step through the same global batches in lockstep and each reads only its own records.
Hand the batch to `jax.make_array_from_process_local_data` (pop "keys" first).

Grain pipeline: MapDataset.source(slot -> record index) .map(read + decode) .batch(b) .to_iter_dataset(threads)
[.mp_prefetch(workers)]. Iterator state is grain's (the next batch index, or per-worker states) plus a fingerprint
of the pipeline's settings that `set_state` checks, so a run resumed with another seed/batch size/cache fails
loudly instead of silently seeing other data. The state is a JSON-serializable dict. grain's part counts global
batches (process p's batch j is its slice of global batch j), so it is the same in every process of any process
count: a state saved by any process of a run with P processes resumes every process of a run with Q processes.

Checkpointing with orbax (grain ships the handler; each process writes `process_<i>-of-<n>.json`; grain's
restore reads only the file of the same process count, wanjax.checkpoint.Checkpointer reads any):

    import orbax.checkpoint as ocp
    from wanjax.data.pipeline import iterator_checkpoint_args
    mngr = ocp.CheckpointManager(ckpt_dir)
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=iterator_checkpoint_args(it)))
    ...
    it = make_batch_iterator(cache_dir, ...same settings...)
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                          data=iterator_checkpoint_args(it, restore=True)))
    # `it` now continues with exactly the batch the saved run would have produced next.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import zlib
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from wanjax.data.records import CacheSource, Manifest, read_manifest, read_record_index

log = logging.getLogger(__name__)


def bucket_members(manifest: Manifest, repeats: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Per bucket (sorted by name), the record indices of one epoch: active record i repeated repeats[dataset] + 1
    times; inactive records (see records.py) and buckets without active records are left out. `repeats` overrides
    the manifest's per-dataset values."""
    reps = {k: d.repeats for k, d in manifest.datasets.items()}
    unknown = sorted(set(repeats or {}) - set(reps))
    if unknown:
        raise ValueError(f"repeats given for datasets {unknown} that {manifest.path} does not have ({sorted(reps)})")
    reps.update(repeats or {})
    if any(r < 0 for r in reps.values()):
        raise ValueError(f"repeats must be >= 0, got {reps}")
    index = read_record_index(manifest)
    copies = np.asarray([reps[d] + 1 for d in index.datasets], np.int64)[index.dataset] * index.active
    order = np.argsort(np.asarray(index.buckets))
    return {index.buckets[b]: np.repeat(np.flatnonzero(index.bucket == b), copies[index.bucket == b]) for b in order
            if index.active[index.bucket == b].any()}


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng([int(e) % 2**64 for e in entropy])


def epoch_plan(members: Mapping[str, np.ndarray], *, global_batch_size: int, seed: int, epoch: int,
               drop_remainder: bool = True) -> np.ndarray:
    """The global batches of one epoch: int64 [batches, global_batch_size] record indices, one bucket per row."""
    g = global_batch_size
    rows = []
    for name, items in members.items():
        if len(items) < g:
            continue
        items = _rng(seed, epoch, 1, zlib.crc32(name.encode())).permutation(items)
        rem = len(items) % g
        if rem:
            items = items[: len(items) - rem] if drop_remainder else np.concatenate([items, items[: g - rem]])
        rows.append(items.reshape(-1, g))
    if not rows:
        return np.zeros((0, g), np.int64)
    plan = np.concatenate(rows).astype(np.int64)
    return plan[_rng(seed, epoch, 2).permutation(len(plan))]


class _SlotSource:
    """grain source over this process's item slots: slot -> record index, epochs planned lazily."""

    def __init__(self, members: Mapping[str, np.ndarray], *, global_batch_size: int, seed: int,
                 drop_remainder: bool, process_index: int, batch_size: int, num_epochs: int | None,
                 batches_per_epoch: int):
        self._members, self._g, self._seed, self._drop = dict(members), global_batch_size, seed, drop_remainder
        self._offset, self._b = process_index * batch_size, batch_size
        self._per_epoch = batches_per_epoch * batch_size
        self._len = sys.maxsize if num_epochs is None else self._per_epoch * num_epochs
        self._plans: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def _plan(self, epoch: int) -> np.ndarray:
        with self._lock:
            plan = self._plans.get(epoch)
            if plan is None:
                plan = epoch_plan(self._members, global_batch_size=self._g, seed=self._seed, epoch=epoch,
                                  drop_remainder=self._drop)
                if len(self._plans) >= 2:  # prefetch threads straddle at most one epoch boundary
                    self._plans.pop(min(self._plans))
                self._plans[epoch] = plan
            return plan

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, slot: int) -> int:
        epoch, t = divmod(int(slot), self._per_epoch)
        j, pos = divmod(t, self._b)
        return int(self._plan(epoch)[j, self._offset + pos])

    def __getstate__(self) -> dict[str, Any]:  # picklable for grain worker processes
        state = dict(self.__dict__)
        state["_plans"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class _Collate:
    """List of decoded examples (one latent shape) -> dict of stacked numpy arrays."""

    def __init__(self, dtype: Any):
        self.dtype = np.dtype(dtype)

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if any("latent_shape" in e for e in examples):  # prompt-only records: DMD reads only the latents' shape
            examples = [{**e, "latents": np.zeros(e["latent_shape"], self.dtype)} if "latent_shape" in e else e
                        for e in examples]
        for name in ("latents", "prompt_embeds", "image_embeds"):
            have = [name in e for e in examples]
            if not any(have):
                continue
            shapes = {e[name].shape for e in examples if name in e}
            if not all(have) or len(shapes) != 1:
                raise ValueError(f"{name} missing or of mixed shapes {shapes} in batch {[e['key'] for e in examples]}")
            arr = np.empty((len(examples), *shapes.pop()), self.dtype)
            for i, e in enumerate(examples):
                arr[i] = e[name]
            out[name] = arr
        out["prompt_lengths"] = np.asarray([e["prompt_length"] for e in examples], np.int32)
        out["index"] = np.asarray([e["index"] for e in examples], np.int64)
        out["keys"] = np.asarray([e["key"] for e in examples])
        return out


# Fingerprint keys that name this process's slice of each global batch, not which global batches come: a state saved
# with other values resumes exactly (grain's part is a global batch position, see the module docstring).
PROCESS_KEYS = ("process_index", "process_count")


class BatchIterator(grain.DatasetIterator):
    """grain's iterator plus a settings fingerprint in its state, checked on `set_state`."""

    def __init__(self, parent: grain.DatasetIterator, fingerprint: dict[str, Any], batches_per_epoch: int):
        super().__init__(parent)
        self.fingerprint = fingerprint
        self.batches_per_epoch = batches_per_epoch

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": dict(self.fingerprint), "grain": self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue at `state`'s global batch. A state of another pipeline raises DataChanged; one saved by another
        process, or by a run with another process count, is welcome (PROCESS_KEYS are not compared)."""
        saved = state.get("pipeline") if isinstance(state, dict) else None
        if saved is None or "grain" not in state:
            raise ValueError(f"not a wanjax data-iterator state: {str(state)[:200]}")
        diff = {k: (saved.get(k), v) for k, v in self.fingerprint.items()
                if k not in PROCESS_KEYS and saved.get(k) != v}
        if diff:
            changes = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise DataChanged(f"data-iterator state was saved by a different pipeline ({changes}); restoring it would "
                              "not reproduce the saved run's batches")
        self._parent.set_state(state["grain"])


class DataChanged(ValueError):
    """A saved iterator position that does not belong to this cache / batch plan (e.g. files were cached since)."""


def make_batch_iterator(
    cache_dir: str | os.PathLike,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    repeats: Mapping[str, int] | None = None,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    worker_count: int = 0,
    read_threads: int = 2,
    prefetch_batches: int = 2,
    dtype: Any = np.float32,
) -> BatchIterator:
    """Checkpointable iterator of this process's batches: {"latents" (b,C,F,H,W), "prompt_embeds" (b,text_len,D)
    in `dtype`, ["image_embeds"], "prompt_lengths" (b,) int32, "index" (b,) int64 record ids, "keys" (b,) str}.

    b = global_batch_size // process_count. Errors (empty cache, no bucket filling a global batch, bad
    settings) are raised here, before any batch is read. `worker_count` > 0 decodes in grain worker processes;
    `read_threads` / `prefetch_batches` prefetch in threads (0 disables); neither changes the batches.
    """
    if global_batch_size < 1 or not 0 <= process_index < process_count or global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of process_count "
                         f"{process_count}, and 0 <= process_index {process_index} < process_count")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None (infinite), got {num_epochs}")
    manifest = read_manifest(cache_dir)
    if manifest.items == 0:
        raise ValueError(f"{manifest.path}: the cache is empty (0 records)")
    if manifest.active_items == 0:
        raise ValueError(f"{manifest.path}: none of its {manifest.items} records is active (they belong to items no "
                         "longer in the dataset list); list them again or cache other data")
    members = bucket_members(manifest, repeats)
    g, b = global_batch_size, global_batch_size // process_count
    per_bucket = {k: len(v) // g + (not drop_remainder and len(v) >= g and len(v) % g > 0) for k, v in members.items()}
    counts = {k: len(v) for k, v in members.items()}
    skipped = {k: n for k, n in counts.items() if n < g}
    if skipped:
        log.warning("buckets smaller than the global batch %d contribute nothing (items per epoch with repeats): %s",
                    g, skipped)
    batches_per_epoch = sum(per_bucket.values())
    if batches_per_epoch == 0:
        raise ValueError(f"{manifest.path}: no bucket fills a global batch of {g}; items per epoch (with repeats) "
                         f"by bucket: {counts}")
    inactive = manifest.items - manifest.active_items
    log.info("data: %d records%s, %d batches of %d per epoch (%s)", manifest.active_items,
             f" ({inactive} more inactive, not trained on)" if inactive else "", batches_per_epoch, g,
             {k: n for k, n in per_bucket.items() if n})

    source = CacheSource(cache_dir, manifest)
    slots = _SlotSource(members, global_batch_size=g, seed=seed, drop_remainder=drop_remainder,
                        process_index=process_index, batch_size=b, num_epochs=num_epochs,
                        batches_per_epoch=batches_per_epoch)
    ds = grain.MapDataset.source(slots).map(source.__getitem__).batch(b, drop_remainder=True, batch_fn=_Collate(dtype))
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches))
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app take their defaults
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    fingerprint = {
        "items": manifest.items, "buckets": dict(manifest.buckets), "global_batch_size": g, "seed": int(seed),
        "process_index": process_index, "process_count": process_count, "num_epochs": num_epochs,
        "drop_remainder": bool(drop_remainder), "worker_count": int(worker_count),
        "epoch_items": {k: int(n) for k, n in counts.items()},
    }
    if inactive:  # which records are trained on (only then: states saved before inactive records existed still load)
        active = np.concatenate([np.unique(v) for v in members.values()]) if members else np.zeros(0, np.int64)
        fingerprint["active"] = {"items": manifest.active_items,
                                 "crc32": zlib.crc32(np.sort(active).astype("<i8").tobytes())}
    return BatchIterator(iter(it_ds), fingerprint, batches_per_epoch)


def iterator_checkpoint_args(it: grain.DatasetIterator, *, restore: bool = False) -> Any:
    """orbax `CheckpointArgs` for the data iterator (grain's handler): use as an item of `ocp.args.Composite`."""
    from grain.checkpoint import CheckpointRestore, CheckpointSave

    return CheckpointRestore(it) if restore else CheckpointSave(it)
