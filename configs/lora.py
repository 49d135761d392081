"""Wan LoRA training with flow matching: SimpleTuner's Wan LoRA quickstart (seed lora-config.json) in wanjax.

    python -m wanjax.train --config configs/lora.py          # Wan2.1-T2V-1.3B, the seed's settings
    python -m wanjax.train --config configs/lora.py:tiny     # tiny pipeline, generated clips cached then trained, CPU
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DEFAULT_MODEL, NEGATIVE_PROMPT, base_config  # noqa: E402

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

    # -- validation (the seed's; wanjax/validation.py) ---------------------------------------------------
    c.validation_prompt = '两只拟人化的猫咪身穿舒适的拳击装备，戴着鲜艳的手套，在聚光灯照射的舞台上激烈对战'
    c.validation_negative_prompt = NEGATIVE_PROMPT
    c.validation_step_interval = 100
    c.validation_resolution = "832x480"
    c.validation_num_video_frames = 81
    c.validation_guidance = 5.2
    c.validation_num_inference_steps = 40
    c.validation_seed = 42
    c.ema_validation = "ema_only"
    c.hub_model_id = "wan-disney"  # the seed also pushes: --config.push_to_hub=true --config.push_checkpoints_to_hub=true

    if arg == "tiny":
        # the whole job offline: generated clips -> JAX VAE + UMT5 -> cache (first run) -> LoRA training
        c.tiny_assets_dir = "cache/tiny-wan"
        c.pretrained_model_name_or_path = "cache/tiny-wan/pipeline"
        c.data_backend_config = "cache/tiny-wan/videos/multidatabackend.json"
        c.cache_dir = "cache/tiny-wan/video-cache"
        c.output_dir = "output/tiny-lora"
        c.resume_from_checkpoint = "latest"
        c.max_train_steps = 8
        c.checkpoint_step_interval = 4
        c.train_batch_size = 8  # divisible by up to 8 data-parallel devices
        c.optimizer = "adamw"
        c.learning_rate = 1e-3
        c.lr_scheduler = "constant"
        c.lr_warmup_steps = 0
        c.max_grad_norm = 1.0
        c.grad_clip_method = "norm"
        c.use_ema = True
        c.ema_update_interval = 1
        c.lora_rank = 4
        c.mixed_precision = "fp32"
        c.model.remat_policy = "none"
        c.validation_step_interval = 0  # off; when turned on, a CPU-sized clip:
        c.validation_resolution, c.validation_num_video_frames, c.validation_num_inference_steps = "48x32", 9, 2
        c.report_to = "none"
        c.tracker_run_name = "tiny-lora"
    return c
