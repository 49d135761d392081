"""The embedded tiny default: a random Wan pipeline and a small sample cache, built offline on first use.

`ensure_assets(dir)` writes (once; atomically, so an interrupted build is redone, never half-used):
  dir/pipeline/  model_index.json, transformer/ (random tiny Wan transformer, diffusers format), scheduler/
  dir/latents/   a wanjax cache of random latents + prompt embeddings in two latent-shape buckets, and the
                 empty-prompt embedding used for caption dropout
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
# WanPipeline's scheduler: UniPC in flow mode, shift 3 (480p).
SCHEDULER_CONFIG = {
    "_class_name": "UniPCMultistepScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
    "disable_corrector": [], "dynamic_thresholding_ratio": 0.995, "final_sigmas_type": "zero", "flow_shift": 3.0,
    "lower_order_final": True, "num_train_timesteps": 1000, "predict_x0": True, "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "solver_order": 2, "solver_p": None, "solver_type": "bh2",
    "steps_offset": 0, "thresholding": False, "timestep_spacing": "linspace", "trained_betas": None,
    "use_beta_sigmas": False, "use_exponential_sigmas": False, "use_flow_sigmas": True, "use_karras_sigmas": False,
}
VERSION = "2"


def build_pipeline(directory: Path, seed: int = 0) -> None:
    from wanjax.models.transformer import init_params
    from wanjax.transformer_io import save_transformer

    directory.mkdir(parents=True)
    params = init_params(TINY_TRANSFORMER, jax.random.key(seed))
    save_transformer(TINY_TRANSFORMER, params, directory / "transformer")
    (directory / "scheduler").mkdir()
    (directory / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    index = {"_class_name": "WanPipeline", "_diffusers_version": "0.35.0", "boundary_ratio": None,
             "expand_timesteps": False, "scheduler": ["diffusers", "UniPCMultistepScheduler"],
             "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": [None, None]}
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
    (tmp / "READY").write_text(VERSION)
    shutil.rmtree(directory, ignore_errors=True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, directory)
    return directory
