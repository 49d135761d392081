"""DMD formulas against direct numpy evaluations, guards against SimpleTuner's DMD defects, and the tiny run."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wanjax import optim
from wanjax.losses import dmd
from wanjax.schedules import shift_sigma


def test_student_sigmas_are_shifted_t_over_1000_not_inverted():
    cfg = dmd.DMDConfig(denoising_steps=(1000, 757, 522), shift=5.0)
    got = dmd.student_sigmas(cfg)
    t = np.array([1000, 757, 522]) / 1000
    np.testing.assert_allclose(got, 5 * t / (1 + 4 * t), rtol=1e-6)
    inverted = shift_sigma(1 - t, 5.0)  # SimpleTuner's defect: s(1 - t/1000)
    assert np.abs(got - inverted).max() > 0.5
    assert got[0] == 1.0 and np.all(np.diff(got) < 0)


def test_x0_is_xt_minus_sigma_v_not_divided():
    rng = np.random.default_rng(0)
    xt, v = rng.standard_normal((2, 3, 2, 2, 2)), rng.standard_normal((2, 3, 2, 2, 2))
    sigma = np.array([0.3, 0.8])
    got = np.asarray(dmd.x0_from_velocity(jnp.asarray(xt), jnp.asarray(sigma), jnp.asarray(v)))
    np.testing.assert_allclose(got, xt - sigma[:, None, None, None, None] * v, rtol=1e-6)
    wrong = (xt - sigma[:, None, None, None, None] * v) / (1 - sigma[:, None, None, None, None])
    assert np.abs(got - wrong).max() > 0.1


def test_normalised_dmd_gradient_and_loss_gradient():
    rng = np.random.default_rng(1)
    x_gen, fake, real = (rng.standard_normal((2, 3, 2, 4, 4)).astype(np.float32) for _ in range(3))
    got = np.asarray(dmd.dmd_gradient(jnp.asarray(x_gen), jnp.asarray(fake), jnp.asarray(real)))
    norm = np.abs(x_gen - real).reshape(2, -1).mean(1)[:, None, None, None, None]
    np.testing.assert_allclose(got, (fake - real) / norm, rtol=1e-5)
    # the surrogate's gradient w.r.t. x_gen is exactly grad / numel
    g = jax.grad(lambda x: dmd.generator_loss(x, jnp.asarray(got)))(jnp.asarray(x_gen))
    np.testing.assert_allclose(np.asarray(g), got / x_gen.size, rtol=1e-5)
    nan_safe = dmd.dmd_gradient(jnp.zeros((1, 2)), jnp.ones((1, 2)), jnp.zeros((1, 2)))
    assert np.all(np.isfinite(np.asarray(nan_safe)))


def _fake_denoise(adapter, x, sigma, ctx):
    """A toy velocity whose value tells which adapter and which context were used (teacher: adapter None)."""
    a = 0.0 if adapter is None else adapter["w"]
    return 0.5 * x + a + ctx.mean(axis=(1, 2))[:, None, None, None, None]


def test_generator_loss_uses_teacher_without_adapter_and_cfg_with_uncond():
    cfg = dmd.DMDConfig(real_score_guidance_scale=3.0, fake_score_guidance_scale=0.0)
    rng = np.random.default_rng(2)
    x_k = jnp.asarray(rng.standard_normal((2, 2, 1, 2, 2)), jnp.float32)
    cond = jnp.full((2, 3, 4), 2.0)
    uncond = jnp.full((2, 3, 4), -1.0)
    gen, critic = {"w": jnp.asarray(0.3)}, {"w": jnp.asarray(-0.2)}
    sigmas = jnp.asarray(dmd.student_sigmas(cfg))
    key = jax.random.key(0)
    loss, aux = dmd.dmd_generator_loss(gen, _fake_denoise, lambda p: p, critic, x_k, sigmas[1], cond, uncond, key,
                                       cfg, sigmas, jnp.asarray(1))
    # the same computation written out
    s_k = float(sigmas[1])
    x_gen = np.asarray(x_k) - s_k * (0.5 * np.asarray(x_k) + 0.3 + 2.0)
    k_sigma, k_noise = jax.random.split(key)
    sigma = np.asarray(dmd.score_sigma(k_sigma, 2, cfg, sigmas, jnp.asarray(1)))[:, None, None, None, None]
    x_t = (1 - sigma) * x_gen + sigma * np.asarray(jax.random.normal(k_noise, x_gen.shape))
    v_fake = 0.5 * x_t - 0.2 + 2.0
    v_real = (0.5 * x_t - 1.0) + 3.0 * ((0.5 * x_t + 2.0) - (0.5 * x_t - 1.0))  # teacher (no adapter), CFG 3
    grad = ((x_t - sigma * v_fake) - (x_t - sigma * v_real)) / np.abs(x_gen - (x_t - sigma * v_real)).reshape(
        2, -1).mean(1)[:, None, None, None, None]
    np.testing.assert_allclose(float(loss), 0.5 * np.mean(grad ** 2), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(aux["x_gen"]), x_gen, rtol=1e-5)


def test_guidance_scale_zero_teacher_unconditional_critic_off():
    """real_score_guidance_scale g: v_u + g (v_c - v_u), so g = 0 is the unconditional teacher; the critic's
    fake_score_guidance_scale 0 means off (conditional only). g = 1 is the conditional prediction either way."""
    def denoise(adapter, x, sigma, ctx):  # v_c = x + 2.5, v_u = x - 0.5 (cond: ones, uncond: zeros)
        return x + 3.0 * ctx.mean(axis=(1, 2)).reshape(-1, *([1] * (x.ndim - 1))) - 0.5

    x = jnp.full((1, 2, 1, 2, 2), 0.25)
    sigma, cond, uncond = jnp.full((1,), 0.5), jnp.ones((1, 3, 4)), jnp.zeros((1, 3, 4))
    v = lambda g, **kw: float(dmd.guided(denoise, None, x, sigma, cond, uncond, g, **kw).mean())  # noqa: E731
    assert v(0.0) == -0.25 and v(0.0, zero_is_off=True) == 2.75
    assert v(1.0) == v(1.0, zero_is_off=True) == 2.75
    np.testing.assert_allclose(v(3.0), -0.25 + 3.0 * 3.0, rtol=1e-6)


def test_score_window_bounds():
    cfg = dmd.DMDConfig(ts_schedule=True, ts_schedule_max=True, min_timestep_ratio=0.0, max_timestep_ratio=1.0)
    sigmas = jnp.asarray(dmd.student_sigmas(cfg))
    for k in range(3):
        s = np.asarray(dmd.score_sigma(jax.random.key(k), 4096, cfg, sigmas, jnp.asarray(k)))
        lo = float(sigmas[k + 1]) if k + 1 < 3 else 0.0
        assert s.min() >= lo - 1e-6 and s.max() <= float(sigmas[k]) + 1e-6
    clamp = dmd.DMDConfig(min_score_timestep=400.0)
    s = np.asarray(dmd.score_sigma(jax.random.key(9), 4096, clamp, sigmas, jnp.asarray(0)))
    assert s.min() >= 0.4 - 1e-6
    shifted = dmd.DMDConfig(timestep_shift=5.0)
    a = np.asarray(dmd.score_sigma(jax.random.key(3), 4096, dmd.DMDConfig(), sigmas, jnp.asarray(0)))
    b = np.asarray(dmd.score_sigma(jax.random.key(3), 4096, shifted, sigmas, jnp.asarray(0)))
    np.testing.assert_allclose(b, shift_sigma(a, 5.0), rtol=1e-5)  # timestep_shift is used


def test_rollout_and_student_sampler_match_their_formula():
    cfg = dmd.DMDConfig()
    sigmas = jnp.asarray(dmd.student_sigmas(cfg))
    noise = jnp.asarray(np.random.default_rng(3).standard_normal((1, 2, 1, 2, 2)), jnp.float32)
    ctx = jnp.ones((1, 3, 4))
    adapter = {"w": jnp.asarray(0.1)}
    key = jax.random.key(5)
    x = np.asarray(noise)
    for i in range(2):  # rollout to exit k = 2
        s = float(sigmas[i])
        x0 = x - s * (0.5 * x + 0.1 + 1.0)
        x = (1 - float(sigmas[i + 1])) * x0 + float(sigmas[i + 1]) * np.asarray(
            jax.random.normal(jax.random.fold_in(key, i), x.shape))
    got = dmd.rollout(_fake_denoise, adapter, noise, ctx, sigmas, jnp.asarray(2), key)
    np.testing.assert_allclose(np.asarray(got), x, rtol=1e-5)
    final = dmd.student_sample(_fake_denoise, adapter, noise, ctx, sigmas, key)
    np.testing.assert_allclose(np.asarray(final), x - float(sigmas[2]) * (0.5 * x + 1.1), rtol=1e-5)


def _interval_2_run(gen_opt, schedule):
    """A toy DMD state, frozen base, batch and jitted step with generator_update_interval=2 (critic: SGD 0.1)."""
    cfg, crit_opt = dmd.DMDConfig(generator_update_interval=2), optax.sgd(0.1)

    def forward(base, adapter, x, t, ctx):
        return _fake_denoise(adapter, x, t / 1000.0, ctx) * base["scale"]

    gen, critic = {"w": jnp.asarray(0.3)}, {"w": jnp.asarray(0.0)}
    state = dmd.DMDState(step=jnp.asarray(0, jnp.int32), gen=gen, gen_opt=gen_opt.init(gen), critic=critic,
                         critic_opt=crit_opt.init(critic), ema=None, rng=jax.random.key_data(jax.random.key(0)))
    frozen = dmd.DMDFrozen(params={"scale": jnp.asarray(1.0)}, uncond=jnp.zeros((3, 4)))
    batch = {"latents": jnp.zeros((2, 2, 1, 2, 2)), "prompt_embeds": jnp.ones((2, 3, 4))}
    step = jax.jit(lambda s, f, b: dmd.dmd_step(s, f, b, forward=forward, gen_adapter=lambda p: p,
                                                critic_adapter=lambda p: p, cfg=cfg, gen_optimizer=gen_opt,
                                                critic_optimizer=crit_opt, schedule=schedule))
    return state, frozen, batch, step


def test_generator_updates_counted_in_optimizer_steps():
    """generator_update_interval=2: the generator moves on optimizer steps 0, 2, 4; the critic on every step."""
    state, frozen, batch, step = _interval_2_run(optax.sgd(0.1), lambda n: 0.1)
    updated, gens, crits = [], [float(state.gen["w"])], [float(state.critic["w"])]
    for _ in range(5):
        state, m = step(state, frozen, batch)
        updated.append(float(m["generator_updated"]))
        gens.append(float(state.gen["w"]))
        crits.append(float(state.critic["w"]))
    assert updated == [1, 0, 1, 0, 1]
    assert [a != b for a, b in zip(gens, gens[1:])] == [True, False, True, False, True]
    assert all(a != b for a, b in zip(crits, crits[1:]))


def test_generator_lr_follows_the_trainer_step():
    """With generator_update_interval=2 the generator's lr is the schedule at the trainer's step (SimpleTuner steps
    its scheduler every global step), not at its own update count, and the logged lr is the applied one. Lion moves
    each weight by exactly lr (sign update, no weight decay): linear 0.1 -> 0 over 5 steps gives 0.1, 0.06, 0.02."""
    ocfg = optim.OptimConfig(optimizer="lion", learning_rate=0.1, lr_scheduler="linear", max_train_steps=5)
    state, frozen, batch, step = _interval_2_run(optim.make_optimizer(ocfg), optim.make_schedule(ocfg))
    moves, logged = [], []
    for _ in range(5):
        before = float(state.gen["w"])
        state, m = step(state, frozen, batch)
        moves.append(abs(float(state.gen["w"]) - before))
        logged.append(float(m["lr"]))
    np.testing.assert_allclose(moves, [0.1, 0.0, 0.06, 0.0, 0.02], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(logged, [0.1, 0.08, 0.06, 0.04, 0.02], rtol=1e-5)


def test_two_phase_programs_equal_the_one_program_step():
    """The trainer runs dmd_generator_phase and dmd_critic_phase as two jitted programs (lower peak memory): same
    states and metrics as dmd_step in one program, over generator and critic-only steps, with EMA."""
    cfg = dmd.DMDConfig(generator_update_interval=2)
    gen_opt, crit_opt = optax.adam(0.05), optax.adam(0.05)

    def forward(base, adapter, x, t, ctx):
        return _fake_denoise(adapter, x, t / 1000.0, ctx) * base["scale"]

    ema_update = functools.partial(optim.ema_update, decay=0.9)
    gen, critic = {"w": jnp.asarray(0.3)}, {"w": jnp.asarray(0.1)}
    state = dmd.DMDState(step=jnp.asarray(0, jnp.int32), gen=gen, gen_opt=gen_opt.init(gen), critic=critic,
                         critic_opt=crit_opt.init(critic), ema=optim.ema_init(gen),
                         rng=jax.random.key_data(jax.random.key(3)))
    frozen = dmd.DMDFrozen(params={"scale": jnp.asarray(1.0)}, uncond=jnp.zeros((3, 4)))
    batch = {"latents": jnp.zeros((2, 2, 1, 2, 2)), "prompt_embeds": jnp.ones((2, 3, 4))}
    common = dict(forward=forward, critic_adapter=lambda p: p, cfg=cfg)
    one = jax.jit(lambda s, f, b: dmd.dmd_step(s, f, b, gen_adapter=lambda p: p, gen_optimizer=gen_opt,
                                               critic_optimizer=crit_opt, schedule=lambda n: 0.05,
                                               ema_update=ema_update, **common))
    p1 = jax.jit(lambda s, f, b: dmd.dmd_generator_phase(s, f, b, gen_adapter=lambda p: p, gen_optimizer=gen_opt,
                                                         **common))
    p2 = jax.jit(lambda s, f, b, c: dmd.dmd_critic_phase(s, f, b, c, critic_optimizer=crit_opt,
                                                         schedule=lambda n: 0.05, ema_update=ema_update, **common))
    a = b = state
    for _ in range(4):
        a, ma = one(a, frozen, batch)
        b, mb = _two(p1, p2, b, frozen, batch)
        for x, y in zip(jax.tree_util.tree_leaves((a, ma)), jax.tree_util.tree_leaves((b, mb))):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-6, atol=1e-7)
    assert int(b.step) == 4 and float(b.gen["w"]) != 0.3 and float(b.critic["w"]) != 0.1


def _two(p1, p2, state, frozen, batch):
    state, carry = p1(state, frozen, batch)
    return p2(state, frozen, batch, carry)
