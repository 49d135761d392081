"""Run a SimpleTuner JSON config: `--config configs/simpletuner.py:path/to/config.json`.

Every key is either mapped to wanjax's config or reported, by name, with the reason it has no effect here. The
report is printed when the config loads and recorded in `output_dir/config.json` under `simpletuner.unhonored`
(nested like the config: `distillation_config.X` is `unhonored.distillation_config.X`). Bad values are refused with
an error naming the key, the value and what was expected; nothing is dropped or converted silently.

Mapping rules:
- SAME: SimpleTuner's name is wanjax's (also cache_dir, num_train_epochs, pretrained_transformer_model_name_or_path);
  the value is converted to the wanjax field's declared type: booleans from true/false ("true"/"yes"/1 ...),
  integers only from integral numbers or numeric strings (never from a boolean or 16.5), floats from numbers or
  numeric strings, pairs (`fake_score_betas`) from a list or "0.9,0.999", strings from strings, integers or lists
  (joined with commas). num_train_epochs > 0 without max_train_steps sets max_train_steps = 0 (the epochs set the length).
- ALIASES: SimpleTuner's other names for a wanjax key: validation_steps, checkpointing_steps, user_prompt_library,
  peft_lora_target_modules (a list, a JSON array string or "a,b"), lora_format (diffusers | comfyui) ->
  lora_export_format. Two keys naming one setting with different values are refused.
- distillation_config: an object, or a JSON / Python-literal string of one (SimpleTuner literal_evals it); its keys
  map to `distillation_config.*`, unknown ones are reported.
- refused: model_family other than "wan", lora_type other than "standard", use_dora true, a JSON null for a
  setting whose wanjax default is not None.
- reported: NO_EFFECT options (no wanjax equivalent, each with its reason); lora_dropout > 0; base_model_default_dtype
  and pretrained_vae_model_name_or_path that differ from what wanjax uses (mixed_precision; the pipeline's vae/);
  dataset or distillation_config options given at the top level; unknown keys, with a "did you mean" suggestion;
  semantics notes: train_batch_size is wanjax's global batch, and DMD applies caption_dropout_probability only in
  its flow-matching term (distillation_config.flow_matching_weight > 0).
"""

import ast
import difflib
import json
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import base_config, dcm_options, dmd_options  # noqa: E402

from wanjax.model_source import resolve_model  # noqa: E402

# key -> wanjax key (same meaning, value converted by the wanjax field's type)
SAME = {k: k for k in (
    "seed", "output_dir", "max_train_steps", "num_train_epochs", "checkpoint_step_interval", "checkpoints_total_limit",
    "tracker_project_name", "tracker_run_name", "report_to", "model_type", "model_flavour",
    "pretrained_model_name_or_path", "pretrained_transformer_model_name_or_path", "pretrained_transformer_subfolder",
    "train_batch_size", "gradient_accumulation_steps", "caption_dropout_probability", "optimizer", "optimizer_config",
    "learning_rate", "max_grad_norm", "grad_clip_method", "lr_scheduler", "lr_warmup_steps", "lr_num_cycles",
    "lr_power", "lr_end", "adam_beta1", "adam_beta2", "adam_epsilon", "adam_weight_decay", "optimizer_beta1",
    "optimizer_beta2", "use_ema", "ema_decay", "ema_update_interval", "lora_rank", "lora_alpha", "init_lora",
    "lora_target_modules", "flow_schedule_shift", "flow_schedule_auto_shift", "flow_use_uniform_schedule",
    "flow_use_beta_schedule", "flow_beta_schedule_alpha", "flow_beta_schedule_beta", "flow_sigmoid_scale",
    "prodigy_steps", "data_backend_config", "cache_dir", "resume_from_checkpoint", "mixed_precision", "vae_batch_size",
    "resolution", "resolution_type", "minimum_image_size", "validation_prompt", "validation_negative_prompt",
    "distillation_method", "validation_seed", "validation_step_interval", "validation_resolution",
    "validation_guidance", "validation_num_inference_steps", "validation_num_video_frames", "ema_validation",
    "push_to_hub", "push_checkpoints_to_hub", "hub_model_id", "model_card_note",
)}

# SimpleTuner's other names for a wanjax key
ALIASES = {
    "validation_steps": "validation_step_interval",
    "checkpointing_steps": "checkpoint_step_interval",
    "user_prompt_library": "validation_prompt_library",
    "peft_lora_target_modules": "lora_target_modules",
    "lora_format": "lora_export_format",
}
LORA_FORMATS = ("diffusers", "comfyui")  # wanjax.lora.save_lora / convert/export_lora.py

_OFFLOAD = "weights are sharded over the devices (config.mesh.fsdp) and stream into their shardings; no CPU/disk offload"
_CHUNK_FF = ("the feed-forward is not chunked; memory is traded with remat (gradient_checkpointing -> "
             "config.model.remat_policy) and FSDP sharding")
_PREVIEW = "no Tiny-AutoEncoder previews (they need webhooks); validation videos are written once sampled"
_SLG = "skip-layer guidance is not implemented; validation uses plain CFG"
_DOWNSAMPLE = "frames are resized straight to the bucket (resize to cover, then crop); no downsample-before-crop step"
NO_EFFECT = {
    "attention_mechanism": "attention kernels are chosen by platform (XLA / cuDNN flash / TPU splash; "
                           "config.model.attention); SageAttention is a CUDA PyTorch kernel",
    "quantize_via": "the frozen base is kept in mixed_precision (bf16); quantisation is not offered",
    "base_model_precision": "the frozen base is kept in mixed_precision (bf16); quantisation is not offered",
    "text_encoder_1_precision": "text embeddings are cached once; the encoder precision does not affect training",
    "text_encoder_2_precision": "Wan has one text encoder (UMT5); its embeddings are cached once",
    "offload_during_startup": "weights stream straight into their device shardings; nothing to offload",
    "enable_group_offload": _OFFLOAD,
    "group_offload_type": _OFFLOAD,
    "group_offload_blocks_per_group": _OFFLOAD,
    "group_offload_use_stream": _OFFLOAD,
    "group_offload_to_disk_path": _OFFLOAD,
    "enable_model_cpu_offload": _OFFLOAD,
    "enable_chunked_feed_forward": _CHUNK_FF,
    "feed_forward_chunk_size": _CHUNK_FF,
    "tread_config": "TREAD token routing is not implemented; every token goes through every block",
    "validation_preview": _PREVIEW,
    "validation_preview_steps": _PREVIEW,
    "wan_force_2_1_time_embedding": "the time-embedding layout is read from the checkpoint (Wan 2.1, or Wan 2.2's "
                                    "per-token timesteps); there is nothing to force",
    "wan_validation_load_other_stage": "validation renders with the trained transformer only; the other Wan 2.2 "
                                       "expert is not loaded",
    "disable_benchmark": "no startup benchmark in wanjax",
    "webhook_config": "webhooks are not supported; metrics go to metrics.jsonl and wandb",
    "delete_problematic_images": "caching skips and reports bad files (cache_report.json); it never deletes data",
    "compress_disk_cache": "the cache is ArrayRecord shards; no separate compression switch",
    "write_batch_size": "the cache is written in ArrayRecord shards of cache_shard_size clips; no write batching",
    "maximum_image_size": _DOWNSAMPLE,
    "target_downsample_size": _DOWNSAMPLE,
    "disable_bucket_pruning": "buckets are exact latent shapes; batches smaller than train_batch_size are dropped",
    "aspect_bucket_rounding": "buckets are exact latent shapes from the caching step",
    "ignore_final_epochs": "the run always lasts max_train_steps (or num_train_epochs) steps; there is no "
                           "epoch-tail handling to switch off",
    "pretrained_t5_model_name_or_path": "text embeddings come from the cache (encoded from the pipeline's text encoder)",
    "lycoris_config": "LyCORIS adapters are not supported; only standard LoRA (lora_type=standard)",
    "validation_guidance_skip_layers": _SLG,
    "validation_guidance_skip_layers_start": _SLG,
    "validation_guidance_skip_layers_stop": _SLG,
}

# options of a multidatabackend.json entry (wanjax/data/sources.py), not of the trainer
DATASET_KEYS = (
    "id", "type", "dataset_type", "instance_data_dir", "caption_strategy", "metadata_backend", "cache_dir_vae",
    "cache_dir_text", "crop", "crop_aspect", "crop_aspect_buckets", "crop_style", "repeats", "num_frames",
    "min_frames", "max_frames", "frame_interval", "frame_stride", "video", "disabled", "disable", "bucket_strategy",
    "instance_prompt", "prepend_instance_prompt", "only_instance_prompt", "minimum_aspect_ratio",
    "maximum_aspect_ratio", "probability", "is_i2v", "conditioning_image_embeds", "cache_dir_conditioning_image_embeds",
)

# keys with their own rule in convert()
SPECIAL = ("gradient_checkpointing", "lora_type", "use_dora", "lora_dropout", "model_family", "distillation_config",
           "validation_prompt_library", "pretrained_vae_model_name_or_path", "base_model_default_dtype")
KNOWN = sorted({*SAME, *ALIASES, *NO_EFFECT, *SPECIAL})

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")


class _Refused(ValueError):
    """An error whose message already names the key and the value."""


def _bool(v) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE + _FALSE:
        return v.strip().lower() in _TRUE
    raise ValueError("expected a boolean (true / false)")


def _number(v, typ: type):
    """`v` as int or float: never from a boolean; an int only from an integral value."""
    what = "an integer" if typ is int else "a number"
    if isinstance(v, bool):
        raise ValueError(f"expected {what}, got a boolean")
    if isinstance(v, str):
        text = v.strip()
        try:
            v = int(text)
        except ValueError:
            try:
                v = float(text)
            except ValueError:
                raise ValueError(f"expected {what}") from None
    if not isinstance(v, (int, float)):
        raise ValueError(f"expected {what}, got {type(v).__name__}")
    if typ is float:
        return float(v)
    if isinstance(v, float) and not v.is_integer():
        raise ValueError("expected an integer, got a fractional number")
    return int(v)


def _literal(text: str):
    """A JSON or Python-literal string (SimpleTuner literal_evals its dict / list options)."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ValueError("not a JSON or Python literal") from None


def _coerce(value, typ: type, default=None):
    """`value` for a wanjax field of type `typ` (its `default` gives a tuple's length and item types)."""
    if typ is bool:
        return _bool(value)
    if typ in (int, float):
        return _number(value, typ)
    if typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, (list, tuple)) and value and all(
                isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
            return ",".join(map(str, value))
        raise ValueError(f"expected a string (or a list of values), got {type(value).__name__}")
    if typ is tuple:
        n = len(default)
        items = value
        if isinstance(value, str):
            text = value.strip()
            items = _literal(text) if text[:1] in "([" else [p.strip() for p in text.split(",")]
        if not isinstance(items, (list, tuple)) or len(items) != n:
            raise ValueError(f"expected {n} values: a list or a comma-separated string")
        return tuple(_coerce(v, type(d)) for v, d in zip(items, default))
    raise ValueError(f"a {typ.__name__} setting is not set from SimpleTuner configs")


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""


def _distillation_config(value) -> dict:
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = _literal(value) if value.strip() else {}
        except ValueError:
            raise _Refused(f"distillation_config={value!r}: expected an object, or a JSON / Python-literal string "
                             "of one (e.g. '{\"mode\": \"semantic\"}')") from None
    if not isinstance(value, dict):
        raise _Refused(f"distillation_config={value!r}: expected an object {{option: value}}")
    return value


def _targets(value) -> str:
    """peft_lora_target_modules: a list, a JSON (or Python) array string, or "a,b" -> wanjax's "a,b"."""
    items = value
    if isinstance(value, str):
        items = _literal(value) if value.strip()[:1] == "[" else [p.strip() for p in value.split(",")]
    if not isinstance(items, (list, tuple)) or not all(isinstance(m, str) for m in items):
        raise ValueError("expected a list of module names, a JSON array string or a comma-separated string")
    names = [m.strip() for m in items if m.strip()]
    if not names:
        raise ValueError("expected at least one module name")
    return ",".join(names)


def _has(c, dotted: str) -> bool:
    node = c
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def _same_path(a, b) -> bool:
    return os.path.normpath(str(a)) == os.path.normpath(str(b))


def convert(data: dict) -> tuple[dict, dict]:
    """SimpleTuner JSON -> (wanjax overrides {dotted key: value}, {reported key: reason not honored})."""
    out, unhonored, _ = _convert(data)
    return out, unhonored


def _convert(data: dict) -> tuple[dict, dict, dict]:
    """convert(), and {wanjax key: the SimpleTuner key it came from} for error messages."""
    if not isinstance(data, dict):
        raise _Refused(f"expected a JSON object {{option: value}}, got {type(data).__name__}")
    base = base_config()
    out, origin, unhonored = {}, {}, {}

    def put(target: str, value, key: str):
        if target in out and str(out[target]) != str(value):
            raise _Refused(f"{origin[target]}={out[target]!r} and {key}={value!r} both set {target}: keep one")
        out[target], origin[target] = value, key

    for raw_key, value in data.items():
        key = str(raw_key).lstrip("-")
        try:
            if key in SAME or key in ALIASES:
                target = SAME.get(key) or ALIASES[key]
                if key == "user_prompt_library" and value in (None, False, ""):
                    continue
                if key == "peft_lora_target_modules":
                    value = _targets(value)
                elif key == "lora_format":
                    if str(value).strip().lower() not in LORA_FORMATS:
                        raise ValueError(f"expected one of {LORA_FORMATS}")
                    value = str(value).strip().lower()
                put(target, value, key)
            elif key == "model_family":
                if not isinstance(value, str) or value.strip().lower() != "wan":
                    raise ValueError("wanjax trains Wan models only: expected 'wan'")
                put("model_family", "wan", key)
            elif key == "gradient_checkpointing":
                put("model.remat_policy", "full" if _bool(value) else "none", key)
            elif key == "lora_type":
                if str(value).strip().lower() != "standard":
                    raise ValueError("only 'standard' LoRA is supported (no LyCORIS)")
            elif key == "use_dora":
                if _bool(value):
                    raise ValueError("DoRA is not supported; only standard LoRA (use_dora=false)")
            elif key == "lora_dropout":
                if _number(value, float) != 0:
                    unhonored[key] = f"{value}: wanjax's LoRA has no dropout; the adapters train without it"
            elif key == "base_model_default_dtype":
                precision = str(data.get("mixed_precision", "bf16")).lower()
                precision = {"no": "fp32"}.get(precision, precision)
                if str(value).lower() != precision:
                    unhonored[key] = (f"{value!r}: wanjax keeps the frozen base in mixed_precision ({precision!r}); "
                                      "set mixed_precision to choose its dtype")
            elif key == "pretrained_vae_model_name_or_path":
                try:
                    pipeline = resolve_model({k: data.get(k) for k in ("model_flavour",
                                                                      "pretrained_model_name_or_path")}).pipeline
                except ValueError:
                    pipeline = None  # an unknown flavour: the trainer refuses it by name
                if value and not (pipeline and _same_path(value, pipeline)):
                    unhonored[key] = f"{value!r}: wanjax reads the VAE from the pipeline's vae/ folder ({pipeline!r})"
            elif key == "validation_prompt_library":
                if not isinstance(value, (str, bool, type(None))):
                    raise ValueError("expected a JSON file path (or false)")
                if isinstance(value, str) and value.strip().lower() not in _TRUE + _FALSE:
                    put("validation_prompt_library", value, key)
                elif value is not None and _bool(value):
                    unhonored[key] = ("true asks for SimpleTuner's built-in prompt library, which wanjax does not ship: "
                                      "give a JSON file {nickname: prompt} (user_prompt_library)")
            elif key == "distillation_config":
                known = sorted(base.distillation_config.keys())
                method = str(data.get("distillation_method") or "").lower()
                own = {"dmd": dmd_options(), "dcm": dcm_options()}.get(method, {})
                for sub, v in _distillation_config(value).items():
                    if sub in known:
                        put(f"distillation_config.{sub}", v, f"distillation_config.{sub}")  # type-checked
                        if sub not in own:  # kept, but this run's method does not read it
                            other = "DMD" if sub in dmd_options() else "DCM"
                            unhonored[f"distillation_config.{sub}"] = f"a {other} option: no effect on a " + (
                                f"{method.upper()} run" if own else "run without distillation_method (LoRA)")
                    else:
                        unhonored[f"distillation_config.{sub}"] = (
                            "unknown distillation option: not recognised by wanjax" + _suggest(sub, known))
            elif key in NO_EFFECT:
                unhonored[key] = NO_EFFECT[key]
            elif key in base.distillation_config:
                unhonored[key] = "a distillation_config option given at the top level: put it inside distillation_config"
            elif key in DATASET_KEYS:
                unhonored[key] = "a dataset option: it belongs in a data_backend_config (multidatabackend.json) entry"
            elif _has(base, key):
                unhonored[key] = f"a wanjax option, not a SimpleTuner one: set it with --config.{key}=VALUE"
            else:
                unhonored[key] = "unknown key: not a SimpleTuner option wanjax recognises" + _suggest(key, KNOWN)
        except _Refused:
            raise
        except ValueError as e:
            raise _Refused(f"{key}={value!r}: {e}") from None

    epochs = out.get("num_train_epochs")
    try:
        from_epochs = epochs is not None and _number(epochs, int) > 0
    except ValueError as e:
        raise _Refused(f"{origin['num_train_epochs']}={epochs!r}: {e}") from None
    if out.get("max_train_steps") is None and from_epochs:
        out["max_train_steps"] = 0  # SimpleTuner: no max_train_steps -> the epochs set the length
    if "train_batch_size" in out:
        unhonored["train_batch_size (semantics)"] = (
            "SimpleTuner's is per GPU; wanjax's is the global batch of one forward/backward over all devices (x "
            "gradient_accumulation_steps per optimizer step): multiply by your data-parallel device count to keep "
            "the same global batch")
    return out, unhonored, origin


def _node(c, dotted: str):
    node = c
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node[p]
    return node, leaf


# SimpleTuner's null for settings wanjax spells with a number: update the EMA every step, keep every checkpoint
NULL_MEANS = {"ema_update_interval": 1, "checkpoints_total_limit": 0}


def _set(c, dotted: str, value):
    """Set `dotted` to `value` converted to the field's declared type (placeholders keep theirs); a null only where
    the default is None, or where SimpleTuner's null has a wanjax number (NULL_MEANS)."""
    node, leaf = _node(c, dotted)
    value = NULL_MEANS.get(dotted, value) if value is None else value
    if value is None:
        if node[leaf] is not None:
            raise ValueError(f"this setting cannot be unset (wanjax's default: {node[leaf]!r})")
        return
    node[leaf] = _coerce(value, node.get_type(leaf), node[leaf])


def _report_tree(flat: dict) -> dict:
    """{"a.b": reason} -> {"a": {"b": reason}}: ConfigDict field names cannot hold dots. A key that cannot nest
    ("a" and "a.b" both reported, or an empty part) stays flat with "/" for its dots."""
    tree = {}
    for key in sorted(flat, key=lambda k: k.count(".")):  # "a" before "a.b"
        parts, node = key.split("."), tree
        if all(parts):
            for p in parts[:-1]:
                if not isinstance(node.setdefault(p, {}), dict):
                    break
                node = node[p]
            else:
                if parts[-1] not in node:
                    node[parts[-1]] = flat[key]
                    continue
        tree[key.replace(".", "/")] = flat[key]
    return tree


def get_config(arg=None):
    if not arg:
        raise ValueError("usage: --config configs/simpletuner.py:path/to/config.json")
    try:
        with open(arg) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{arg}: cannot read a SimpleTuner JSON config ({e})") from None
    try:
        overrides, unhonored, origin = _convert(data)
    except ValueError as e:
        raise ValueError(f"{arg}: {e}") from None
    c = base_config()
    for key, value in overrides.items():
        try:
            _set(c, key, value)
        except (ValueError, TypeError) as e:
            name = origin.get(key, key)
            raise ValueError(f"{arg}: {name}={value!r}: {e}" + (f" (wanjax's {key})" if name != key else "")) from None
    dmd = str(c.distillation_method or "").lower() == "dmd"
    if dmd and float(c.distillation_config.flow_matching_weight) == 0 and float(c.caption_dropout_probability) > 0:
        unhonored["caption_dropout_probability (semantics)"] = (
            f"{c.caption_dropout_probability}: DMD drops captions only in its optional flow-matching term "
            "(distillation_config.flow_matching_weight, here 0); the generator and critic always see the captions")
    method = str(c.distillation_method or "").lower()
    if method in ("dmd", "dcm") and data.get("validation_num_inference_steps") is not None:
        from wanjax.methods.dmd import parse_steps  # the DMD trainer's reading of dmd_denoising_steps

        d = c.distillation_config
        steps = d.multiphase if method == "dcm" else len(parse_steps(d.dmd_denoising_steps))
        if int(c.validation_num_inference_steps) != int(steps):
            unhonored["validation_num_inference_steps"] = (
                f"{c.validation_num_inference_steps}: the {method.upper()} student samples in its own {steps} steps "
                + ("(multiphase)" if method == "dcm" else "(dmd_denoising_steps)"))
    c.simpletuner = dict(source=os.path.abspath(arg), unhonored=_report_tree(unhonored))
    for key, reason in sorted(unhonored.items()):
        print(f"[simpletuner] {key}: not honored: {reason}", file=sys.stderr)
    return c
