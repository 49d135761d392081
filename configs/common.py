"""Options every wanjax job shares, with SimpleTuner's names where SimpleTuner has the option.

New options (mesh, kernels, remat) are grouped (`config.mesh.fsdp`, `config.model.remat_policy`). Every key
exists here with its type, so `--config.key=value` overrides are type-checked and unknown keys are refused.
"""

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

DEFAULT_MODEL = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
# Wan's own negative prompt (the seeds' validation_negative_prompt)
NEGATIVE_PROMPT = '色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走'

# the DMD and DCM seeds' validation prompt
COW_PROMPT = (
    "A black and white animated scene unfolds featuring a distressed upright cow with prominent horns and"
    " expressive eyes, suspended by its legs from a hook on a static background wall. A smaller Mickey Mo"
    "use-like character enters, standing near a wooden bench, initiating interaction between the two. The"
    " cow's posture changes as it leans, stretches, and falls, while the mouse watches with a concerned e"
    "xpression, its face a mixture of curiosity and worry, in a world devoid of color."
)


def dmd_options() -> dict:
    """distillation_config's DMD options (docs/spec/distillation.md); defaults are the seed dmd-config.json's."""
    return dict(
        dmd_denoising_steps="1000,757,522",
        generator_update_interval=1,
        real_score_guidance_scale=3.0,  # teacher CFG v_u + g (v_c - v_u) (FastVideo's legacy w = g - 1)
        fake_score_guidance_scale=0.0,
        fake_score_lr=1e-5,
        fake_score_weight_decay=0.01,
        fake_score_betas=(0.9, 0.999),
        fake_score_eps=1e-8,
        fake_score_grad_clip=1.0,
        min_timestep_ratio=0.02,
        max_timestep_ratio=0.98,
        timestep_shift=1.0,
        min_score_timestep=0.0,
        ts_schedule=True,
        ts_schedule_max=False,
        last_step_only=False,
        num_training_frames=21,
        flow_matching_weight=0.0,  # generator flow-matching loss on real latents (SimpleTuner always adds it)
        # Self-Forcing (block-causal) options: no effect on a bidirectional Wan student; reported by name
        num_frame_per_block=3,
        independent_first_frame=False,
        same_step_across_blocks=False,
        context_noise=0.0,
    )


def dcm_options() -> dict:
    """distillation_config's DCM options (docs/spec/distillation.md): SimpleTuner's keys first, then wanjax's."""
    return dict(
        mode="semantic",  # "semantic" (consistency) | "fine" (+ adversarial loss on the detail intervals)
        euler_steps=placeholder(int),  # E teacher Euler steps (SimpleTuner's docs); None: euler_timesteps, else 50
        euler_timesteps=placeholder(int),  # the same setting under the name SimpleTuner's code reads
        dcm_shift=placeholder(float),  # SimpleTuner's sampler shift; must equal flow_schedule_shift when set
        multiphase=4,  # M phases = student steps
        distill_cfg=5.0,  # teacher CFG v_u + w (v_c - v_u), uncond = negative (else empty) prompt
        adv_weight=0.1,  # fine: generator loss = consistency + adv_weight * L_G
        model_family=placeholder(str),  # SimpleTuner's discriminator family; only "wan"
        discriminator_head_stride=2,  # heads on the outputs of blocks 0, 2, 4, ...
        discriminator_total_layers=placeholder(int),  # derived from the model; must match it when set
        discriminator_width=1024,  # head channels (1x1 conv C -> width)
        discriminator_lr=1e-5,
        discriminator_betas=(0.0, 0.999),
        discriminator_eps=1e-8,
        discriminator_weight_decay=0.0,
        discriminator_grad_clip=1.0,  # gradient-norm clip of the discriminator
        adv_sigma_range=0.7,  # sigma_adv from grid points [b, b + range * E) (the original's 35 of 50)
        pseudo_huber_c=1e-3,
        temporal_loss_weight=1.0,  # lambda_t of the temporal-coherence MSE
        temporal_frame_stride=3,  # d latent frames
        target_model="ema",  # consistency target: "ema" of the student adapter | "student" (no gradient)
        ema_target_decay=0.95,  # EMA of the target, every step
        dual_experts=False,  # two adapters: semantic (high noise) + detail (low noise), both exported
        expert_boundary=0.7,  # j >= boundary * E is semantic (rounded down to a phase boundary)
    )


def base_config() -> ConfigDict:
    c = ConfigDict()
    # -- model -----------------------------------------------------------------------------------------
    c.model_family = "wan"
    c.model_type = "lora"  # "lora" (full fine-tuning is not offered)
    # where the model is read (wanjax/model_source.py): SimpleTuner's keys and rules
    c.model_flavour = placeholder(str)  # SimpleTuner flavours, e.g. "i2v-14b-2.2-low" picks transformer_2
    c.pretrained_model_name_or_path = placeholder(str)  # the pipeline; None: the flavour's repo, else DEFAULT_MODEL
    c.pretrained_transformer_model_name_or_path = placeholder(str)  # a fine-tuned transformer; None: the pipeline's
    c.pretrained_transformer_subfolder = placeholder(str)  # None: the flavour's / "transformer"; "none": no subfolder
    c.mixed_precision = "bf16"  # dtype of the frozen base: bf16 | fp32
    c.model = ConfigDict(dict(attention="auto", remat_policy="full"))  # gradient_checkpointing -> remat
    c.tiny_assets_dir = ""  # tiny variants: build the tiny pipeline + sample cache here when missing

    # -- LoRA ------------------------------------------------------------------------------------------
    c.lora_rank = 16
    c.lora_alpha = placeholder(float)  # None: alpha = rank (PEFT's default scale 1)
    c.lora_target_modules = "to_q,to_k,to_v,to_out.0"  # matched in attn1 and attn2
    c.init_lora = placeholder(str)  # start from an existing LoRA file (any format load_lora reads)

    # -- data ------------------------------------------------------------------------------------------
    c.cache_dir = "cache/wan"  # wanjax cache: manifest.json + ArrayRecord shards + text embeds
    c.data_backend_config = placeholder(str)  # SimpleTuner multidatabackend.json (used by caching)
    # GLOBAL clips per forward/backward, over all devices and processes (not per GPU, not per process): split
    # over mesh data x fsdp, so a multiple of data x fsdp and of the process count (each process loads its
    # 1/processes share). One optimizer step sees this x gradient_accumulation_steps clips.
    c.train_batch_size = 1
    c.caption_dropout_probability = 0.1
    c.data_workers = 0
    # caching (python -m wanjax.cache; the trainer runs it when the cache is missing and data_backend_config is set)
    c.cache_shard_size = 32
    c.vae_batch_size = 1  # clips per device per VAE call (1: results independent of the device count)
    c.text_encoder_batch_size = 1
    c.cache_dtype = "bf16"  # bf16 | fp16 | fp32 latents / embeddings on disk
    c.cache_decode_threads = 4
    c.resolution = placeholder(float)  # defaults for datasets that do not set their own (SimpleTuner's; pixels, or
    c.resolution_type = placeholder(str)  # megapixels with resolution_type "area")
    c.minimum_image_size = placeholder(float)
    c.validation_prompt = placeholder(str)
    c.validation_negative_prompt = placeholder(str)  # also the unconditional prompt of distillation CFG
    c.validation_prompt_library = placeholder(str)  # JSON file {nickname: prompt}

    # -- validation videos during training (wanjax/validation.py) ----------------------------------------
    c.validation_step_interval = 0  # 0: off
    c.validation_guidance = 5.0  # CFG of the validation sampler (students: > 1 adds CFG to the student)
    c.validation_num_inference_steps = 30  # LoRA runs (students take their own step count)
    c.validation_num_video_frames = 81
    c.validation_resolution = "832x480"  # "WxH", an int (square), or a comma-separated list
    c.validation_seed = placeholder(int)  # None: seed
    c.ema_validation = "comparison"  # none | ema_only | comparison (when use_ema)
    c.validation_scheduler = "unipc"  # unipc (WanPipeline's) | euler
    c.validation_flow_shift = placeholder(float)  # None: the pipeline's scheduler_config flow_shift
    c.validation_fps = placeholder(int)  # None: the pipeline's (24 for TI2V-5B, else 16)

    # -- hub (wanjax/hub.py): without network or token it says so once and training goes on ----------------
    c.push_to_hub = False
    c.push_checkpoints_to_hub = False
    c.hub_model_id = placeholder(str)  # None: tracker_project_name (as SimpleTuner)
    c.hub_private = False
    c.model_card_note = placeholder(str)

    # -- flow matching ---------------------------------------------------------------------------------
    c.flow_schedule_shift = 3.0
    c.flow_schedule_auto_shift = False
    c.flow_use_uniform_schedule = False
    c.flow_use_beta_schedule = False
    c.flow_beta_schedule_alpha = 2.0
    c.flow_beta_schedule_beta = 2.0
    c.flow_sigmoid_scale = 1.0

    # -- optimisation ----------------------------------------------------------------------------------
    c.seed = 42
    c.max_train_steps = 1000  # optimizer steps; or 0 and num_train_epochs > 0 (epochs of the batch plan)
    c.num_train_epochs = 0
    c.learning_rate = 1e-4
    c.optimizer = "adamw_bf16"
    c.optimizer_config = ""
    c.lr_scheduler = "constant"
    c.lr_warmup_steps = 0
    c.lr_num_cycles = 1
    c.lr_power = 0.8
    c.lr_end = 4e-7
    # None: the optimizer's own defaults (SimpleTuner's per-optimizer table); set to override.
    c.adam_beta1 = placeholder(float)
    c.adam_beta2 = placeholder(float)
    c.adam_epsilon = placeholder(float)
    c.adam_weight_decay = placeholder(float)
    c.optimizer_beta1 = placeholder(float)
    c.optimizer_beta2 = placeholder(float)
    c.max_grad_norm = 2.0
    c.grad_clip_method = "value"
    c.gradient_accumulation_steps = 1
    c.prodigy_steps = placeholder(int)  # None: never freeze the Prodigy step-size estimate
    c.use_ema = False
    c.ema_decay = 0.995
    c.ema_update_interval = 1

    # -- distillation (SimpleTuner's `distillation_method` + `distillation_config`) -----------------------
    c.distillation_method = placeholder(str)  # None: LoRA flow matching; "dmd" | "dcm"
    c.distillation_config = ConfigDict({**dmd_options(), **dcm_options()})

    # -- sharding --------------------------------------------------------------------------------------
    c.mesh = ConfigDict(dict(data=1, fsdp=-1, context=1, tensor=1))
    # JAX's GPU memory pool, a fraction of each GPU (JAX's default 0.75 leaves ~20 GB of an 80 GB GPU unused); set
    # before JAX starts; XLA_CLIENT_MEM_FRACTION / XLA_PYTHON_CLIENT_MEM_FRACTION in the environment win
    c.gpu_memory_fraction = 0.95

    # -- checkpoints, logging, output ------------------------------------------------------------------
    c.output_dir = "output/wan"
    c.checkpoint_step_interval = 500
    c.checkpoints_total_limit = 5
    c.resume_from_checkpoint = placeholder(str)  # "latest" or a checkpoint path
    c.report_to = "wandb"  # wandb | none
    c.tracker_project_name = "wanjax"
    c.tracker_run_name = "wanjax-run"
    c.log_every = 1
    c.lora_export_format = "diffusers"  # diffusers | comfyui
    return c


def seed_validation(c: ConfigDict, *, prompt: str, interval: int, resolution: str, frames: int, guidance: float,
                    steps: int, hub_model_id: str) -> None:
    """A seed config's validation block (wanjax/validation.py) and hub id; Wan's negative prompt, seed 42, EMA
    weights. The seeds also push (`--config.push_to_hub=true --config.push_checkpoints_to_hub=true`)."""
    c.validation_prompt = prompt
    c.validation_negative_prompt = NEGATIVE_PROMPT
    c.validation_step_interval = interval
    c.validation_resolution = resolution
    c.validation_num_video_frames = frames
    c.validation_guidance = guidance
    c.validation_num_inference_steps = steps
    c.validation_seed = 42
    c.ema_validation = "ema_only"
    c.hub_model_id = hub_model_id


def tiny(c: ConfigDict, *, run_name: str) -> None:
    """What every `:tiny` variant shares: the embedded tiny pipeline (built offline on first use), 8-sample batches
    (divisible by up to 8 data-parallel devices), AdamW at a constant 1e-3, a rank-4 LoRA, float32 without remat,
    no tracker, and validation off (a CPU-sized 48x32x9 clip in 2 steps when turned on)."""
    c.tiny_assets_dir = "cache/tiny-wan"
    c.pretrained_model_name_or_path = "cache/tiny-wan/pipeline"
    c.train_batch_size = 8
    c.optimizer = "adamw"
    c.learning_rate = 1e-3
    c.lr_scheduler = "constant"
    c.lr_warmup_steps = 0
    c.lora_rank = 4
    c.mixed_precision = "fp32"
    c.model.remat_policy = "none"
    c.report_to = "none"
    c.tracker_run_name = run_name
    c.validation_step_interval = 0
    c.validation_resolution, c.validation_num_video_frames, c.validation_num_inference_steps = "48x32", 9, 2
