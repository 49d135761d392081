"""Hub publishing without the network: the model card's content, and the pusher up to the HfApi calls it makes
(recorded by monkeypatched HfApi methods), disabling itself with one warning when it cannot push."""

import importlib.util
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import requests
import yaml
from huggingface_hub import HfApi, errors

from wanjax import hub

ROOT = Path(__file__).resolve().parents[1]
SEEDS = Path(__file__).parent / "fixtures" / "simpletuner"
BASE = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
HUB_METHODS = ("create_repo", "create_commit", "upload_folder", "upload_file", "whoami")


def _front_matter(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def _simpletuner(name: str):
    spec = importlib.util.spec_from_file_location("cfg_simpletuner", ROOT / "configs" / "simpletuner.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(str(SEEDS / name))


# ---------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------
def test_model_card_lora():
    validation = [{"prompt": "Two cats box on a stage, 'spotlit'", "path": "validation/step_400_0.mp4"}]
    text = hub.model_card(
        base_model=BASE, method="lora", repo_id="user/wan-disney", validation=validation,
        settings={"Training steps": 400, "Learning rate": 5e-05, "LoRA rank": 16, "LoRA alpha": 16.0,
                  "Optimizer": "optimi-lion", "Resolution": "480 (pixel_area)", "Skipped": None},
        sampling={"negative_prompt": "色调艳丽，过曝"},
    )
    front, body = _front_matter(text)
    assert front["base_model"] == BASE and front["library_name"] == "diffusers"
    assert front["pipeline_tag"] == "text-to-video" and front["base_model_relation"] == "adapter"
    for tag in ("text-to-video", "diffusers", "lora", "wan", "template:sd-lora"):
        assert tag in front["tags"]
    assert front["widget"] == [{"text": validation[0]["prompt"], "parameters": {"negative_prompt": "色调艳丽，过曝"},
                                "output": {"url": "validation/step_400_0.mp4"}}]
    for line in ("- Training steps: `400`", "- Learning rate: `5e-05`", "- LoRA rank: `16`", "- LoRA alpha: `16.0`",
                 "- Optimizer: `optimi-lion`", "- Resolution: `480 (pixel_area)`"):
        assert line in body
    assert "Skipped" not in body and "<Gallery />" in body and body.startswith("\n# user/wan-disney")
    code = body.split("```python\n", 1)[1].split("```", 1)[0]
    assert f"WanPipeline.from_pretrained({BASE!r}" in code
    assert "pipe.load_lora_weights('user/wan-disney')" in code
    assert "guidance_scale=5.0" in code and "num_inference_steps=50" in code
    compile(code, "usage", "exec")  # the snippet is valid Python


def test_model_card_student_and_variants():
    sigmas = [1.0, 0.9375, 0.8333]
    text = hub.model_card(base_model=BASE, method="dmd", repo_id="user/wan-dmd", settings={"DMD": {"Steps": 3}},
                          sampling={"sigmas": sigmas})
    front, body = _front_matter(text)
    assert "widget" not in front and {"distillation", "dmd"} <= set(front["tags"])
    assert "- DMD:\n  - Steps: `3`" in body and "Distribution Matching Distillation" in body
    code = body.split("```python\n", 1)[1].split("```", 1)[0]
    compile(code, "usage", "exec")
    assert f"sigmas={sigmas!r}" in code and "stochastic_sampling=True" in code
    assert "num_inference_steps=3" in code and "guidance_scale=1.0" in code

    # Wan 2.2 low-noise expert, a local base (no base_model in the metadata), a full fine-tune
    text = hub.model_card(base_model="Wan-AI/Wan2.2-T2V-A14B-Diffusers", method="lora", repo_id="u/r", settings={},
                          transformer="transformer_2")
    assert "pipe.load_lora_weights('u/r', load_into_transformer_2=True)" in text
    front, _ = _front_matter(hub.model_card(base_model="/data/wan", method="lora", repo_id="u/r", settings={}))
    assert "base_model" not in front
    front, body = _front_matter(hub.model_card(base_model=BASE, method="full", repo_id="u/r", settings={}, lora=False))
    assert "lora" not in front["tags"] and "WanPipeline.from_pretrained('u/r'" in body and "load_lora" not in body
    with pytest.raises(ValueError, match="method"):
        hub.model_card(base_model=BASE, method="sft", repo_id="u/r", settings={})


@pytest.mark.parametrize("seed, method", [("lora-config.json", "lora"), ("dmd-config.json", "dmd"),
                                          ("dcm-config.json", "dcm")])
def test_card_from_simpletuner_seed_configs(seed, method):
    config = _simpletuner(seed)
    meta = {"method": method, "lora": {"rank": config.lora_rank, "alpha": 128.0, "targets": ["to_q", "to_k"]}}
    if method != "lora":
        meta["student"] = {"sigmas": [1.0, 0.9, 0.7]}
    text = hub.card_from_config(config, repo_id="user/wan-disney", steps=123, meta=meta,
                                validation=[{"prompt": "p", "path": "validation/a.mp4"}])
    front, body = _front_matter(text)
    assert front["base_model"] == BASE and front["widget"][0]["output"]["url"] == "validation/a.mp4"
    assert "- Training steps: `123`" in body and f"- Learning rate: `{config.learning_rate}`" in body
    assert "- LoRA alpha: `128.0`" in body and "- LoRA targets: `to_q, to_k`" in body
    if method == "dmd":
        assert "- DMD:" in body and "1000,757,522" in body and "stochastic_sampling=True" in body
    if method == "dcm":
        assert "- DCM:" in body and "- Mode: `semantic`" in body and "stochastic_sampling=False" in body
    if method == "lora":
        assert front["widget"][0]["parameters"]["negative_prompt"] == config.validation_negative_prompt
    else:  # a student runs without CFG: no negative prompt
        assert "parameters" not in front["widget"][0] and "negative_prompt" not in body


# ---------------------------------------------------------------------------------------------------------
# Pusher
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def calls(monkeypatch, tmp_path):
    """No token anywhere unless a test sets one; every HfApi network method records its call instead."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # conftest sets it for the whole session
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    # the token file's path is fixed when huggingface_hub is imported: point it at the empty HF_HOME too
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "tokens"))
    recorded = []

    def recorder(name):
        def method(self, *args, **kwargs):
            recorded.append((name, args, kwargs))
            if name == "create_repo":
                return SimpleNamespace(repo_id=f"someone/{args[0].split('/')[-1]}")
            return SimpleNamespace(oid="0" * 40)
        return method

    for name in HUB_METHODS:
        monkeypatch.setattr(HfApi, name, recorder(name))
    return recorded


def _run(tmp_path):
    out = tmp_path / "out"
    (out / "validation").mkdir(parents=True)
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"lora")
    (out / "validation" / "step_4_0.mp4").write_bytes(b"mp4")
    return out


@pytest.mark.parametrize("why", ["no token", "offline"])
def test_disabled_without_token_or_offline(calls, tmp_path, monkeypatch, caplog, why):
    if why == "offline":
        monkeypatch.setenv("HF_TOKEN", "hf_test")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.WARNING, logger="wanjax.hub"):
        pusher = hub.HubPusher("wan-disney", push_checkpoints=True)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "wan-disney" in warnings[0].getMessage()
    assert ("HF_HUB_OFFLINE" if why == "offline" else "no Hugging Face token") in warnings[0].getMessage()
    assert not pusher.enabled
    out = _run(tmp_path)
    assert pusher.push_final(out, [out / "pytorch_lora_weights.safetensors"], "# card\n") is False
    assert pusher.push_checkpoint(4, [out / "pytorch_lora_weights.safetensors"]) is False
    assert calls == []  # not one hub call
    assert (out / "README.md").read_text() == "# card\n"  # the card is still written locally
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_push_final_and_checkpoint(calls, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    pusher = hub.HubPusher("wan-disney", private=True, push_checkpoints=True)
    assert pusher.enabled and pusher.repo_id == "someone/wan-disney"  # the namespace create_repo resolved
    name, args, kwargs = calls[0]
    assert name == "create_repo" and args[0] == "wan-disney"
    assert kwargs["repo_type"] == "model" and kwargs["exist_ok"] and kwargs["private"] is True

    out = _run(tmp_path)
    card = hub.model_card(base_model=BASE, method="lora", repo_id=pusher.repo_id, settings={"Training steps": 4},
                          validation=[{"prompt": "p", "path": "validation/step_4_0.mp4"}])
    assert pusher.push_final(out, [out / "pytorch_lora_weights.safetensors", "validation/step_4_0.mp4"], card)
    name, args, kwargs = calls[1]
    assert name == "create_commit" and args[0] == "someone/wan-disney" and kwargs["repo_type"] == "model"
    assert kwargs["run_as_future"] is False
    ops = {op.path_in_repo: op for op in args[1]}
    assert set(ops) == {"pytorch_lora_weights.safetensors", "README.md", "validation/step_4_0.mp4"}
    assert Path(ops["README.md"].path_or_fileobj).read_text() == card == (out / "README.md").read_text()
    assert Path(ops["validation/step_4_0.mp4"].path_or_fileobj).read_bytes() == b"mp4"

    assert pusher.push_checkpoint(4, [out / "pytorch_lora_weights.safetensors"])
    name, args, kwargs = calls[2]
    assert name == "create_commit" and args[0] == "someone/wan-disney" and kwargs["repo_type"] == "model"
    assert [op.path_in_repo for op in args[1]] == ["checkpoint-4/pytorch_lora_weights.safetensors"]
    assert len(calls) == 3

    # a folder of exports goes under checkpoint-<step>/ too; without push_checkpoints nothing is pushed
    (out / "ckpt").mkdir()
    (out / "ckpt" / "fake_score_lora_weights.safetensors").write_bytes(b"critic")
    assert pusher.push_checkpoint(8, [out / "ckpt"])
    assert [op.path_in_repo for op in calls[3][1][1]] == ["checkpoint-8/fake_score_lora_weights.safetensors"]
    pusher.push_checkpoints = False
    assert pusher.push_checkpoint(12, [out / "pytorch_lora_weights.safetensors"]) is False and len(calls) == 4


def _http_error():
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    response = httpx.Response(401, request=httpx.Request("POST", "https://huggingface.co/api/repos/create"))
    return errors.HfHubHTTPError("401 Client Error: Unauthorized", response=response)


@pytest.mark.parametrize("error", [
    requests.ConnectionError("Max retries exceeded: Temporary failure in name resolution"),
    errors.OfflineModeIsEnabled("offline"),
    "http",
])
def test_unreachable_hub_disables(calls, tmp_path, monkeypatch, caplog, error):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    error = _http_error() if error == "http" else error

    def create_repo(self, *args, **kwargs):
        calls.append(("create_repo", args, kwargs))
        raise error

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    with caplog.at_level(logging.WARNING, logger="wanjax.hub"):
        pusher = hub.HubPusher("user/wan-disney", push_checkpoints=True)
    assert not pusher.enabled
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "user/wan-disney" in warning and type(error).__name__ in warning
    out = _run(tmp_path)
    assert pusher.push_final(out, ["pytorch_lora_weights.safetensors"], "card") is False
    assert pusher.push_checkpoint(4, [out / "pytorch_lora_weights.safetensors"]) is False
    assert [c[0] for c in calls] == ["create_repo"]


def test_upload_failure_is_logged_not_raised(calls, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    pusher = hub.HubPusher("user/wan-disney", push_checkpoints=True)

    def create_commit(self, *args, **kwargs):
        raise requests.ConnectionError("connection reset")

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    out = _run(tmp_path)
    with caplog.at_level(logging.WARNING, logger="wanjax.hub"):
        assert pusher.push_checkpoint(4, [out / "pytorch_lora_weights.safetensors"]) is False
        assert pusher.push_final(out, ["pytorch_lora_weights.safetensors", "validation/missing.mp4"], "c") is False
    assert "connection reset" in caplog.text and "missing.mp4" in caplog.text
    assert pusher.enabled  # a transient failure does not stop later pushes


def test_pusher_from_config(calls, monkeypatch):
    config = _simpletuner("lora-config.json")  # push_to_hub / push_checkpoints_to_hub "true", hub_model_id wan-disney
    if "push_to_hub" not in config:  # common.py without the hub keys: simulate what they will hold
        config.unlock()
        config.push_to_hub, config.push_checkpoints_to_hub, config.hub_model_id = True, True, "wan-disney"
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    pusher = hub.pusher_from_config(config)
    assert pusher.enabled and pusher.push_checkpoints and calls[0][1][0] == "wan-disney"
    config.push_to_hub = False
    assert hub.pusher_from_config(config) is None


def test_only_process_zero_pushes(calls, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(hub.jax, "process_index", lambda: 1)
    with caplog.at_level(logging.WARNING, logger="wanjax.hub"):
        pusher = hub.HubPusher("user/wan-disney", push_checkpoints=True)
    out = _run(tmp_path)
    assert not pusher.enabled and caplog.records == []
    assert pusher.push_final(out, ["pytorch_lora_weights.safetensors"], "card") is False
    assert pusher.push_checkpoint(4, [out / "pytorch_lora_weights.safetensors"]) is False
    assert calls == [] and not (out / "README.md").exists()


def _dcm_config(**over):
    d = {"distillation_method": "dcm", "model_type": "lora", "lora_rank": 4, "model_flavour": "t2v-480p-1.3b-2.1",
         "distillation_config": {"mode": "semantic", "multiphase": 4, "dual_experts": True, "expert_boundary": 0.7}}
    d.update(over)
    return d


def test_dcm_card_sigmas_drop_trailing_zero_and_dual_expert_note():
    sig = [1.0, 0.9807692170143127, 0.9444444179534912, 0.8500000238418579, 0.0]  # DCM meta: ends in 0
    meta = {"method": "dcm", "student": {"sigmas": sig, "switch_sigma": sig[2],
                                         "experts": ["semantic", "semantic", "detail", "detail"]}}
    text = hub.card_from_config(_dcm_config(), repo_id="user/wan-dcm", steps=10, meta=meta)
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert f"sigmas={sig[:-1]!r}" in code and "num_inference_steps=4" in code and ", 0.0]" not in code
    assert "- Student sigmas: `1.0, 0.9807692170143127, 0.9444444179534912, 0.8500000238418579`" in text
    assert f"start at sigma <= {sig[2]}" in text and "below sigma" not in text
    assert "semantic, semantic, detail, detail" in text


def _run_card_snippet(code: str, subs, steps: int, record, text_dim: int):
    """Run a card's diffusers snippet on a tiny local pipeline, on CPU in float32: `subs` (old, new[, count])
    replaced after bfloat16 -> float32 (repo ids, pipeline arguments), the prompt given as embeddings, a 9-frame 32x48
    clip of `steps` steps, latents out, no video written. `record(transformer)` is kept for every transformer
    forward. Returns (the snippet's namespace, the records)."""
    import diffusers
    import numpy as np
    import torch

    code = code.replace("pipe.to('cuda')", "pipe.to('cpu')").replace("torch.bfloat16", "torch.float32")
    for old, new, *count in subs:
        code = code.replace(old, new, *count)
    code = (code.replace("prompt=", "prompt_embeds=EMB, negative_prompt=")
            .replace(f"num_inference_steps={steps}", "height=32, width=48, num_frames=9, output_type='latent', "
                                                     f"num_inference_steps={steps}")
            .replace(".frames[0]", ".frames").split("export_to_video(video")[0])
    seen = []
    orig = diffusers.WanTransformer3DModel.forward

    def fwd(self, hidden_states, timestep, *a, **k):
        seen.append(record(self))
        return orig(self, hidden_states, timestep, *a, **k)

    ns = {"EMB": torch.from_numpy(np.random.default_rng(0).standard_normal((1, 7, text_dim), dtype=np.float32))}
    try:
        diffusers.WanTransformer3DModel.forward = fwd
        exec(code, ns)
    finally:
        diffusers.WanTransformer3DModel.forward = orig
    return ns, seen


def test_dcm_dual_expert_card_switches_the_loras_per_step(tmp_path):
    """The DCM dual-expert card's snippet, run on a tiny pipeline: it loads both LoRAs (the detail one from
    detail_expert_lora_weights.safetensors) and each student step runs with the adapter the run's meta names for
    it (without `experts` in the meta: the trainer's rule, detail from sigma <= switch_sigma)."""
    import diffusers
    import jax

    import reference as ref
    import wanjax

    cfg = ref.T2V
    base = tmp_path / "pipe"
    diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None,
                          scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                          transformer=ref.make_model(cfg, seed=0)).save_pretrained(base)
    config, _ = wanjax.load_transformer(base, subfolder="transformer")
    repo = tmp_path / "repo"
    repo.mkdir()
    for seed, name in ((0, "pytorch_lora_weights.safetensors"), (1, hub.DETAIL_LORA_FILE)):
        wanjax.save_lora(wanjax.init_lora(config, jax.random.key(seed), rank=2, alpha=2.0), repo / name)
    sig = [1.0, 0.98, 0.94, 0.85, 0.0]
    for student, want in (({"experts": ["semantic", "detail", "detail", "semantic"]},
                           ["semantic", "detail", "detail", "semantic"]),
                          ({"switch_sigma": 0.94}, ["semantic", "semantic", "detail", "detail"])):
        meta = {"method": "dcm", "student": {"sigmas": sig, **student}}
        text = hub.card_from_config(_dcm_config(), repo_id="user/wan-dcm", steps=1, meta=meta)
        code = text.split("```python\n", 1)[1].split("```", 1)[0]
        assert f"weight_name={hub.DETAIL_LORA_FILE!r}, adapter_name='detail'" in code
        assert "callback_on_step_end=switch_expert" in code and "The snippet below loads both" in text
        base_id = code.split("WanPipeline.from_pretrained(", 1)[1].split(",", 1)[0]
        no_encoders = "torch_dtype=torch.float32, vae=None, text_encoder=None, tokenizer=None)"
        subs = [(base_id, repr(str(base))), ("'user/wan-dcm'", repr(str(repo))),
                ("torch_dtype=torch.float32)", no_encoders, 1)]
        _, seen = _run_card_snippet(code, subs, 4, lambda m: list(m.active_adapters()), cfg["text_dim"])
        assert seen == [[w] for w in want], (student, seen)


def test_card_fps_from_the_base_model_index(tmp_path, monkeypatch):
    """The snippet exports at the base pipeline's frame rate, read from its model_index.json (24 where it sets
    expand_timesteps: Wan2.2 TI2V-5B; else 16): in a local folder, or in the hub cache for a hub id (never fetched);
    without one, TI2V by name."""
    def fps_line(text):
        return text.split("export_to_video(video, 'output.mp4', ")[1].split(")")[0]

    local = tmp_path / "my-5b"  # no "ti2v" in the name
    local.mkdir()
    (local / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "expand_timesteps": True}))
    assert hub.base_fps(str(local)) == 24
    text = hub.card_from_config({"model_type": "lora", "pretrained_model_name_or_path": str(local)},
                                repo_id="user/x", steps=1)
    assert fps_line(text) == "fps=24"
    cache = tmp_path / "hub-cache"
    snap = cache / "models--org--wan-5b" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "model_index.json").write_text(json.dumps({"expand_timesteps": True}))
    (cache / "models--org--wan-5b" / "refs").mkdir()
    (cache / "models--org--wan-5b" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert hub.base_fps("org/wan-5b") == 24
    assert hub.base_fps("org/not-cached") is None and hub.base_fps(str(tmp_path / "nothing")) is None
    (snap / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    assert hub.base_fps("org/wan-5b") == 16
    text = hub.card_from_config({"model_type": "lora", "pretrained_model_name_or_path": "org/Wan2.2-TI2V-5B-x"},
                                repo_id="user/x", steps=1)
    assert fps_line(text) == "fps=24"  # not cached: by name


def test_card_without_namespace_uses_placeholder():
    text = hub.card_from_config(_dcm_config(), repo_id="wan-dcm", steps=1, meta={"method": "dcm"})
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert "pipe.load_lora_weights('YOUR_USERNAME/wan-dcm')" in code and "'wan-dcm'" not in code
    assert "replace `YOUR_USERNAME`" in text
    text = hub.card_from_config(_dcm_config(), repo_id="me/wan-dcm", steps=1, meta={"method": "dcm"})
    assert "YOUR_USERNAME" not in text and "load_lora_weights('me/wan-dcm')" in text


@pytest.mark.parametrize("flavour", ["t2v-a14b-2.2-high", "t2v-a14b-2.2-low"])
def test_a14b_student_card_runs_every_step_on_the_lora_expert(tmp_path, flavour):
    """The student card's snippet, run on a tiny two-expert (boundary_ratio) pipeline: every student step runs the
    expert the LoRA adapts (high: transformer, low: transformer_2's weights), with the LoRA loaded."""
    import diffusers
    import jax
    import torch

    import reference as ref
    import wanjax

    cfg = ref.T2V
    base = tmp_path / "pipe22"
    diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None,
                          scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                          transformer=ref.make_model(cfg, seed=0), transformer_2=ref.make_model(cfg, seed=1),
                          boundary_ratio=0.875).save_pretrained(base)
    config, _ = wanjax.load_transformer(base, subfolder="transformer")
    (tmp_path / "repo").mkdir()
    wanjax.save_lora(wanjax.init_lora(config, jax.random.key(0), rank=2, alpha=2.0),
                     tmp_path / "repo" / "pytorch_lora_weights.safetensors")
    meta = {"method": "dmd", "student": {"sigmas": [1.0, 0.9, 0.8]}}
    c = {"distillation_method": "dmd", "model_type": "lora", "model_flavour": flavour}
    text = hub.card_from_config(c, repo_id="user/wan22-dmd", steps=1, meta=meta)
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert "transformer_2=None, boundary_ratio=None" in code and "load_into_transformer_2" not in code
    subs = [("'Wan-AI/Wan2.2-T2V-A14B-Diffusers'", repr(str(base))), ("'user/wan22-dmd'", repr(str(tmp_path / "repo"))),
            ("transformer_2=None,", "transformer_2=None, vae=None, text_encoder=None, tokenizer=None,")]
    ns, seen = _run_card_snippet(code, subs, 3, lambda m: (m, bool(getattr(m, "peft_config", None))), cfg["text_dim"])
    pipe = ns["pipe"]
    assert pipe.transformer_2 is None and pipe.config.boundary_ratio is None
    assert len(seen) == 3 and all(m is pipe.transformer and lora for m, lora in seen)
    want = ref.make_model(cfg, seed=1 if flavour.endswith("low") else 0).state_dict()
    got = pipe.transformer.state_dict()
    key = "patch_embedding.weight"
    assert torch.equal(got.get(key, got.get("patch_embedding.base_layer.weight")), want[key])
