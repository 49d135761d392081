"""DMD distillation of Wan into a 3-step student: SimpleTuner's DMD quickstart (seed dmd-config.json) in wanjax.

    python -m wanjax.train --config configs/dmd.py          # Wan2.1-T2V-1.3B, the seed's settings
    python -m wanjax.train --config configs/dmd.py:tiny     # tiny random pipeline + sample cache, CPU
    python -m wanjax.train --config configs/dmd.py:tiny_prompts   # the same from a prompt list alone (no videos)

DMD needs prompts, not videos: a dataset list with a `prompts` entry (wanjax/data/sources.py), e.g.
    [{"id": "prompts", "dataset_type": "prompts", "prompts_file": "prompts.txt", "width": 832, "height": 480,
      "num_frames": 81}]
is cached as prompt embeddings plus the latent shape of that clip size, and the student generates at that shape.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import COW_PROMPT, DEFAULT_MODEL, base_config, seed_validation, tiny  # noqa: E402

VARIANTS = ("", "tiny", "tiny_prompts")


def get_config(arg=None):
    arg = arg or ""
    if arg not in VARIANTS:
        raise ValueError(f"configs/dmd.py:{arg}: unknown variant; expected one of {VARIANTS}")
    c = base_config()
    c.distillation_method = "dmd"
    # -- the seed config's settings (distillation_config defaults in common.py are the seed's) -------------
    c.pretrained_model_name_or_path = DEFAULT_MODEL
    c.output_dir = "output/wan-dmd"
    c.cache_dir = "cache/wan-dmd"
    c.seed = 1000
    c.max_train_steps = 4000
    c.checkpoint_step_interval = 200
    c.checkpoints_total_limit = 3
    c.resume_from_checkpoint = "latest"
    c.train_batch_size = 1
    c.gradient_accumulation_steps = 1
    c.caption_dropout_probability = 0.1
    c.mixed_precision = "bf16"
    c.optimizer = "adamw_bf16"
    c.learning_rate = 2e-5
    c.lr_scheduler = "cosine_with_min_lr"
    c.lr_warmup_steps = 100
    c.max_grad_norm = 1.0
    c.grad_clip_method = "value"
    c.use_ema = True
    c.ema_update_interval = 5
    c.lora_rank = 128
    c.lora_alpha = 128.0
    c.flow_schedule_shift = 5.0
    c.report_to = "wandb"
    c.tracker_project_name = "dmd-training"
    c.tracker_run_name = "wan-DMD-3step"
    c.model.remat_policy = "full"

    seed_validation(c, prompt=COW_PROMPT, interval=200,
                    resolution="1280x704", frames=121, guidance=1.0, steps=3,
                    hub_model_id="wan-disney-DMD-3step")

    if arg in ("tiny", "tiny_prompts"):
        tiny(c, run_name="tiny-dmd")
        c.lora_alpha = 4.0
        c.cache_dir = "cache/tiny-wan/latents"
        c.output_dir = "output/tiny-dmd"
        c.max_train_steps = 6
        c.checkpoint_step_interval = 3
        c.distillation_config.fake_score_lr = 1e-3
        c.distillation_config.generator_update_interval = 2
    if arg == "tiny_prompts":
        c.data_backend_config = "cache/tiny-wan/videos/prompts-backend.json"
        c.cache_dir = "output/tiny-dmd-prompts/cache"
        c.output_dir = "output/tiny-dmd-prompts"
    return c
