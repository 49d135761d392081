"""DCM distillation of Wan into a 4-step student: SimpleTuner's DCM quickstart (seed dcm-config.json) in wanjax.

    python -m wanjax.train --config configs/dcm.py             # Wan2.1-T2V-1.3B, the seed's settings (semantic)
    python -m wanjax.train --config configs/dcm.py:tiny        # tiny random pipeline + sample cache, CPU
    python -m wanjax.train --config configs/dcm.py:tiny_fine   # the same with fine mode (discriminator heads)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import COW_PROMPT, DEFAULT_MODEL, base_config, seed_validation, tiny  # noqa: E402

VARIANTS = ("", "tiny", "tiny_fine")


def get_config(arg=None):
    arg = arg or ""
    if arg not in VARIANTS:
        raise ValueError(f"configs/dcm.py:{arg}: unknown variant; expected one of {VARIANTS}")
    c = base_config()
    c.distillation_method = "dcm"
    c.distillation_config.mode = "semantic"
    c.distillation_config.euler_steps = 100
    # -- the seed config's settings ------------------------------------------------------------------------
    c.pretrained_model_name_or_path = DEFAULT_MODEL
    c.output_dir = "output/wan"
    c.cache_dir = "cache/wan-dcm"
    c.data_backend_config = "config/wan/multidatabackend.json"
    c.seed = 42
    c.max_train_steps = 400000
    c.checkpoint_step_interval = 100
    c.checkpoints_total_limit = 5
    c.resume_from_checkpoint = "latest"
    c.train_batch_size = 2
    c.gradient_accumulation_steps = 1
    c.caption_dropout_probability = 0.1
    c.mixed_precision = "bf16"
    c.optimizer = "adamw_bf16"
    c.learning_rate = 1e-4
    c.lr_scheduler = "cosine"  # SimpleTuner's cosine: one half period over lr_warmup_steps
    c.lr_warmup_steps = 400000
    c.max_grad_norm = 0.01
    c.grad_clip_method = "value"
    c.prodigy_steps = 100000
    c.use_ema = False
    c.ema_update_interval = 2
    c.lora_rank = 128
    c.lora_alpha = 128.0
    c.flow_schedule_shift = 17.0
    c.resolution = 480
    c.resolution_type = "pixel_area"
    c.minimum_image_size = 0
    c.vae_batch_size = 1
    c.report_to = "wandb"
    c.tracker_project_name = "lora-training"
    c.tracker_run_name = "wan-AdamW-DCM"
    c.model.remat_policy = "full"  # gradient_checkpointing

    seed_validation(c, prompt=COW_PROMPT, interval=4,
                    resolution="832x480", frames=16, guidance=1.0, steps=8,
                    hub_model_id="wan-disney-DCM-distilled")

    if arg in ("tiny", "tiny_fine"):
        tiny(c, run_name=f"{arg}-dcm")
        c.lora_alpha = 4.0
        c.cache_dir = "cache/tiny-wan/latents"
        c.data_backend_config = None
        c.output_dir = f"output/{arg.replace('_', '-')}-dcm"
        c.max_train_steps = 6
        c.checkpoint_step_interval = 3
        c.max_grad_norm = 1.0
    if arg == "tiny_fine":
        c.distillation_config.mode = "fine"
        c.distillation_config.discriminator_width = 64  # GroupNorm(32) over 64 channels; 1024 at full size
        c.distillation_config.discriminator_lr = 1e-3
    return c
