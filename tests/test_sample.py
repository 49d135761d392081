"""Sampling: the JAX schedulers == diffusers' schedulers step by step; `wanjax.sample` == WanPipeline(...,
output_type="latent") on tiny random models (UniPC / Euler, CFG or not, LoRA, Wan2.2 two experts); the CLI writes a
playable mp4 and refuses bad inputs by name."""

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline

import reference as ref
import wanjax
from wanjax import sample as sample_mod
from wanjax import schedulers, tiny, video_out

pytestmark = pytest.mark.filterwarnings("ignore:.*LoRA tensor.*have invalid shape:UserWarning")
ROOT = Path(__file__).parents[1]
SCHED_TOL = 1e-5  # max |jax - diffusers| / max |diffusers|, after every step
PIPE_TOL = 1e-3  # the same, after the whole sampling loop
CFG = ref.T2V
SHAPE = (2, CFG["in_channels"], 3, 4, 6)  # (B, C, T, h, w): 9 frames of 32 x 48 pixels
UNIPC_CONFIG = {k: v for k, v in tiny.SCHEDULER_CONFIG.items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------------------------------
# Schedulers, step by step
# ---------------------------------------------------------------------------------------------------------
def _run_jax(sched, x, outputs):
    """All intermediate samples of the JAX scheduler over given model outputs, `i` traced (lax.scan)."""
    def body(carry, inp):
        x, state = carry
        i, v = inp
        x, state = sched.step(state, v, i, x)
        return (x, state), x

    _, xs = jax.jit(lambda x, o: jax.lax.scan(body, (x, sched.init_state(x)), (jnp.arange(len(o)), o)))(x, outputs)
    return np.asarray(xs)


def _run_torch(sched, x, outputs):
    xs, xt = [], torch.from_numpy(x)
    for t, v in zip(sched.timesteps, outputs):
        xt = sched.step(torch.from_numpy(v), t, xt).prev_sample
        xs.append(xt.numpy().copy())
    return np.stack(xs)


def _compare_steps(ref_sched, sched, n, seed=0):
    assert len(ref_sched.timesteps) == n == sched.num_inference_steps
    np.testing.assert_array_equal(np.float32(ref_sched.timesteps.numpy()), sched.timesteps)
    np.testing.assert_array_equal(ref_sched.sigmas.numpy(), sched.sigmas)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    outputs = rng.standard_normal((n, *SHAPE), dtype=np.float32)
    want, got = _run_torch(ref_sched, x, outputs), _run_jax(sched, x, outputs)
    errs = [ref.rel_err(g, w) for g, w in zip(got, want)]
    assert max(errs) <= SCHED_TOL, errs
    return want


@pytest.mark.parametrize("n", [1, 2, 3, 10])
@pytest.mark.parametrize("options", [{}, {"solver_order": 1}, {"solver_order": 3},
                                     {"disable_corrector": (0, 3)}], ids=lambda o: str(o) or "wan")
def test_unipc_matches_diffusers_step_by_step(n, options):
    ref_sched = UniPCMultistepScheduler(**{**UNIPC_CONFIG, **options, "flow_shift": 5.0})
    ref_sched.set_timesteps(n)
    sched = schedulers.unipc_multistep(n, 5.0, **options)
    want = _compare_steps(ref_sched, sched, n)
    if n == 10 and not options:  # WanPipeline's configuration: orders warm up and end low, corrector everywhere
        assert sched.orders == (1, 2, 2, 2, 2, 2, 2, 2, 2, 1)
        assert sched.c_on.tolist() == [False] + [True] * 9
    if n == 3 and not options:
        assert sched.orders == (1, 2, 1)  # lower_order_final with odd N
    assert np.isfinite(want).all()


@pytest.mark.parametrize("n", [1, 2, 3, 10])
def test_euler_matches_diffusers_step_by_step(n):
    ref_sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref_sched.set_timesteps(n)
    _compare_steps(ref_sched, schedulers.flow_match_euler(n, 3.0), n)


def test_scheduler_options_are_checked():
    with pytest.raises(ValueError, match="lower_order_final"):
        schedulers.unipc_multistep(4, 3.0, lower_order_final=False)
    with pytest.raises(ValueError, match="bh1"):
        schedulers.unipc_multistep(4, 3.0, solver_type="bh1")
    with pytest.raises(ValueError, match="scheduler='ddim'"):
        schedulers.make_scheduler("ddim", 4, 3.0)
    with pytest.raises(ValueError, match="num_inference_steps=0"):
        schedulers.make_scheduler("unipc", 0, 3.0)


# ---------------------------------------------------------------------------------------------------------
# The whole loop against WanPipeline
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two random tiny transformers (torch + wanjax params), a LoRA file + object, latents and embeddings."""
    d = tmp_path_factory.mktemp("sample")
    torch_models, params = [], []
    for seed in (0, 1):
        m = ref.make_model(CFG, seed=seed)
        m.save_pretrained(d / f"t{seed}")
        config, p = wanjax.load_transformer(d / f"t{seed}", dtype=jnp.float32)
        torch_models.append(m)
        params.append(p)
    lora = wanjax.init_lora(config, jax.random.key(3), rank=4, alpha=2.0)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(lora.params)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    lora = lora.replace(params=jax.tree_util.tree_unflatten(
        treedef, [x if p[-1].key == "A" else 0.3 * jax.random.normal(k, x.shape) for k, (p, x) in zip(keys, leaves)]))
    wanjax.save_lora(lora, d / "lora.safetensors")
    rng = np.random.default_rng(0)
    latents = rng.standard_normal(SHAPE, dtype=np.float32)
    embeds = rng.standard_normal((2, SHAPE[0], 7, CFG["text_dim"]), dtype=np.float32)
    return dict(config=config, torch=torch_models, params=params, lora=lora, lora_path=d / "lora.safetensors",
                latents=latents, pos=embeds[0], neg=embeds[1])


def _diffusers(m, scheduler, steps, guidance, *, two=False, boundary=None, guidance_2=None, lora=False):
    sched = (UniPCMultistepScheduler(**UNIPC_CONFIG) if scheduler == "unipc"
             else FlowMatchEulerDiscreteScheduler(shift=UNIPC_CONFIG["flow_shift"]))
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=sched, transformer=m["torch"][0],
                       transformer_2=m["torch"][1] if two else None, boundary_ratio=boundary)
    pipe.set_progress_bar_config(disable=True)
    if lora:
        pipe.load_lora_weights(str(m["lora_path"]))
    try:
        with torch.no_grad():
            out = pipe(prompt_embeds=torch.from_numpy(m["pos"]), negative_prompt_embeds=torch.from_numpy(m["neg"]),
                       latents=torch.from_numpy(m["latents"]), num_inference_steps=steps, guidance_scale=guidance,
                       guidance_scale_2=guidance_2, output_type="latent", return_dict=False)[0]
    finally:
        if lora:
            pipe.unload_lora_weights()
    return out.float().numpy(), pipe.scheduler.timesteps.numpy()


def _wanjax(m, scheduler, steps, guidance, *, two=False, boundary=None, guidance_2=None, lora=False):
    return np.asarray(wanjax.sample(
        m["config"], m["params"][0], jnp.asarray(m["latents"]), jnp.asarray(m["pos"]),
        negative_prompt_embeds=jnp.asarray(m["neg"]), scheduler=scheduler, num_inference_steps=steps,
        guidance_scale=guidance, flow_shift=UNIPC_CONFIG["flow_shift"], lora=m["lora"] if lora else None,
        params_2=m["params"][1] if two else None, boundary_ratio=boundary, guidance_scale_2=guidance_2))


@pytest.mark.parametrize("scheduler,steps,guidance,lora", [
    ("unipc", 8, 5.0, False),  # WanPipeline's default scheduler, with CFG
    ("euler", 6, 5.0, True),  # FlowMatchEuler with CFG and a LoRA
    ("unipc", 3, 1.0, False),  # no CFG (guidance 1); odd N: orders 1, 2, 1
])
def test_sample_matches_wan_pipeline(models, scheduler, steps, guidance, lora):
    want, _ = _diffusers(models, scheduler, steps, guidance, lora=lora)
    got = _wanjax(models, scheduler, steps, guidance, lora=lora)
    err = ref.rel_err(got, want)
    print(f"{scheduler} N={steps} g={guidance} lora={lora}: rel err {err:.2e}")
    assert got.dtype == np.float32 and got.shape == SHAPE
    assert err <= PIPE_TOL
    assert ref.rel_err(models["latents"], want) > 0.1  # the loop did something


def test_sample_two_experts_matches_wan_pipeline(models):
    boundary = 0.857  # timesteps 999, 937, 857 | 750, 600, 376: t == boundary * 1000 takes the first expert (>=)
    want, timesteps = _diffusers(models, "unipc", 6, 5.0, two=True, boundary=boundary, guidance_2=3.0)
    assert timesteps.tolist() == [999, 937, 857, 750, 600, 376]
    got = _wanjax(models, "unipc", 6, 5.0, two=True, boundary=boundary, guidance_2=3.0)
    err = ref.rel_err(got, want)
    print(f"two experts: rel err {err:.2e}")
    assert err <= PIPE_TOL
    # the second expert and its guidance matter
    assert ref.rel_err(_wanjax(models, "unipc", 6, 5.0, two=True, boundary=boundary, guidance_2=5.0), want) > 1e-2
    assert ref.rel_err(_wanjax(models, "unipc", 6, 5.0), want) > 1e-2


def test_sample_compiles_once_per_shape_and_steps(models):
    m = models
    before = sample_mod._denoise._cache_size()
    steps = []
    for g, shift in ((4.0, 3.0), (6.0, 7.0)):  # guidance and shift are traced: no recompilation
        out = wanjax.sample(m["config"], m["params"][0], jnp.asarray(m["latents"]), jnp.asarray(m["pos"]),
                            negative_prompt_embeds=jnp.asarray(m["neg"][:1]), num_inference_steps=2,
                            guidance_scale=g, flow_shift=shift, progress=steps.append)
        assert np.isfinite(np.asarray(out)).all()
    assert sample_mod._denoise._cache_size() == before + 1
    assert sorted(steps) == [0, 0, 1, 1]  # the progress callback saw every step of both calls


def test_sample_argument_checks(models):
    m = models
    args = (m["config"], m["params"][0], jnp.asarray(m["latents"]), jnp.asarray(m["pos"]))
    with pytest.raises(ValueError, match="params_2"):
        wanjax.sample(*args, boundary_ratio=0.9)
    with pytest.raises(ValueError, match="guidance_scale_2"):
        wanjax.sample(*args, guidance_scale_2=2.0)
    with pytest.raises(ValueError, match=r"expected \(B, 4, T, h, w\)"):
        wanjax.sample(m["config"], m["params"][0], jnp.zeros((2, 5, 3, 4, 6)), jnp.asarray(m["pos"]))


# ---------------------------------------------------------------------------------------------------------
# Video output and the command line
# ---------------------------------------------------------------------------------------------------------
def _read_frames(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_to_uint8_frames_and_write_mp4_roundtrip(tmp_path):
    f, h, w = 5, 32, 48
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    video = np.stack([np.stack([xx, yy, np.full_like(xx, 2 * t / (f - 1) - 1)]) for t in range(f)], axis=1)
    frames = video_out.to_uint8_frames(video[None] * 1.2)  # out-of-range values clamp
    assert frames.shape == (1, f, h, w, 3) and frames.dtype == np.uint8
    assert frames[0, 0, 0, 0, 0] == 0 and frames[0, 0, 0, -1, 0] == 255 and frames[0, -1, 0, 0, 2] == 255
    out = video_out.write_mp4(tmp_path / "v" / "x.mp4", frames[0], fps=8)
    back = _read_frames(out)
    assert back.shape == frames[0].shape
    assert np.abs(back.astype(float) - frames[0]).mean() < 8  # lossy codec, smooth content
    assert [p.name for p in out.parent.iterdir()] == ["x.mp4"]  # no temporary left behind
    with pytest.raises(ValueError, match="even"):
        video_out.write_mp4(tmp_path / "odd.mp4", np.zeros((1, 31, 48, 3), np.uint8))


@pytest.fixture(scope="module")
def tiny_dir():
    """`--tiny`'s own default location (relative to the repo root, as configs/*.py:tiny use it): built once per
    checkout (~30 s), reused afterwards, so the CLI test runs exactly the documented command."""
    return tiny.ensure_assets(ROOT / "cache" / "tiny-wan")


def test_cli_tiny_writes_mp4(tiny_dir, tmp_path):
    del tiny_dir  # built (if missing) in-process first; the command finds it by its default path
    out = tmp_path / "x.mp4"
    cmd = [sys.executable, "-m", "wanjax.sample", "--tiny", "--prompt", "a red square", "--out", str(out),
           "--num_inference_steps", "2", "--height", "32", "--width", "48", "--num_frames", "9"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")  # the sharded (FSDP) path
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "RuntimeWarning" not in r.stderr
    frames = _read_frames(out)
    assert frames.shape == (9, 32, 48, 3)
    assert frames.std() > 1  # a decoded random-model video, not a blank frame
    with av.open(str(out)) as f:
        assert f.streams.video[0].average_rate == 16  # Wan 2.1's frame rate (TI2V-5B pipelines: 24)
    assert video_out.pipeline_fps({"expand_timesteps": True}) == 24 and video_out.pipeline_fps({}) == 16


@pytest.mark.parametrize("extra,message", [
    (["--num_frames", "10"], "num_frames=10: expected 4k+1 frames (e.g. 9 or 13)"),
    (["--height", "40"], "height=40: expected a positive multiple of 16"),
    (["--width", "0"], "width=0: expected a positive multiple of 16"),
    (["--num_inference_steps", "0"], "--num_inference_steps 0: expected >= 1"),
    (["--lora", "/nonexistent/lora.safetensors"], "--lora /nonexistent/lora.safetensors: no such file"),
])
def test_cli_bad_inputs(tiny_dir, tmp_path, capsys, extra, message):
    argv = ["--model", str(tiny_dir / "pipeline"), "--prompt", "p", "--out", str(tmp_path / "x.mp4"),
            "--height", "32", "--width", "48", "--num_frames", "9", *extra]
    assert sample_mod.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


def test_cli_bad_model(tmp_path, capsys):
    assert sample_mod.main(["--model", str(tmp_path / "missing"), "--prompt", "p", "--out", "x.mp4"]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "transformer").mkdir()
    assert sample_mod.main(["--model", str(tmp_path / "half"), "--prompt", "p", "--out", "x.mp4"]) == 2
    assert "missing subfolder(s) vae, text_encoder, tokenizer" in capsys.readouterr().err


def _no_models(monkeypatch):
    """--out / --lora problems must be found before any transformer is loaded."""
    import wanjax.transformer_io as tio

    def boom(*a, **k):
        raise AssertionError("models loaded before the arguments were checked")

    monkeypatch.setattr(tio, "load_transformer", boom)


@pytest.mark.parametrize("out,message", [
    ("vid.webm", "expected a .mp4 file"),
    ("vid.gif", "expected a .mp4 file"),
    ("noext", "expected a .mp4 file"),
    ("/proc/nope/x.mp4", "cannot create the folder /proc/nope"),
])
def test_cli_out_checked_before_loading(tiny_dir, tmp_path, capsys, monkeypatch, out, message):
    _no_models(monkeypatch)
    out = out if out.startswith("/") else str(tmp_path / out)
    argv = ["--model", str(tiny_dir / "pipeline"), "--prompt", "p", "--out", out]
    assert sample_mod.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and message in err


def test_resolve_out_folders(tmp_path):
    (tmp_path / "exists").mkdir()
    assert sample_mod.resolve_out(str(tmp_path / "exists")) == tmp_path / "exists" / "sample.mp4"
    new = sample_mod.resolve_out(str(tmp_path / "newfolder") + "/")
    assert new == tmp_path / "newfolder" / "sample.mp4" and (tmp_path / "newfolder").is_dir()
    assert sample_mod.resolve_out(str(tmp_path / "a" / "b" / "v.MP4")) == tmp_path / "a" / "b" / "v.MP4"
    assert (tmp_path / "a" / "b").is_dir()
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    try:
        if not os.access(tmp_path / "ro", os.W_OK):  # root can write anyway
            with pytest.raises(sample_mod.UsageError, match="not writable"):
                sample_mod.resolve_out(str(tmp_path / "ro" / "x.mp4"))
    finally:
        os.chmod(tmp_path / "ro", 0o700)
    assert "sample.mp4" in sample_mod._parser().format_help()


def test_cli_lora_for_another_architecture_is_a_usage_error(tiny_dir, tmp_path, capsys, monkeypatch):
    import dataclasses

    from wanjax.models.config import WanConfig

    cfg = WanConfig.from_diffusers(json.loads((tiny_dir / "pipeline" / "transformer" / "config.json").read_text()))
    other = dataclasses.replace(cfg, num_attention_heads=cfg.num_attention_heads * 2)
    wanjax.save_lora(wanjax.init_lora(other, jax.random.key(0), rank=2, alpha=2.0), tmp_path / "other.safetensors")
    _no_models(monkeypatch)
    argv = ["--model", str(tiny_dir / "pipeline"), "--prompt", "p", "--out", str(tmp_path / "x.mp4"),
            "--lora", str(tmp_path / "other.safetensors")]
    assert sample_mod.main(argv) == 2
    assert capsys.readouterr().err.startswith("error: --lora: ")


def test_image_to_video_pipelines_refused_before_loading(tiny_dir, tmp_path, capsys, monkeypatch):
    """A Wan 2.2 I2V-style transformer (36 input channels: noise + image condition) or a Wan 2.1 I2V one (image
    embedder) is a usage error before any weights load; `sample()` refuses it too, instead of a shape error inside
    the loop."""
    import dataclasses
    import shutil

    from wanjax.models.config import WanConfig

    src = json.loads((tiny_dir / "pipeline" / "transformer" / "config.json").read_text())
    _no_models(monkeypatch)
    for change, reason in (({"in_channels": 36}, f"in_channels 36 != out_channels {src['out_channels']}"),
                           ({"image_dim": 32, "added_kv_proj_dim": src["num_attention_heads"] *
                             src["attention_head_dim"]}, "image_dim 32")):
        pipe = tmp_path / "i2v"
        shutil.rmtree(pipe, ignore_errors=True)
        shutil.copytree(tiny_dir / "pipeline", pipe)
        (pipe / "transformer" / "config.json").write_text(json.dumps({**src, **change}))
        assert sample_mod.main(["--model", str(pipe), "--prompt", "p", "--out", str(tmp_path / "x.mp4")]) == 2
        err = capsys.readouterr().err
        assert f"an image-to-video model ({reason}); wanjax.sample runs text-to-video pipelines only" in err
        cfg = WanConfig.from_diffusers({**src, **change})
        assert cfg.image_conditioning == reason
        with pytest.raises(ValueError, match=r"this is an image-to-video model \("):
            sample_mod.sample(cfg, {}, jnp.zeros((1, cfg.in_channels, 1, 2, 2)), jnp.zeros((1, 4, cfg.text_dim)))
    assert WanConfig.from_diffusers(src).image_conditioning == ""
    assert dataclasses.replace(WanConfig.from_diffusers(src), in_channels=48, out_channels=48).image_conditioning == ""
    assert not (tmp_path / "x.mp4").exists()
