"""Wan LoRA training with flow matching: SimpleTuner's Wan LoRA quickstart (seed lora-config.json) in wanjax.

    python -m wanjax.train --config configs/lora.py          # Wan2.1-T2V-1.3B, the seed's settings
    python -m wanjax.train --config configs/lora.py:tiny     # tiny pipeline, generated clips cached then trained, CPU
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DEFAULT_MODEL, base_config, seed_validation, tiny  # noqa: E402

VARIANTS = ("", "tiny")


def get_config(arg=None):
    arg = arg or ""
    if arg not in VARIANTS:
        raise ValueError(f"configs/lora.py:{arg}: unknown variant; expected one of {VARIANTS}")
    c = base_config()
    # -- the seed config's settings -----------------------------------------------------------------------
    c.pretrained_model_name_or_path = DEFAULT_MODEL
    c.output_dir = "output/wan"
    c.cache_dir = "cache/wan"
    c.seed = 42
    c.max_train_steps = 400000
    c.checkpoint_step_interval = 1000
    c.checkpoints_total_limit = 5
    c.resume_from_checkpoint = "latest"
    c.train_batch_size = 2
    c.gradient_accumulation_steps = 1
    c.caption_dropout_probability = 0.1
    c.mixed_precision = "bf16"
    c.optimizer = "optimi-lion"
    c.learning_rate = 5e-5
    c.max_grad_norm = 0.01
    c.grad_clip_method = "value"
    c.lr_scheduler = "cosine"
    c.lr_warmup_steps = 400000
    c.use_ema = True
    c.ema_update_interval = 2
    c.lora_rank = 16
    c.flow_schedule_shift = 3.0
    c.report_to = "wandb"
    c.tracker_project_name = "lora-training"
    c.tracker_run_name = "wan-adamW"
    c.model.remat_policy = "full"  # gradient_checkpointing: true

    seed_validation(c, prompt="两只拟人化的猫咪身穿舒适的拳击装备，戴着鲜艳的手套，在聚光灯照射的舞台上激烈对战",
                    interval=100, resolution="832x480", frames=81, guidance=5.2, steps=40,
                    hub_model_id="wan-disney")

    if arg == "tiny":
        # the whole job offline: generated clips -> JAX VAE + UMT5 -> cache (first run) -> LoRA training
        tiny(c, run_name="tiny-lora")
        c.data_backend_config = "cache/tiny-wan/videos/multidatabackend.json"
        c.cache_dir = "cache/tiny-wan/video-cache"
        c.output_dir = "output/tiny-lora"
        c.resume_from_checkpoint = "latest"
        c.max_train_steps = 8
        c.checkpoint_step_interval = 4
        c.max_grad_norm = 1.0
        c.grad_clip_method = "norm"
        c.use_ema = True
        c.ema_update_interval = 1
    return c
