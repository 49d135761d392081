"""A checkpoint resumes exactly on another number of processes: every process continues at the global batch the
saved run would have read next (pipeline + Checkpointer, processes simulated by their iterators' process_index /
process_count and by the process grain's handler names the saved file after)."""

import json
import logging

import numpy as np
import pytest
from grain._src.core import sharding as grain_sharding

# test_data's `cache` fixture (a tiny cache), imported by name: it shadows pytest's own `cache` fixture here
from test_data import assert_batches_equal, cache, take  # noqa: F401
from wanjax.checkpoint import Checkpointer
from wanjax.data.pipeline import make_batch_iterator

G, SEED = 4, 2  # 12 items, 9 per bucket with repeats -> 4 global batches of 4 per epoch
KW = dict(global_batch_size=G, seed=SEED, read_threads=0, prefetch_batches=0)


def iterators(cache_dir, count, **kw):
    return [make_batch_iterator(cache_dir, process_index=p, process_count=count, **{**KW, **kw}) for p in range(count)]


def take_global(its, n):
    """n global batches from one iterator per process (the processes' slices concatenated in process order)."""
    parts = [take(it, n) for it in its]
    return [{k: np.concatenate([p[k] for p in batch]) for k in batch[0]} for batch in zip(*parts)]


def save(tmp_path, monkeypatch, its, step=5):
    """A checkpoint as a run of len(its) processes writes it: state + meta, and each process's data file."""
    ckpt = Checkpointer(max_to_keep=None, directory=tmp_path / "ckpt")
    for p, it in enumerate(its):
        monkeypatch.setattr(grain_sharding, "get_process_index_and_count", lambda p=p: (p, len(its)))
        if p == 0:
            ckpt.save(step, {"w": np.arange(3.0)}, it, {"method": "lora"})
            ckpt.wait()
        else:  # the other processes' data files (orbax's state and meta are written once here)
            path = tmp_path / "ckpt" / str(step) / "data" / f"process_{p}-of-{len(its)}.json"
            path.write_text(json.dumps(it.get_state()))
    monkeypatch.undo()
    ckpt.close()
    return tmp_path / "ckpt", step


@pytest.mark.parametrize("saved,resumed", [(1, 2), (2, 1), (2, 4)])
def test_resume_on_another_process_count_is_exact(tmp_path, monkeypatch, caplog, cache, saved, resumed):  # noqa: F811
    done, more = 5, 6  # 5 batches in, then across the epoch boundary at 8
    expected = take_global(iterators(cache, 1), done + more)
    its = iterators(cache, saved)
    assert_batches_equal(take_global(its, done), expected[:done])
    directory, step = save(tmp_path, monkeypatch, its)
    assert sorted(p.name for p in (directory / str(step) / "data").glob("*.json")) == [
        f"process_{p}-of-{saved}.json" for p in range(saved)]

    new = iterators(cache, resumed)
    caplog.set_level(logging.INFO, logger="wanjax.checkpoint")
    for it in new:  # every process restores from the shared checkpoint folder
        state, meta, data_changed = Checkpointer(max_to_keep=None, directory=directory).restore(
            step, {"w": np.zeros(3)}, it)
        assert data_changed is None and meta == {"method": "lora"} and np.array_equal(state["w"], np.arange(3.0))
    assert_batches_equal(take_global(new, more), expected[done:])
    assert caplog.text.count("data position carried over from process 0 of") == resumed


def test_same_process_count_reads_its_own_file(tmp_path, monkeypatch, caplog, cache):  # noqa: F811
    its = iterators(cache, 2)
    take_global(its, 3)
    directory, step = save(tmp_path, monkeypatch, its)
    expected = take_global(its, 2)
    new = iterators(cache, 2)
    caplog.set_level(logging.INFO, logger="wanjax.checkpoint")
    for it in new:
        assert Checkpointer(max_to_keep=None, directory=directory).restore(step, {"w": np.zeros(3)}, it)[2] is None
    assert_batches_equal(take_global(new, 2), expected)
    assert "carried over" not in caplog.text


@pytest.mark.parametrize("change", [dict(seed=SEED + 1), dict(global_batch_size=2 * G)])
def test_changed_data_on_another_process_count_still_starts_fresh(tmp_path, monkeypatch, cache, change):  # noqa: F811
    its = iterators(cache, 1)
    take_global(its, 3)
    directory, step = save(tmp_path, monkeypatch, its)
    new = iterators(cache, 2, **change)
    fresh = take_global(iterators(cache, 2, **change), 2)
    for it in new:
        state, _, data_changed = Checkpointer(max_to_keep=None, directory=directory).restore(
            step, {"w": np.zeros(3)}, it)
        assert np.array_equal(state["w"], np.arange(3.0))
        assert data_changed and next(iter(change)) in data_changed
    assert_batches_equal(take_global(new, 2), fresh)


@pytest.mark.parametrize("workers", [0, 1])
def test_grain_state_is_a_global_position(cache, workers):  # noqa: F811
    """What the above rests on: at the same global batch, every process of every process count holds one state."""
    states = []
    for count in (1, 2, 4):
        for it in iterators(cache, count, worker_count=workers, read_threads=1, prefetch_batches=1):
            take(it, 5)
            states.append(it.get_state()["grain"])
            it.close()
    assert all(s == states[0] for s in states), states
