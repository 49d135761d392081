"""The flow-matching loss and step against direct evaluations of their formulas."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reference as ref
import wanjax
from wanjax import lora as lora_lib
from wanjax import schedules
from wanjax.losses import flow_matching as fm

CONFIG = wanjax.WanConfig.from_diffusers(ref.T2V)


@pytest.fixture(scope="module")
def setup():
    params = wanjax.init_params(CONFIG, jax.random.key(0))
    lora = lora_lib.init_lora(CONFIG, jax.random.key(1), rank=2, alpha=4.0)
    lora_params = jax.tree_util.tree_map(lambda x: x + 0.05, lora.params)  # B != 0: the adapter matters
    spec = fm.LoraSpec(rank=2, alpha=4.0, targets=lora.targets)
    rng = np.random.default_rng(0)
    batch = {"latents": jnp.asarray(rng.standard_normal((2, 4, 3, 4, 6)), jnp.float32),
             "prompt_embeds": jnp.asarray(rng.standard_normal((2, 7, 16)), jnp.float32)}
    empty = jnp.asarray(rng.standard_normal((7, 16)), jnp.float32)
    return params, lora_params, spec, batch, fm.Frozen(params=params, empty_prompt_embeds=empty)


def _manual_loss(params, lora_params, spec, batch, empty, key, cfg, drop_all=None):
    """The loss written out: same key splits, sigma sampler, noising, target, mean of squares."""
    x0 = batch["latents"]
    k_sigma, k_noise, k_drop = jax.random.split(key, 3)
    sigma = schedules.sample_sigmas(k_sigma, 2, sampler=cfg.sampler, shift=cfg.shift, logit_std=cfg.logit_std,
                                    seq_len=36, auto_shift=False)
    eps = jax.random.normal(k_noise, x0.shape)
    s = np.asarray(sigma)[:, None, None, None, None]
    xt = (1 - s) * np.asarray(x0) + s * np.asarray(eps)
    drop = np.asarray(jax.random.uniform(k_drop, (2,))) < cfg.caption_dropout_probability
    text = np.where(drop[:, None, None], np.asarray(empty)[None], np.asarray(batch["prompt_embeds"]))
    v = wanjax.transformer_forward(CONFIG, params, jnp.asarray(xt), sigma * 1000, jnp.asarray(text),
                                   lora=spec.wrap(lora_params))
    target = np.asarray(eps) - np.asarray(x0)
    return float(np.mean((np.asarray(v) - target) ** 2)), drop


@pytest.mark.parametrize("p_drop", [0.0, 1.0])
def test_loss_matches_formula_and_dropout_uses_empty_prompt(setup, p_drop):
    params, lora_params, spec, batch, frozen = setup
    cfg = fm.FlowMatchingConfig(shift=3.0, caption_dropout_probability=p_drop)
    key = jax.random.key(3)
    loss, aux = fm.flow_matching_loss(lora_params, frozen, batch, key, model=CONFIG, lora=spec, fm=cfg)
    expected, drop = _manual_loss(params, lora_params, spec, batch, frozen.empty_prompt_embeds, key, cfg)
    assert bool(drop.all()) == bool(drop.any()) == (p_drop == 1.0)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(aux["caption_dropped"]) == p_drop


def test_accumulation_averages_micro_batch_gradients(setup):
    """accum=2 over a batch of 2 == the mean of the two single-item gradients (micro-batch i = items j*2+i)."""
    params, lora_params, spec, batch, frozen = setup
    cfg = fm.FlowMatchingConfig(caption_dropout_probability=0.0)
    loss_fn = functools.partial(fm.flow_matching_loss, model=CONFIG, lora=spec, fm=cfg)
    sgd = optax.sgd(1.0)
    state = fm.TrainState(step=jnp.asarray(5, jnp.int32), lora=lora_params, opt_state=sgd.init(lora_params), ema=None,
                          rng=jax.random.key_data(jax.random.key(9)))
    new, metrics = fm.train_step(state, frozen, batch, loss_fn=loss_fn, optimizer=sgd, schedule=lambda s: 1.0, accum=2)
    rng = jax.random.fold_in(jax.random.key(9), 5)
    grads, losses = [], []
    for i in range(2):
        micro = jax.tree_util.tree_map(lambda x: x[i:i + 1], batch)
        (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(lora_params, frozen, micro, jax.random.fold_in(rng, i))
        grads.append(g)
        losses.append(float(loss))
    mean_grad = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, *grads)
    expected = jax.tree_util.tree_map(lambda p, g: p - g, lora_params, mean_grad)
    for a, b in zip(jax.tree_util.tree_leaves(new.lora), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(losses), rtol=1e-6)
    assert int(new.step) == 6
