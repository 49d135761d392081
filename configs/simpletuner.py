"""Run a SimpleTuner JSON config: `--config configs/simpletuner.py:path/to/config.json`.

Every key is either mapped to wanjax's config (same name where SimpleTuner has the option) or reported, by
name, with the reason it has no effect here. The report is printed when the config loads and recorded in
`output_dir/config.json` under `simpletuner.unhonored`. Unknown keys are reported too, never silently dropped.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import base_config  # noqa: E402


def _bool(v):
    if isinstance(v, str):
        if v.lower() in ("true", "1", "yes"):
            return True
        if v.lower() in ("false", "0", "no", ""):
            return False
        raise ValueError(f"expected a boolean, got {v!r}")
    return bool(v)


# key -> wanjax key (same meaning, value converted by type)
SAME = {k: k for k in (
    "seed", "output_dir", "max_train_steps", "checkpoint_step_interval", "checkpoints_total_limit",
    "tracker_project_name", "tracker_run_name", "report_to", "model_type", "model_family", "model_flavour",
    "pretrained_model_name_or_path", "pretrained_transformer_subfolder", "train_batch_size",
    "gradient_accumulation_steps", "caption_dropout_probability", "optimizer", "optimizer_config", "learning_rate",
    "max_grad_norm", "grad_clip_method", "lr_scheduler", "lr_warmup_steps", "lr_num_cycles", "lr_power", "lr_end",
    "adam_beta1", "adam_beta2", "adam_epsilon", "adam_weight_decay", "optimizer_beta1", "optimizer_beta2", "use_ema", "ema_decay", "ema_update_interval",
    "lora_rank", "lora_alpha", "init_lora", "flow_schedule_shift", "flow_schedule_auto_shift",
    "flow_use_uniform_schedule", "flow_use_beta_schedule", "flow_beta_schedule_alpha", "flow_beta_schedule_beta",
    "flow_sigmoid_scale", "prodigy_steps", "data_backend_config", "resume_from_checkpoint", "mixed_precision",
    "vae_batch_size", "resolution", "resolution_type", "minimum_image_size", "validation_prompt",
    "validation_negative_prompt", "distillation_method", "validation_seed", "validation_step_interval",
    "validation_resolution", "validation_guidance", "validation_num_inference_steps", "validation_num_video_frames",
    "ema_validation", "push_to_hub", "push_checkpoints_to_hub", "hub_model_id", "model_card_note",
)}
SAME["lora_target_modules"] = "lora_target_modules"

NO_EFFECT = {
    "attention_mechanism": "attention kernels are chosen by platform (XLA / cuDNN flash / TPU splash; "
                           "config.model.attention); SageAttention is a CUDA PyTorch kernel",
    "quantize_via": "the frozen base is kept in mixed_precision (bf16); quantisation is not offered",
    "base_model_precision": "the frozen base is kept in mixed_precision (bf16); quantisation is not offered",
    "text_encoder_1_precision": "text embeddings are cached once; the encoder precision does not affect training",
    "offload_during_startup": "weights stream straight into their device shardings; nothing to offload",
    "disable_benchmark": "no startup benchmark in wanjax",
    "webhook_config": "webhooks are not supported; metrics go to metrics.jsonl and wandb",
    "delete_problematic_images": "caching skips and reports bad files (cache_report.json); it never deletes data",
    "compress_disk_cache": "the cache is ArrayRecord shards; no separate compression switch",
    "disable_bucket_pruning": "buckets are exact latent shapes; batches smaller than train_batch_size are dropped",
    "aspect_bucket_rounding": "buckets are exact latent shapes from the caching step",
    "ignore_final_epochs": "training stops at max_train_steps; there is no epoch-tail handling",
    "pretrained_t5_model_name_or_path": "text embeddings come from the cache (encoded from the pipeline's text encoder)",
    "lycoris_config": "LyCORIS adapters are not supported; only standard LoRA (lora_type=standard)",
    "validation_guidance_skip_layers": "skip-layer guidance is not implemented; validation uses plain CFG",
    "validation_guidance_skip_layers_start": "skip-layer guidance is not implemented; validation uses plain CFG",
    "validation_guidance_skip_layers_stop": "skip-layer guidance is not implemented; validation uses plain CFG",
}


def convert(data: dict) -> tuple[dict, dict]:
    """SimpleTuner JSON -> (wanjax overrides, {key: reason not honored})."""
    out, unhonored = {}, {}
    for key, value in data.items():
        key = key.lstrip("-")
        if key in SAME:
            out[SAME[key]] = value
        elif key == "gradient_checkpointing":
            out["model.remat_policy"] = "full" if _bool(value) else "none"
        elif key == "lora_type":
            if str(value).lower() != "standard":
                raise ValueError(f"lora_type={value!r}: only 'standard' LoRA is supported")
        elif key == "distillation_config":
            known = set(base_config().distillation_config.keys())
            for sub, v in (value or {}).items():
                if sub in known:
                    out[f"distillation_config.{sub}"] = v
                else:
                    unhonored[f"distillation_config.{sub}"] = "unknown distillation option: not recognised by wanjax"
        elif key == "validation_prompt_library":
            if value not in (False, None, "", "false"):
                out["validation_prompt_library"] = value
        elif key == "num_train_epochs":
            if int(value) != 0:
                unhonored[key] = f"{value}: training length is max_train_steps; epochs are not counted"
        elif key in NO_EFFECT:
            unhonored[key] = NO_EFFECT[key]
        else:
            unhonored[key] = "unknown key: not a SimpleTuner option wanjax recognises"
    if "train_batch_size" in out:
        unhonored["train_batch_size (semantics)"] = (
            "SimpleTuner's is per GPU; wanjax's is the global batch per optimizer step: multiply by your data-parallel "
            "device count to keep the same global batch")
    return out, unhonored


def _set(c, dotted: str, value):
    node = c
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node[p]
    current = node[leaf]
    if isinstance(current, bool) or (current is None and isinstance(value, str) and value.lower() in ("true", "false")):
        value = _bool(value)
    elif isinstance(current, float) and not isinstance(value, bool):
        value = float(value)
    elif isinstance(current, int) and not isinstance(current, bool):
        value = int(value)
    elif isinstance(current, tuple):
        value = tuple(value)
    elif isinstance(value, list):
        value = ",".join(map(str, value))
    node[leaf] = value


def get_config(arg=None):
    if not arg:
        raise ValueError("usage: --config configs/simpletuner.py:path/to/config.json")
    try:
        with open(arg) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{arg}: cannot read a SimpleTuner JSON config ({e})") from None
    overrides, unhonored = convert(data)
    c = base_config()
    for key, value in overrides.items():
        try:
            _set(c, key, value)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{arg}: {key}={value!r}: {e}") from None
    c.simpletuner = dict(source=os.path.abspath(arg), unhonored=unhonored)
    for key, reason in sorted(unhonored.items()):
        print(f"[simpletuner] {key}: not honored: {reason}", file=sys.stderr)
    return c
