"""Few-step student samplers: wanjax (renoise / Euler, dual experts) == diffusers' WanPipeline with the student's
sigmas and LoRA (scripts/run_student_diffusers.py), and both loops == their formulas on a toy velocity."""

import functools
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

import reference as ref
import wanjax
from wanjax import students
from wanjax.losses import dmd

TOL = 1e-4  # max |wanjax - diffusers| <= TOL * max |diffusers|
CFG = ref.T2V
SHAPE = (2, CFG["in_channels"], 3, 4, 6)  # (B, C, F, H, W): 9 frames of 32 x 48 pixels
pytestmark = pytest.mark.filterwarnings("ignore:.*LoRA tensor.*have invalid shape:UserWarning")

_spec = importlib.util.spec_from_file_location(
    "run_student_diffusers", Path(__file__).parents[1] / "scripts" / "run_student_diffusers.py")
rsd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rsd)


def shifted(u, shift):
    return shift * u / (1 + (shift - 1) * u)


DMD_SIGMAS = dmd.student_sigmas(dmd.DMDConfig())  # 3 steps: s(1.0), s(0.757), s(0.522), shift 5
DCM_SIGMAS = np.float32(shifted(np.array([40, 30, 20, 10]) / 40, 17.0))  # phase floors of E=40, M=4, shift 17


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(config, params, two saved random LoRAs (objects, paths), the base model dir, inputs)."""
    d = tmp_path_factory.mktemp("students")
    ref.make_model(CFG).save_pretrained(d / "base")
    config, params = wanjax.load_transformer(d / "base", dtype=jnp.float32)
    loras, paths = [], []
    for seed in (0, 10):
        lora = wanjax.init_lora(config, jax.random.key(seed), rank=4, alpha=2.0)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(lora.params)
        keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
        new = [x if p[-1].key == "A" else 0.3 * jax.random.normal(k, x.shape) for k, (p, x) in zip(keys, leaves)]
        lora = lora.replace(params=jax.tree_util.tree_unflatten(treedef, new))
        paths.append(str(d / f"lora{seed}.safetensors"))
        wanjax.save_lora(lora, paths[-1])
        loras.append(lora)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(SHAPE, dtype=np.float32)
    embeds = rng.standard_normal((SHAPE[0], 7, CFG["text_dim"]), dtype=np.float32)
    return config, params, loras, paths, d / "base", noise, embeds


def pipeline(base_dir, *loras):
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       transformer=ref.make_model(CFG))
    pipe.set_progress_bar_config(disable=True)
    names = rsd.load_student(pipe, *loras)
    return pipe, names


@functools.partial(jax.jit, static_argnums=0)
def _renoise(config, params, noise, embeds, sigmas, noises, lora):
    return students.renoise_sample(config, params, noise, embeds, sigmas, lora=lora, noises=noises)


@functools.partial(jax.jit, static_argnums=(0, 7))
def _euler(config, params, noise, embeds, sigmas, lora, lora_switch, switch_sigma):
    return students.euler_sample(config, params, noise, embeds, sigmas, lora=lora, lora_switch=lora_switch,
                                 switch_sigma=switch_sigma)


@pytest.mark.parametrize("source", ["noises", "generator"])
def test_renoise_matches_diffusers_stochastic_scheduler(model, source):
    config, params, loras, paths, base, noise, embeds = model
    n = len(DMD_SIGMAS)
    if source == "noises":  # wanjax's noises= handed to the scheduler as step_noises
        noises = np.random.default_rng(1).standard_normal((n - 1, *SHAPE), dtype=np.float32)
        kw = dict(step_noises=noises)
    else:  # diffusers' own randn_tensor from a seeded generator; wanjax replays the same torch draws
        noises = rsd.torch_noises(7, SHAPE, n)
        kw = dict(generator=torch.Generator().manual_seed(7))
    pipe, _ = pipeline(base, paths[0])
    got = rsd.run_student(pipe, kind="dmd", sigmas=DMD_SIGMAS, latents=noise, prompt_embeds=embeds, **kw)
    sched = pipe.scheduler
    assert sched.config.stochastic_sampling
    np.testing.assert_array_equal(sched.sigmas.numpy(), np.append(DMD_SIGMAS, 0))  # no shift on custom sigmas
    np.testing.assert_array_equal(sched.timesteps.numpy(), np.float32(1000) * DMD_SIGMAS)
    want = _renoise(config, params, jnp.asarray(noise), jnp.asarray(embeds), jnp.asarray(DMD_SIGMAS),
                    jnp.asarray(noises), loras[0])
    assert ref.rel_err(want, got.numpy()) < TOL
    # the noises really drive both: other noises, another sample
    other = _renoise(config, params, jnp.asarray(noise), jnp.asarray(embeds), jnp.asarray(DMD_SIGMAS),
                     jnp.asarray(noises[::-1].copy()), loras[0])
    assert ref.rel_err(other, got.numpy()) > 1e-2


def test_euler_matches_diffusers_euler(model):
    config, params, loras, paths, base, noise, embeds = model
    pipe, _ = pipeline(base, paths[0])
    got = rsd.run_student(pipe, kind="dcm", sigmas=np.append(DCM_SIGMAS, 0), latents=noise, prompt_embeds=embeds)
    assert not pipe.scheduler.config.stochastic_sampling
    np.testing.assert_array_equal(pipe.scheduler.sigmas.numpy(), np.append(DCM_SIGMAS, 0))
    want = _euler(config, params, jnp.asarray(noise), jnp.asarray(embeds), jnp.asarray(DCM_SIGMAS), loras[0],
                  None, None)
    assert ref.rel_err(want, got.numpy()) < TOL


def test_dual_expert_euler_matches_diffusers_adapter_switch(model):
    config, params, loras, paths, base, noise, embeds = model
    switch = float(DCM_SIGMAS[1] + DCM_SIGMAS[2]) / 2  # steps 0, 1: first adapter; steps 2, 3: second
    pipe, names = pipeline(base, *paths)
    got = rsd.run_student(pipe, kind="dcm", sigmas=DCM_SIGMAS, latents=noise, prompt_embeds=embeds,
                          adapters=names, switch_sigma=switch)
    args = (config, params, jnp.asarray(noise), jnp.asarray(embeds), jnp.asarray(DCM_SIGMAS))
    want = _euler(*args, loras[0], loras[1], switch)
    assert ref.rel_err(want, got.numpy()) < TOL
    assert ref.rel_err(_euler(*args, loras[0], None, None), got.numpy()) > 1e-2  # the switch matters
    # concrete (numpy) sigmas take a Python branch instead of lax.cond: same sample
    eager = students.euler_sample(config, params, jnp.asarray(noise), jnp.asarray(embeds), DCM_SIGMAS,
                                  lora=loras[0], lora_switch=loras[1], switch_sigma=switch)
    np.testing.assert_allclose(np.asarray(eager), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_fixed_sigmas_scheduler_guards():
    sched = rsd.FixedSigmasScheduler.for_student("1.0, 0.9, 0.5", stochastic=False)
    with pytest.raises(ValueError, match="student has 3 steps"):
        sched.set_timesteps(50)  # WanPipeline's default num_inference_steps
    sched.set_timesteps(3)
    np.testing.assert_array_equal(sched.sigmas.numpy(), np.float32([1.0, 0.9, 0.5, 0.0]))
    # what it guards against: the stock scheduler shifts custom sigmas by its `shift`
    stock = FlowMatchEulerDiscreteScheduler(shift=5.0)
    stock.set_timesteps(sigmas=[1.0, 0.9, 0.5])
    assert float(stock.sigmas[2]) == pytest.approx(shifted(0.5, 5.0))
    for bad in ("0.5,0.9", "1.5,0.5", "1.0,0.0,0.0"):
        with pytest.raises(ValueError, match="descending"):
            rsd.parse_sigmas(bad)
        with pytest.raises(ValueError, match="descending"):
            students.step_sigmas([float(s) for s in bad.split(",")])


# ---------------------------------------------------------------------------------------------------------
# The loops against their formulas, with a toy velocity
# ---------------------------------------------------------------------------------------------------------
def _toy(adapter, x, sigma, ctx):
    return adapter["w"] * x + sigma[:, None, None, None, None] * ctx + 0.3


def _toy_np(w, x, s, ctx):
    return w * x + s * ctx + 0.3


def test_renoise_loop_formula_and_compiles_once():
    traces = []

    @jax.jit
    def run(noise, sigmas, noises, w):
        traces.append(1)
        return students.renoise_loop(_toy, {"w": w}, noise, jnp.float32(0.2), sigmas, noises=noises)

    rng = np.random.default_rng(2)
    noise = rng.standard_normal((2, 3, 1, 2, 2), dtype=np.float32)
    noises = rng.standard_normal((2, *noise.shape), dtype=np.float32)
    for sigmas in (DMD_SIGMAS, np.float32([0.9, 0.6, 0.2])):
        x = noise.astype(np.float64)
        for i, s in enumerate(sigmas):
            x0 = x - s * _toy_np(0.5, x, s, 0.2)
            x = x0 if i == len(sigmas) - 1 else (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * noises[i]
        got = run(noise, jnp.asarray(sigmas), noises, jnp.float32(0.5))
        np.testing.assert_allclose(np.asarray(got), x, rtol=1e-5, atol=1e-5)
    assert len(traces) == 1
    # without noises: eps_i = normal(fold_in(rng, i)), the training code's student sampler
    key = jax.random.key(4)
    a = students.renoise_loop(_toy, {"w": 0.5}, jnp.asarray(noise), 0.2, DMD_SIGMAS, key)
    b = dmd.student_sample(_toy, {"w": 0.5}, jnp.asarray(noise), 0.2, jnp.asarray(DMD_SIGMAS), key)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_euler_loop_formula_dual_expert_and_compiles_once():
    traces = []

    @functools.partial(jax.jit, static_argnums=3)
    def run(noise, sigmas, ws, switch):
        traces.append(1)
        return students.euler_loop(_toy, {"w": ws[0]}, noise, jnp.float32(0.2), sigmas, {"w": ws[1]}, switch)

    noise = np.random.default_rng(3).standard_normal((2, 3, 1, 2, 2), dtype=np.float32)
    switch = 0.5
    for sigmas in (DCM_SIGMAS, np.float32([1.0, 0.7, 0.4, 0.1])):
        x = noise.astype(np.float64)
        for i, s in enumerate(sigmas):
            nxt = sigmas[i + 1] if i + 1 < len(sigmas) else 0.0
            x = x + (nxt - s) * _toy_np(-0.4 if s < switch else 0.5, x, s, 0.2)
        got = run(noise, jnp.asarray(sigmas), (jnp.float32(0.5), jnp.float32(-0.4)), switch)
        np.testing.assert_allclose(np.asarray(got), x, rtol=1e-5, atol=1e-5)
    assert len(traces) == 1
    # a trailing 0 (the spec's DCM grid form) is the same schedule
    a = students.euler_loop(_toy, {"w": 0.5}, jnp.asarray(noise), 0.2, np.append(DCM_SIGMAS, 0))
    b = students.euler_loop(_toy, {"w": 0.5}, jnp.asarray(noise), 0.2, DCM_SIGMAS)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cli_seeded_dmd_matches_renoise_sample(model, tmp_path):
    """The script end to end (pipeline folder, --seed): draw 0 of the seeded torch generator is the initial noise,
    draws 1..N the step noises; wanjax given those draws gives the same latents."""
    config, params, loras, paths, base, _, embeds = model
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       transformer=ref.make_model(CFG))
    pipe.save_pretrained(tmp_path / "pipe")
    np.save(tmp_path / "embeds.npy", embeds)
    sigmas = ",".join(str(s) for s in DMD_SIGMAS)  # float32 reprs round-trip exactly
    b, c, f, h, w = SHAPE
    rsd.main(["--model", str(tmp_path / "pipe"), "--lora", paths[0], "--kind", "dmd", "--sigmas", sigmas,
              "--prompt-embeds", str(tmp_path / "embeds.npy"), "--frames", str((f - 1) * 4 + 1), "--height",
              str(8 * h), "--width", str(8 * w), "--seed", "5", "--dtype", "float32", "--device", "cpu",
              "--out", str(tmp_path / "out.npy")])
    got = np.load(tmp_path / "out.npy")
    draws = rsd.torch_noises(5, SHAPE, 1 + len(DMD_SIGMAS))
    want = _renoise(config, params, jnp.asarray(draws[0]), jnp.asarray(embeds), jnp.asarray(DMD_SIGMAS),
                    jnp.asarray(draws[1:]), loras[0])
    assert got.shape == SHAPE
    assert ref.rel_err(want, got) < TOL


def _expert_toy(adapter, x, sigma, ctx):
    """v = w: the adapter each step used is readable from the result (w differs per adapter)."""
    return jnp.broadcast_to(jnp.asarray(adapter["w"], jnp.float32), x.shape)


def test_dcm_switch_step_runs_the_detail_expert_as_the_trainer():
    """The step that starts at sigma == switch_sigma (meta's switch_sigma is a grid point) belongs to the detail
    expert, as losses.dcm.dcm_student_experts / dcm_sample assign it; the samplers follow, by the sigma rule and by
    the meta's per-step experts list."""
    from wanjax.losses import dcm as dcmlib

    cfg = dcmlib.DCMConfig(dual_experts=True)
    sig = students.step_sigmas(dcmlib.dcm_student_sigmas(cfg))
    switch = float(dcmlib.dcm_grid(cfg)[dcmlib.split_index(cfg)])  # methods/dcm.py's meta switch_sigma
    experts = list(dcmlib.dcm_student_experts(cfg))
    assert switch in sig.tolist() and experts.count("detail") >= 1
    w = {"semantic": 1.0, "detail": 100.0}
    noise = jnp.zeros((1, 1, 1, 1, 1))
    full = np.append(sig, 0.0)
    want = sum((full[i + 1] - full[i]) * w[e] for i, e in enumerate(experts))
    gen, det = {"w": jnp.float32(w["semantic"])}, {"w": jnp.float32(w["detail"])}
    eager = students.euler_loop(_expert_toy, gen, noise, None, sig, det, switch)
    traced = jax.jit(lambda s: students.euler_loop(_expert_toy, gen, noise, None, s, det, switch))(jnp.asarray(sig))
    listed = students.euler_loop(_expert_toy, gen, noise, None, sig, det, None, experts)
    for got in (eager, traced, listed):
        np.testing.assert_allclose(float(np.asarray(got).ravel()[0]), want, rtol=1e-5)
    with pytest.raises(ValueError, match="experts"):
        students.euler_loop(_expert_toy, gen, noise, None, sig, det, None, experts[:-1])


def test_diffusers_script_switch_step_runs_the_detail_expert(model):
    """run_student_diffusers: the adapter of the step at sigma == switch_sigma is the second (detail) one, as the
    manual loop over the meta experts list; `experts=` gives the same."""
    config, params, loras, paths, base, noise, embeds = model
    experts = ["semantic", "semantic", "detail", "detail"]
    switch = float(DCM_SIGMAS[2])  # exactly a step sigma, as DCM's meta switch_sigma
    pipe, names = pipeline(base, *paths)
    used = []
    orig = pipe.set_adapters

    def spy(name, *a, **k):
        used.append(name)
        return orig(name, *a, **k)

    pipe.set_adapters = spy
    got = rsd.run_student(pipe, kind="dcm", sigmas=DCM_SIGMAS, latents=noise, prompt_embeds=embeds,
                          adapters=names, switch_sigma=switch)
    assert used == [names[1] if e == "detail" else names[0] for e in experts]
    got_list = rsd.run_student(pipe, kind="dcm", sigmas=DCM_SIGMAS, latents=noise, prompt_embeds=embeds,
                               adapters=names, experts=experts)
    want = students.euler_sample(config, params, jnp.asarray(noise), jnp.asarray(embeds), DCM_SIGMAS,
                                 lora=loras[0], lora_switch=loras[1], experts=experts)
    assert ref.rel_err(want, got.numpy()) < TOL
    assert ref.rel_err(want, got_list.numpy()) < TOL
    by_sigma = students.euler_sample(config, params, jnp.asarray(noise), jnp.asarray(embeds), DCM_SIGMAS,
                                     lora=loras[0], lora_switch=loras[1], switch_sigma=switch)
    np.testing.assert_allclose(np.asarray(by_sigma), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_cli_writes_playable_mp4_with_fps(tmp_path):
    """`--out video.mp4` is written with wanjax.video_out (PyAV; no imageio/OpenCV needed) at --fps."""
    import av

    from wanjax import tiny

    pipe_dir = tiny.ensure_assets(Path(__file__).parents[1] / "cache" / "tiny-wan") / "pipeline"
    config, _ = wanjax.load_transformer(pipe_dir, subfolder="transformer", dtype=jnp.float32)
    lora = wanjax.init_lora(config, jax.random.key(0), rank=2, alpha=2.0)
    wanjax.save_lora(lora, tmp_path / "lora.safetensors")
    out = tmp_path / "video.mp4"
    rsd.main(["--model", str(pipe_dir), "--lora", str(tmp_path / "lora.safetensors"), "--kind", "dcm",
              "--sigmas", "1.0,0.9,0.5", "--prompt", "a cat", "--height", "32", "--width", "48", "--frames", "9",
              "--dtype", "float32", "--device", "cpu", "--fps", "24", "--out", str(out)])
    with av.open(str(out)) as c:
        stream = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
        assert stream.average_rate == 24
    assert len(frames) == 9 and frames[0].shape == (32, 48, 3)
    rsd.main(["--model", str(pipe_dir), "--lora", str(tmp_path / "lora.safetensors"), "--kind", "dcm",
              "--sigmas", "1.0", "--prompt", "a cat", "--height", "32", "--width", "48", "--frames", "5",
              "--dtype", "float32", "--device", "cpu", "--out", str(out)])
    with av.open(str(out)) as c:
        assert c.streams.video[0].average_rate == 16  # the pipeline's (not TI2V-5B)
    with pytest.raises(SystemExit):
        rsd.main(["--model", str(pipe_dir), "--lora", "x", "--kind", "dcm", "--sigmas", "1.0", "--out", "v.webm"])
