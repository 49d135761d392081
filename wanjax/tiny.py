"""The embedded tiny default: a random Wan pipeline and a small sample cache, built offline on first use.

`ensure_assets(dir)` writes (once; atomically, so an interrupted build is redone, never half-used):
  dir/pipeline/  model_index.json, transformer/ (random tiny Wan transformer), vae/ (random tiny Wan2.1 VAE),
                 text_encoder/ (random tiny UMT5), tokenizer/ (trained offline), scheduler/: diffusers layout
  dir/videos/    generated clips of two sizes with .txt captions, and multidatabackend.json listing them
                 (SimpleTuner's dataset-list format): what the caching job reads; prompts.txt and
                 prompts-backend.json (a `prompts` dataset: DMD from prompts alone)
  dir/latents/   a ready wanjax cache of random latents + prompt embeddings in two latent-shape buckets, and the
                 empty-prompt embedding (for fast tests that skip caching)
Used by `configs/*.py:tiny` and the tests; no hub, no torch.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np

from wanjax.models.config import WanConfig

TINY_TRANSFORMER = WanConfig(
    num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16, text_dim=32, ffn_dim=64,
    num_layers=2, rope_max_seq_len=64,
)
TEXT_LEN = 512
# Wan2.1-style VAE at the smallest width diffusers' tests use: 4x time, 8x space, 16 latent channels.
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=(1, 1, 1, 1), num_res_blocks=1, temperal_downsample=(False, True, True))
TINY_UMT5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
                 relative_attention_max_distance=128)
# (width, height, frames) of the generated clips: two pixel-area buckets, 9 frames = 3 latent frames
CLIP_SIZES = ((48, 32, 9), (32, 48, 9))
CAPTIONS = ("a red square drifting right", "a blue circle bouncing", "green stripes scrolling up",
            "a yellow dot pulsing slowly", "two boxes passing each other", "a gradient sweeping left")
# WanPipeline's scheduler: UniPC in flow mode, shift 3 (480p).
SCHEDULER_CONFIG = {
    "_class_name": "UniPCMultistepScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
    "disable_corrector": [], "dynamic_thresholding_ratio": 0.995, "final_sigmas_type": "zero", "flow_shift": 3.0,
    "lower_order_final": True, "num_train_timesteps": 1000, "predict_x0": True, "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "solver_order": 2, "solver_p": None, "solver_type": "bh2",
    "steps_offset": 0, "thresholding": False, "timestep_spacing": "linspace", "trained_betas": None,
    "use_beta_sigmas": False, "use_exponential_sigmas": False, "use_flow_sigmas": True, "use_karras_sigmas": False,
}
VERSION = "4"


def build_pipeline(directory: Path, seed: int = 0) -> None:
    from wanjax import text_io, vae_io
    from wanjax.models import text_encoder, vae
    from wanjax.models.transformer import init_params
    from wanjax.transformer_io import save_transformer

    directory.mkdir(parents=True)
    params = init_params(TINY_TRANSFORMER, jax.random.key(seed))
    save_transformer(TINY_TRANSFORMER, params, directory / "transformer")
    vae_cfg = vae.VaeConfig(**TINY_VAE)
    vae_io.save_vae(vae_cfg, vae.init_vae_params(vae_cfg, jax.random.key(seed + 1)), directory / "vae")
    tok_dir = text_io.train_tiny_tokenizer(directory / "tokenizer")
    vocab = len(text_io.Tokenizer.from_directory(tok_dir))
    t5_cfg = text_encoder.UMT5Config(vocab_size=vocab, **TINY_UMT5)
    assert t5_cfg.d_model == TINY_TRANSFORMER.text_dim
    text_io.save_text_encoder(t5_cfg, text_encoder.init_text_encoder_params(t5_cfg, jax.random.key(seed + 2)),
                              directory / "text_encoder")
    (directory / "scheduler").mkdir()
    (directory / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    index = {"_class_name": "WanPipeline", "_diffusers_version": "0.35.0", "boundary_ratio": None,
             "expand_timesteps": False, "scheduler": ["diffusers", "UniPCMultistepScheduler"],
             "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": [None, None],
             "vae": ["diffusers", "AutoencoderKLWan"]}
    (directory / "model_index.json").write_text(json.dumps(index, indent=2))


def build_cache(directory: Path, seed: int = 0, num_items: int = 32) -> None:
    from wanjax.data import records

    cfg = TINY_TRANSFORMER
    records.write_synthetic_cache(directory, num_items=num_items, latent_channels=cfg.in_channels,
                                  text_dim=cfg.text_dim, text_len=TEXT_LEN, seed=seed)
    rng = np.random.default_rng(seed + 1)
    # "" tokenises to a single EOS token: a one-token embedding, zeros after (Wan's convention).
    records.write_text_embeds(directory / "empty_prompt.safetensors",
                              {"empty": rng.standard_normal((1, cfg.text_dim)).astype(np.float32)})


def build_videos(directory: Path, final: Path, seed: int = 0, per_size: int = 8) -> None:
    """Small generated clips (moving coloured shapes) with .txt captions, and the dataset list that names them
    (by their `final` location: the build happens under a temporary name)."""
    import av

    rng = np.random.default_rng(seed)
    clips = directory / "clips"
    clips.mkdir(parents=True)
    n = 0
    for w, h, frames in CLIP_SIZES:
        for _ in range(per_size):
            name = f"clip{n:03d}"
            color = rng.integers(40, 255, 3)
            with av.open(str(clips / f"{name}.mp4"), "w") as container:
                stream = container.add_stream("mpeg4", rate=8)
                stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
                for f in range(frames):
                    img = np.zeros((h, w, 3), np.uint8)
                    x = (f * 3 + n) % max(1, w - 8)
                    img[h // 4: h // 4 + 8, x: x + 8] = color
                    for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
            (clips / f"{name}.txt").write_text(CAPTIONS[n % len(CAPTIONS)])
            n += 1
    backends = [
        {"id": "tiny-clips", "type": "local", "dataset_type": "video", "instance_data_dir": str((final / "clips").absolute()),
         "caption_strategy": "textfile", "resolution": 40, "resolution_type": "pixel_area", "crop": False,
         "repeats": 0, "video": {"num_frames": 9, "min_frames": 9}},
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True},
    ]
    (directory / "multidatabackend.json").write_text(json.dumps(backends, indent=2))
    # DMD from prompts alone: a prompt list and a `prompts` dataset generating 48x32 clips of 9 frames
    (directory / "prompts.txt").write_text("\n".join(CAPTIONS) + "\n")
    prompts = [{"id": "tiny-prompts", "dataset_type": "prompts", "prompts_file": str((final / "prompts.txt").absolute()),
                "width": 48, "height": 32, "num_frames": 9, "repeats": 1}]
    (directory / "prompts-backend.json").write_text(json.dumps(prompts, indent=2))


def ensure_assets(directory: str | os.PathLike) -> Path:
    """Build the tiny pipeline and cache under `directory` unless a complete build is already there."""
    directory = Path(directory)
    marker = directory / "READY"
    if marker.exists() and marker.read_text().strip() == VERSION:
        return directory
    if jax.process_index() != 0:  # process 0 builds; the others wait for its marker
        import time

        for _ in range(600):
            if marker.exists() and marker.read_text().strip() == VERSION:
                return directory
            time.sleep(0.5)
        raise RuntimeError(f"{directory}: tiny assets were not built by process 0 within 300 s")
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    build_pipeline(tmp / "pipeline")
    build_cache(tmp / "latents")
    build_videos(tmp / "videos", directory / "videos")
    (tmp / "READY").write_text(VERSION)
    shutil.rmtree(directory, ignore_errors=True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, directory)
    return directory
