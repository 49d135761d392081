"""DCM formulas against direct numpy evaluations, guards against SimpleTuner's DCM defects, the student sampler,
and tiny end-to-end runs (logged losses, exact resume with the discriminator, LoRA export)."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from wanjax import lora as lora_lib
from wanjax import tiny
from wanjax.losses import dcm
from wanjax.models.transformer import init_params, transformer_forward

ROOT = Path(__file__).resolve().parents[1]


def _np_grid(E, S):
    u = np.arange(E + 1, dtype=np.float64) / E
    return S * u / (1 + (S - 1) * u)


def _np_floor(j, E, M):
    return max(m * E // M for m in range(M + 1) if m * E // M < j)


def _fake_denoise(adapter, x, sigma, ctx):
    """A toy velocity whose value tells which adapter and context were used (teacher: adapter None)."""
    a, m = (0.0, 0.0) if adapter is None else (adapter["w"], adapter.get("m", 0.0))
    return (0.5 + m) * x + a + ctx.mean(axis=(1, 2))[:, None, None, None, None]


# ---------------------------------------------------------------------------------------------------------
# Grid, phases, experts
# ---------------------------------------------------------------------------------------------------------
def test_grid_and_phase_boundaries():
    cfg = dcm.DCMConfig(euler_steps=100, shift=17.0, multiphase=4)
    np.testing.assert_allclose(dcm.dcm_grid(cfg), _np_grid(100, 17.0), rtol=1e-6)
    assert dcm.dcm_grid(cfg)[0] == 0.0 and dcm.dcm_grid(cfg)[-1] == 1.0
    assert dcm.phase_boundaries(cfg).tolist() == [0, 25, 50, 75, 100]
    assert dcm.phase_boundaries(dcm.DCMConfig(euler_steps=10, multiphase=3)).tolist() == [0, 3, 6, 10]


@pytest.mark.parametrize("E,M", [(10, 3), (100, 4), (7, 7), (5, 1)])
def test_phase_floor_every_interval(E, M):
    cfg = dcm.DCMConfig(euler_steps=E, multiphase=M)
    j = np.arange(1, E + 1)
    got = np.asarray(dcm.phase_floor(jnp.asarray(j), dcm.phase_boundaries(cfg)))
    assert got.tolist() == [_np_floor(int(k), E, M) for k in j]
    if (E, M) == (10, 3):  # a boundary is the floor of the intervals above it, not its own
        assert [int(got[k - 1]) for k in (1, 3, 4, 6, 7, 10)] == [0, 0, 3, 3, 6, 6]
    if E == M:
        assert got.tolist() == (j - 1).tolist()  # one interval per phase: x_hat is the teacher step itself


def test_expert_split_is_rounded_down_to_a_phase_floor():
    base = {"euler_steps": 100, "multiphase": 4, "dual_experts": True}
    assert dcm.split_index(dcm.DCMConfig(expert_boundary=0.7, **base)) == 50  # 0.7 * 100 is 70.00000000000001
    assert dcm.split_index(dcm.DCMConfig(expert_boundary=0.75, **base)) == 50
    assert dcm.split_index(dcm.DCMConfig(expert_boundary=0.76, **base)) == 75
    cfg = dcm.DCMConfig(expert_boundary=0.7, **base)
    assert dcm.dcm_student_experts(cfg) == ("semantic", "semantic", "detail", "detail")
    assert dcm.dcm_student_experts(dcm.DCMConfig()) == ("semantic",) * 4
    with pytest.raises(ValueError, match="detail expert"):
        dcm.DCMConfig(expert_boundary=0.2, **base)  # no phase below the boundary


# ---------------------------------------------------------------------------------------------------------
# Loss terms
# ---------------------------------------------------------------------------------------------------------
def test_pseudo_huber_and_temporal_coherence():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 2, 3, 5, 2, 2)).astype(np.float32)
    got = float(dcm.pseudo_huber(jnp.asarray(a), jnp.asarray(b), 1e-3))
    np.testing.assert_allclose(got, np.mean(np.sqrt((a.astype(np.float64) - b) ** 2 + 1e-6) - 1e-3), rtol=1e-5)
    got = float(dcm.temporal_coherence(jnp.asarray(a), jnp.asarray(b), 3))
    want = np.mean(((a[:, :, 3:] - a[:, :, :-3]) - (b[:, :, 3:] - b[:, :, :-3])).astype(np.float64) ** 2)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert float(dcm.temporal_coherence(jnp.asarray(a[:, :, :3]), jnp.asarray(b[:, :, :3]), 3)) == 0.0  # F <= d


def test_teacher_is_the_base_with_cfg_on_the_uncond_embedding():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 2, 1, 2, 2)), jnp.float32)
    sigma = jnp.asarray([0.3, 0.9])
    cond, uncond = jnp.full((2, 3, 4), 2.0), jnp.full((2, 3, 4), -1.0)
    got = np.asarray(dcm.teacher_velocity(_fake_denoise, x, sigma, cond, uncond, 5.0))
    np.testing.assert_allclose(got, 0.5 * np.asarray(x) - 1.0 + 5.0 * 3.0, rtol=1e-6)  # v_u + w (v_c - v_u)
    got = np.asarray(dcm.teacher_velocity(_fake_denoise, x, sigma, cond, uncond, 1.0))
    np.testing.assert_allclose(got, 0.5 * np.asarray(x) + 2.0, rtol=1e-6)  # w = 1: conditional only


def _semantic_np(x0, eps, j, c, u, w, a_s, a_t, E, M, S, lam, d=3, huber_c=1e-3, m_s=0.0, m_t=0.0):
    tau = _np_grid(E, S)
    x0, eps = x0.astype(np.float64), eps.astype(np.float64)
    xs, xh = [], []
    for i, ji in enumerate(j):
        b = _np_floor(ji, E, M)
        xj = (1 - tau[ji]) * x0[i] + tau[ji] * eps[i]
        v_t = (0.5 * xj + u) + w * ((0.5 * xj + c[i]) - (0.5 * xj + u))  # teacher: no adapter
        x_prev = xj + (tau[ji - 1] - tau[ji]) * v_t
        x_hat = x_prev if ji - 1 == b else x_prev + (tau[b] - tau[ji - 1]) * ((0.5 + m_t) * x_prev + a_t + c[i])
        xs.append(xj + (tau[b] - tau[ji]) * ((0.5 + m_s) * xj + a_s + c[i]))
        xh.append(x_hat)
    xs, xh = np.stack(xs), np.stack(xh)
    huber = np.mean(np.sqrt((xs - xh) ** 2 + huber_c**2) - huber_c)
    tc = np.mean(((xs[:, :, d:] - xs[:, :, :-d]) - (xh[:, :, d:] - xh[:, :, :-d])) ** 2)
    return huber + lam * tc, huber, tc, xs, xh


def _semantic_jax(cfg, x0, eps, j, cond, uncond, a_s, a_t, m_s=0.0, m_t=0.0):
    target = {"w": jnp.asarray(a_t), "m": jnp.asarray(m_t)}
    x_j, x_hat, b = dcm.consistency_target(_fake_denoise, target, x0, eps, j, cond, uncond, cfg)
    tau = jnp.asarray(dcm.dcm_grid(cfg))
    x_s = dcm.student_jump(_fake_denoise, {"w": jnp.asarray(a_s), "m": jnp.asarray(m_s)}, x_j, tau[j], tau[b], cond)
    loss, aux = dcm.semantic_loss(x_s, x_hat, cfg)
    return loss, aux, x_s, x_hat


def test_semantic_loss_matches_numpy():
    E, M, S = 20, 4, 3.0
    cfg = dcm.DCMConfig(euler_steps=E, multiphase=M, shift=S, distill_cfg=4.0, temporal_weight=0.5)
    rng = np.random.default_rng(2)
    x0, eps = (rng.standard_normal((4, 2, 5, 2, 2)).astype(np.float32) for _ in range(2))
    j = np.array([1, 6, 13, 20])  # j - 1 at the floor (1, 6); target jumps (13 -> 10, 20 -> 15)
    c = np.array([2.0, 1.0, -0.5, 0.3])
    cond = jnp.asarray(np.broadcast_to(c[:, None, None], (4, 3, 4)), jnp.float32)
    uncond = jnp.full((4, 3, 4), -1.0)
    loss, aux, x_s, x_hat = _semantic_jax(cfg, jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(j), cond, uncond,
                                          0.3, -0.2, 0.2, -0.1)
    total, huber, tc, xs, xh = _semantic_np(x0, eps, j, c, -1.0, 4.0, 0.3, -0.2, E, M, S, 0.5, m_s=0.2, m_t=-0.1)
    assert tc > 1e-3  # the frame-difference term is exercised, not vanishing
    np.testing.assert_allclose(np.asarray(x_s), xs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(x_hat), xh, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(aux["semantic_loss"]), huber, rtol=1e-5)
    np.testing.assert_allclose(float(aux["temporal_loss"]), tc, rtol=1e-5)
    np.testing.assert_allclose(float(loss), total, rtol=1e-5)


def test_semantic_loss_compares_latents_not_velocities():
    """SimpleTuner compares the student's raw velocity with the target latent. A student whose jump lands exactly
    on the target (v_S = v_T with j - 1 at the floor) must have zero loss, while velocity-vs-latent is large."""
    E, M = 20, 4
    cfg = dcm.DCMConfig(euler_steps=E, multiphase=M, shift=3.0, distill_cfg=4.0)
    rng = np.random.default_rng(3)
    x0, eps = (jnp.asarray(rng.standard_normal((4, 2, 4, 2, 2)), jnp.float32) for _ in range(2))
    j = jnp.asarray([1, 6, 11, 16])  # all at the floor + 1
    cond, uncond = jnp.full((4, 3, 4), 2.0), jnp.full((4, 3, 4), -1.0)
    a_s = -1.0 + 4.0 * 3.0 - 2.0  # student velocity = the teacher's CFG velocity
    loss, _, _, x_hat = _semantic_jax(cfg, x0, eps, j, cond, uncond, a_s, 0.0)
    assert float(loss) < 1e-8
    v_s = 0.5 * np.asarray(dcm.consistency_target(_fake_denoise, None, x0, eps, j, cond, uncond, cfg)[0]) + a_s + 2.0
    assert np.mean((v_s - np.asarray(x_hat)) ** 2) > 1.0  # what the defect would have minimised


def test_uncond_is_the_cached_embedding_not_zeros():
    """The step's teacher runs its unconditional half on frozen.uncond (SimpleTuner used zeros)."""
    cfg = dcm.DCMConfig(euler_steps=20, multiphase=4, shift=3.0)
    seen = []

    def forward(base, adapter, x, t, ctx):
        if not isinstance(ctx, jax.core.Tracer) and adapter is None:
            seen.append(np.asarray(ctx))
        return _fake_denoise(adapter, x, t / 1000.0, ctx)

    state, frozen, batch = _toy_state(cfg, optax.sgd(0.1))
    dcm.dcm_step(state, frozen, batch, **_toy_kwargs(cfg, forward, optax.sgd(0.1)))
    teacher = [s for s in seen if s.shape[0] == 4]
    assert teacher, "the teacher ran no batched CFG pass"
    np.testing.assert_array_equal(teacher[0][2:], np.broadcast_to(np.asarray(frozen.uncond), (2, 3, 4)))
    assert np.abs(teacher[0][2:]).min() > 0


def test_uncond_from_negative_else_empty_prompt_in_method():
    from wanjax.losses.flow_matching import FlowMatchingConfig
    from wanjax.methods import Context, build
    from wanjax.optim import OptimConfig

    c = _get_config("tiny")
    empty, negative = jnp.full((4, 32), 0.5), jnp.full((4, 32), -0.25)
    for embeds, want in (({"empty": empty}, empty), ({"empty": empty, "negative": negative}, negative)):
        ctx = Context(config=c, model=tiny.TINY_TRANSFORMER, base={}, text_embeds=embeds,
                      lora_targets=lora_lib.DEFAULT_TARGETS[:4], lora_alpha=4.0, init_lora=None,
                      optim=OptimConfig(optimizer="adamw", learning_rate=1e-3), fm=FlowMatchingConfig())
        method = build("dcm", ctx)
        np.testing.assert_array_equal(np.asarray(method.frozen.uncond), np.asarray(want))
        np.testing.assert_array_equal(np.asarray(method.frozen.empty), np.asarray(empty))


# ---------------------------------------------------------------------------------------------------------
# Config: SimpleTuner's keys
# ---------------------------------------------------------------------------------------------------------
def _get_config(arg):
    spec = importlib.util.spec_from_file_location("cfg_dcm", ROOT / "configs" / "dcm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_euler_steps_and_its_alias_euler_timesteps():
    from wanjax.methods.dcm import dcm_config

    def e(**kw):
        c = _get_config("")
        c.distillation_config.euler_steps = None
        for k, v in kw.items():
            c.distillation_config[k] = v
        return dcm_config(c).euler_steps

    assert e(euler_steps=100) == 100  # the documented key is read (SimpleTuner's code ignored it)
    assert e(euler_timesteps=80) == 80
    assert e(euler_steps=64, euler_timesteps=64) == 64
    assert e() == 50
    with pytest.raises(ValueError, match="disagree"):
        e(euler_steps=100, euler_timesteps=50)


def test_seed_settings_and_bad_keys():
    from wanjax.methods.dcm import dcm_config

    c = _get_config("")
    cfg = dcm_config(c, tiny.TINY_TRANSFORMER.replace(num_layers=30))
    assert (cfg.mode, cfg.euler_steps, cfg.shift, cfg.multiphase) == ("semantic", 100, 17.0, 4)
    got = (c.lora_rank, c.lora_alpha, c.optimizer, c.learning_rate, c.lr_scheduler, c.flow_schedule_shift)
    assert got == (128, 128.0, "adamw_bf16", 1e-4, "cosine", 17.0)
    for key, value, match in (("dcm_shift", 5.0, "dcm_shift"), ("model_family", "hunyuan", "model_family"),
                              ("discriminator_total_layers", 40, "blocks"), ("mode", "coarse", "mode")):
        bad = _get_config("")
        bad.distillation_config[key] = value
        with pytest.raises(ValueError, match=match):
            dcm_config(bad, tiny.TINY_TRANSFORMER.replace(num_layers=30))
    ok = _get_config("")
    ok.distillation_config.dcm_shift = 17.0
    assert dcm_config(ok).shift == 17.0


# ---------------------------------------------------------------------------------------------------------
# Fine mode: features, discriminator, adversarial terms
# ---------------------------------------------------------------------------------------------------------
def test_base_features_and_discriminator_at_two_resolutions():
    """Heads derive (F', H', W') from the latent: two tiny resolutions through the same discriminator (SimpleTuner
    hard-coded 480x832); the features' final output is the transformer's own, the features are block outputs."""
    cfg_model = tiny.TINY_TRANSFORMER
    params = init_params(cfg_model, jax.random.key(0))
    feats_fn = jax.jit(dcm.base_features, static_argnums=0, static_argnames="stride")
    fwd = jax.jit(transformer_forward, static_argnums=0)
    disc = dcm.Discriminator(num_heads=1, width=32, groups=32)
    rng = np.random.default_rng(4)
    x, t, ctx = jnp.asarray(rng.standard_normal((2, 16, 2, 4, 6)), jnp.float32), jnp.full((2,), 700.0), jnp.asarray(
        rng.standard_normal((2, 5, 32)), jnp.float32)
    feats, out = feats_fn(cfg_model, params, x, t, ctx, stride=2)
    np.testing.assert_allclose(np.asarray(out), np.asarray(fwd(cfg_model, params, x, t, ctx)), rtol=1e-5, atol=1e-6)
    one = cfg_model.replace(num_layers=1)  # a 1-layer model's output is the head applied to block 0's output
    params1 = {**params, "blocks": jax.tree_util.tree_map(lambda a: a[:1], params["blocks"])}
    feats1, out1 = feats_fn(one, params1, x, t, ctx, stride=1)
    np.testing.assert_allclose(np.asarray(feats1[0]), np.asarray(feats[0]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out1), np.asarray(fwd(one, params1, x, t, ctx)), rtol=1e-5, atol=1e-6)
    three = {**params, "blocks": jax.tree_util.tree_map(lambda a: jnp.concatenate([a, a[:1]]), params["blocks"])}
    assert len(jax.eval_shape(lambda: dcm.base_features(cfg_model.replace(num_layers=3), three, x, t, ctx,
                                                        stride=2))[0]) == 2  # blocks 0 and 2
    assert dcm.feature_layers(30, 2) == tuple(range(0, 30, 2)) and dcm.feature_layers(5, 2) == (0, 2, 4)
    disc_params = disc.init(jax.random.key(1), feats, dcm.token_grid(x.shape, cfg_model.patch_size))["params"]
    for shape in ((2, 16, 2, 4, 6), (1, 16, 3, 8, 4)):
        x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        f, _ = feats_fn(cfg_model, params, x, t[: shape[0]], ctx[: shape[0]], stride=2)
        grid = dcm.token_grid(shape, cfg_model.patch_size)
        assert f[0].shape == (shape[0], int(np.prod(grid)), cfg_model.inner_dim)
        logits = disc.apply({"params": disc_params}, f, grid)
        assert logits[0].shape == (shape[0], int(np.prod(grid))) and np.all(np.isfinite(np.asarray(logits[0])))


def test_hinge_losses_and_masks():
    rng = np.random.default_rng(5)
    real, fake = ([rng.standard_normal((3, 6)).astype(np.float32) for _ in range(2)] for _ in range(2))
    mask = np.array([1.0, 0.0, 1.0], np.float32)
    got_d = float(dcm.discriminator_loss([jnp.asarray(r) for r in real], [jnp.asarray(f) for f in fake], mask))
    got_g = float(dcm.generator_hinge([jnp.asarray(f) for f in fake], mask))
    sel = mask > 0
    want_d = np.mean([np.maximum(1 + f[sel], 0).mean() + np.maximum(1 - r[sel], 0).mean() for r, f in zip(real, fake)])
    want_g = np.mean([np.maximum(1 - f[sel], 0).mean() for f in fake])
    np.testing.assert_allclose(got_d, want_d, rtol=1e-5)
    np.testing.assert_allclose(got_g, want_g, rtol=1e-5)
    assert float(dcm.generator_hinge([jnp.asarray(fake[0])], np.zeros(3, np.float32))) == 0.0


def test_adversarial_sigmas_and_mix():
    cfg = dcm.DCMConfig(euler_steps=50, multiphase=4, mode="fine")
    tau = _np_grid(50, cfg.shift)
    b = jnp.asarray(np.repeat([0, 12, 25, 37], 4000))
    sa, se = (np.asarray(v) for v in dcm.adversarial_sigmas(jax.random.key(0), b, cfg))
    k = np.searchsorted(tau.astype(np.float32), sa)
    for floor in (0, 12, 25, 37):
        ks = k[np.asarray(b) == floor]
        assert ks.min() == floor and ks.max() == min(floor + 34, 50)  # 35 of 50 grid points, clipped at the top
    np.testing.assert_allclose(se, tau[np.asarray(b)], rtol=1e-6)
    x, e = np.full((1, 1, 1, 1, 1), 2.0, np.float32), np.full((1, 1, 1, 1, 1), -1.0, np.float32)
    got = float(dcm.adversarial_mix(jnp.asarray(x), jnp.asarray(e), jnp.asarray([0.8]), jnp.asarray([0.5])).squeeze())
    np.testing.assert_allclose(got, (0.2 * 2.0 + 0.3 * -1.0) / 0.5, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Steps with a toy denoiser
# ---------------------------------------------------------------------------------------------------------
def _toy_features(base, x, t, ctx):
    b, c = x.shape[:2]
    return [x.transpose(0, 2, 3, 4, 1).reshape(b, -1, c) * base["scale"]], x * base["scale"]


def _toy_state(cfg, opt, disc_opt=None):
    gen = {"w": jnp.asarray(0.3)}
    detail = {"w": jnp.asarray(-0.1)} if cfg.dual_experts else None
    disc = dcm.Discriminator(num_heads=1, width=32, groups=32)
    dp = disc.init(jax.random.key(1), [jnp.zeros((1, 1, 2))], (1, 1, 1))["params"] if cfg.fine else None
    state = dcm.DCMState(
        step=jnp.asarray(0, jnp.int32), gen=gen, gen_opt=opt.init(gen), target={"w": jnp.asarray(0.0)}, detail=detail,
        detail_opt=opt.init(detail) if detail else None, detail_target={"w": jnp.asarray(0.0)} if detail else None,
        disc=dp, disc_opt=disc_opt.init(dp) if cfg.fine else None, ema=None, detail_ema=None,
        rng=jax.random.key_data(jax.random.key(7)))
    frozen = dcm.DCMFrozen(params={"scale": jnp.asarray(1.0)}, uncond=jnp.full((3, 4), -0.7),
                           empty=jnp.full((3, 4), 0.1))
    lat = np.random.default_rng(6).standard_normal((2, 2, 4, 2, 2)).astype(np.float32)
    batch = {"latents": jnp.asarray(lat), "prompt_embeds": jnp.ones((2, 3, 4))}
    return state, frozen, batch


def _toy_kwargs(cfg, forward, opt, disc_opt=None):
    disc = dcm.Discriminator(num_heads=1, width=32, groups=32)
    return {"forward": forward, "features": _toy_features, "wrap": lambda p: p, "cfg": cfg, "optimizer": opt,
            "disc_apply": lambda p, f, g: disc.apply({"params": p}, f, g), "disc_optimizer": disc_opt,
            "schedule": lambda n: 0.1, "patch_size": (1, 1, 1)}


def _toy_forward(base, adapter, x, t, ctx):
    return _fake_denoise(adapter, x, t / 1000.0, ctx) * base["scale"]


def test_step_loss_and_ema_target():
    cfg = dcm.DCMConfig(euler_steps=20, multiphase=4, shift=3.0)
    opt = optax.sgd(0.1)
    state, frozen, batch = _toy_state(cfg, opt)
    new, m = dcm.dcm_step(state, frozen, batch, **_toy_kwargs(cfg, _toy_forward, opt))
    k_int, k_eps = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0), 5)[:2]
    j = jax.random.randint(k_int, (2,), 1, 21)
    eps = jax.random.normal(k_eps, batch["latents"].shape, jnp.float32)
    want, *_ = _semantic_np(np.asarray(batch["latents"]), np.asarray(eps), np.asarray(j), np.ones(2), -0.7,
                            cfg.distill_cfg, 0.3, 0.0, 20, 4, 3.0, 1.0)
    np.testing.assert_allclose(float(m["dcm_loss"]), want, rtol=1e-5)
    assert float(new.gen["w"]) != 0.3
    np.testing.assert_allclose(float(new.target["w"]), 0.05 * float(new.gen["w"]), rtol=1e-6)  # 0 + (1 - .95)(p - 0)


def test_dual_experts_fine_update_only_their_own_intervals():
    cfg = dcm.DCMConfig(euler_steps=20, multiphase=4, shift=3.0, dual_experts=True, mode="fine")
    s = dcm.split_index(cfg)
    opt, dopt = optax.sgd(0.1), optax.adamw(1e-3, b1=0.0)
    state, frozen, batch = _toy_state(cfg, opt, dopt)
    step = jax.jit(lambda st: dcm.dcm_step(st, frozen, batch, **_toy_kwargs(cfg, _toy_forward, opt, dopt)))
    experts = []
    for _ in range(6):
        new, m = step(state)
        e = int(m["expert"])
        experts.append(e)
        gen_moved = float(new.gen["w"]) != float(state.gen["w"])
        det_moved = float(new.detail["w"]) != float(state.detail["w"])
        disc_moved = any(np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(
            jax.tree_util.tree_leaves(new.disc), jax.tree_util.tree_leaves(state.disc)))
        assert (gen_moved, det_moved, disc_moved) == ((False, True, True) if e else (True, False, False))
        lo, hi = (1, s) if e else (s + 1, 20)
        assert lo <= float(m["interval_mean"]) <= hi
        assert np.isfinite(float(m["adv_g_loss"])) == bool(e) and np.isfinite(float(m["dcm_loss"]))
        if e:
            np.testing.assert_allclose(float(m["dcm_loss"]), float(m["semantic_loss"]) + float(m["temporal_loss"])
                                       + 0.1 * float(m["adv_g_loss"]), rtol=1e-5)
        pairs = ((state.target, new.target, new.gen), (state.detail_target, new.detail_target, new.detail))
        for t_old, t_new, p in pairs:
            want = float(t_old["w"]) + 0.05 * (float(p["w"]) - float(t_old["w"]))
            np.testing.assert_allclose(float(t_new["w"]), want, rtol=1e-6)
        state = new
    assert set(experts) == {0, 1}


def test_student_sampler_matches_its_formula():
    cfg = dcm.DCMConfig(euler_steps=20, multiphase=4, shift=3.0, dual_experts=True)
    tau = _np_grid(20, 3.0)
    sigmas = dcm.dcm_student_sigmas(cfg)
    np.testing.assert_allclose(sigmas, [tau[20], tau[15], tau[10], tau[5], 0.0], rtol=1e-6)
    noise = np.random.default_rng(8).standard_normal((1, 2, 1, 2, 2)).astype(np.float32)
    adapters = {"semantic": {"w": jnp.asarray(0.2)}, "detail": {"w": jnp.asarray(-0.4)}}
    got = dcm.dcm_sample(_fake_denoise, adapters, jnp.asarray(noise), jnp.ones((1, 3, 4)), cfg)
    x = noise.astype(np.float64)
    for i, a in enumerate((0.2, 0.2, -0.4, -0.4)):  # switch at the split (steps from tau_20, tau_15 semantic)
        x = x + (sigmas[i + 1] - sigmas[i]) * (0.5 * x + a + 1.0)
    np.testing.assert_allclose(np.asarray(got), x, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# End to end on the tiny pipeline
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny.ensure_assets(tmp_path_factory.mktemp("tiny") / "tiny-wan")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One latent bucket with 4 frames (temporal term on; one compile per run) and a cached negative prompt."""
    from wanjax.data import records

    directory = tmp_path_factory.mktemp("dcm") / "cache"
    records.write_synthetic_cache(directory, num_items=16, latent_channels=16, text_dim=32, text_len=tiny.TEXT_LEN,
                                  shapes=((4, 4, 4),), seed=3)
    rng = np.random.default_rng(9)
    records.write_text_embeds(directory / "empty_prompt.safetensors",
                              {"empty": rng.standard_normal((1, 32)).astype(np.float32)})
    negative = _get_config("tiny").validation_negative_prompt  # stored as the caching job stores it
    records.write_text_embeds(directory / "validation_prompts.safetensors",
                              {"validation_negative_prompt": rng.standard_normal((3, 32)).astype(np.float32)},
                              {"prompts": json.dumps({"validation_negative_prompt": negative})})
    return directory


def _run_cfg(variant, assets, out, steps, cache=None):
    c = _get_config(variant)
    c.tiny_assets_dir, c.pretrained_model_name_or_path = str(assets), str(assets / "pipeline")
    c.cache_dir, c.output_dir = str(cache or assets / "latents"), str(out)
    c.max_train_steps, c.checkpoint_step_interval, c.resume_from_checkpoint = steps, 2, "latest"
    return c


def _rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_dcm_tiny_dual_experts_resume_exactly_and_export_both(assets, cache, tmp_path):
    """configs/dcm.py:tiny with two experts: DCM losses logged, 2 steps + resume + 2 == 4 uninterrupted (both
    experts, both EMA targets), both adapters exported and loadable."""
    from wanjax.train import run

    def cfg(out, steps):
        c = _run_cfg("tiny", assets, out, steps, cache)
        c.distillation_config.dual_experts = True
        return c

    from test_train import _student_videos, _with_validation

    run(_with_validation(cfg(tmp_path / "full", 4)))  # validation (both experts) must not change training
    run(cfg(tmp_path / "split", 2))
    summary = run(cfg(tmp_path / "split", 4))
    assert _student_videos(tmp_path / "full") == ["step_000002_validation.mp4", "step_000004_validation.mp4"]
    full, split = _rows(tmp_path / "full"), _rows(tmp_path / "split")
    keys = ("dcm_loss", "semantic_loss", "temporal_loss", "grad_norm", "expert", "interval_mean")
    assert [r["step"] for r in full] == [1, 2, 3, 4] and all(np.isfinite(r[k]) for r in full for k in keys)
    assert all(r["temporal_loss"] > 0 for r in full)
    np.testing.assert_array_equal([[r[k] for k in keys] for r in full], [[r[k] for k in keys] for r in split])
    assert summary["exports"][1].endswith("detail_expert_lora_weights.safetensors")
    experts = {r["expert"] for r in full}
    for name, expert in (("pytorch_lora_weights", 0.0), ("detail_expert_lora_weights", 1.0)):
        a = lora_lib.load_lora(tmp_path / "full" / f"{name}.safetensors")
        b = lora_lib.load_lora(tmp_path / "split" / f"{name}.safetensors")
        for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        trained = np.abs(np.asarray(a.params["blocks"]["attn1"]["to_q"]["B"])).max() > 0
        assert trained == (expert in experts)  # an expert moves only on its own steps
    meta_path = tmp_path / "full" / "checkpoints" / "4" / "meta"
    meta = json.loads((meta_path if meta_path.is_file() else next(meta_path.glob("*"))).read_text())
    assert meta["student"]["kind"] == "dcm" and meta["lora"]["state_key"] == "gen"
    assert meta["student"]["experts"] == ["semantic", "semantic", "detail", "detail"]
    np.testing.assert_allclose(meta["student"]["sigmas"], dcm.dcm_student_sigmas(dcm.DCMConfig(euler_steps=100)))


def test_dcm_tiny_fine_resumes_exactly_with_the_discriminator(assets, cache, tmp_path):
    """configs/dcm.py:tiny_fine: 2 steps + resume + 2 == 4 uninterrupted, bitwise (student, EMA target,
    discriminator and its optimizer, data position); the temporal term is on (4 latent frames)."""
    from wanjax.train import run

    run(_run_cfg("tiny_fine", assets, tmp_path / "full", 4, cache))
    run(_run_cfg("tiny_fine", assets, tmp_path / "split", 2, cache))
    summary = run(_run_cfg("tiny_fine", assets, tmp_path / "split", 4, cache))
    assert summary["start_step"] == 2
    full, split = _rows(tmp_path / "full"), _rows(tmp_path / "split")
    keys = ("dcm_loss", "semantic_loss", "temporal_loss", "adv_g_loss", "adv_d_loss", "feature_matching_loss",
            "grad_norm", "discriminator_grad_norm", "adv_fraction")
    assert len(full) == len(split) == 4
    np.testing.assert_array_equal([[r[k] for k in keys] for r in full], [[r[k] for k in keys] for r in split])
    assert all(r["temporal_loss"] > 0 for r in full)
    assert any(r["adv_fraction"] > 0 and np.isfinite(r["adv_d_loss"]) for r in full[2:])  # resumed D was used
    a = lora_lib.load_lora(tmp_path / "full" / "pytorch_lora_weights.safetensors")
    b = lora_lib.load_lora(tmp_path / "split" / "pytorch_lora_weights.safetensors")
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
