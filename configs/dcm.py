"""DCM distillation of Wan into a 4-step student: SimpleTuner's DCM quickstart (seed dcm-config.json) in wanjax.

    python -m wanjax.train --config configs/dcm.py             # Wan2.1-T2V-1.3B, the seed's settings (semantic)
    python -m wanjax.train --config configs/dcm.py:tiny        # tiny random pipeline + sample cache, CPU
    python -m wanjax.train --config configs/dcm.py:tiny_fine   # the same with fine mode (discriminator heads)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DEFAULT_MODEL, NEGATIVE_PROMPT, base_config  # noqa: E402

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

    # -- validation (the seed's; wanjax/validation.py) ---------------------------------------------------
    c.validation_prompt = "A black and white animated scene unfolds featuring a distressed upright cow with prominent horns and expressive eyes, suspended by its legs from a hook on a static background wall. A smaller Mickey Mouse-like character enters, standing near a wooden bench, initiating interaction between the two. The cow's posture changes as it leans, stretches, and falls, while the mouse watches with a concerned expression, its face a mixture of curiosity and worry, in a world devoid of color."
    c.validation_negative_prompt = NEGATIVE_PROMPT
    c.validation_step_interval = 4
    c.validation_resolution = "832x480"
    c.validation_num_video_frames = 16
    c.validation_guidance = 1.0
    c.validation_num_inference_steps = 8
    c.validation_seed = 42
    c.ema_validation = "ema_only"
    c.hub_model_id = "wan-disney-DCM-distilled"  # the seed also pushes: --config.push_to_hub=true --config.push_checkpoints_to_hub=true

    if arg in ("tiny", "tiny_fine"):
        c.tiny_assets_dir = "cache/tiny-wan"
        c.pretrained_model_name_or_path = "cache/tiny-wan/pipeline"
        c.cache_dir = "cache/tiny-wan/latents"
        c.data_backend_config = None
        c.output_dir = f"output/{arg.replace('_', '-')}-dcm"
        c.max_train_steps = 6
        c.checkpoint_step_interval = 3
        c.train_batch_size = 8
        c.optimizer = "adamw"
        c.learning_rate = 1e-3
        c.lr_scheduler = "constant"
        c.lr_warmup_steps = 0
        c.max_grad_norm = 1.0
        c.lora_rank = 4
        c.lora_alpha = 4.0
        c.mixed_precision = "fp32"
        c.model.remat_policy = "none"
        c.validation_step_interval = 0  # off; when turned on, a CPU-sized clip:
        c.validation_resolution, c.validation_num_video_frames, c.validation_num_inference_steps = "48x32", 9, 2
        c.report_to = "none"
        c.tracker_run_name = f"{arg}-dcm"
    if arg == "tiny_fine":
        c.distillation_config.mode = "fine"
        c.distillation_config.discriminator_width = 64  # GroupNorm(32) over 64 channels; 1024 at full size
        c.distillation_config.discriminator_lr = 1e-3
    return c
