"""Videos + captions in, LoRA out, with the real JAX VAE and UMT5: bad files are skipped, reported, and the
good ones train."""

import json
import shutil

import av
import numpy as np

from test_train import _get_config, assets  # noqa: F401  (the session fixture)
from wanjax.train import run


def _write_clip(path, w, h, frames):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for f in range(frames):
            img = np.full((h, w, 3), 20 * f % 255, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_folder_with_bad_files_caches_good_ones_reports_bad_and_trains(assets, tmp_path, caplog):  # noqa: F811
    data = tmp_path / "data"
    shutil.copytree(assets / "videos" / "clips", data)  # 16 good clips, two sizes, with captions
    (data / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video" * 10)
    (data / "corrupt.txt").write_text("a broken file")
    _write_clip(data / "short.mp4", 48, 32, 3)  # 3 frames < min_frames 9
    (data / "short.txt").write_text("too short")
    _write_clip(data / "nocaption.mp4", 48, 32, 9)  # no nocaption.txt
    backends = json.loads((assets / "videos" / "multidatabackend.json").read_text())
    backends[0]["instance_data_dir"] = str(data)
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backends))

    c = _get_config("lora", "tiny")
    c.tiny_assets_dir, c.pretrained_model_name_or_path = str(assets), str(assets / "pipeline")
    c.data_backend_config = str(tmp_path / "multidatabackend.json")
    c.cache_dir, c.output_dir, c.max_train_steps = str(tmp_path / "cache"), str(tmp_path / "out"), 2
    summary = run(c)

    assert summary["steps"] == 2 and all(np.isfinite(summary["losses"]))
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["items"] == 16 and manifest["latent_channels"] == 16 and manifest["text_dim"] == 32
    assert set(manifest["buckets"]) == {"16x3x4x6", "16x3x6x4"}  # 9 frames -> 3 latent frames, 8x space
    report = json.loads((tmp_path / "cache" / "cache_report.json").read_text())
    reasons = {item["key"].split("/")[-1]: item["reason"] for item in report["skipped"]}
    assert reasons == {"corrupt.mp4": "unreadable", "short.mp4": "too_short", "nocaption.mp4": "missing_caption"}
    assert report["cached"] == 16 and "3 skipped" in report["summary"]
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()

    # the next start: nothing new, so the encoders are not loaded and the cache is untouched; then a new clip is
    # cached at start (the trainer checks the dataset list against the cache, as SimpleTuner does at each start)
    import wanjax.cache as cache_lib

    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    loads = []
    real_load = cache_lib.load_encoders
    cache_lib.load_encoders = lambda *a, **k: loads.append(1) or real_load(*a, **k)
    try:
        c.max_train_steps = 3
        assert run(c)["steps"] == 3 and not loads
        assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()} == before
        _write_clip(data / "new.mp4", 48, 32, 9)
        (data / "new.txt").write_text("a new clip")
        c.max_train_steps = 4
        assert run(c)["steps"] == 4 and loads == [1]
    finally:
        cache_lib.load_encoders = real_load
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["items"] == 17
    # the saved data position belongs to the old batch plan: weights and optimizer resume, the data order restarts
    assert "the data changed since checkpoint 3" in caplog.text and "items: saved 16, now 17" in caplog.text
