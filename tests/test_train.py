"""The LoRA trainer end to end on the tiny default: export loads in diffusers, exact resume, 1 device == 8 devices
== 2 processes, and bad settings refused before any compute."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
import wanjax
from wanjax import lora as lora_lib
from wanjax import tiny
from wanjax.train import ConfigError, main, run

ROOT = Path(__file__).resolve().parents[1]
SEEDS = Path(__file__).parent / "fixtures" / "simpletuner"  # SimpleTuner's seed configs, as users bring them


def _get_config(name, arg):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    return tiny.ensure_assets(tmp_path_factory.mktemp("tiny") / "tiny-wan")


def tiny_config(assets, out, **overrides):
    c = _get_config("lora", "tiny")
    c.tiny_assets_dir = str(assets)
    c.pretrained_model_name_or_path = str(assets / "pipeline")
    c.cache_dir = str(assets / "latents")
    c.output_dir = str(out)
    for k, v in overrides.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def cli_args(assets, out, **overrides):
    args = [f"--config={ROOT / 'configs' / 'lora.py'}:tiny", f"--config.tiny_assets_dir={assets}",
            f"--config.pretrained_model_name_or_path={assets / 'pipeline'}", f"--config.cache_dir={assets / 'latents'}",
            f"--config.output_dir={out}"]
    return args + [f"--config.{k}={v}" for k, v in overrides.items()]


def losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------
def test_tiny_run_lora_loads_in_diffusers(assets, tmp_path):
    """4 steps -> pytorch_lora_weights.safetensors -> WanPipeline.load_lora_weights matches wanjax with that LoRA."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    out = tmp_path / "run"
    summary = run(tiny_config(assets, out, max_train_steps=4, checkpoint_step_interval=2))
    assert summary["steps"] == 4 and len(summary["losses"]) == 4 and all(np.isfinite(summary["losses"]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all({"loss", "lr"} <= set(r) for r in rows)
    saved = json.loads((out / "config.json").read_text())
    assert saved["max_train_steps"] == 4 and saved["lora_rank"] == 4
    path = out / "pytorch_lora_weights.safetensors"
    lora = lora_lib.load_lora(path)
    assert np.abs(np.asarray(lora.params["blocks"]["attn1"]["to_q"]["B"])).max() > 0  # it trained

    transformer = WanTransformer3DModel.from_pretrained(assets / "pipeline" / "transformer").eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.load_lora_weights(str(path))
    cfg = dict(transformer.config)
    inp = ref.inputs(cfg, text_len=9)
    expected = ref.torch_forward(pipe.transformer, inp)
    config, params = wanjax.load_transformer(assets / "pipeline", dtype=jnp.float32)
    kw = {k: jnp.asarray(v) for k, v in inp.items()}
    ours = wanjax.transformer_forward(config, params, kw["hidden_states"], kw["timestep"], kw["encoder_hidden_states"],
                                      lora=lora_lib.load_lora(path, config=config))
    base = ref.torch_forward(WanTransformer3DModel.from_pretrained(assets / "pipeline" / "transformer").eval(), inp)
    assert ref.rel_err(expected, base) > 1e-4  # the LoRA changes the output...
    assert ref.rel_err(np.asarray(ours), expected) <= 1e-4  # ...and diffusers applies it as wanjax does

    # the checkpoint exporter writes the same adapter (EMA weights, as the final export)
    exported = tmp_path / "exported.safetensors"
    r = subprocess.run([sys.executable, str(ROOT / "convert" / "export_lora.py"), "--src", str(out), "--dst",
                        str(exported)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    a, b = lora_lib.load_lora(path), lora_lib.load_lora(exported)
    for x, y in zip(*(sorted(jnp.ravel(v).tolist()[:5] for v in __import__("jax").tree_util.tree_leaves(t.params))
                      for t in (a, b))):
        assert x == y


def test_schedule_free_exports_its_evaluation_weights(assets, tmp_path):
    """adamw_schedulefree trains the y sequence; the weights to save and validate are x = (y - (1 - b1) z) / b1. The
    trainer's export (optax's schedule_free_eval_params) and convert/export_lora.py (from the checkpoint's optimizer
    state) write the same x, which is not y. Resuming such a checkpoint with another optimizer is refused."""
    import jax

    out = tmp_path / "sf"
    run(tiny_config(assets, out, max_train_steps=3, checkpoint_step_interval=3, optimizer="adamw_schedulefree",
                    lr_warmup_steps=0, learning_rate=1e-2))
    sys.path.insert(0, str(ROOT / "convert"))
    try:
        import export_lora
    finally:
        sys.path.pop(0)
    y = export_lora.restore_host(out / "checkpoints" / "3" / "state", ("lora",))["lora"]
    exported = tmp_path / "exported.safetensors"
    r = subprocess.run([sys.executable, str(ROOT / "convert" / "export_lora.py"), "--src", str(out), "--dst",
                        str(exported)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    trainer = lora_lib.load_lora(out / "pytorch_lora_weights.safetensors").params
    tool = lora_lib.load_lora(exported).params
    for a, b, raw in zip(*(jax.tree_util.tree_leaves(t) for t in (trainer, tool, y))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
    diff = max(float(np.abs(np.asarray(a) - np.asarray(raw)).max()) for a, raw in
               zip(jax.tree_util.tree_leaves(trainer), jax.tree_util.tree_leaves(y)))
    assert diff > 1e-4
    with pytest.raises(ConfigError, match="optimizer: saved 'adamw_schedulefree', now 'adamw'"):
        run(tiny_config(assets, out, max_train_steps=4, optimizer="adamw", resume_from_checkpoint="latest"))


@pytest.mark.parametrize("key,value,message", [
    ("log_every", 0, "log_every=0: expected >= 1"),
    ("checkpoints_total_limit", -1, "checkpoints_total_limit=-1: expected >= 0"),
    ("lora_export_format", "kohya", "lora_export_format='kohya': expected one of"),
    ("learning_rate", -1e-4, "learning_rate=-0.0001: expected > 0"),
    ("lr_warmup_steps", -5, "lr_warmup_steps=-5: expected >= 0"),
    ("lr_num_cycles", 0, "lr_num_cycles=0: expected >= 1"),
    ("ema_decay", 1.5, r"ema_decay=1.5: expected a number in \(0, 1\)"),
])
def test_bad_run_settings_refused_before_compute(assets, tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=message):
        run(tiny_config(assets, tmp_path / "x", **{key: value}))
    assert not (tmp_path / "x").exists()


def test_mesh_layouts_refused_before_the_base_loads(assets, tmp_path, monkeypatch):
    """A mesh these 8 devices cannot make, heads that do not split over `context`, and cached clips whose tokens do
    not split over it are one-line ConfigErrors before any weights load (they used to fail at the first traced step,
    or, for a bucket first drawn later, partway through and again on every resume)."""
    from types import SimpleNamespace

    import wanjax.transformer_io as tio
    from wanjax.train import _check_layout

    def boom(*a, **k):
        raise AssertionError("weights loaded before the mesh was checked")

    monkeypatch.setattr(tio, "materialize", boom)
    with pytest.raises(ConfigError, match=r"config.mesh: mesh sizes .*'fsdp': 3.* need 3 devices, have 8 \(1 process"):
        run(tiny_config(assets, tmp_path / "x", **{"mesh.fsdp": 3}))
    with pytest.raises(ConfigError, match="mesh.context=4: context parallelism: num_attention_heads=2 must be "
                                          "divisible by the `context` mesh axis size 4"):
        run(tiny_config(assets, tmp_path / "x", **{"mesh.fsdp": 2, "mesh.context": 4}))

    mesh = SimpleNamespace(shape={"data": 1, "fsdp": 4, "context": 2, "tensor": 1})
    model = tiny.TINY_TRANSFORMER  # 2 heads, patch (1, 2, 2)
    manifest = SimpleNamespace(active_buckets={"16x2x4x6": 3, "16x3x2x2": 2, "16x1x2x2": 0})  # 12, 3, (1) tokens
    cfg = tiny_config(assets, tmp_path / "x", train_batch_size=4)
    with pytest.raises(ConfigError, match=r"mesh.context=2: the cache .* \{'16x3x2x2': 3\}"):
        _check_layout(cfg, mesh, model, manifest, "lora")
    # DMD trains on num_training_frames latent frames: 2 of the 3 frames give 2 tokens, which split
    cfg.distillation_config.num_training_frames = 2
    _check_layout(cfg, mesh, model, manifest, "dmd")
    # 2 hosts x 1 device with context 2: one batch shard would span both processes, which load different rows
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    two_hosts = SimpleNamespace(shape={"data": 1, "fsdp": 1, "context": 2, "tensor": 1})
    with pytest.raises(ConfigError, match=r"context x tensor spans processes.*data x fsdp \(1\) must be a multiple"):
        _check_layout(tiny_config(assets, tmp_path / "x", train_batch_size=2), two_hosts, model, manifest, "lora")


def test_resume_past_max_train_steps_says_what_is_exported(assets, tmp_path, caplog):
    run(tiny_config(assets, tmp_path / "r", max_train_steps=2, checkpoint_step_interval=2))
    with caplog.at_level("WARNING", logger="wanjax.train"):
        summary = run(tiny_config(assets, tmp_path / "r", max_train_steps=1, checkpoint_step_interval=2,
                                  resume_from_checkpoint="latest"))
    assert summary["start_step"] == 2
    assert "checkpoint 2 is past max_train_steps=1: nothing to train; its weights (step 2) are exported" in caplog.text


def test_resume_is_exact(assets, tmp_path):
    """3 steps + resume + 3 steps logs the same losses as 6 uninterrupted steps."""
    common = dict(checkpoint_step_interval=3, use_ema=True)
    run(tiny_config(assets, tmp_path / "full", max_train_steps=6, **common))
    run(tiny_config(assets, tmp_path / "split", max_train_steps=3, **common))
    summary = run(tiny_config(assets, tmp_path / "split", max_train_steps=6, resume_from_checkpoint="latest", **common))
    assert summary["start_step"] == 3
    full, split = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert len(full) == len(split) == 6
    assert full == split  # bitwise: same state, same RNG, same batches
    a = lora_lib.load_lora(tmp_path / "full" / "pytorch_lora_weights.safetensors")
    b = lora_lib.load_lora(tmp_path / "split" / "pytorch_lora_weights.safetensors")
    for x, y in zip(__import__("jax").tree_util.tree_leaves(a.params), __import__("jax").tree_util.tree_leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_refusals_and_a_copied_checkpoint(assets, tmp_path):
    """Resume problems are one-line ConfigErrors, before compute where possible: a path that is not a checkpoint,
    a start that would write over later checkpoints (a fresh run into a run's folder, an older step), another
    adapter or optimizer. A checkpoint copied anywhere resumes."""
    import shutil

    out = tmp_path / "run"
    run(tiny_config(assets, out, max_train_steps=4, checkpoint_step_interval=2))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "4"]
    with pytest.raises(ConfigError, match=r"holds checkpoints \[2, 4\] after step 0: a fresh run would write over"):
        run(tiny_config(assets, out, max_train_steps=4, resume_from_checkpoint=""))
    with pytest.raises(ConfigError, match=r"holds checkpoints \[4\] after step 2: resuming from step 2 would"):
        run(tiny_config(assets, out, max_train_steps=6, resume_from_checkpoint=str(out / "checkpoints" / "2")))
    with pytest.raises(ConfigError, match="expected 'latest' or a checkpoint folder"):
        run(tiny_config(assets, out, resume_from_checkpoint=str(out / "checkpoints" / "99")))
    with pytest.raises(ConfigError, match=r"was saved by another setup \(rank: saved 4, now 8"):
        run(tiny_config(assets, out, max_train_steps=6, lora_rank=8))
    with pytest.raises(ConfigError, match=r"another setup \(optimizer: saved 'adamw', now 'optimi-lion'"):
        run(tiny_config(assets, out, max_train_steps=6, optimizer="optimi-lion"))
    with pytest.raises(ConfigError, match="does not fit this run's trainable state"):
        run(tiny_config(assets, out, max_train_steps=6, use_ema=False))
    assert len(losses(out)) == 4 and sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "4"]
    shutil.copytree(out / "checkpoints" / "4", tmp_path / "backup" / "4")  # a copy outside any checkpoints/ folder
    summary = run(tiny_config(assets, tmp_path / "branch", max_train_steps=6,
                              resume_from_checkpoint=str(tmp_path / "backup" / "4")))
    assert summary["start_step"] == 4 and summary["steps"] == 6


def test_failed_final_validation_loses_nothing(assets, tmp_path, monkeypatch, caplog):
    """The last validation runs after the final checkpoint and export, and a validation error is logged, not the
    end of the run."""
    from wanjax import validation

    def broken(self, step, method, state):
        raise OSError(36, "File name too long")

    monkeypatch.setattr(validation.Validator, "run", broken)
    out = tmp_path / "val"
    summary = run(tiny_config(assets, out, max_train_steps=2, checkpoint_step_interval=0, validation_step_interval=2,
                              validation_prompt="a red square", validation_resolution="48x32",
                              validation_num_video_frames=9, validation_num_inference_steps=1))
    assert summary["steps"] == 2 and (out / "pytorch_lora_weights.safetensors").exists()
    assert (out / "checkpoints" / "2").is_dir() and "validation at step 2 failed; training goes on" in caplog.text


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu", **extra)
    return env


def test_one_device_eight_devices_two_processes_agree(assets, tmp_path):
    """Same losses and LoRA on 1 device, 8 devices (data x fsdp) and 2 processes x 2 devices with `fsdp` across the
    processes (the LoRA sharded over hosts: the export gathers it)."""
    common = dict(max_train_steps=3, train_batch_size=8, checkpoint_step_interval=0, gradient_accumulation_steps=2)
    # 8 simulated devices in this process, mesh data x fsdp
    run(tiny_config(assets, tmp_path / "eight", **{"mesh.data": 2, "mesh.fsdp": 4}, **common))
    # 1 device
    r = subprocess.run([sys.executable, "-m", "wanjax.train", *cli_args(assets, tmp_path / "one", **common,
                        **{"mesh.fsdp": 1})], env=_env(1), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    # 2 processes x 2 CPU devices on localhost
    port = _free_port()
    procs = [
        subprocess.Popen([sys.executable, "-m", "wanjax.train", *cli_args(assets, tmp_path / "two", **common,
                          **{"mesh.data": 1, "mesh.fsdp": 4})],
                         env=_env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                  JAX_PROCESS_ID=str(i)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[1][-3000:] for o in outs)
    one, eight, two = (np.array(losses(tmp_path / d)) for d in ("one", "eight", "two"))
    assert len(one) == len(eight) == len(two) == 3
    np.testing.assert_allclose(eight, one, rtol=1e-4)
    np.testing.assert_allclose(two, one, rtol=1e-4)
    exported = {d: lora_lib.load_lora(tmp_path / d / "pytorch_lora_weights.safetensors") for d in ("one", "two")}
    for a, b in zip(jax.tree_util.tree_leaves(exported["one"].params), jax.tree_util.tree_leaves(exported["two"].params)):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-6)


# -- bad input, refused before compute ---------------------------------------------------------------------
def test_unknown_config_key_refused(assets, tmp_path, capsys):
    rc = main(["train", *cli_args(assets, tmp_path / "x"), "--config.learning_rat=1e-4"])
    assert rc == 2 and "unknown config key 'learning_rat'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_other_methods_distillation_option_refused(assets, tmp_path, capsys):
    """A distillation_config option only another method reads, set on the command line, would do nothing: refused
    by name with the method that reads it, before anything is written (LoRA: every method's option; the method's
    own options pass). The key lists are configs/common.py's."""
    spec = importlib.util.spec_from_file_location("cfg_common", ROOT / "configs" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    from wanjax.methods import dcm, dmd
    from wanjax.train import foreign_distillation_options

    assert dmd.OPTIONS == set(common.dmd_options()) and dcm.OPTIONS == set(common.dcm_options())
    rc = main(["train", *cli_args(assets, tmp_path / "x"), "--config.distillation_config.multiphase=2"])
    err = capsys.readouterr().err
    assert rc == 2 and "--config.distillation_config.multiphase=2" not in err
    assert "--config.distillation_config.multiphase is a DCM option, but distillation_method=None" in err
    assert not (tmp_path / "x").exists()
    keys = ["learning_rate", "distillation_config.fake_score_lr"]
    assert foreign_distillation_options("dmd", keys) is None
    assert "a DMD option, but distillation_method='dcm'" in foreign_distillation_options("dcm", keys)
    assert foreign_distillation_options("dcm", ["distillation_config.multiphase", "mesh.fsdp"]) is None


def test_help_prints_usage(capsys):
    """--help (or -h) prints the usage and exits 0 (absl used to call it an unknown flag); the caching CLI too."""
    from wanjax import cache

    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m wanjax.train --config CONFIG") and "--dry_run" in out
    assert cache.main(["cache", "-h"]) == 0
    assert capsys.readouterr().out.startswith("usage: python -m wanjax.cache --config CONFIG")


def test_gpu_memory_fraction_set_for_jax_unless_the_environment_has_one(monkeypatch):
    """config.gpu_memory_fraction becomes XLA_PYTHON_CLIENT_MEM_FRACTION (JAX's GPU pool; its default 0.75 holds
    59.7 GiB of an 80 GB H100, less than 14B DMD needs); a fraction in the environment, under either of JAX's names,
    is kept (setting the other too would make JAX refuse to start)."""
    from wanjax.sharding import set_gpu_memory_fraction

    for name in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        monkeypatch.delenv(name, raising=False)
    assert set_gpu_memory_fraction(0.95) == "0.95" and os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.95"
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION")
    monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", "0.5")
    assert set_gpu_memory_fraction(0.95) == "0.5 (from XLA_CLIENT_MEM_FRACTION)"
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"gpu_memory_fraction={float(bad)}: expected a fraction .* \(0, 1\]"):
            set_gpu_memory_fraction(bad)


def test_bad_gpu_memory_fraction_refused(assets, tmp_path, capsys, monkeypatch):
    for name in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        monkeypatch.delenv(name, raising=False)
    rc = main(["train", *cli_args(assets, tmp_path / "x"), "--config.gpu_memory_fraction=1.5"])
    assert rc == 2 and "gpu_memory_fraction=1.5: expected a fraction" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ


def test_missing_model_path_refused(assets, tmp_path):
    with pytest.raises(ConfigError, match="pretrained_model_name_or_path=.*no-such-dir"):
        run(tiny_config(assets, tmp_path / "x", pretrained_model_name_or_path=str(tmp_path / "no-such-dir")))
    assert not (tmp_path / "x").exists()


def test_num_train_epochs_sets_the_run_length(assets, tmp_path):
    """SimpleTuner's num_train_epochs (with max_train_steps 0): epochs of the batch plan, one optimizer step per
    global batch; the LR schedule gets the same length; the run stops there. Both or neither set: refused."""
    from wanjax.train import resolve

    r = resolve(tiny_config(assets, tmp_path / "x", max_train_steps=0, num_train_epochs=2))
    per_epoch = r.iterator.batches_per_epoch
    assert per_epoch > 0 and r.max_train_steps == 2 * per_epoch and r.optim.max_train_steps == 2 * per_epoch
    summary = run(tiny_config(assets, tmp_path / "run", max_train_steps=0, num_train_epochs=1,
                              checkpoint_step_interval=0))
    assert summary["steps"] == per_epoch and len(losses(tmp_path / "run")) == per_epoch
    for steps, epochs in ((10, 2), (0, 0), (-1, 0)):
        with pytest.raises(ConfigError, match=f"max_train_steps={steps}, num_train_epochs={epochs}: set exactly one"):
            resolve(tiny_config(assets, tmp_path / "x", max_train_steps=steps, num_train_epochs=epochs))


def test_lora_target_not_in_this_model_refused_before_compute(assets, tmp_path):
    """add_k_proj exists only in image-conditioned Wan models: on the tiny T2V model it is refused at resolve."""
    with pytest.raises(ConfigError, match="lora_target_modules='to_q,add_k_proj': LoRA target 'attn2.add_k_proj' is "
                                          "not a layer of this model"):
        run(tiny_config(assets, tmp_path / "x", lora_target_modules="to_q,add_k_proj"))
    with pytest.raises(ConfigError, match="lora_rank=0: expected >= 1"):
        run(tiny_config(assets, tmp_path / "x", lora_rank=0))
    assert not (tmp_path / "x").exists()


def test_report_to_other_than_wandb_or_none_refused_before_compute(assets, tmp_path):
    with pytest.raises(ConfigError, match="report_to='tensorboard': expected one of"):
        run(tiny_config(assets, tmp_path / "x", report_to="tensorboard"))
    assert not (tmp_path / "x").exists()


def test_seed_outside_32_bits_refused_before_compute(assets, tmp_path):
    """JAX keys take 32 bits (2**32 + 5 would repeat seed 5's noise) and numpy refuses negative entropy."""
    for key, value in (("seed", 2**32 + 5), ("seed", -1), ("validation_seed", 2**32)):
        with pytest.raises(ConfigError, match=rf"{key}={value}: expected an integer in \[0, 2\*\*32\)"):
            run(tiny_config(assets, tmp_path / "x", **{key: value}))
    assert not (tmp_path / "x").exists()


def test_low_flavour_reads_transformer_2_of_a_custom_pipeline(assets, tmp_path):
    """model_flavour t2v-a14b-2.2-low with pretrained_transformer_model_name_or_path naming a pipeline folder: the
    low-noise expert (transformer_2) is trained, as SimpleTuner does, not the pipeline's first transformer."""
    import json
    import shutil

    from wanjax.train import resolve

    pipe = tmp_path / "a14b"
    shutil.copytree(assets / "pipeline", pipe)
    shutil.copytree(pipe / "transformer", pipe / "transformer_2")
    index = json.loads((pipe / "model_index.json").read_text())
    index.update(transformer_2=index["transformer"], boundary_ratio=0.875)
    (pipe / "model_index.json").write_text(json.dumps(index))
    r = resolve(tiny_config(assets, tmp_path / "x", model_flavour="t2v-a14b-2.2-low",
                            pretrained_model_name_or_path=str(assets / "pipeline"),
                            pretrained_transformer_model_name_or_path=str(pipe)))
    assert r.reader.source.startswith(str(pipe / "transformer_2"))


def test_image_to_video_refused_before_compute(assets, tmp_path):
    """An I2V flavour is refused before anything is read (no download); an I2V transformer at a path (36 input
    channels) once its config is read, before weights or data."""
    with pytest.raises(ConfigError, match="model_flavour='i2v-14b-2.2-low': image-to-video training is not "):
        run(tiny_config(assets, tmp_path / "x", model_flavour="i2v-14b-2.2-low", pretrained_model_name_or_path=None))
    ref.make_model(ref.I2V_PLAIN).save_pretrained(tmp_path / "i2v")
    with pytest.raises(ConfigError, match="in_channels 8 != out_channels 4: image-conditioned"):
        run(tiny_config(assets, tmp_path / "x", pretrained_transformer_model_name_or_path=str(tmp_path / "i2v"),
                        pretrained_transformer_subfolder="none"))
    assert not (tmp_path / "x").exists()


def test_custom_transformer_beside_the_pipeline(assets, tmp_path):
    """SimpleTuner's custom fine-tune keys: the transformer from pretrained_transformer_model_name_or_path (subfolder
    "none": the path is the transformer folder), VAE / text encoder / validation from the pipeline."""
    from wanjax.train import resolve

    ft = assets / "pipeline" / "transformer"
    r = resolve(tiny_config(assets, tmp_path / "x", pretrained_transformer_model_name_or_path=str(ft),
                            pretrained_transformer_subfolder="none"))
    assert r.transformer_path == str(ft) and r.subfolder is None and r.model_path == str(assets / "pipeline")
    assert r.reader.config.num_layers == tiny.TINY_TRANSFORMER.num_layers
    with pytest.raises(ConfigError, match="pretrained_transformer_model_name_or_path=.*no-such"):
        resolve(tiny_config(assets, tmp_path / "x", pretrained_transformer_model_name_or_path=str(tmp_path / "no-such")))


def test_cache_with_wrong_channels_refused(assets, tmp_path):
    from wanjax.data import records

    records.write_synthetic_cache(tmp_path / "cache48", num_items=4, latent_channels=48, text_dim=32)
    with pytest.raises(ConfigError, match="48 channels.*16"):
        run(tiny_config(assets, tmp_path / "x", cache_dir=str(tmp_path / "cache48")))
    assert not (tmp_path / "x").exists()


def test_lora_for_another_architecture_refused(assets, tmp_path):
    other = wanjax.WanConfig(num_attention_heads=2, attention_head_dim=24, in_channels=16, out_channels=16,
                             text_dim=32, ffn_dim=64, num_layers=2)
    import jax

    lora_lib.save_lora(lora_lib.init_lora(other, jax.random.key(0), rank=4), tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match="init_lora=.*(48|32)"):
        run(tiny_config(assets, tmp_path / "x", init_lora=str(tmp_path / "other.safetensors")))
    assert not (tmp_path / "x").exists()


def test_simpletuner_config_maps_and_reports(tmp_path, capsys):
    c = _get_config("simpletuner", str(SEEDS / "lora-config.json"))
    err = capsys.readouterr().err
    assert c.optimizer == "optimi-lion" and c.learning_rate == 5e-5 and c.lora_rank == 16
    assert c.use_ema is True and c.ema_update_interval == 2 and c.model.remat_policy == "full"
    assert "attention_mechanism" in c.simpletuner.unhonored and "[simpletuner] attention_mechanism" in err


def test_simpletuner_seed_config_trains_on_tiny(assets, tmp_path, monkeypatch):
    """The LoRA seed config through the mapper (optimi-lion, SimpleTuner cosine, EMA, bf16 base), on the tiny
    assets: trains, keeps checkpoints_total_limit, logs to wandb offline without credentials, and records the
    keys it did not honor in output_dir/config.json."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    c = _get_config("simpletuner", str(SEEDS / "lora-config.json"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the seed pushes to the hub: here it must say so and go on
    # the seed's validation (every 100 steps; 832x480x81, 40 steps) at a CPU-sized clip: runs at the final step
    for key, value in dict(pretrained_model_name_or_path=str(assets / "pipeline"), cache_dir=str(assets / "latents"),
                           output_dir=str(tmp_path / "st"), max_train_steps=3, checkpoint_step_interval=1,
                           checkpoints_total_limit=2, train_batch_size=8, validation_resolution="48x32",
                           validation_num_video_frames=5, validation_num_inference_steps=2).items():
        c[key] = value
    summary = run(c)
    assert summary["steps"] == 3 and all(np.isfinite(summary["losses"]))
    out = tmp_path / "st"
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["optimizer"] == "optimi-lion" and "attention_mechanism" in recorded["simpletuner"]["unhonored"]
    assert list((out / "wandb").glob("offline-run-*")), "wandb should log offline without credentials"
    # ema_validation "ema_only": the EMA weights' video; the model card is written even though the push is off
    assert [p.name for p in (out / "validation").glob("*.mp4")] == ["step_000003_validation_ema.mp4"]
    card = (out / "README.md").read_text()  # no hub namespace known with the push off: a placeholder to fill in
    assert "pipe.load_lora_weights('YOUR_USERNAME/wan-disney')" in card and "replace `YOUR_USERNAME`" in card



def _with_validation(c):
    """Validation every 2 steps at a 48x32x5 clip: the student renders with its own sampler."""
    c.validation_step_interval, c.validation_prompt = 2, "a red square drifting right"
    c.validation_resolution, c.validation_num_video_frames, c.validation_guidance = "48x32", 5, 1.0
    c.ema_validation = "none"  # the trained adapter (the LoRA test covers "comparison")
    return c


def _student_videos(out):
    import av

    names = sorted(p.name for p in (out / "validation").glob("*.mp4"))
    for name in names:
        with av.open(str(out / "validation" / name)) as f:
            frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
        assert len(frames) == 5 and frames[0].shape == (32, 48, 3)
    return names


def test_dmd_tiny_trains_logs_and_resumes_exactly(assets, tmp_path):
    """configs/dmd.py:tiny: dmd_loss / fake_score_loss logged, generator on every 2nd step, exact resume, both
    adapters exported as LoRA files."""
    def cfg(out, steps, **kw):
        c = _get_config("dmd", "tiny")
        c.tiny_assets_dir, c.pretrained_model_name_or_path = str(assets), str(assets / "pipeline")
        c.cache_dir, c.output_dir, c.max_train_steps, c.checkpoint_step_interval = str(assets / "latents"), str(out), steps, 2
        return c

    run(_with_validation(cfg(tmp_path / "full", 4)))  # validation must not change training
    run(cfg(tmp_path / "split", 2))
    run(cfg(tmp_path / "split", 4))
    assert _student_videos(tmp_path / "full") == ["step_000002_validation.mp4", "step_000004_validation.mp4"]
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["generator_updated"] for r in rows] == [1.0, 0.0, 1.0, 0.0]
    assert all(np.isfinite(r["fake_score_loss"]) for r in rows) and np.isfinite(rows[0]["dmd_loss"])
    split = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["fake_score_loss"] for r in rows] == [r["fake_score_loss"] for r in split]
    for name in ("pytorch_lora_weights", "fake_score_lora_weights"):
        a = lora_lib.load_lora(tmp_path / "full" / f"{name}.safetensors")
        b = lora_lib.load_lora(tmp_path / "split" / f"{name}.safetensors")
        for x, y in zip(__import__("jax").tree_util.tree_leaves(a.params), __import__("jax").tree_util.tree_leaves(b.params)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_dmd_from_prompts_alone(assets, tmp_path):
    """configs/dmd.py:tiny_prompts: a prompt list (no videos) is cached as embeddings + a latent shape and DMD
    trains on it; LoRA flow matching refuses that cache before any compute."""
    c = _get_config("dmd", "tiny_prompts")
    c.tiny_assets_dir, c.pretrained_model_name_or_path = str(assets), str(assets / "pipeline")
    c.data_backend_config = str(assets / "videos" / "prompts-backend.json")
    c.cache_dir, c.output_dir, c.max_train_steps = str(tmp_path / "cache"), str(tmp_path / "out"), 2
    run(c)
    from wanjax.data import records

    man = records.read_manifest(tmp_path / "cache")
    assert man.prompt_only == ["tiny-prompts"] and man.buckets == {"16x3x4x6": 6}  # 6 prompts of 48x32x9
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and np.isfinite(rows[0]["dmd_loss"]) and all(np.isfinite(r["fake_score_loss"]) for r in rows)
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()

    lora = tiny_config(assets, tmp_path / "lora")
    lora.cache_dir, lora.data_backend_config = str(tmp_path / "cache"), None  # that cache as it is
    with pytest.raises(ConfigError, match=r"datasets \['tiny-prompts'\] are prompts only .*LoRA flow matching trains "
                                          "on real latents"):
        run(lora)


def _decode(path):
    import av

    with av.open(str(path)) as f:
        return [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]


def test_validation_every_two_steps_writes_playable_videos(assets, tmp_path):
    """validation_step_interval=2 on a 4-step LoRA run: mp4s at steps 2 and 4 that decode back to the requested
    frames and size, for the prompt and a library entry; EMA comparison renders both weights."""
    (tmp_path / "lib.json").write_text(json.dumps({"blue circle": {"prompt": "a blue circle bouncing"}}))
    out = tmp_path / "val"
    run(tiny_config(assets, out, max_train_steps=4, checkpoint_step_interval=0, use_ema=True,
                    validation_step_interval=2, validation_prompt="a red square drifting right",
                    validation_prompt_library=str(tmp_path / "lib.json"), validation_resolution="48x32",
                    validation_num_video_frames=9, validation_num_inference_steps=2, ema_validation="comparison"))
    names = sorted(p.name for p in (out / "validation").glob("*.mp4"))
    assert names == sorted(f"step_{s:06d}_{n}{e}.mp4" for s in (2, 4) for n in ("validation", "blue_circle")
                           for e in ("", "_ema"))
    for name in names:
        frames = _decode(out / "validation" / name)
        assert len(frames) == 9 and frames[0].shape == (32, 48, 3)
    rounds = [json.loads(line) for line in (out / "validation" / "videos.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rounds] == [2, 4] and all(len(r["files"]) == 4 for r in rounds)


def test_validation_settings_refused_before_compute(assets, tmp_path):
    with pytest.raises(ConfigError, match="validation_num_video_frames=0: expected >= 1"):
        run(tiny_config(assets, tmp_path / "a", validation_step_interval=2, validation_prompt="x",
                        validation_num_video_frames=0))
    with pytest.raises(ConfigError, match="validation_resolution 50x32: width and height must be multiples of 16"):
        run(tiny_config(assets, tmp_path / "b", validation_step_interval=2, validation_prompt="x",
                        validation_resolution="50x32"))
    with pytest.raises(ConfigError, match="no validation_prompt or validation_prompt_library"):
        run(tiny_config(assets, tmp_path / "c", validation_step_interval=2, validation_prompt=None))
    assert not (tmp_path / "a" / "metrics.jsonl").exists()
    from wanjax import validation

    c = tiny_config(assets, tmp_path / "d", validation_step_interval=2, validation_prompt="x",
                    validation_num_video_frames=16)  # the DCM seed's: WanPipeline rounds 16 // 4 * 4 + 1 = 17
    assert validation.settings_from_config(c).frames == 17


def test_context_parallel_training_matches(assets, tmp_path):
    """mesh.context=2 (tokens split over 2 devices, all-to-all attention) trains like context=1 (8 devices here).

    The two layouts sum the gradients in different orders (float32, ~1e-10 apart here). AdamW's first update is
    lr * g / (|g| + eps), steepest where |g| ~ eps: with the default eps 1e-8 one LoRA-B element whose gradient is
    ~1e-8 moved 2e-6 apart (lr 1e-3) while every other weight agreed to 1e-8. An eps above such gradients keeps
    the comparison about the gradients, not about that amplification, at the same tolerance."""
    common = {"max_train_steps": 2, "checkpoint_step_interval": 0, "adam_epsilon": 1e-5}
    run(tiny_config(assets, tmp_path / "cp1", **{"mesh.fsdp": 8, "mesh.context": 1}, **common))
    run(tiny_config(assets, tmp_path / "cp2", **{"mesh.fsdp": 4, "mesh.context": 2}, **common))
    np.testing.assert_allclose(losses(tmp_path / "cp2"), losses(tmp_path / "cp1"), rtol=1e-5)
    a = lora_lib.load_lora(tmp_path / "cp1" / "pytorch_lora_weights.safetensors")
    b = lora_lib.load_lora(tmp_path / "cp2" / "pytorch_lora_weights.safetensors")
    for x, y in zip(__import__("jax").tree_util.tree_leaves(a.params), __import__("jax").tree_util.tree_leaves(b.params)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)
