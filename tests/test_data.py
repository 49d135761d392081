"""Latent cache format and the grain input pipeline: exact round trips, bucketing, coverage, determinism, resume,
multi-process slicing, and clear errors on bad caches."""

import collections
import json
import logging

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from wanjax.data import records
from wanjax.data.pipeline import epoch_plan, iterator_checkpoint_args, make_batch_iterator
from wanjax.data.records import (CacheSource, CacheWriter, read_manifest, read_record_index, validate_cache,
                                 write_synthetic_cache)
from wanjax.safetensors_io import SafetensorsFile

C, D, L = 4, 8, 32


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
            assert np.array_equal(x[k], y[k]) if x[k].dtype.kind == "U" else np.array_equal(bits(x[k]), bits(y[k])), k


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """12 items, 2 shapes x 2 datasets: per bucket 3 of "a" (repeats 0) and 3 of "b" (repeats 1) -> 9 per epoch."""
    d = tmp_path_factory.mktemp("cache")
    write_synthetic_cache(d, num_items=12, latent_channels=C, text_dim=D, text_len=L, datasets={"a": 0, "b": 1},
                          shard_size=5)
    return d


# -- the record format ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32])
def test_round_trip_bit_exact_and_padding(tmp_path, dtype):
    rng = np.random.default_rng(0)
    w = CacheWriter(tmp_path, latent_channels=C, text_dim=D, text_len=L, shard_size=2)
    examples = []
    for i, t in enumerate([1, 7, L, 3]):
        lat = rng.standard_normal((C, 2, 3, 5)).astype(dtype)
        lat.reshape(-1)[:3] = np.array([np.inf, -0.0, np.nan], dtype)  # special values must survive too
        ex = {"key": f"v/{i}.mp4", "dataset": "d", "caption": f"cap {i} ü", "latents": lat,
              "prompt_embeds": rng.standard_normal((t, D)).astype(dtype)}
        if i == 2:
            ex["image_embeds"] = rng.standard_normal((5, 6)).astype(dtype)
        examples.append(ex)
        assert w.add(ex) == i
    w.close(datasets={"d": 2})
    src = CacheSource(tmp_path)
    assert len(src) == 4
    for i, ex in enumerate(examples):
        got = src[i]
        assert (got["key"], got["dataset"], got["caption"], got["index"]) == (ex["key"], "d", ex["caption"], i)
        assert got["latents"].dtype == np.dtype(dtype) and np.array_equal(bits(got["latents"]), bits(ex["latents"]))
        t = ex["prompt_embeds"].shape[0]
        assert got["prompt_length"] == t and got["prompt_embeds"].shape == (L, D)
        assert np.array_equal(bits(got["prompt_embeds"][:t]), bits(ex["prompt_embeds"]))
        assert not bits(got["prompt_embeds"][t:]).any()  # exact +0.0 padding
        assert ("image_embeds" in got) == ("image_embeds" in ex)
        if "image_embeds" in ex:
            assert np.array_equal(bits(got["image_embeds"]), bits(ex["image_embeds"]))


def test_record_is_a_safetensors_blob(tmp_path):
    ex = {"key": "k", "dataset": "d", "caption": "c", "latents": np.arange(24, dtype=np.float32).reshape(2, 1, 3, 4),
          "prompt_embeds": np.ones((2, 3), ml_dtypes.bfloat16)}
    path = tmp_path / "one.safetensors"
    path.write_bytes(records.encode_record(ex))
    f = SafetensorsFile(path)
    assert f.metadata == {"format": "wanjax-record-1", "key": "k", "dataset": "d", "caption": "c"}
    assert np.array_equal(f.read("latents"), ex["latents"]) and f.read("prompt_embeds").dtype == ml_dtypes.bfloat16
    with pytest.raises(ValueError, match="not a wanjax record"):
        records.decode_record(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")


def test_text_embeds_side_file(tmp_path):
    e = {"empty": np.random.default_rng(0).standard_normal((3, D)).astype(ml_dtypes.bfloat16),
         "val_0": np.ones((L, D), np.float32)}
    records.write_text_embeds(tmp_path / records.EMPTY_PROMPT_FILE, e)
    got = records.read_text_embeds(tmp_path / records.EMPTY_PROMPT_FILE)
    assert got.keys() == e.keys() and all(np.array_equal(bits(got[k]), bits(e[k])) for k in e)


def test_manifest_and_atomic_layout(tmp_path, cache):
    m = read_manifest(cache)
    assert (m.latent_channels, m.text_dim, m.text_len, m.items) == (C, D, L, 12)
    assert m.buckets == {f"{C}x2x4x6": 6, f"{C}x3x4x4": 6}
    assert {k: (v.repeats, v.items) for k, v in m.datasets.items()} == {"a": (0, 6), "b": (1, 6)}
    assert m.shards == tuple(f"records-{i:05d}-of-00003.array_record" for i in range(3)) and m.shard_items == (5, 5, 2)
    raw = json.loads(m.path.read_text())
    assert raw["format"] == "wanjax-cache" and raw["version"] == 1 and raw["buckets"][f"{C}x3x4x4"] == {"count": 6}
    assert not list(cache.glob("*.partial"))
    # an unfinished cache holds only partial shards and no manifest
    w = CacheWriter(tmp_path, latent_channels=C, text_dim=D, text_len=L)
    w.add({"key": "x", "dataset": "d", "caption": "", "latents": np.zeros((C, 1, 1, 1)),
           "prompt_embeds": np.zeros((1, D))})
    assert [p.name for p in tmp_path.iterdir()] == ["records-00000.array_record.partial"]
    with pytest.raises(ValueError, match="manifest.json: missing"):
        read_manifest(tmp_path)
    w.close()
    with pytest.raises(ValueError, match="already holds a complete cache"):
        CacheWriter(tmp_path, latent_channels=C, text_dim=D)


def test_writer_refuses_bad_examples(tmp_path):
    w = CacheWriter(tmp_path, latent_channels=C, text_dim=D, text_len=4)
    ok = {"key": "k", "dataset": "d", "caption": "", "latents": np.zeros((C, 1, 2, 2)),
          "prompt_embeds": np.zeros((4, D))}
    w.add(ok)
    for bad, match in [({"latents": np.zeros((C + 1, 1, 2, 2))}, "latents must be"),
                       ({"prompt_embeds": np.zeros((5, D))}, "prompt_embeds must be"),
                       ({"prompt_embeds": np.zeros((2, D + 1))}, "prompt_embeds must be"),
                       ({"caption": None}, "caption"), ({}, "duplicate key")]:
        with pytest.raises(ValueError, match=match):
            w.add({**ok, "key": "k" if match == "duplicate key" else "k2", **bad})


def test_synthetic_cache_is_deterministic(tmp_path):
    a = write_synthetic_cache(tmp_path / "a", num_items=5, latent_channels=C, text_dim=D, text_len=L, seed=3)
    b = write_synthetic_cache(tmp_path / "b", num_items=5, latent_channels=C, text_dim=D, text_len=L, seed=3)
    sa, sb = CacheSource(a.directory), CacheSource(b.directory)
    lengths = {sa[i]["prompt_length"] for i in range(5)}
    assert len(lengths) > 1
    assert all(np.array_equal(bits(sa[i]["latents"]), bits(sb[i]["latents"])) for i in range(5))


# -- the pipeline --------------------------------------------------------------------------------------------
def test_one_shape_per_batch_and_epoch_coverage_with_repeats(cache):
    it = make_batch_iterator(cache, global_batch_size=3, seed=0)
    assert it.batches_per_epoch == 6  # 9 per bucket per epoch / 3
    src, idx = CacheSource(cache), read_record_index(read_manifest(cache))
    epochs = [take(it, 6), take(it, 6)]
    for batches in epochs:
        seen = collections.Counter()
        for b in batches:
            assert b["latents"].dtype == np.float32 and b["prompt_embeds"].shape == (3, L, D)
            assert len({idx.bucket[i] for i in b["index"]}) == 1
            seen.update(b["index"].tolist())
            for j, i in enumerate(b["index"]):
                rec = src[int(i)]
                assert np.array_equal(b["latents"][j], rec["latents"].astype(np.float32))
                assert np.array_equal(b["prompt_embeds"][j], rec["prompt_embeds"].astype(np.float32))
                assert b["keys"][j] == rec["key"] and b["prompt_lengths"][j] == rec["prompt_length"]
        expected = {i: 1 + (idx.datasets[idx.dataset[i]] == "b") for i in range(12)}
        assert seen == expected
    order = [[b["index"].tolist() for b in e] for e in epochs]
    assert order[0] != order[1]  # the epoch is folded into the shuffle


def test_image_embeds_and_output_dtype(tmp_path):
    write_synthetic_cache(tmp_path, num_items=4, latent_channels=C, text_dim=D, text_len=L, image_embeds_shape=(5, 6),
                          shapes=((1, 2, 2),))
    b = next(make_batch_iterator(tmp_path, global_batch_size=4, seed=0, dtype=ml_dtypes.bfloat16))
    assert b["image_embeds"].shape == (4, 5, 6) and b["latents"].shape == (4, C, 1, 2, 2)
    assert {b[k].dtype for k in ("latents", "prompt_embeds", "image_embeds")} == {np.dtype(ml_dtypes.bfloat16)}
    src = CacheSource(tmp_path)
    for j, i in enumerate(b["index"]):  # bf16 -> bf16: bit-exact through the pipeline
        assert np.array_equal(bits(b["image_embeds"][j]), bits(src[int(i)]["image_embeds"]))


def test_repeats_override_and_unknown_dataset(cache):
    it = make_batch_iterator(cache, global_batch_size=3, seed=0, repeats={"b": 0})
    assert it.batches_per_epoch == 4
    seen = collections.Counter(i for b in take(it, 4) for i in b["index"].tolist())
    assert seen == {i: 1 for i in range(12)}
    with pytest.raises(ValueError, match=r"datasets \['zzz'\]"):
        make_batch_iterator(cache, global_batch_size=3, seed=0, repeats={"zzz": 1})


def test_seed_determinism(cache):
    a = take(make_batch_iterator(cache, global_batch_size=2, seed=7), 10)
    b = take(make_batch_iterator(cache, global_batch_size=2, seed=7, read_threads=0, prefetch_batches=0), 10)
    c = take(make_batch_iterator(cache, global_batch_size=2, seed=8), 10)
    assert_batches_equal(a, b)
    assert [x["index"].tolist() for x in a] != [x["index"].tolist() for x in c]


def test_drop_remainder_false_and_finite_epochs(cache):
    # 9 per bucket, batch 4: 2 full batches + one padded from the bucket's own permuted list
    it = make_batch_iterator(cache, global_batch_size=4, seed=1, drop_remainder=False, num_epochs=2)
    assert it.batches_per_epoch == 6
    batches = list(it)
    assert len(batches) == 12
    seen = collections.Counter(i for b in batches[:6] for i in b["index"].tolist())
    assert set(seen) == set(range(12)) and sum(seen.values()) == 24
    dropped = make_batch_iterator(cache, global_batch_size=4, seed=1, num_epochs=1)
    assert dropped.batches_per_epoch == 4 and len(list(dropped)) == 4


def test_small_buckets_skipped_or_refused(tmp_path, caplog):
    write_synthetic_cache(tmp_path, num_items=7, latent_channels=C, text_dim=D, text_len=L,
                          shapes=((2, 4, 6), (2, 4, 6), (3, 4, 4), (2, 4, 6)))  # buckets of 5 and 2
    with caplog.at_level(logging.WARNING):
        it = make_batch_iterator(tmp_path, global_batch_size=3, seed=0)
    assert it.batches_per_epoch == 1 and f"{C}x3x4x4': 2" in caplog.text
    with pytest.raises(ValueError, match=rf"no bucket fills a global batch of 6.*'{C}x2x4x6': 5, '{C}x3x4x4': 2"):
        make_batch_iterator(tmp_path, global_batch_size=6, seed=0)
    empty = tmp_path / "empty"
    CacheWriter(empty, latent_channels=C, text_dim=D).close()
    with pytest.raises(ValueError, match="the cache is empty"):
        make_batch_iterator(empty, global_batch_size=1, seed=0)


@pytest.mark.parametrize("threads,workers", [(0, 0), (2, 0), (1, 2)])
def test_resume_exact_across_epoch_boundary(cache, threads, workers):
    kw = dict(global_batch_size=3, seed=5, repeats={"b": 0}, read_threads=threads, prefetch_batches=threads,
              worker_count=workers)  # 4 batches per epoch: batches 4..6 cross into epoch 2
    full = make_batch_iterator(cache, **kw)
    expected = take(full, 6)
    it = make_batch_iterator(cache, **kw)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    take(it, 2)  # the old iterator moving on must not matter
    resumed = make_batch_iterator(cache, **kw)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 3), expected[3:])
    for x in (full, it, resumed):
        x.close()


def test_resume_through_orbax(tmp_path, cache):
    kw = dict(global_batch_size=2, seed=3)
    expected = take(make_batch_iterator(cache, **kw), 7)
    it = make_batch_iterator(cache, **kw)
    take(it, 4)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    mngr.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.arange(3.0)}),
                                         data=iterator_checkpoint_args(it)))
    take(it, 2)  # advancing while an async save may still run must not change what was saved
    mngr.wait_until_finished()
    mngr.close()
    resumed = make_batch_iterator(cache, **kw)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    out = mngr.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore({"w": np.zeros(3)}),
                                                  data=iterator_checkpoint_args(resumed, restore=True)))
    assert np.array_equal(out["state"]["w"], np.arange(3.0)) and out["data"] is resumed
    assert_batches_equal(take(resumed, 3), expected[4:])


def test_state_from_another_pipeline_is_refused(cache):
    state = make_batch_iterator(cache, global_batch_size=2, seed=3).get_state()
    other = make_batch_iterator(cache, global_batch_size=2, seed=4)
    with pytest.raises(ValueError, match="seed: saved 3, now 4"):
        other.set_state(state)
    with pytest.raises(ValueError, match="not a wanjax data-iterator state"):
        other.set_state({"next_index": 3})


def test_two_processes_slice_the_global_batches(cache):
    glob = take(make_batch_iterator(cache, global_batch_size=4, seed=2, drop_remainder=False), 9)
    parts = [take(make_batch_iterator(cache, global_batch_size=4, seed=2, drop_remainder=False,
                                      process_index=p, process_count=2), 9) for p in range(2)]
    for g, p0, p1 in zip(glob, *parts):
        assert p0["latents"].shape[0] == 2
        assert_batches_equal([{k: np.concatenate([p0[k], p1[k]]) for k in g}], [g])
    with pytest.raises(ValueError, match="multiple of process_count"):
        make_batch_iterator(cache, global_batch_size=3, seed=0, process_count=2)


def test_epoch_plan_is_a_pure_function():
    members = {"a": np.arange(10), "b": np.arange(10, 13)}
    p = epoch_plan(members, global_batch_size=4, seed=1, epoch=0)
    assert p.shape == (2, 4) and set(p.ravel()) < set(range(10))
    assert np.array_equal(p, epoch_plan(members, global_batch_size=4, seed=1, epoch=0))
    assert not np.array_equal(p, epoch_plan(members, global_batch_size=4, seed=1, epoch=1))


# -- bad caches ----------------------------------------------------------------------------------------------
def copy_cache(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(version=2), "cache format version 2; this wanjax reads version 1"),
    (lambda m: m.update(format="other"), "format is 'other', expected 'wanjax-cache'"),
    (lambda m: m.pop("text_dim"), "malformed manifest"),
    (lambda m: m.update(items=13), "shard_items sum to 12, items is 13"),
    (lambda m: m["shards"].__setitem__(0, "nope.array_record"), r"shard files missing: \['nope.array_record'\]"),
])
def test_bad_manifest(tmp_path, cache, edit, match):
    d = copy_cache(cache, tmp_path / "c")
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=f"{d / 'manifest.json'}: {match}"):
        make_batch_iterator(d, global_batch_size=1, seed=0)


def test_missing_or_corrupt_manifest(tmp_path, cache):
    with pytest.raises(ValueError, match=f"{tmp_path / 'manifest.json'}: missing"):
        read_manifest(tmp_path)
    d = copy_cache(cache, tmp_path / "c")
    (d / "manifest.json").write_text('{"format": "wanjax-cache", ')
    with pytest.raises(ValueError, match="manifest.json: not valid JSON"):
        read_manifest(d)


def test_validate_cache_names_the_mismatch(cache):
    m = read_manifest(cache)
    validate_cache(m, latent_channels=C, text_dim=D, text_len=L)
    with pytest.raises(ValueError, match=f"^{m.path}: latents have {C} channels, the model expects 48$"):
        validate_cache(m, latent_channels=48, text_dim=D)
    with pytest.raises(ValueError, match=f"prompt embeddings have {D} features, the model expects 4096"):
        validate_cache(m, latent_channels=C, text_dim=4096)


@pytest.mark.parametrize("cut", [100, 0.5])
def test_truncated_shard_names_the_file(tmp_path, cache, cut):
    d = copy_cache(cache, tmp_path / "c")
    shard = d / read_manifest(d).shards[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - cut] if isinstance(cut, int) else data[: int(len(data) * cut)])
    with pytest.raises(ValueError, match=f"{shard}: .*(truncated or corrupt|unreadable)"):
        make_batch_iterator(d, global_batch_size=1, seed=0)


def test_corrupt_record_names_file_and_record(tmp_path, cache):
    d = copy_cache(cache, tmp_path / "c")
    shard = d / read_manifest(d).shards[0]
    data = bytearray(shard.read_bytes())
    data[200:300] = b"x" * 100  # inside record 0's chunk; the file's footer stays intact
    shard.write_bytes(bytes(data))
    src = CacheSource(d)
    with pytest.raises(ValueError, match=f"{shard}: record 0 "):
        src[0]
    assert src[1]["key"] == "synthetic/000001.mp4"


# -- active records ------------------------------------------------------------------------------------------
def _remanifest(d, active):
    """Rewrite `d`'s manifest over its shards with only `active` keys active (as the caching job's merge does)."""
    man, src = read_manifest(d), CacheSource(d)
    recs, shards, start = [src[i] for i in range(len(src))], [], 0
    for name, n in zip(man.shards, man.shard_items):
        rows, start = recs[start : start + n], start + n
        shards.append(records.ShardInfo(name, tuple(r["key"] for r in rows),
                                        tuple(records.bucket_key(r["latents"].shape) for r in rows),
                                        tuple(r["dataset"] for r in rows)))
    keep = set(active)
    return records.write_manifest(d, shards, latent_channels=C, text_dim=D, text_len=L,
                                  datasets={k: v.repeats for k, v in man.datasets.items()},
                                  active_records=[k in keep for s in shards for k in s.keys])


def test_inactive_records_stay_readable_but_out_of_the_epoch(tmp_path, cache, caplog):
    """Records marked inactive (items no longer in the dataset list) keep their place and can be read, but the epoch
    plan leaves them out, and a bucket without active records is not planned (nor warned about)."""
    d = copy_cache(cache, tmp_path / "c")
    assert "active_items" not in json.loads((d / "manifest.json").read_text())  # all active: the format as before
    keys = [CacheSource(d)[i]["key"] for i in range(12)]
    # item i: bucket (2x4x6, 3x4x4)[i % 2], dataset ("a", "a", "b", "b")[i % 4]; keep a's records of bucket 2x4x6
    man = _remanifest(d, [keys[i] for i in (0, 4, 8)])
    assert (man.items, man.active_items) == (12, 3)
    assert man.active_buckets == {f"{C}x2x4x6": 3, f"{C}x3x4x4": 0} and man.buckets == {f"{C}x2x4x6": 6, f"{C}x3x4x4": 6}
    assert {k: (v.items, v.active) for k, v in man.datasets.items()} == {"a": (6, 3), "b": (6, 0)}
    assert read_record_index(man).active.tolist() == [i in (0, 4, 8) for i in range(12)]
    with caplog.at_level(logging.WARNING):
        it = make_batch_iterator(d, global_batch_size=1, seed=0, num_epochs=1)
    assert sorted(int(b["index"][0]) for b in it) == [0, 4, 8] and "3x4x4" not in caplog.text
    assert CacheSource(d)[1]["key"] == keys[1]  # an inactive record is still there
    good = (d / "manifest.json").read_text()
    (d / "manifest.json").write_text(json.dumps({**json.loads(good), "active_items": 5}))
    with pytest.raises(ValueError, match="bucket active counts sum to 3, active_items is 5"):
        read_manifest(d)
    (d / "manifest.json").write_text(good)
    _remanifest(d, [])
    with pytest.raises(ValueError, match="none of its 12 records is active"):
        make_batch_iterator(d, global_batch_size=1, seed=0)
    _remanifest(d, keys)  # all active again: the manifest reads as the original one
    assert json.loads((d / "manifest.json").read_text()) == {**json.loads((cache / "manifest.json").read_text()),
                                                             "source": {}}
