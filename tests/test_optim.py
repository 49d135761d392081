"""Optimizer construction against torch: lr schedules step by step, clipping, AdamW, Lion, accumulation, EMA."""

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from diffusers.optimization import get_scheduler
from transformers import get_scheduler as hf_get_scheduler
from transformers.optimization import get_polynomial_decay_schedule_with_warmup

from wanjax import optim
from wanjax.optim import OptimConfig

LR = 1e-4
STEPS = 500
# (warmup, max_train_steps): none, short, equal (the seed configs: 400000 / 400000), longer than the run.
WARMUPS = [(0, 300), (20, 300), (300, 300), (400, 300)]


def torch_lrs(make, n=STEPS, lr=LR):
    """The lr torch uses for optimizer update k = 0..n-1 (read before opt.step(), then sched.step())."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = make(opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(out)


def ours(n=STEPS, **kw):
    return np.asarray(optim.make_schedule(OptimConfig(learning_rate=LR, **kw))(jnp.arange(n)))


def assert_lrs(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * LR)


@pytest.mark.parametrize(
    "name,warmup,total",
    [(n, w, t) for n in ("constant_with_warmup", "linear", "cosine_with_restarts") for w, t in WARMUPS]
    + [("constant", 0, 300)],  # constant + warmup becomes constant_with_warmup (SimpleTuner), tested below
)
def test_diffusers_schedules_step_by_step(name, warmup, total):
    want = torch_lrs(lambda o: get_scheduler(name, o, num_warmup_steps=warmup, num_training_steps=total, num_cycles=3))
    assert_lrs(ours(lr_scheduler=name, lr_warmup_steps=warmup, max_train_steps=total, lr_num_cycles=3), want)


@pytest.mark.parametrize("warmup,total", WARMUPS)
def test_cosine_with_min_lr_matches_transformers(warmup, total):
    kw = {"scheduler_specific_kwargs": {"min_lr": 4e-6}}
    want = torch_lrs(lambda o: hf_get_scheduler("cosine_with_min_lr", o, warmup, total, **kw))
    got = ours(lr_scheduler="cosine_with_min_lr", lr_warmup_steps=warmup, max_train_steps=total, lr_end=4e-6)
    assert_lrs(got, want)


@pytest.mark.parametrize("warmup,total", [(0, 300), (20, 300), (400, 300)])
def test_polynomial_matches_simpletuner_formula(warmup, total):
    # SimpleTuner's polynomial scheduler is transformers' formula with lr_end / lr_power passed through.
    want = torch_lrs(lambda o: get_polynomial_decay_schedule_with_warmup(o, warmup, total, lr_end=4e-6, power=0.8))
    got = ours(lr_scheduler="polynomial", lr_warmup_steps=warmup, max_train_steps=total, lr_end=4e-6, lr_power=0.8)
    assert_lrs(got, want)


@pytest.mark.parametrize("period", [100, 300])
def test_simpletuner_cosine(period):
    # SimpleTuner's Cosine: period = lr_warmup_steps, floor lr_end, no warmup, periodic; == torch CosineAnnealingLR.
    k = np.arange(700)
    got = ours(700, lr_scheduler="cosine", lr_warmup_steps=period, lr_end=4e-6, max_train_steps=50)
    assert_lrs(got, 4e-6 + (LR - 4e-6) * (1 + np.cos(np.pi * k / period)) / 2)
    want = torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=period, eta_min=4e-6), 700)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * LR)
    # With lr_end = 0 it is diffusers' cosine without warmup over `period` steps.
    want0 = torch_lrs(lambda o: get_scheduler("cosine", o, num_warmup_steps=0, num_training_steps=period), 700)
    assert_lrs(ours(700, lr_scheduler="cosine", lr_warmup_steps=period, lr_end=0.0), want0)
    # The seed configs' lr_warmup_steps == max_train_steps: one half-cosine from lr to lr_end over the run.
    seed = ours(401, lr_scheduler="cosine", lr_warmup_steps=400, max_train_steps=400, lr_end=4e-7)
    assert seed[0] == pytest.approx(LR) and seed[400] == pytest.approx(4e-7) and np.all(np.diff(seed) < 0)


def test_simpletuner_sine_and_defaults():
    k = np.arange(400)
    got = ours(400, lr_scheduler="sine", lr_warmup_steps=100, lr_end=1e-6)
    assert_lrs(got, 1e-6 + (LR - 1e-6) * (1 + np.sin(np.pi * k / 100)) / 2)
    # lr_warmup_steps 0: SimpleTuner's Cosine falls back to a 1000-step period.
    assert_lrs(ours(2000, lr_scheduler="cosine", lr_end=0.0), LR * (1 + np.cos(np.pi * np.arange(2000) / 1000)) / 2)
    # constant + warmup is constant_with_warmup; cosine_with_warmup is an alias of cosine.
    assert_lrs(ours(lr_scheduler="constant", lr_warmup_steps=10), ours(lr_scheduler="constant_with_warmup",
                                                                       lr_warmup_steps=10))
    assert_lrs(ours(lr_scheduler="cosine_with_warmup", lr_warmup_steps=50), ours(lr_scheduler="cosine",
                                                                                lr_warmup_steps=50))


def test_schedule_errors():
    with pytest.raises(ValueError, match="unknown lr_scheduler 'cosine_annealing'.*constant_with_warmup.*polynomial"):
        optim.make_schedule(OptimConfig(lr_scheduler="cosine_annealing"))
    with pytest.raises(ValueError, match="needs max_train_steps"):
        optim.make_schedule(OptimConfig(lr_scheduler="linear"))
    with pytest.raises(ValueError, match="lr_end"):
        optim.make_schedule(OptimConfig(learning_rate=1e-6, lr_end=1e-5, lr_scheduler="polynomial", max_train_steps=9))
    with pytest.raises(ValueError, match="sine"):
        optim.make_schedule(OptimConfig(lr_scheduler="sine"))


def test_unknown_names_refused():
    with pytest.raises(ValueError, match="unknown optimizer 'adamw8bit'; known: adamw_bf16, adamw, .*optimi-lion"):
        optim.make_optimizer(OptimConfig(optimizer="adamw8bit"))
    with pytest.raises(ValueError, match="unknown grad_clip_method 'l2'; known: value, norm, none"):
        optim.make_optimizer(OptimConfig(grad_clip_method="l2"))
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        optim.make_optimizer(OptimConfig(gradient_accumulation_steps=0))


def rand_tree(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {"a": (scale * rng.standard_normal((4, 3))).astype(np.float32),
            "b": {"c": (scale * rng.standard_normal((5,))).astype(np.float32)}}


def to_torch(tree):
    return [torch.tensor(tree["a"]), torch.tensor(tree["b"]["c"])]


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clipping_matches_torch(max_norm):
    grads = rand_tree(0, scale=3.0)
    for method, torch_clip in (("value", torch.nn.utils.clip_grad_value_),
                               ("norm", torch.nn.utils.clip_grad_norm_)):
        tx = optim.make_clip(OptimConfig(grad_clip_method=method, max_grad_norm=max_norm))
        out, _ = tx.update(jax.tree.map(jnp.asarray, grads), tx.init(grads))
        ps = [torch.nn.Parameter(torch.zeros_like(g)) for g in to_torch(grads)]
        for p, g in zip(ps, to_torch(grads)):
            p.grad = g.clone()
        torch_clip(ps, max_norm)
        np.testing.assert_allclose(np.asarray(out["a"]), ps[0].grad.numpy(), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(out["b"]["c"]), ps[1].grad.numpy(), rtol=1e-6)
    # No clipping for "none", max_grad_norm <= 0 and prodigy (SimpleTuner).
    assert optim.make_clip(OptimConfig(grad_clip_method="none")) is None
    assert optim.make_clip(OptimConfig(max_grad_norm=0.0)) is None
    assert optim.make_clip(OptimConfig(optimizer="prodigy")) is None


def run_ours(cfg, params, grads_seq):
    tx = optim.make_optimizer(cfg)
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    history = []
    for g in grads_seq:
        updates, state = step(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    return history, state


@pytest.mark.parametrize("name,betas,eps,wd", [("torch-adamw", (0.9, 0.999), 1e-8, 1e-2),
                                               ("optimi-adamw", (0.9, 0.99), 1e-6, 0.0)])
@pytest.mark.parametrize("scheduled", [False, True])
def test_adamw_matches_torch(name, betas, eps, wd, scheduled):
    params, grads = rand_tree(1), [rand_tree(10 + i) for i in range(5)]
    kw = dict(lr_scheduler="linear", lr_warmup_steps=2, max_train_steps=6) if scheduled else {}
    cfg = OptimConfig(optimizer=name, learning_rate=1e-2, grad_clip_method="none", **kw)
    assert optim.optimizer_hyperparams(cfg) == {"b1": betas[0], "b2": betas[1], "eps": eps, "weight_decay": wd}
    history, _ = run_ours(cfg, params, grads)
    tp = [torch.nn.Parameter(t) for t in to_torch(params)]
    opt = torch.optim.AdamW(tp, lr=1e-2, betas=betas, eps=eps, weight_decay=wd)
    sched = get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=6) if scheduled else None
    for g, ours_p in zip(grads, history):
        for p, gt in zip(tp, to_torch(g)):
            p.grad = gt
        opt.step()
        if sched:
            sched.step()
        # Params are O(1), each update O(lr); float32 rounding differs from torch's at ~3e-7.
        np.testing.assert_allclose(np.asarray(ours_p["a"]), tp[0].detach().numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(ours_p["b"]["c"]), tp[1].detach().numpy(), rtol=1e-6, atol=1e-6)


def test_update_at_a_trainer_step_matches_torch():
    """A student updated on trainer steps 0, 3, 6 only (DMD generator_update_interval=3) takes the lr of those steps,
    as torch does when its scheduler steps every global step: AdamW with the lr set per update."""
    params, grads = rand_tree(1), [rand_tree(20 + i) for i in range(3)]
    cfg = OptimConfig(optimizer="torch-adamw", learning_rate=1e-2, grad_clip_method="none", lr_scheduler="linear",
                      lr_warmup_steps=2, max_train_steps=9)
    tx, sched = optim.make_optimizer(cfg), optim.make_schedule(cfg)
    ours_p = jax.tree.map(jnp.asarray, params)
    state = tx.init(ours_p)
    step = jax.jit(lambda g, st, p, s: optim.update_at(tx, g, st, p, s))
    tp = [torch.nn.Parameter(t) for t in to_torch(params)]
    opt = torch.optim.AdamW(tp, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    for trainer_step, g in zip((0, 3, 6), grads):
        updates, state = step(jax.tree.map(jnp.asarray, g), state, ours_p, jnp.asarray(trainer_step))
        ours_p = optax.apply_updates(ours_p, updates)
        opt.param_groups[0]["lr"] = float(sched(trainer_step))  # 0, 1e-2 * 6/7, 1e-2 * 3/7
        for p, gt in zip(tp, to_torch(g)):
            p.grad = gt
        opt.step()
        np.testing.assert_allclose(np.asarray(ours_p["a"]), tp[0].detach().numpy(), rtol=1e-6, atol=1e-6)
    # every other optimizer takes the step too (schedule-free keeps its own warmup), and step == count is no change
    for name in optim.OPTIMIZERS:
        tx = optim.make_optimizer(OptimConfig(optimizer=name, learning_rate=1e-2, lr_scheduler="linear",
                                              max_train_steps=9))
        p0 = jax.tree.map(jnp.asarray, params)
        g = jax.tree.map(jnp.asarray, grads[0])
        by_count, _ = tx.update(g, tx.init(p0), p0)
        at_0, _ = optim.update_at(tx, g, tx.init(p0), p0, jnp.asarray(0))
        at_6, _ = optim.update_at(tx, g, tx.init(p0), p0, jnp.asarray(6))
        np.testing.assert_array_equal(np.asarray(at_0["a"]), np.asarray(by_count["a"]))
        if name != "adamw_schedulefree":
            assert not np.allclose(np.asarray(at_6["a"]), np.asarray(by_count["a"]), rtol=1e-3, atol=0), name


def test_schedulefree_logs_the_lr_it_applies(caplog):
    """adamw_schedulefree ignores lr_scheduler (its own warmup, then constant): the schedule the trainer logs is that
    one, with a warning naming the ignored scheduler."""
    with caplog.at_level(logging.WARNING, logger="wanjax.optim"):
        lrs = optim.make_schedule(OptimConfig(optimizer="adamw_schedulefree", learning_rate=1e-2,
                                              lr_scheduler="linear", lr_warmup_steps=2, max_train_steps=6))
    np.testing.assert_allclose(np.asarray(lrs(jnp.arange(6))), [0, 5e-3, 1e-2, 1e-2, 1e-2, 1e-2], rtol=1e-6)
    assert "lr_scheduler='linear' is not used by adamw_schedulefree" in caplog.text


def test_adamw_bf16_matches_simpletuner_formula():
    params, grads = rand_tree(2), [rand_tree(20 + i) for i in range(5)]
    cfg = OptimConfig(optimizer="adamw_bf16", learning_rate=1e-2, grad_clip_method="none")
    history, _ = run_ours(cfg, params, grads)
    b1, b2, eps, wd, lr = 0.9, 0.999, 1e-6, 1e-2, 1e-2
    p = {k: np.float64(v) for k, v in {"a": params["a"], "c": params["b"]["c"]}.items()}
    m = {k: 0 * v for k, v in p.items()}
    v = {k: 0 * x for k, x in p.items()}
    for t, (g, ours_p) in enumerate(zip(grads, history), start=1):
        for k, gk in (("a", g["a"]), ("c", g["b"]["c"])):
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk**2
            p[k] = p[k] - lr * wd * p[k] - lr * np.sqrt(1 - b2**t) * m[k] / (np.sqrt(v[k]) + eps)
        np.testing.assert_allclose(np.asarray(ours_p["a"]), p["a"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(ours_p["b"]["c"]), p["c"], rtol=1e-5, atol=1e-7)
    # No first-moment bias correction: the first step is (1 - b1) of AdamW's sign-like step.
    first = np.asarray(history[0]["a"]) - params["a"] * (1 - lr * wd)
    assert np.abs(first).max() < 0.11 * lr


@pytest.mark.parametrize("opt_config,wd", [(None, 0.0), ("weight_decay=0.5", 0.5)])
def test_lion_matches_reference(opt_config, wd):
    params, grads = rand_tree(3), [rand_tree(30 + i) for i in range(5)]
    cfg = OptimConfig(optimizer="optimi-lion", learning_rate=1e-3, grad_clip_method="none", optimizer_config=opt_config)
    history, _ = run_ours(cfg, params, grads)
    b1, b2, lr = 0.9, 0.99, 1e-3
    p = {"a": params["a"].astype(np.float64), "c": params["b"]["c"].astype(np.float64)}
    m = {k: 0 * v for k, v in p.items()}
    for g, ours_p in zip(grads, history):
        for k, gk in (("a", g["a"]), ("c", g["b"]["c"])):
            update = np.sign(b1 * m[k] + (1 - b1) * gk)
            m[k] = b2 * m[k] + (1 - b2) * gk
            p[k] = p[k] * (1 - lr * wd) - lr * update  # optimi: decoupled decay p *= 1 - lr wd
        np.testing.assert_allclose(np.asarray(ours_p["a"]), p["a"], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(ours_p["b"]["c"]), p["c"], rtol=1e-6, atol=1e-7)


def test_accumulation_equals_one_step_on_mean_gradient():
    # Two updates with a decaying lr: the schedule must advance once per update, clipping must see the mean gradient.
    params = {"w": np.zeros(3, np.float32)}
    micro = [{"w": np.array(x, np.float32)} for x in ([3.0, 0.2, -4.0], [-1.0, 0.6, 1.0],
                                                       [0.5, 2.0, 0.1], [0.3, -0.4, 0.9])]
    base = dict(optimizer="torch-adamw", learning_rate=1e-2, lr_scheduler="linear", max_train_steps=4,
                grad_clip_method="value", max_grad_norm=1.5)
    acc_hist, acc_state = run_ours(OptimConfig(gradient_accumulation_steps=2, **base), params, micro)
    mean = [jax.tree.map(lambda a, b: (a + b) / 2, micro[0], micro[1]),
            jax.tree.map(lambda a, b: (a + b) / 2, micro[2], micro[3])]
    one_hist, _ = run_ours(OptimConfig(**base), params, mean)
    np.testing.assert_array_equal(np.asarray(acc_hist[0]["w"]), params["w"])  # no update mid-accumulation
    np.testing.assert_allclose(np.asarray(acc_hist[1]["w"]), np.asarray(one_hist[0]["w"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(acc_hist[3]["w"]), np.asarray(one_hist[1]["w"]), rtol=1e-6)
    counts = [int(x) for x in jax.tree.leaves(acc_state) if getattr(x, "dtype", None) == jnp.int32 and x.ndim == 0]
    assert 2 in counts  # the inner optimizer (and its schedule) counted 2 updates, not 4 micro-steps


def test_hyperparameter_resolution(caplog):
    assert optim.optimizer_hyperparams(OptimConfig()) == {"b1": 0.9, "b2": 0.999, "eps": 1e-6, "weight_decay": 1e-2}
    cfg = OptimConfig(optimizer="optimi-lion", adam_beta2=0.98, adam_epsilon=1e-3)  # lion has no eps
    assert optim.optimizer_hyperparams(cfg) == {"b1": 0.9, "b2": 0.98, "weight_decay": 0.0}
    cfg = OptimConfig(adam_weight_decay=0.1, optimizer_beta1=0.8, optimizer_beta2=0.95,
                      optimizer_config="eps=1e-7,weight_decay=0.0,kahan_sum=true,beta2=0.9")
    with caplog.at_level(logging.WARNING, logger="wanjax.optim"):
        hp = optim.optimizer_hyperparams(cfg)
    assert hp == {"b1": 0.8, "b2": 0.9, "eps": 1e-7, "weight_decay": 0.0}
    assert "kahan_sum" in caplog.text
    assert optim.parse_optimizer_config("a=1,b=0.5,c=1e-6,d=True,e=none,f=name") == {
        "a": 1, "b": 0.5, "c": 1e-6, "d": True, "e": None, "f": "name"}
    with pytest.raises(ValueError, match="key=value"):
        optim.parse_optimizer_config("eps")


def test_from_mapping_takes_a_simpletuner_config():
    seed = {"optimizer": "optimi-lion", "learning_rate": 5e-05, "max_grad_norm": 0.01, "grad_clip_method": "value",
            "lr_scheduler": "cosine", "lr_warmup_steps": 400000, "max_train_steps": 400000, "lr_end": "4e-7",
            "gradient_accumulation_steps": 1, "use_ema": True, "lora_rank": 16}
    cfg = OptimConfig.from_mapping(seed)
    assert cfg.lr_end == 4e-7 and cfg.max_train_steps == 400000 and cfg.optimizer == "optimi-lion"
    lrs = np.asarray(optim.make_schedule(cfg)(jnp.array([0, 200000, 400000])))
    np.testing.assert_allclose(lrs, [5e-5, (5e-5 + 4e-7) / 2, 4e-7], rtol=1e-5)


@pytest.mark.parametrize("name", list(optim.OPTIMIZERS))
def test_every_optimizer_state_is_arrays_and_jits(name):
    cfg = OptimConfig(optimizer=name, learning_rate=1e-3, lr_warmup_steps=2, gradient_accumulation_steps=2)
    tx = optim.make_optimizer(cfg)
    params = jax.tree.map(jnp.asarray, rand_tree(4))
    shapes = jax.eval_shape(tx.init, params)
    state = tx.init(params)
    assert jax.tree.structure(shapes) == jax.tree.structure(state)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    for i in range(4):
        updates, state = step(jax.tree.map(jnp.asarray, rand_tree(40 + i)), state, params)
        params = optax.apply_updates(params, updates)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))
    assert np.any(np.asarray(params["a"]) != rand_tree(4)["a"])


def test_prodigy_steps_freeze_d_and_schedulefree_eval_params():
    params, grads = rand_tree(5), [rand_tree(50)] * 12  # a steady direction, so D grows
    _, free = run_ours(OptimConfig(optimizer="prodigy", learning_rate=1.0), params, grads)
    _, frozen = run_ours(OptimConfig(optimizer="prodigy", learning_rate=1.0, prodigy_steps=6), params, grads)
    _, frozen6 = run_ours(OptimConfig(optimizer="prodigy", learning_rate=1.0, prodigy_steps=6), params, grads[:6])
    d = lambda s: float(s.estim_lr)  # noqa: E731
    assert d(frozen) == d(frozen6) and d(free) > 2 * d(frozen) and d(frozen) > 2e-6  # d0 = 1e-6
    # A warmup (lr 0 at the first update) must not poison Prodigy's D estimate with 0 / 0.
    hist, _ = run_ours(OptimConfig(optimizer="prodigy", learning_rate=1.0, lr_warmup_steps=3), params, grads)
    assert np.all(np.isfinite(np.asarray(hist[-1]["a"]))) and not np.allclose(np.asarray(hist[-1]["a"]), params["a"])
    hist, state = run_ours(OptimConfig(optimizer="adamw_schedulefree", learning_rate=1e-2), params, grads)
    ev = optim.eval_params(state, hist[-1])
    assert not np.allclose(np.asarray(ev["a"]), np.asarray(hist[-1]["a"]))
    p = {"w": jnp.ones(2)}
    assert optim.eval_params(optim.make_optimizer(OptimConfig()).init(p), p) is p


def test_ema_interval_and_decay():
    assert [float(optim.ema_decay_at(s, 0.995)) for s in (0, 1, 2, 3)] == pytest.approx([0, 0, 2 / 11, 3 / 12])
    assert float(optim.ema_decay_at(10**6, 0.995)) == pytest.approx(0.995)
    params = {"w": jnp.zeros(2)}
    ema = optim.ema_init(params)
    update = jax.jit(lambda e, p, s: optim.ema_update(e, p, s, decay=0.995, update_interval=2))
    expected, seen = 0.0, []
    for step in range(1, 7):
        p = {"w": jnp.full(2, float(step))}
        ema = update(ema, p, jnp.asarray(step))
        if step % 2 == 0:
            d = min((1 + (step - 1)) / (10 + (step - 1)), 0.995)
            expected = expected - (1 - d) * (expected - step)
        seen.append(float(ema["w"][0]))
        assert float(ema["w"][0]) == pytest.approx(expected, rel=1e-6)
    assert seen[0] == 0.0 and seen[1] != 0.0 and seen[2] == seen[1]  # steps 1 and 3 leave it alone
    # Every step without an interval; the first update (step 1, decay 0) copies the params.
    ema = optim.ema_update(optim.ema_init(params), {"w": jnp.full(2, 7.0)}, 1)
    np.testing.assert_array_equal(np.asarray(ema["w"]), [7.0, 7.0])
    assert ema["w"].dtype == jnp.float32 and math.isclose(optim.EMA_DECAY, 0.995)
