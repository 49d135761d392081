"""The caching job: videos + captions -> the trainer's cache. Small generated videos, test-double encoders;
bad files skipped and reported, 2 processes == 1, resume after a crash, SimpleTuner dataset lists parsed.

TEST DOUBLES (not the Wan VAE / UMT5; the real encoders get their own end-to-end test):
- `fake_vae`: (B, 3, F, H, W) -> (B, C, 1 + (F-1)//4, H/8, W/8): frame 0 alone then means of 4-frame groups (the causal
  VAE's time layout), 8x8 mean pooling, a fixed random 3 -> C projection, tanh. Row-independent and deterministic.
- `fake_text`: whitespace tokens + an EOS token, each token's row drawn from a generator seeded by its hash; zero
  padded to TEXT_LEN, like UMT5's output; "" has one token (EOS) as in Wan.
"""

import json
import os
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import av
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from ml_collections import ConfigDict

from wanjax.cache import CacheConfigError, CacheError, Encoders, build_cache, main, pending
from wanjax.data import records, sources, video
from wanjax.data.pipeline import make_batch_iterator

ROOT = Path(__file__).resolve().parents[1]
SEEDS = Path(__file__).parent / "fixtures" / "simpletuner"
C, D, TEXT_LEN = 16, 32, 40
_PROJ = np.random.default_rng(1234).standard_normal((3, C)).astype(np.float32)


# -- test doubles ---------------------------------------------------------------------------------------------
@jax.jit
def fake_vae(x):
    b, c, f, h, w = x.shape
    t = jnp.concatenate([x[:, :, :1], x[:, :, 1:].reshape(b, c, (f - 1) // 4, 4, h, w).mean(axis=3)], axis=2)
    t = t.reshape(b, c, t.shape[2], h // 8, 8, w // 8, 8).mean(axis=(4, 6))
    return jnp.tanh(jnp.einsum("bcfhw,cd->bdfhw", t, _PROJ))


def fake_text(prompts):
    emb = np.zeros((len(prompts), TEXT_LEN, D), np.float32)
    lengths = []
    for i, p in enumerate(prompts):
        tokens = (p.split() + ["</s>"])[:TEXT_LEN]
        for j, t in enumerate(tokens):
            emb[i, j] = np.random.default_rng(zlib.crc32(t.encode())).standard_normal(D)
        lengths.append(len(tokens))
    return emb, np.asarray(lengths)


def fake_encoders(vae=fake_vae, text=fake_text, video_batch_size=2, text_batch_size=3):
    return Encoders(vae, text, latent_channels=C, text_dim=D, spatial_factor=8, text_len=TEXT_LEN,
                    video_batch_size=video_batch_size, text_batch_size=text_batch_size, name="test-double")


# -- data ------------------------------------------------------------------------------------------------------
def write_video(path, width, height, frames, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            img = np.zeros((height, width, 3), np.uint8)
            img[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None]
            img[..., 1] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
            img[..., 2] = (i * 15 + rng.integers(0, 60)) % 256
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def write_png(path):
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(path, format="PNG")


# key -> (clip frames, clip H, clip W): resolution 40 px area at alignment 16 puts 48x32 -> 48x32, 32x48 -> 32x48,
# 40x40 -> 48x48; frame counts trimmed to 4k+1 (11 -> 9)
GOOD = {"clips/a.mp4": (17, 32, 48), "clips/b.mp4": (13, 48, 32), "clips/d.mp4": (9, 32, 48),
        "clips/e.mp4": (17, 32, 48), "clips/sub/c.mp4": (9, 48, 48), "more/a_red_ball.mp4": (9, 48, 48)}
BAD = {"clips/corrupt.mp4": "unreadable", "clips/short.mp4": "too_short", "clips/nocap.mp4": "missing_caption",
       "clips/still.png": "not_a_video", "clips/fake.mp4": "not_a_video"}


def make_dataset(root: Path) -> Path:
    clips, more = root / "clips", root / "more"
    for name, (w, h, n) in {"a": (48, 32, 17), "b": (32, 48, 13), "sub/c": (40, 40, 9), "d": (48, 32, 11),
                            "e": (48, 32, 17), "short": (48, 32, 3), "nocap": (48, 32, 9)}.items():
        write_video(clips / f"{name}.mp4", w, h, n, seed=zlib.crc32(name.encode()))
        if name != "nocap":
            (clips / f"{name}.txt").write_text(f"clip {name.replace('/', ' ')} moves\n")
    (clips / "e.txt").write_text("first line\nsecond line\n")
    (clips / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    (clips / "corrupt.txt").write_text("broken")
    write_png(clips / "still.png")
    (clips / "still.txt").write_text("a still")
    write_png(clips / "fake.mp4")
    (clips / "fake.txt").write_text("an image named like a video")
    write_video(more / "a_red_ball.mp4", 48, 48, 9, seed=7)
    backends = [
        {"id": "clips", "type": "local", "dataset_type": "video", "instance_data_dir": str(clips),
         "caption_strategy": "textfile", "resolution": 40, "resolution_type": "pixel_area", "crop": False,
         "minimum_image_size": 16, "repeats": 0, "cache_dir_vae": "cache/vae/clips", "metadata_backend": "discovery",
         "video": {"min_frames": 5, "bucket_strategy": "aspect_ratio"}, "foo_bar": 1},
        {"id": "more", "type": "local", "dataset_type": "video", "instance_data_dir": str(more),
         "caption_strategy": "filename", "resolution": 40, "resolution_type": "pixel_area", "repeats": 2,
         "video": {"num_frames": 9}},
        {"id": "off", "type": "local", "dataset_type": "video", "instance_data_dir": "/nonexistent", "disabled": True},
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
         "cache_dir": "cache/text/wan", "disabled": False, "write_batch_size": 128},
    ]
    (root / "multidatabackend.json").write_text(json.dumps(backends, indent=1))
    return root / "multidatabackend.json"


def make_config(backend, cache_dir, **extra):
    return ConfigDict({"data_backend_config": str(backend), "cache_dir": str(cache_dir), "cache_shard_size": 4,
                       "pretrained_model_name_or_path": "unused", **extra})


def read_records(cache_dir):
    src = records.CacheSource(cache_dir)
    return {ex["key"]: ex for ex in (src[i] for i in range(len(src)))}


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def one_process(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache1")
    cfg = make_config(dataset, out, validation_prompt="a cat boxing", validation_negative_prompt="blurry")
    return out, build_cache(cfg, encoders=fake_encoders())


# -- the job ---------------------------------------------------------------------------------------------------
def test_caches_good_items_with_right_shapes_and_values(one_process, dataset):
    out, report = one_process
    recs = read_records(out)
    assert set(recs) == set(GOOD) and report.cached == len(GOOD) == report.manifest.items
    specs = {d.id: d for d in sources.with_alignment(sources.read_datasets(dataset)[0], 16)}
    for key, (f, h, w) in GOOD.items():
        ex = recs[key]
        assert ex["latents"].shape == (C, 1 + (f - 1) // 4, h // 8, w // 8), key
        assert ex["latents"].dtype == ml_dtypes.bfloat16
        ds, rel = key.split("/", 1)
        clip = video.load_clip(Path(specs[ds].instance_data_dir) / rel, specs[ds].clip)
        assert clip.shape == (f, h, w, 3)
        want = np.asarray(fake_vae(video.to_model_input([clip])))[0].astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(bits(ex["latents"]), bits(want))  # the right row went to the right key
        emb, n = fake_text([ex["caption"]])
        assert ex["prompt_length"] == n[0] and ex["prompt_embeds"].shape == (TEXT_LEN, D)
        np.testing.assert_array_equal(bits(ex["prompt_embeds"][: n[0]]), bits(emb[0, : n[0]].astype(ml_dtypes.bfloat16)))
        assert not ex["prompt_embeds"][n[0]:].any()
    assert recs["clips/e.mp4"]["caption"] == "first line"
    assert recs["more/a_red_ball.mp4"]["caption"] == "a red ball"
    assert {k: d.repeats for k, d in report.manifest.datasets.items()} == {"clips": 0, "more": 2}
    assert report.manifest.text_len == TEXT_LEN and report.manifest.latent_channels == C


def test_bad_inputs_reported_by_name(one_process):
    out, report = one_process
    assert {k: v["reason"] for k, v in report.skipped.items()} == BAD
    saved = json.loads((out / "cache_report.json").read_text())
    assert {s["key"]: s["reason"] for s in saved["skipped"]} == BAD
    assert saved["skipped_by_reason"] == {"missing_caption": 1, "not_a_video": 2, "too_short": 1, "unreadable": 1}
    assert all(s["detail"] and s["path"] for s in saved["skipped"])
    assert "3 frames" in report.skipped["clips/short.mp4"]["detail"]
    assert saved["datasets"]["clips"] == {"skipped": 5, "repeats": 0, "cached": 5}
    assert report.summary().startswith("cached 6 of 11 items (5 skipped: 1 missing_caption, 2 not_a_video")
    notes = {(n["dataset"], n["key"]) for n in saved["config_notes"]}
    assert {("clips", "foo_bar"), ("clips", "cache_dir_vae"), ("clips", "video.bucket_strategy"),
            ("off", "disabled"), ("text-embeds", "write_batch_size"), ("clips", "caption_strategy")} <= notes
    assert "unknown key" in next(n["note"] for n in saved["config_notes"] if n["key"] == "foo_bar")
    assert not list(out.rglob("*.partial"))


def test_side_files_and_trainer_reads_cache(one_process):
    out, _ = one_process
    empty = records.read_text_embeds(out / records.EMPTY_PROMPT_FILE)["empty"]
    np.testing.assert_array_equal(bits(empty), bits(fake_text([""])[0][0, :1].astype(ml_dtypes.bfloat16)))
    val = records.read_text_embeds(out / records.VALIDATION_PROMPTS_FILE)
    assert sorted(val) == ["validation_negative_prompt", "validation_prompt"]
    assert val["validation_prompt"].shape == (4, D) and val["validation_negative_prompt"].shape == (2, D)
    # the trainer finds the negative prompt by its text (distillation CFG's unconditional branch)
    from wanjax.train import _cached_text_embeds

    embeds = _cached_text_embeds(out, TEXT_LEN, jax.sharding.Mesh(jax.devices()[:1], ("data",)), "blurry")
    np.testing.assert_array_equal(np.asarray(embeds["negative"])[:2], val["validation_negative_prompt"].astype(np.float32))
    assert not np.asarray(embeds["negative"])[2:].any() and embeds["empty"].shape == (TEXT_LEN, D)
    assert "negative" not in _cached_text_embeds(out, TEXT_LEN, jax.sharding.Mesh(jax.devices()[:1], ("data",)),
                                                  "another negative")
    it = make_batch_iterator(out, global_batch_size=1, seed=0, num_epochs=1)
    seen = [str(b["keys"][0]) for b in it]
    assert sorted(seen) == sorted(list(GOOD) + ["more/a_red_ball.mp4"] * 2)  # repeats 2: seen 3 times
    recs = read_records(out)
    for b in make_batch_iterator(out, global_batch_size=1, seed=0, num_epochs=1):
        k = str(b["keys"][0])
        assert b["latents"].shape == (1, *recs[k]["latents"].shape) and b["prompt_lengths"][0] == recs[k]["prompt_length"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(one_process, dataset, tmp_path):
    """Real 2-process run (jax.distributed on localhost, 1 CPU device each): same records, bit for bit."""
    out1, _ = one_process
    out2 = tmp_path / "cache2"
    cfg = json.dumps(make_config(dataset, out2, validation_prompt="a cat boxing").to_dict())
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2")
    procs = [subprocess.Popen([sys.executable, __file__, cfg], env={**env, "JAX_PROCESS_ID": str(i)}, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[1][-3000:] for o in outs)
    encoded = [json.loads(o[0].strip().splitlines()[-1])["encoded"] for o in outs]
    assert sorted(encoded) == [3, 3]  # items 0,2,4,6,8 vs 1,3,5,7 of 9 candidates, bad ones skipped
    m = records.read_manifest(out2)
    assert {s.split("-")[1] for s in m.shards} == {"p000", "p001"}
    a, b = read_records(out1), read_records(out2)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k]["caption"] == b[k]["caption"] and a[k]["dataset"] == b[k]["dataset"]
        for t in ("latents", "prompt_embeds"):
            np.testing.assert_array_equal(bits(a[k][t]), bits(b[k][t]), err_msg=f"{k} {t}")
    rep = json.loads((out2 / "cache_report.json").read_text())
    assert {s["key"]: s["reason"] for s in rep["skipped"]} == BAD


class CrashOnCall:
    """Wraps the text double; raises on the n-th call (a job killed mid-chunk)."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self, prompts):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("simulated crash")
        return fake_text(prompts)


def test_resume_after_crash_skips_done_items(one_process, dataset, tmp_path):
    out = tmp_path / "cache"
    cfg = make_config(dataset, out, cache_shard_size=3)
    # items: a b corrupt | d e fake | short c a_red_ball; one prompt per text call -> call 6 is a_red_ball,
    # with c already written into the third (partial) shard
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_cache(cfg, encoders=fake_encoders(text=CrashOnCall(6), text_batch_size=1))
    assert not (out / records.MANIFEST).exists()
    assert [p.name for p in out.glob("*.partial")] == ["records-p000-00002.array_record.partial"]
    done = [json.loads(f.read_text()) for f in sorted((out / "progress").glob("records-p*.json"))]
    assert [sorted(d["keys"]) for d in done] == [["clips/a.mp4", "clips/b.mp4"], ["clips/d.mp4", "clips/e.mp4"]]
    assert [d["name"] for d in done] == ["records-p000-00000.array_record", "records-p000-00001.array_record"]
    before = {p.name: p.read_bytes() for p in out.glob("*.array_record")}
    # a shard renamed but killed before its done-list, and a done-list whose shard was deleted: both ignored
    (out / "records-p000-00007.array_record").write_bytes(before["records-p000-00000.array_record"])
    (out / "progress" / "records-p000-00009.json").write_text(json.dumps({**done[0], "name": "gone.array_record"}))

    report = build_cache(cfg, encoders=fake_encoders(text_batch_size=1))
    assert report.encoded_here == 2 and report.cached == len(GOOD)
    assert all((out / n).read_bytes() == data for n, data in before.items())  # done shards untouched
    assert not list(out.glob("*.partial")) and not (out / "records-p000-00007.array_record").exists()
    assert not (out / "progress" / "records-p000-00009.json").exists()
    assert report.manifest.shards == ("records-p000-00000.array_record", "records-p000-00001.array_record",
                                      "records-p000-00002.array_record")
    ref, got = read_records(one_process[0]), read_records(out)
    assert ref.keys() == got.keys()
    for k in ref:
        np.testing.assert_array_equal(bits(ref[k]["latents"]), bits(got[k]["latents"]))
        np.testing.assert_array_equal(bits(ref[k]["prompt_embeds"]), bits(got[k]["prompt_embeds"]))
    again = build_cache(cfg, encoders=fake_encoders(text=CrashOnCall(1)))  # nothing left to encode
    assert again.encoded_here == 0 and again.manifest.items == len(GOOD)
    assert {k: v["reason"] for k, v in again.skipped.items()} == BAD
    # other settings for the same cache are refused
    with pytest.raises(CacheError, match="other settings.*cache_dtype"):
        build_cache(make_config(dataset, out, cache_shard_size=3, cache_dtype="fp32"), encoders=fake_encoders())


def test_pending_says_what_the_trainer_must_cache(tmp_path):
    """`pending` (the trainer's check before it loads encoders): None for a current cache (bad files skipped last time
    count as seen); a new file, a changed dataset setting or repeats, or no cache at all need the caching job."""
    backend = make_dataset(tmp_path / "data")
    cfg = make_config(backend, tmp_path / "cache")
    assert pending(cfg) == "no cache yet"
    build_cache(cfg, encoders=fake_encoders())
    assert pending(cfg) is None
    write_video(tmp_path / "data" / "clips" / "new.mp4", 48, 32, 9, seed=3)
    (tmp_path / "data" / "clips" / "new.txt").write_text("a new clip")
    assert pending(cfg) == "1 files not cached yet (e.g. clips/new.mp4)"
    assert build_cache(cfg, encoders=fake_encoders()).encoded_here == 1 and pending(cfg) is None
    lists = json.loads(backend.read_text())
    for change, why in (({"repeats": 3}, "repeats of datasets ['clips'] changed"),
                        ({"resolution": 48}, "datasets ['clips'] are new or their settings changed"),
                        ({"id": "renamed"}, "datasets ['renamed'] are new or their settings changed")):
        changed = [dict(lists[0], **change), *lists[1:]]
        (tmp_path / "changed.json").write_text(json.dumps(changed))
        assert pending(make_config(tmp_path / "changed.json", tmp_path / "cache")) == why
    (tmp_path / "fewer.json").write_text(json.dumps(lists[:1]))  # a dataset dropped: its records stay, inactive
    assert pending(make_config(tmp_path / "fewer.json", tmp_path / "cache")).startswith(
        "1 cached records are trained on but no longer in the dataset list (e.g. more/a_red_ball.mp4")
    assert "cache_dtype bf16 -> fp32" in pending(make_config(backend, tmp_path / "cache", cache_dtype="fp32"))
    (tmp_path / "cache" / "progress" / "settings.json").unlink()  # not made by the caching job: used as it is
    assert pending(cfg) is None


def test_sequential_process_shares_then_merge(dataset, tmp_path):
    cfg = make_config(dataset, tmp_path / "c")
    with pytest.raises(CacheError, match="neither cached nor skipped"):  # process 1 has not run yet
        build_cache(cfg, encoders=fake_encoders(), process_index=0, process_count=2)
    r1 = build_cache(cfg, encoders=fake_encoders(), process_index=1, process_count=2)
    assert r1.manifest is None
    r0 = build_cache(cfg, encoders=fake_encoders(), process_index=0, process_count=2)
    assert r0.encoded_here == 0 and set(read_records(tmp_path / "c")) == set(GOOD)


def test_nothing_usable_fails_clearly(tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "corrupt.mp4").write_bytes(b"\x00" * 100)
    (clips / "corrupt.txt").write_text("x")
    write_video(clips / "nocap.mp4", 32, 32, 5)
    cfg_path = tmp_path / "db.json"
    cfg_path.write_text(json.dumps([{"id": "v", "dataset_type": "video", "instance_data_dir": str(clips)}]))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "v", "dataset_type": "video", "instance_data_dir": str(tmp_path / "nope")}]))
    with pytest.raises(CacheConfigError, match="instance_data_dir=.*nope.*is not a directory"):
        build_cache(make_config(bad, tmp_path / "out"), encoders=fake_encoders())
    with pytest.raises(CacheError, match="no usable items.*1 missing_caption, 1 unreadable"):
        build_cache(make_config(cfg_path, tmp_path / "out"), encoders=fake_encoders())
    assert not (tmp_path / "out" / records.MANIFEST).exists()
    rep = json.loads((tmp_path / "out" / "cache_report.json").read_text())
    assert {s["key"]: s["reason"] for s in rep["skipped"]} == {"v/corrupt.mp4": "unreadable",
                                                               "v/nocap.mp4": "missing_caption"}


def test_cli_exit_codes(tmp_path, capsys):
    clips = tmp_path / "clips"
    write_video(clips / "nocap.mp4", 32, 32, 5)
    cfg_path = tmp_path / "db.json"
    cfg_path.write_text(json.dumps([{"id": "v", "dataset_type": "video", "instance_data_dir": str(clips)}]))
    base = ["cache", f"--config={ROOT / 'configs' / 'lora.py'}", f"--config.cache_dir={tmp_path / 'out'}"]
    assert main([*base, f"--config.data_backend_config={cfg_path}"]) == 1  # before any encoder is loaded
    err = capsys.readouterr().err
    assert "no usable items" in err and "missing_caption" in err
    assert main([*base, "--config.cache_dirr=x"]) == 2 and "unknown config key 'cache_dirr'" in capsys.readouterr().err
    assert main(base) == 2 and "data_backend_config is not set" in capsys.readouterr().err


# -- dataset lists ---------------------------------------------------------------------------------------------
def test_seed_multidatabackend_parsed():
    datasets, notes = sources.read_datasets(SEEDS / "multidatabackend.json")
    (ds,) = datasets
    assert ds.id == "disney-black-and-white" and ds.type == "local" and ds.repeats == 0
    assert ds.instance_data_dir == "datasets/disney-black-and-white" and ds.caption_strategy == "textfile"
    c = ds.clip
    assert (c.num_frames, c.min_frames, c.resolution, c.resolution_type, c.crop, c.minimum_image_size) == \
        (75, 75, 480, "pixel_area", False, 480)
    noted = {(n["dataset"], n["key"]) for n in notes}
    assert noted == {("disney-black-and-white", k) for k in ("cache_dir_vae", "maximum_image_size",
                                                             "target_downsample_size", "video.bucket_strategy")} | \
        {("text-embeds", k) for k in ("type", "default", "cache_dir", "write_batch_size")}
    with pytest.raises(sources.DatasetConfigError, match="needs an 'id'"):
        sources.read_datasets(SEEDS / "dmd-dataset.json")


def test_dataset_list_errors_and_options(tmp_path):
    def parse(entries):
        p = tmp_path / "db.json"
        p.write_text(json.dumps(entries))
        return sources.read_datasets(p)

    base = {"id": "v", "dataset_type": "video", "instance_data_dir": "x"}
    for bad, msg in [({"resolution_type": "megapixel"}, "resolution_type"), ({"type": "aws"}, "type='aws'"),
                     ({"caption_strategy": "huggingface"}, "caption_strategy"), ({"repeats": -1}, "repeats"),
                     ({"video": {"num_frames": 0}}, "num_frames")]:
        with pytest.raises(sources.DatasetConfigError, match=msg):
            parse([{**base, **bad}])
    with pytest.raises(sources.DatasetConfigError, match="no enabled"):
        parse([{**base, "disabled": True}])
    with pytest.raises(sources.DatasetConfigError, match="more than once"):
        parse([base, base])
    (ds,), notes = parse([{**base, "num_frames": 121, "frame_interval": 1, "cache_dir": "c", "crop": "true",
                           "crop_style": "random", "probability": 0.5}])  # dmd-dataset.json style
    assert ds.clip.num_frames == 121 and ds.clip.crop is True and ds.clip.crop_style == "center"
    assert {n["key"] for n in notes} == {"cache_dir", "crop_style", "probability"}
    (ds,), _ = sources.read_datasets("tfds:my_videos:validation")
    assert ds.type == "tfds" and ds.tfds["name"] == "my_videos" and ds.tfds["split"] == "validation"
    # trainer-level resolution settings are defaults for datasets without their own (SimpleTuner)
    (a, b), _ = parse([{**base, "resolution": 720}, {**base, "id": "w"}])
    (a2, b2), _ = sources.read_datasets(tmp_path / "db.json", {"resolution": 240, "resolution_type": "pixel"})
    assert (a.clip.resolution, b.clip.resolution, a2.clip.resolution, b2.clip.resolution) == (720, 480, 720, 240)
    assert b2.clip.resolution_type == "pixel"


def test_caption_strategies(tmp_path):
    root = tmp_path / "v"
    for name in ("x_one", "y_two", "sub/z"):
        write_video(root / f"{name}.mp4", 32, 32, 5)
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "x_one.mp4", "caption": "from jsonl"}) + "\n" +
                                         json.dumps({"file_name": "sub/z.mp4", "text": "fallback text"}) + "\n")
    (tmp_path / "cap.json").write_text(json.dumps([{"id": "x_one", "cap": ["first", "second"]}]))
    base = {"id": "v", "dataset_type": "video", "instance_data_dir": str(root)}

    def captions(**opts):
        p = tmp_path / "db.json"
        p.write_text(json.dumps([{**base, **opts}]))
        found = sources.discover(sources.read_datasets(p)[0])
        return {i.key: i.caption for i in found.items}, {k: s["reason"] for k, s in found.skipped.items()}

    assert captions(caption_strategy="jsonl") == ({"v/sub/z.mp4": "fallback text", "v/x_one.mp4": "from jsonl"},
                                                  {"v/y_two.mp4": "missing_caption"})
    assert captions(caption_strategy="filename")[0] == {"v/sub/z.mp4": "z", "v/x_one.mp4": "x one",
                                                        "v/y_two.mp4": "y two"}
    assert captions(caption_strategy="instanceprompt", instance_prompt="sks")[0]["v/y_two.mp4"] == "sks"
    assert captions(caption_strategy="filename", prepend_instance_prompt=True,
                    instance_prompt="sks")[0]["v/y_two.mp4"] == "sks y two"
    got = captions(caption_strategy="parquet", parquet={"path": str(tmp_path / "cap.json"), "filename_column": "id",
                                                         "caption_column": "cap"})
    assert got == ({"v/x_one.mp4": "first"}, {"v/sub/z.mp4": "missing_caption", "v/y_two.mp4": "missing_caption"})
    assert len(captions(caption_strategy="filename", max_num_samples=2)[0]) == 2


# -- frames and sizes ------------------------------------------------------------------------------------------
def test_bucket_sizes_and_frame_rules():
    spec = video.ClipSpec(resolution=480)  # pixel_area: ~480 x 480 pixels, sides multiples of 16
    assert video.target_size(1920, 1080, spec) == (640, 368)
    assert video.target_size(1920, 1080, video.ClipSpec(resolution=480, alignment=32)) == (640, 352)
    assert video.target_size(1080, 1920, spec) == (368, 640)
    assert video.target_size(1920, 1080, video.ClipSpec(resolution=480, crop=True)) == (480, 480)  # square crop
    assert video.target_size(1920, 1080, video.ClipSpec(resolution=480, resolution_type="pixel")) == (848, 480)
    assert video.target_size(1000, 1000, video.ClipSpec(resolution=0.25, resolution_type="area")) == (496, 496)
    with pytest.raises(video.Skip, match="too_small"):
        video.check_size(320, 240, video.ClipSpec(minimum_image_size=480))
    s = video.ClipSpec(num_frames=75, min_frames=75)
    assert video.frame_count(80, s) == 73 and video.frame_count(75, s) == 73
    with pytest.raises(video.Skip, match="too_short: 74 frames, min_frames is 75"):
        video.frame_count(74, s)
    with pytest.raises(video.Skip, match="too_long"):
        video.frame_count(120, video.ClipSpec(max_frames=100))
    assert video.frame_count(17, video.ClipSpec()) == 17 and video.frame_count(16, video.ClipSpec()) == 13
    assert video.frame_count(23, video.ClipSpec(frame_interval=8)) == 13  # 23 -> 16 -> 4k+1
    assert video.frame_count(3, video.ClipSpec()) == 1


def test_load_clip_stride_crop_and_normalisation(tmp_path):
    write_video(tmp_path / "v.mp4", 64, 32, 20)
    clip = video.load_clip(tmp_path / "v.mp4", video.ClipSpec(resolution=40, frame_stride=2))
    assert clip.shape == (9, 32, 64, 3)  # 10 strided frames -> 9; 2:1 at 40x40 px area -> 57x28 -> 64x32
    crop = video.load_clip(tmp_path / "v.mp4", video.ClipSpec(resolution=40, crop=True, num_frames=5))
    assert crop.shape == (5, 48, 48, 3)  # square, 40 rounded to 48
    # the red channel is a horizontal ramp: the square centre crop keeps the middle of it
    assert abs(int(crop[0, 24, 24, 0]) - 128) < 12 and crop[0, 24, 0, 0] > 40
    x = video.to_model_input([clip, clip])
    assert x.shape == (2, 3, 9, 32, 64) and x.dtype == np.float32 and -1 <= x.min() and x.max() <= 1
    with pytest.raises(video.Skip, match="not_a_video"):
        video.prepare_frames(np.zeros((32, 32, 3), np.uint8), video.ClipSpec())
    write_png(tmp_path / "i.png")  # an image dataset: one frame per file
    assert video.load_clip(tmp_path / "i.png", video.ClipSpec(resolution=32, image=True)).shape == (1, 32, 32, 3)
    assert video.prepare_frames(np.zeros((32, 32, 1), np.uint8), video.ClipSpec(resolution=32, image=True)).shape \
        == (1, 32, 32, 3)


def test_tfds_source(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyClips(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "frames": tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8, encoding="zlib"),
                "text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            rng = np.random.default_rng(0)
            for i, (f, h, w, cap) in enumerate([(9, 32, 48, "one"), (6, 48, 32, "two"), (5, 32, 32, "")]):
                yield i, {"frames": rng.integers(0, 255, (f, h, w, 3), dtype=np.uint8), "text": cap}

    TinyClips(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    db = tmp_path / "db.json"
    db.write_text(json.dumps([{"id": "tf", "type": "tfds", "tfds_name": "tiny_clips", "split": "train",
                               "data_dir": str(tmp_path / "tfds"), "video_key": "frames", "caption_key": "text",
                               "resolution": 40}]))
    report = build_cache(make_config(db, tmp_path / "out"), encoders=fake_encoders())
    recs = read_records(tmp_path / "out")
    assert {k: (r["caption"], r["latents"].shape) for k, r in recs.items()} == {
        "tf/train/00000000": ("one", (C, 3, 4, 6)), "tf/train/00000001": ("two", (C, 2, 6, 4))}
    assert {k: v["reason"] for k, v in report.skipped.items()} == {"tf/train/00000002": "missing_caption"}


if __name__ == "__main__":  # a worker of test_two_processes_match_one: python tests/test_cache.py CONFIG_JSON
    from wanjax.sharding import maybe_initialize_distributed

    maybe_initialize_distributed()
    rep = build_cache(ConfigDict(json.loads(sys.argv[1])), encoders=fake_encoders())
    print(json.dumps({"encoded": rep.encoded_here}))


# -- prompts datasets (DMD: prompts, no videos) ----------------------------------------------------------------
def test_prompts_dataset_caches_embeddings_and_latent_shape_only(tmp_path):
    (tmp_path / "p.txt").write_text("a cat boxing\n\n  a dog surfing  \nrain on a window\n")
    (tmp_path / "lib.json").write_text(json.dumps({"cat": "a cat boxing", "sea": "waves at dusk"}))
    backends = [
        {"id": "txt", "dataset_type": "prompts", "prompts_file": str(tmp_path / "p.txt"), "width": 48, "height": 32,
         "num_frames": 9, "repeats": 1, "crop": True},
        {"id": "lib", "dataset_type": "prompts", "prompts_file": str(tmp_path / "lib.json"), "width": 32,
         "height": 32, "num_frames": 5},
    ]
    (tmp_path / "db.json").write_text(json.dumps(backends))
    out = tmp_path / "cache"
    report = build_cache(make_config(tmp_path / "db.json", out), encoders=fake_encoders())
    assert report.cached == 5
    assert {(n["dataset"], n["key"]) for n in report.notes} == {("txt", "crop")}  # reported, not dropped
    man = records.read_manifest(out)
    assert man.prompt_only == ["lib", "txt"]
    assert man.buckets == {"16x3x4x6": 3, "16x2x4x4": 2}  # (C, (F-1)//4+1, H/8, W/8)
    recs = read_records(out)
    assert sorted(r["caption"] for r in recs.values()) == sorted(
        ["a cat boxing", "a dog surfing", "rain on a window", "a cat boxing", "waves at dusk"])
    for r in recs.values():
        assert "latents" not in r
        want, n = fake_text([r["caption"]])
        np.testing.assert_array_equal(bits(r["prompt_embeds"][: n[0]]),
                                      bits(want[0, : n[0]].astype(ml_dtypes.bfloat16)))
    batches = list(make_batch_iterator(out, global_batch_size=1, seed=0, num_epochs=1))
    assert len(batches) == 3 * 2 + 2  # repeats 1 on "txt"
    for b in batches:
        k = str(b["keys"][0])
        assert b["latents"].shape == (1, *recs[k]["latent_shape"]) and not b["latents"].any()


def test_prompts_dataset_errors(tmp_path):
    def parse(entry):
        (tmp_path / "db.json").write_text(json.dumps([{"id": "p", "dataset_type": "prompts", **entry}]))
        return sources.read_datasets(tmp_path / "db.json")

    with pytest.raises(sources.DatasetConfigError, match="needs prompts_file"):
        parse({})
    with pytest.raises(sources.DatasetConfigError, match="num_frames=10: Wan clips have 4k\\+1 frames"):
        parse({"prompts_file": "x.txt", "num_frames": 10})
    with pytest.raises(sources.DatasetConfigError, match="width='wide' is not an integer"):
        parse({"prompts_file": "x.txt", "width": "wide"})
    (tmp_path / "bad.json").write_text(json.dumps(["ok", "", 3]))
    with pytest.raises(sources.DatasetConfigError, match=r"bad.json.*entries \[1, 2\] are not non-empty strings"):
        sources.discover(parse({"prompts_file": str(tmp_path / "bad.json")})[0])
    with pytest.raises(sources.DatasetConfigError, match="missing.txt.*not readable"):
        sources.discover(parse({"prompts_file": str(tmp_path / "missing.txt")})[0])
    (tmp_path / "p.txt").write_text("a prompt\n")
    with pytest.raises(CacheConfigError, match="height=40, width=48 must be multiples of 16"):
        build_cache(make_config(tmp_path / "db.json", tmp_path / "c"), encoders=fake_encoders()) if parse(
            {"prompts_file": str(tmp_path / "p.txt"), "height": 40, "width": 48}) else None


# -- active records, max_num_samples, text files, folders, caption tables, rotation ----------------------------
def _two_datasets(root: Path, drop_entry: dict | None = None) -> Path:
    """Datasets "keep" and "drop" (repeats 3) of two 48x32 clips each; `drop_entry` replaces drop's entry (None:
    as made; {}: removed from the list)."""
    for ds in ("keep", "drop"):
        for i in range(2):
            if not (root / ds / f"v{i}.mp4").exists():
                write_video(root / ds / f"v{i}.mp4", 48, 32, 9, seed=i)
                (root / ds / f"v{i}.txt").write_text(f"{ds} clip {i}")
    entry = {"type": "local", "dataset_type": "video", "caption_strategy": "textfile", "resolution": 40}
    drop = {**entry, "id": "drop", "instance_data_dir": str(root / "drop"), "repeats": 3}
    if drop_entry is not None:
        drop = {**drop, **drop_entry} if drop_entry else None
    backends = [{**entry, "id": "keep", "instance_data_dir": str(root / "keep")}] + ([drop] if drop else [])
    (root / "db.json").write_text(json.dumps(backends))
    return root / "db.json"


def _epoch(cache_dir):
    return sorted(str(b["keys"][0]) for b in make_batch_iterator(cache_dir, global_batch_size=1, seed=0, num_epochs=1))


def test_disabled_removed_or_deleted_items_are_not_trained_on_but_kept(tmp_path):
    """A dataset disabled or removed, or a file deleted: `pending` asks for a new manifest, the rerun encodes nothing,
    the epoch leaves those records out, and they stay on disk; listed again, they are trained on again without
    re-encoding."""
    cfg = make_config(_two_datasets(tmp_path), tmp_path / "cache")
    build_cache(cfg, encoders=fake_encoders())
    everything = ["drop/v0.mp4"] * 4 + ["drop/v1.mp4"] * 4 + ["keep/v0.mp4", "keep/v1.mp4"]
    assert _epoch(tmp_path / "cache") == everything and pending(cfg) is None
    for change in ({"disabled": True}, {}):  # disabled, then removed from the list
        _two_datasets(tmp_path, change)
        why = pending(cfg)
        assert why is not None and "2 cached records are trained on but no longer in the dataset list" in why, why
        assert "drop/v0.mp4" in why
        report = build_cache(cfg, encoders=fake_encoders(vae=None, text=None))  # nothing to encode
        assert report.encoded_here == 0 and report.cached == 2 and report.stale == 2 and pending(cfg) is None
        assert _epoch(tmp_path / "cache") == ["keep/v0.mp4", "keep/v1.mp4"]
        man = records.read_manifest(tmp_path / "cache")
        assert (man.items, man.active_items) == (4, 2) and man.datasets["drop"] == records.DatasetInfo(3, 2, True, 0)
        assert set(read_records(tmp_path / "cache")) == {"keep/v0.mp4", "keep/v1.mp4", "drop/v0.mp4", "drop/v1.mp4"}
        rep = json.loads((tmp_path / "cache" / "cache_report.json").read_text())
        assert rep["stale"] == 2 and rep["stale_by_dataset"] == {"drop": 2} and rep["buckets"] == {"16x3x4x6": 2}
        _two_datasets(tmp_path)  # listed again: trained on again, nothing re-encoded
        assert "2 cached records are in the dataset list but not trained on (e.g. drop/v0.mp4)" in pending(cfg)
        assert build_cache(cfg, encoders=fake_encoders(vae=None, text=None)).encoded_here == 0
        assert _epoch(tmp_path / "cache") == everything and pending(cfg) is None
    (tmp_path / "keep" / "v1.mp4").unlink()  # a deleted file
    assert "1 cached records are trained on but no longer in the dataset list (e.g. keep/v1.mp4" in pending(cfg)
    build_cache(cfg, encoders=fake_encoders(vae=None, text=None))
    assert _epoch(tmp_path / "cache") == everything[:-1]


def test_manifest_of_older_jobs_counts_every_record_active(tmp_path):
    """A cache merged before records had active flags (no `active` in the manifest or index) trained on every record:
    it still reads that way, and `pending` asks for the merge that stops training on a disabled dataset."""
    cfg = make_config(_two_datasets(tmp_path), tmp_path / "cache")
    build_cache(cfg, encoders=fake_encoders())
    _two_datasets(tmp_path, {"disabled": True})
    build_cache(cfg, encoders=fake_encoders(vae=None, text=None))
    from wanjax.safetensors_io import SafetensorsFile, write_safetensors

    out = tmp_path / "cache"
    m = json.loads((out / "manifest.json").read_text())  # as the job wrote it before: every record counted
    m.pop("active_items")
    for part in (*m["datasets"].values(), *m["buckets"].values()):
        part.pop("active", None)
    (out / "manifest.json").write_text(json.dumps(m))
    f = SafetensorsFile(out / records.INDEX)
    arrays = {k: f.read(k) for k in ("bucket", "dataset")}
    write_safetensors(out / records.INDEX, [(k, a.dtype, a.shape) for k, a in arrays.items()], arrays.__getitem__,
                      metadata=f.metadata)
    man = records.read_manifest(out)
    assert man.active_items == man.items == 4 and man.datasets["drop"].active == 2
    assert len(_epoch(out)) == 2 + 2 * 4
    assert "2 cached records are trained on but no longer in the dataset list" in pending(cfg)
    build_cache(cfg, encoders=fake_encoders(vae=None, text=None))
    assert _epoch(out) == ["keep/v0.mp4", "keep/v1.mp4"]


def test_max_num_samples_is_stable_and_nested(tmp_path):
    """The subset is the items with the lowest crc32(key): a smaller max_num_samples keeps a subset of a larger one's
    pick, and one new file changes the pick by at most one item."""
    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(10):
        (clips / f"v{i:02d}.mp4").write_bytes(b"")  # discovery reads names only

    def pick(n):
        (tmp_path / "db.json").write_text(json.dumps([{"id": "c", "dataset_type": "video", "max_num_samples": n,
                                                        "instance_data_dir": str(clips), "caption_strategy": "filename"}]))
        return [it.key for it in sources.discover(sources.read_datasets(tmp_path / "db.json")[0]).items]

    four, two = pick(4), pick(2)
    assert set(two) < set(four) and four == sorted(four) and len(four) == 4
    keys = sorted((f"c/v{i:02d}.mp4" for i in range(10)), key=lambda k: (zlib.crc32(k.encode()), k))
    assert four == sorted(keys[:4])
    (clips / "v10.mp4").write_bytes(b"")
    assert len(set(pick(4)) - set(four)) <= 1 and set(pick(2)) <= set(pick(4))


def test_utf8_bom_is_ignored_in_captions_tables_and_prompts(tmp_path):
    bom = "\ufeff".encode()
    clips = tmp_path / "clips"
    clips.mkdir()
    for n in ("a", "b"):
        (clips / f"{n}.mp4").write_bytes(b"")
    (clips / "a.txt").write_bytes(bom + "a cat walking\n".encode())
    (clips / "b.txt").write_bytes(bom + b"\r\n")  # a BOM alone is no caption
    (clips / "metadata.jsonl").write_bytes(bom + b'{"file_name": "a.mp4", "caption": "from jsonl"}\r\n')
    (tmp_path / "t.json").write_bytes(bom + b'[{"filename": "a", "caption": "from json"}]')
    (tmp_path / "p.txt").write_bytes(bom + b"first prompt\nsecond prompt\n")
    (tmp_path / "p.json").write_bytes(bom + b'{"one": "a prompt"}')

    def found(**entry):
        (tmp_path / "db.json").write_text(json.dumps([{"id": "c", "dataset_type": "video",
                                                        "instance_data_dir": str(clips), **entry}]))
        got = sources.discover(sources.read_datasets(tmp_path / "db.json")[0])
        return {i.key: i.caption for i in got.items}, {k: s["reason"] for k, s in got.skipped.items()}

    assert found() == ({"c/a.mp4": "a cat walking"}, {"c/b.mp4": "missing_caption"})
    assert found(caption_strategy="jsonl")[0] == {"c/a.mp4": "from jsonl"}
    assert found(caption_strategy="parquet", parquet={"path": str(tmp_path / "t.json")})[0] == {"c/a.mp4": "from json"}
    assert sources.read_prompts(tmp_path / "p.txt") == ["first prompt", "second prompt"]
    assert sources.read_prompts(tmp_path / "p.json") == ["a prompt"]
    from wanjax.cache import _prompt_library

    assert _prompt_library(ConfigDict({"validation_prompt_library": str(tmp_path / "p.json")}), []) == \
        {"library/one": "a prompt"}


def test_symlink_loop_and_second_link_listed_once(tmp_path):
    clips = tmp_path / "clips"
    (clips / "sub").mkdir(parents=True)
    for rel in ("v.mp4", "sub/w.mp4"):
        (clips / rel).write_bytes(b"")
    os.symlink(".", clips / "loop")  # ln -s . clips/loop
    os.symlink("sub", clips / "sub2")  # a second link to one folder
    (tmp_path / "db.json").write_text(json.dumps([{"id": "c", "dataset_type": "video", "instance_data_dir": str(clips),
                                                    "caption_strategy": "filename"}]))
    got = sources.discover(sources.read_datasets(tmp_path / "db.json")[0])
    assert [i.key for i in got.items] == ["c/sub/w.mp4", "c/v.mp4"]
    notes = {n["key"]: n["note"] for n in got.notes}
    assert set(notes) == {"loop", "sub2"}
    assert "reached again through a symlink" in notes["loop"] and "'.'" in notes["loop"] and "'sub'" in notes["sub2"]


def test_bad_prompt_library_fails_before_encoding(tmp_path):
    """Checked before any clip is decoded or encoded; the last run's report is left as it was."""
    cfg = make_config(_two_datasets(tmp_path), tmp_path / "cache")
    build_cache(cfg, encoders=fake_encoders())
    report = (tmp_path / "cache" / "cache_report.json").read_text()
    write_video(tmp_path / "keep" / "new.mp4", 48, 32, 9)
    (tmp_path / "keep" / "new.txt").write_text("a new clip")
    calls = []

    def vae(x):
        calls.append(x.shape)
        return fake_vae(x)

    for text, match in (('{"cat": "a cat",}', "unreadable .*Expecting property name"),
                        ('["a cat"]', r"expected a JSON object \{name: prompt\}, got list"),
                        ('{"cat": {"negative": "x"}}', "entry 'cat' has no prompt text"),
                        ('{"cat": "a", "cat": "b"}', r"unreadable \(ValueError: key 'cat' appears twice\)")):
        (tmp_path / "lib.json").write_text(text)
        bad = make_config(tmp_path / "db.json", tmp_path / "cache", validation_prompt_library=str(tmp_path / "lib.json"))
        with pytest.raises(CacheConfigError, match=f"^validation_prompt_library='{tmp_path / 'lib.json'}': {match}"):
            build_cache(bad, encoders=fake_encoders(vae=vae))
    assert calls == [] and (tmp_path / "cache" / "cache_report.json").read_text() == report


def test_caption_table_identifiers(tmp_path):
    """Exact relative path first, then the path without its media extension; dotted names keep their dots; absolute
    paths under instance_data_dir match; one identifier for several files is reported, never silent."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    clips = tmp_path / "clips"
    (clips / "sub").mkdir(parents=True)
    for n in ("plain.mp4", "sub/nested.mp4", "my.clip.v2.mp4", "abs.mp4", "Upper.MP4", "dup.mp4", "dup.mkv",
              "only.mkv", "two.mp4", "two.webm"):
        (clips / n).write_bytes(b"")
    rows = [{"filename": "plain", "caption": "plain caption"},
            {"filename": "./sub/nested.mp4", "caption": "nested caption"},
            {"filename": "my.clip.v2", "caption": "dotted name"},
            {"filename": str(clips / "abs.mp4"), "caption": "absolute path"},
            {"filename": str(tmp_path / "elsewhere.mp4"), "caption": "outside"},
            {"filename": "Upper.MP4", "caption": "upper ext"},
            {"filename": "dup.mp4", "caption": "the mp4"}, {"filename": "dup.mkv", "caption": "the mkv"},
            {"filename": "only.mp4", "caption": "another file's caption"},
            {"filename": "two", "caption": "both formats"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "captions.parquet")
    (tmp_path / "db.json").write_text(json.dumps([{
        "id": "p", "dataset_type": "video", "instance_data_dir": str(clips), "caption_strategy": "parquet",
        "parquet": {"path": str(tmp_path / "captions.parquet"), "filename_column": "filename",
                    "caption_column": "caption"}}]))
    got = sources.discover(sources.read_datasets(tmp_path / "db.json")[0])
    assert {i.key: i.caption for i in got.items} == {
        "p/plain.mp4": "plain caption", "p/sub/nested.mp4": "nested caption", "p/my.clip.v2.mp4": "dotted name",
        "p/abs.mp4": "absolute path", "p/Upper.MP4": "upper ext", "p/dup.mp4": "the mp4", "p/dup.mkv": "the mkv",
        "p/two.mp4": "both formats", "p/two.webm": "both formats"}
    assert {k: s["reason"] for k, s in got.skipped.items()} == {"p/only.mkv": "missing_caption"}
    notes = [n["note"] for n in got.notes if n["key"] == "parquet.filename"]
    assert len(notes) == 2
    assert any("identifier 'two'" in n and "captions 2 files: two.mp4, two.webm" in n for n in notes), notes
    assert any("1 absolute paths" in n and "elsewhere.mp4" in n for n in notes), notes


def _write_rotated(path, width, height, frames, rotation):
    """An mp4 whose display matrix rotates it by `rotation` degrees counterclockwise (PyAV's frame.rotation)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.set_display_rotation(rotation)
        for i in range(frames):
            img = np.zeros((height, width, 3), np.uint8)
            img[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None]  # red grows to the right
            img[: height // 4, : width // 4, 2] = 255  # a blue mark top-left
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_rotated_video_is_cached_upright(tmp_path):
    """A phone video (stored 64x32 landscape, display matrix -90: shown 90 degrees clockwise, 32x64 portrait) is
    cached upright, in the portrait bucket."""
    if not hasattr(av.VideoFrame, "rotation") or not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        pytest.skip(f"PyAV {av.__version__} cannot read or write display rotation")
    _write_rotated(tmp_path / "phone.mp4", 64, 32, 5, -90)
    with av.open(str(tmp_path / "phone.mp4")) as c:
        assert next(c.decode(video=0)).rotation == -90
    clip = video.load_clip(tmp_path / "phone.mp4", video.ClipSpec(resolution=40))
    assert clip.shape == (5, 64, 32, 3)  # upright 32x64 -> the 32x64 bucket (stored: 64x32)
    f = clip[0].astype(int)
    assert f[:8, -8:, 2].mean() > 200 and f[:8, :8, 2].mean() < 50  # the top-left mark is now top-right
    assert f[:4, :, 0].mean() < 60 and f[-4:, :, 0].mean() > 190  # the red ramp now grows downwards
    with pytest.raises(video.Skip, match="aspect 0.500 below minimum_aspect_ratio 0.8"):  # filters see 32x64
        video.load_clip(tmp_path / "phone.mp4", video.ClipSpec(resolution=40, minimum_aspect_ratio=0.8))
    _write_rotated(tmp_path / "flipped.mp4", 64, 32, 5, 180)
    clip = video.load_clip(tmp_path / "flipped.mp4", video.ClipSpec(resolution=40))
    assert clip.shape == (5, 32, 64, 3) and clip[0, -4:, -8:, 2].mean() > 200  # the mark is now bottom-right


# -- changed items: edited captions, replaced videos ------------------------------------------------------------
def _epoch_captions(cache_dir):
    """(key, caption) of every example of one trainer epoch (make_batch_iterator), and per bucket the keys of
    pipeline.bucket_members."""
    from wanjax.data.pipeline import bucket_members

    src = records.CacheSource(cache_dir)
    seen = sorted((str(b["keys"][0]), src[int(b["index"][0])]["caption"])
                  for b in make_batch_iterator(cache_dir, global_batch_size=1, seed=0, num_epochs=1))
    members = {b: sorted({src[int(i)]["key"] for i in idx}) for b, idx in bucket_members(src.manifest).items()}
    return seen, members


def test_edited_caption_is_reencoded_and_only_the_new_one_trained_on(tmp_path):
    """A caption .txt fixed after caching: `pending` names the item, the rerun re-encodes exactly it into a new shard,
    the old record stays on disk inactive, and the trainer's epoch sees the new caption only."""
    cfg = make_config(_two_datasets(tmp_path), tmp_path / "cache")
    out = tmp_path / "cache"
    build_cache(cfg, encoders=fake_encoders())
    before = read_records(out)["keep/v1.mp4"]
    assert pending(cfg) is None
    (tmp_path / "keep" / "v1.txt").write_text("keep clip 1, caption fixed")
    why = pending(cfg)
    assert why is not None and "1 cached items changed" in why and "keep/v1.mp4: caption edited" in why, why
    texts = []
    report = build_cache(cfg, encoders=fake_encoders(text=lambda p: (texts.extend(p), fake_text(p))[1],
                                                     text_batch_size=1))
    assert report.encoded_here == 1 and report.cached == 4 and report.replaced == 1 and report.stale == 0
    assert "keep clip 1, caption fixed" in texts and "keep clip 0" not in texts
    assert pending(cfg) is None
    assert build_cache(cfg, encoders=fake_encoders(vae=None, text=None)).encoded_here == 0  # nothing left
    man = records.read_manifest(out)
    assert (man.items, man.active_items) == (5, 4) and len(man.shards) == 2
    seen, members = _epoch_captions(out)
    assert [c for k, c in seen if k == "keep/v1.mp4"] == ["keep clip 1, caption fixed"]
    assert [c for k, c in seen if k == "drop/v0.mp4"] == ["drop clip 0"] * 4
    assert members == {"16x3x4x6": ["drop/v0.mp4", "drop/v1.mp4", "keep/v0.mp4", "keep/v1.mp4"]}
    src = records.CacheSource(out)  # the old record is still on disk, bit-identical latents
    old = [src[i] for i in range(len(src)) if src[i]["key"] == "keep/v1.mp4" and src[i]["caption"] == "keep clip 1"]
    assert len(old) == 1 and np.array_equal(bits(old[0]["latents"]), bits(before["latents"]))
    rep = json.loads((out / "cache_report.json").read_text())
    assert rep["replaced"] == 1 and rep["cached"] == 4


def test_replaced_video_gets_its_new_bucket_and_old_record_inactive(tmp_path):
    """A video replaced at the same path by one of another size: re-encoded into its new bucket; the old record
    stays on disk, inactive, and its bucket is left out of the epoch when nothing else is in it."""
    cfg = make_config(_two_datasets(tmp_path), tmp_path / "cache")
    out = tmp_path / "cache"
    build_cache(cfg, encoders=fake_encoders())
    write_video(tmp_path / "keep" / "v0.mp4", 32, 48, 9, seed=5)  # portrait now
    why = pending(cfg)
    assert why is not None and "keep/v0.mp4: media file replaced or modified" in why, why
    report = build_cache(cfg, encoders=fake_encoders())
    assert report.encoded_here == 1 and report.replaced == 1 and pending(cfg) is None
    man = records.read_manifest(out)
    assert man.buckets == {"16x3x4x6": 4, "16x3x6x4": 1} and man.active_buckets == {"16x3x4x6": 3, "16x3x6x4": 1}
    seen, members = _epoch_captions(out)
    assert members == {"16x3x4x6": ["drop/v0.mp4", "drop/v1.mp4", "keep/v1.mp4"], "16x3x6x4": ["keep/v0.mp4"]}
    assert sorted(k for k, _ in seen).count("keep/v0.mp4") == 1
    index = records.read_record_index(man)
    keys = [k for s in man.shards for k in json.loads((out / "progress" / s.replace(".array_record", ".json"))
                                                        .read_text())["keys"]]
    assert [(k, index.buckets[b], bool(a)) for k, b, a in zip(keys, index.bucket, index.active)
            if k == "keep/v0.mp4"] == [("keep/v0.mp4", "16x3x4x6", False), ("keep/v0.mp4", "16x3x6x4", True)]
    # replaced again by a corrupt file: skipped, and the old record is not trained on either
    (tmp_path / "keep" / "v0.mp4").write_bytes(b"not a video" * 100)
    assert "keep/v0.mp4" in pending(cfg)
    report = build_cache(cfg, encoders=fake_encoders())
    assert report.cached == 3 and report.skipped["keep/v0.mp4"]["reason"] == "unreadable"
    assert pending(cfg) is None  # skipped last run: retried by the job, like a new bad file
    assert "keep/v0.mp4" not in {k for k, _ in _epoch_captions(out)[0]}
    # two records of one key may not both be active
    shards = [records.ShardInfo.from_json(json.loads(f.read_text()))
              for f in sorted((out / "progress").glob("records-p*.json"))]
    with pytest.raises(ValueError, match="duplicate record keys"):
        records.write_manifest(tmp_path / "elsewhere", shards, latent_channels=C, text_dim=D, text_len=TEXT_LEN)


def test_done_lists_without_fingerprints_count_as_unchanged(tmp_path):
    """A cache written before fingerprints were recorded (done-lists with keys only): an edited caption or touched
    file is not noticed, and nothing is re-encoded -- no mass re-encode after an upgrade."""
    cfg = make_config(_two_datasets(tmp_path), tmp_path / "cache")
    out = tmp_path / "cache"
    build_cache(cfg, encoders=fake_encoders())
    for f in (out / "progress").glob("records-p*.json"):
        d = json.loads(f.read_text())
        assert len(d.pop("fingerprints")) == len(d["keys"]) and d.pop("run") == 1
        f.write_text(json.dumps(d))
    (tmp_path / "keep" / "v1.txt").write_text("keep clip 1, caption fixed")
    os.utime(tmp_path / "keep" / "v0.mp4", ns=(1, 1))
    assert pending(cfg) is None
    report = build_cache(cfg, encoders=fake_encoders(vae=None, text=None))
    assert report.encoded_here == 0 and report.replaced == 0 and report.cached == 4
    # new items encoded now get fingerprints next to the old done-lists, and later edits of them are noticed
    write_video(tmp_path / "keep" / "v2.mp4", 48, 32, 9, seed=9)
    (tmp_path / "keep" / "v2.txt").write_text("keep clip 2")
    assert build_cache(cfg, encoders=fake_encoders()).encoded_here == 1
    (tmp_path / "keep" / "v2.txt").write_text("keep clip 2, edited")
    assert "keep/v2.mp4: caption edited" in pending(cfg)
    assert build_cache(cfg, encoders=fake_encoders()).encoded_here == 1 and pending(cfg) is None


def test_rerun_that_only_rewrites_the_manifest_loads_no_encoders(tmp_path, monkeypatch):
    """Nothing to encode (a dataset disabled, repeats changed): the manifest is rewritten with the encoder sizes of
    progress/settings.json and the VAE / UMT5 are never loaded; something to encode loads them once."""
    from wanjax import cache

    backend = _two_datasets(tmp_path)
    cfg = make_config(backend, tmp_path / "cache", validation_prompt="a cat boxing")
    first = build_cache(cfg, encoders=fake_encoders())

    def refuse(*a, **k):
        raise AssertionError("load_encoders called with nothing to encode")

    monkeypatch.setattr(cache, "load_encoders", refuse)
    _two_datasets(tmp_path, {"disabled": True})
    report = build_cache(cfg)
    assert report.encoded_here == 0 and report.cached == 2 and pending(cfg) is None
    man = records.read_manifest(tmp_path / "cache")
    assert (man.latent_channels, man.text_dim, man.text_len) == (C, D, TEXT_LEN)
    assert man.source["encoders"] == first.manifest.source["encoders"] == "test-double"
    lists = json.loads(backend.read_text())
    backend.write_text(json.dumps([dict(lists[0], repeats=2)]))
    assert "repeats" in pending(cfg)
    build_cache(cfg)
    assert records.read_manifest(tmp_path / "cache").datasets["keep"].repeats == 2
    calls = []
    monkeypatch.setattr(cache, "load_encoders", lambda *a, **k: calls.append(a) or fake_encoders())
    (tmp_path / "keep" / "v0.txt").write_text("keep clip 0, edited")
    assert build_cache(cfg).encoded_here == 1 and len(calls) == 1 and pending(cfg) is None


def test_load_encoders_fetches_hub_ids_only(tmp_path, monkeypatch):
    """An "org/name" that is no local folder is downloaded (the call is real, the hub is not reached here); a missing
    local path of another form ("./x/y", "a/b/c", "a/b c") is refused as a folder without a hub call."""
    import huggingface_hub as hf

    from wanjax import cache

    calls = []

    def offline(repo_id, **kw):
        calls.append((repo_id, kw.get("allow_patterns")))
        raise FileNotFoundError("offline here")

    monkeypatch.setattr(hf, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="offline here"):
        cache.load_encoders("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    assert calls == [("Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                      ["model_index.json", "vae/*", "text_encoder/*", "tokenizer/*"])]
    for path in ("./missing/pipe", "a/b/c", "org/name with space"):
        with pytest.raises(FileNotFoundError, match="not a Wan VAE folder"):
            cache.load_encoders(path)
    assert len(calls) == 1
