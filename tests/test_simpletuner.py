"""configs/simpletuner.py: every SimpleTuner key is mapped with its meaning, or reported with the reason it has no
effect; bad values are refused naming the key, the value and what was expected."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEEDS = Path(__file__).parent / "fixtures" / "simpletuner"  # SimpleTuner's seed configs, as users bring them


def _module():
    spec = importlib.util.spec_from_file_location("cfg_simpletuner_test", ROOT / "configs" / "simpletuner.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(tmp_path, data):
    """The wanjax config of a SimpleTuner JSON (a dict written to a file, or a seed's file name)."""
    if isinstance(data, str):
        path = SEEDS / data
    else:
        path = tmp_path / "config.json"
        path.write_text(json.dumps(data))
    return _module().get_config(str(path))


def recorded(c) -> dict:
    """simpletuner.unhonored as output_dir/config.json records it."""
    return json.loads(c.to_json_best_effort())["simpletuner"]["unhonored"]


def refused(tmp_path, data, *parts):
    with pytest.raises(ValueError) as info:
        load(tmp_path, data)
    for part in parts:
        assert part in str(info.value), str(info.value)
    return str(info.value)


# -- 1. distillation_config: unknown sub-keys are reported, not a crash ------------------------------------
def test_unknown_distillation_option_is_reported(tmp_path, capsys):
    c = load(tmp_path, {"distillation_method": "dcm",
                        "distillation_config": {"mode": "semantic", "euler_steps": 100, "euler_step": 100}})
    assert c.distillation_config.euler_steps == 100 and c.distillation_config.mode == "semantic"
    reason = recorded(c)["distillation_config"]["euler_step"]
    assert "unknown distillation option" in reason and "did you mean 'euler_steps'?" in reason
    assert "[simpletuner] distillation_config.euler_step: not honored" in capsys.readouterr().err


def test_dotted_report_keys_never_crash(tmp_path):
    c = load(tmp_path, {"model.attention": "cudnn", "x.y": 2, "x": 1, "distillation_config": {"a.b": 1, "a": 2}})
    report = recorded(c)
    assert "--config.model.attention" in report["model"]["attention"]  # a wanjax key: says how to set it
    assert "unknown key" in report["x"] and "unknown key" in report["x/y"]
    assert "unknown distillation option" in report["distillation_config"]["a"]
    assert "unknown distillation option" in report["distillation_config/a/b"]


def test_the_other_methods_distillation_options_are_reported(tmp_path):
    """A DMD key in a DCM run (and the reverse, and any in a LoRA run) is kept, type-checked, and reported as having
    no effect: never dropped silently."""
    dcm = load(tmp_path, {"distillation_method": "dcm", "distillation_config": {
        "real_score_guidance_scale": 8, "generator_update_interval": 5, "multiphase": 4}})
    report = dict(dcm.simpletuner["unhonored"]["distillation_config"])
    assert report == {"real_score_guidance_scale": "a DMD option: no effect on a DCM run",
                      "generator_update_interval": "a DMD option: no effect on a DCM run"}
    dmd = load(tmp_path, {"distillation_method": "dmd", "distillation_config": {"distill_cfg": 9, "mode": "fine"}})
    assert set(dmd.simpletuner["unhonored"]["distillation_config"]) == {"distill_cfg", "mode"}
    lora = load(tmp_path, {"distillation_config": {"fake_score_lr": 1e-4}})
    assert dict(lora.simpletuner["unhonored"]["distillation_config"]) == {
        "fake_score_lr": "a DMD option: no effect on a run without distillation_method (LoRA)"}
    refused(tmp_path, {"distillation_method": "dcm", "distillation_config": {"fake_score_betas": "0.9"}},
            "expected 2 values")


def test_validation_steps_of_a_student_are_its_own():
    """The DCM seed's validation_num_inference_steps=8: the 4-step student samples in its 4 steps (reported); the DMD
    seed's 3 equals its 3 steps (nothing to report)."""
    dcm = load(None, "dcm-config.json").simpletuner["unhonored"]
    assert dcm["validation_num_inference_steps"] == "8: the DCM student samples in its own 4 steps (multiphase)"
    assert "validation_num_inference_steps" not in load(None, "dmd-config.json").simpletuner["unhonored"]


# -- 2. distillation_config as a string (SimpleTuner literal_evals it) -------------------------------------
@pytest.mark.parametrize("text", ['{"mode": "semantic", "euler_steps": 100, "dual_experts": true}',
                                  "{'mode': 'semantic', 'euler_steps': 100, 'dual_experts': True}"])
def test_distillation_config_string_is_parsed(tmp_path, text):
    c = load(tmp_path, {"distillation_method": "dcm", "distillation_config": text})
    d = c.distillation_config
    assert (d.mode, d.euler_steps, d.dual_experts) == ("semantic", 100, True)


@pytest.mark.parametrize("value", ["mode=semantic", "[1, 2]", 5])
def test_distillation_config_not_an_object_is_refused(tmp_path, value):
    refused(tmp_path, {"distillation_config": value}, "distillation_config=", "expected an object")


# -- 3. types follow the wanjax field's declared type ------------------------------------------------------
@pytest.mark.parametrize("data, parts", [
    ({"learning_rate": True}, ("learning_rate=True", "expected a number")),
    ({"lora_rank": 16.5}, ("lora_rank=16.5", "expected an integer")),
    ({"train_batch_size": 2.9}, ("train_batch_size=2.9", "expected an integer")),
    ({"lora_rank": True}, ("lora_rank=True", "expected an integer")),
    ({"validation_seed": "forty-two"}, ("validation_seed='forty-two'", "expected an integer")),
    ({"use_ema": "maybe"}, ("use_ema='maybe'", "expected a boolean")),
    ({"use_ema": 2}, ("use_ema=2", "expected a boolean")),
    ({"distillation_config": {"fake_score_betas": "0.9"}}, ("distillation_config.fake_score_betas='0.9'",
                                                            "expected 2 values")),
    ({"distillation_config": {"fake_score_betas": "0.9,x"}}, ("fake_score_betas='0.9,x'", "expected a number")),
    ({"lora_rank": None}, ("lora_rank=None", "cannot be unset")),
    ({"validation_prompt": True}, ("validation_prompt=True", "expected a string")),
])
def test_wrong_types_are_refused(tmp_path, data, parts):
    refused(tmp_path, data, *parts)


def test_simpletuner_nulls_with_a_wanjax_number(tmp_path):
    """SimpleTuner's null ema_update_interval updates the EMA every step, its null checkpoints_total_limit keeps every
    checkpoint: wanjax's 1 and 0."""
    c = load(tmp_path, {"ema_update_interval": None, "checkpoints_total_limit": None, "use_ema": True})
    assert c.ema_update_interval == 1 and c.checkpoints_total_limit == 0


def test_values_are_converted_by_declared_type(tmp_path):
    c = load(tmp_path, {"validation_seed": "42", "validation_resolution": 480, "lora_rank": "16", "lora_alpha": 8,
                        "learning_rate": "1e-4", "train_batch_size": 2.0, "push_to_hub": "false",
                        "distillation_config": {"fake_score_betas": "0.9,0.999", "discriminator_betas": [0, 0.99]}})
    assert c.validation_seed == 42 and c.validation_resolution == "480"
    assert c.lora_rank == 16 and c.lora_alpha == 8.0 and c.learning_rate == 1e-4 and c.train_batch_size == 2
    assert c.push_to_hub is False
    assert c.distillation_config.fake_score_betas == (0.9, 0.999)
    assert c.distillation_config.discriminator_betas == (0.0, 0.99)
    # validation_resolution as wanjax/validation.py reads it ("WxH", an int, or a comma-separated list of them)
    assert load(tmp_path, {"validation_resolution": ["832x480", 480]}).validation_resolution == "832x480,480"


def test_area_resolution_in_megapixels(tmp_path):
    c = load(tmp_path, {"resolution": 1.0, "resolution_type": "area"})
    assert c.resolution == 1 and c.resolution_type == "area"
    c = load(tmp_path, {"resolution": 0.5, "resolution_type": "area", "minimum_image_size": 0.25})
    assert (c.resolution, c.minimum_image_size) == (0.5, 0.25)
    # the caching step's dataset reader takes them as trainer-level defaults (wanjax/cache.py)
    from wanjax.data import sources

    (tmp_path / "clips").mkdir()
    backend = tmp_path / "multidatabackend.json"
    backend.write_text(json.dumps([{"id": "clips", "type": "local", "dataset_type": "video",
                                    "instance_data_dir": str(tmp_path / "clips")}]))
    defaults = {k: c.get(k) for k in ("resolution", "resolution_type", "minimum_image_size")}
    (ds,), _ = sources.read_datasets(backend, defaults)
    assert (ds.clip.resolution, ds.clip.resolution_type, ds.clip.minimum_image_size) == (0.5, "area", 0.25)


# -- 4. SimpleTuner options (and aliases) with a wanjax equivalent are mapped --------------------------------
@pytest.mark.parametrize("value", [["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj"],
                                   '["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj"]',
                                   "to_q,to_k,to_v,to_out.0,ffn.net.0.proj"])
def test_peft_lora_target_modules(tmp_path, value):
    c = load(tmp_path, {"peft_lora_target_modules": value})
    assert c.lora_target_modules == "to_q,to_k,to_v,to_out.0,ffn.net.0.proj"
    assert "peft_lora_target_modules" not in recorded(c)


def test_aliases_and_same_keys_are_mapped(tmp_path):
    lib = tmp_path / "prompts.json"
    c = load(tmp_path, {"lora_format": "ComfyUI", "user_prompt_library": str(lib), "validation_steps": 10,
                        "checkpointing_steps": 20, "cache_dir": "cache/x", "use_dora": False, "lora_dropout": 0.0,
                        "pretrained_model_name_or_path": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                        "pretrained_vae_model_name_or_path": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                        "pretrained_transformer_model_name_or_path": "path/to-the-other-model",
                        "pretrained_transformer_subfolder": "none"})
    assert c.lora_export_format == "comfyui" and c.validation_prompt_library == str(lib)
    assert c.validation_step_interval == 10 and c.checkpoint_step_interval == 20 and c.cache_dir == "cache/x"
    assert c.pretrained_transformer_model_name_or_path == "path/to-the-other-model"
    assert c.pretrained_transformer_subfolder == "none"
    assert set(recorded(c)) == set()  # every key honored


def test_num_train_epochs_sets_the_length(tmp_path):
    c = load(tmp_path, {"num_train_epochs": 5})
    assert (c.num_train_epochs, c.max_train_steps) == (5, 0) and "num_train_epochs" not in recorded(c)
    c = load(tmp_path, {"num_train_epochs": 0, "max_train_steps": 300})
    assert (c.num_train_epochs, c.max_train_steps) == (0, 300)


def test_refused_lora_options(tmp_path):
    refused(tmp_path, {"use_dora": True}, "use_dora=True", "DoRA is not supported")
    refused(tmp_path, {"lora_format": "kohya"}, "lora_format='kohya'", "'diffusers', 'comfyui'")
    refused(tmp_path, {"validation_steps": 10, "validation_step_interval": 20},
            "validation_steps=10", "validation_step_interval=20", "keep one")


def test_options_without_equivalent_have_a_reason(tmp_path):
    c = load(tmp_path, {"lora_dropout": 0.1, "pretrained_model_name_or_path": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                        "pretrained_vae_model_name_or_path": "someone/other-vae", "base_model_default_dtype": "fp32"})
    report = recorded(c)
    assert "no dropout" in report["lora_dropout"]
    assert "vae/ folder" in report["pretrained_vae_model_name_or_path"]
    assert "mixed_precision" in report["base_model_default_dtype"]
    # the VAE of the pipeline in use (here the flavour's repo) is what wanjax reads: nothing to report
    same = load(tmp_path, {"model_flavour": "t2v-480p-14b-2.1",
                           "pretrained_vae_model_name_or_path": "Wan-AI/Wan2.1-T2V-14B-Diffusers"})
    assert "pretrained_vae_model_name_or_path" not in recorded(same)


# the SimpleTuner Wan quickstarts' options (/work/shared/seeds): reported with a reason, never as unknown
QUICKSTART_OPTIONS = {
    "enable_group_offload": True, "group_offload_type": "block_level", "group_offload_blocks_per_group": 1,
    "group_offload_use_stream": True, "group_offload_to_disk_path": "/ssd", "enable_model_cpu_offload": True,
    "enable_chunked_feed_forward": True, "feed_forward_chunk_size": 2, "text_encoder_2_precision": "no_change",
    "base_model_default_dtype": "bf16", "tread_config": {"routes": []}, "validation_preview": True,
    "validation_preview_steps": 1, "wan_force_2_1_time_embedding": True, "wan_validation_load_other_stage": True,
    "write_batch_size": 128, "--user_prompt_library": "config/user_prompt_library.json",
}


def test_quickstart_options_are_known(tmp_path):
    report = recorded(load(tmp_path, QUICKSTART_OPTIONS))
    unknown = {k: v for k, v in report.items() if isinstance(v, str) and "unknown key" in v}
    assert not unknown


def test_misplaced_options_say_where_they_belong(tmp_path):
    report = recorded(load(tmp_path, {"mode": "fine", "crop": True, "validation_prompt_library": True}))
    assert "inside distillation_config" in report["mode"]
    assert "data_backend_config" in report["crop"]
    assert "built-in prompt library" in report["validation_prompt_library"]


@pytest.mark.parametrize("seed", ["lora-config.json", "dmd-config.json", "dcm-config.json"])
def test_seed_configs_have_no_unknown_keys(tmp_path, seed):
    report = recorded(load(tmp_path, seed))
    flat = {**{k: v for k, v in report.items() if isinstance(v, str)},
            **{f"{k}.{s}": r for k, v in report.items() if isinstance(v, dict) for s, r in v.items()}}
    assert not {k: v for k, v in flat.items() if "unknown" in v}


# -- 5. unknown keys: reported with a suggestion ---------------------------------------------------------
def test_unknown_key_suggests_the_known_one(tmp_path, capsys):
    c = load(tmp_path, {"learning_rat": 1e-3})
    assert c.learning_rate == 1e-4  # the default: the typo is not applied...
    assert "did you mean 'learning_rate'?" in recorded(c)["learning_rat"]  # ...and says so
    assert "[simpletuner] learning_rat: not honored" in capsys.readouterr().err


# -- 6. model_family ---------------------------------------------------------------------------------------
def test_model_family_must_be_wan(tmp_path):
    refused(tmp_path, {"model_family": "flux"}, "model_family='flux'", "expected 'wan'")
    assert load(tmp_path, {"model_family": "Wan"}).model_family == "wan"


# -- 7. DMD uses caption dropout only in its flow-matching term --------------------------------------------
def test_dmd_caption_dropout_note(tmp_path):
    note = recorded(load(tmp_path, "dmd-config.json")).get("caption_dropout_probability (semantics)", "")
    assert "flow_matching_weight" in note
    with_fm = json.loads((SEEDS / "dmd-config.json").read_text())
    with_fm["distillation_config"]["flow_matching_weight"] = 0.5
    assert "caption_dropout_probability (semantics)" not in recorded(load(tmp_path, with_fm))
    assert "caption_dropout_probability (semantics)" not in recorded(load(tmp_path, "lora-config.json"))


def test_refusal_is_one_line_on_the_command_line(tmp_path, capsys):
    """The trainer's command line shows the importer's refusal as one line, not ml_collections' wrapped traceback."""
    from wanjax.train import main

    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"lora_rank": 16.5}))
    assert main(["train", f"--config={ROOT / 'configs' / 'simpletuner.py'}:{path}", "--dry_run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert err.endswith(f"{path}: lora_rank=16.5: expected an integer, got a fractional number")
