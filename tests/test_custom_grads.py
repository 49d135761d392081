"""The transformer's hand-written derivatives (written out for XLA:CPU speed and saved-activation memory) equal
autodiff of their formulas: `standardize` (LayerNorm / RMSNorm core) and `gelu_tanh`, both custom VJPs that keep
their input in its own dtype, in value and gradient, float32 and bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wanjax.models import transformer as tf


def _layer_norm_formula(h, eps):
    mean = h.mean(-1, keepdims=True)
    var = jnp.square(h - mean).mean(-1, keepdims=True)
    return (h - mean) * jax.lax.rsqrt(var + eps)


def _rms_norm_formula(h, eps):
    return h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + eps)


@pytest.mark.parametrize("center, formula", [(True, _layer_norm_formula), (False, _rms_norm_formula)])
@pytest.mark.parametrize("shape", [(2, 37, 48), (3, 5, 4, 64)])
def test_standardize_matches_autodiff_of_formula(center, formula, shape):
    keys = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(keys[0], shape) * 3.0 + 0.5
    cot = jax.random.normal(keys[1], shape)
    eps = 1e-6
    out, vjp = jax.vjp(lambda x: tf.standardize(x, eps, center), h)
    want, want_vjp = jax.vjp(lambda x: formula(x, eps), h)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
    (g,), (g_want,) = vjp(cot), want_vjp(cot)
    scale = np.abs(np.asarray(g_want)).max()
    assert np.abs(np.asarray(g) - np.asarray(g_want)).max() <= 1e-5 * scale


@pytest.mark.parametrize("center", [True, False])
def test_standardize_gradient_matches_finite_differences(center):
    """Against float64 numpy central differences, so a shared mistake with the formula above would show."""
    rng = np.random.default_rng(1)
    h = rng.standard_normal((4, 16)) * 2 + 0.3
    w = rng.standard_normal((4, 16))
    eps = 1e-5

    def f(x):
        c = x - x.mean(-1, keepdims=True) if center else x
        denom = np.sqrt((c * c).mean(-1, keepdims=True) + eps)
        return float(np.sum(np.sin(c / denom) * w))

    g = jax.grad(lambda x: jnp.sum(jnp.sin(tf.standardize(x, eps, center)) * w))(jnp.asarray(h, jnp.float32))
    d = rng.standard_normal(h.shape)
    numeric = (f(h + 1e-6 * d) - f(h - 1e-6 * d)) / 2e-6
    assert abs(numeric - float(np.sum(np.asarray(g, np.float64) * d))) <= 1e-4 * max(1.0, abs(numeric))


def test_gelu_tanh_matches_jax_and_its_autodiff():
    x = jnp.linspace(-8.0, 8.0, 4001)
    np.testing.assert_array_equal(np.asarray(tf.gelu_tanh(x)), np.asarray(jax.nn.gelu(x, approximate=True)))
    g = jax.vmap(jax.grad(tf.gelu_tanh))(x)
    g_want = jax.vmap(jax.grad(lambda t: jax.nn.gelu(t, approximate=True)))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_want), rtol=1e-5, atol=1e-6)


def test_bfloat16_inputs_keep_their_dtype_and_match_float32_math():
    """bf16 in: computed in float32 (the value and gradient of the f32 formula at the bf16 input, rounded once)."""
    x = (jax.random.normal(jax.random.key(3), (4, 8, 64)) * 2).astype(jnp.bfloat16)
    cot = jax.random.normal(jax.random.key(4), x.shape)
    x32 = x.astype(jnp.float32)
    y, vjp = jax.vjp(tf.gelu_tanh, x)
    assert y.dtype == jnp.bfloat16
    (g,) = vjp(cot.astype(jnp.bfloat16))
    assert g.dtype == jnp.bfloat16
    y32, vjp32 = jax.vjp(lambda t: jax.nn.gelu(t, approximate=True), x32)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y32.astype(jnp.bfloat16)))
    (g32,) = vjp32(cot.astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g32), rtol=1e-2, atol=1e-2)
    for center, formula in ((True, _layer_norm_formula), (False, _rms_norm_formula)):
        out, vjp = jax.vjp(lambda t: tf.standardize(t, 1e-6, center), x)
        assert out.dtype == jnp.float32  # statistics and output in float32, as diffusers' FP32LayerNorm
        (g,) = vjp(cot)
        assert g.dtype == jnp.bfloat16
        out32, vjp32 = jax.vjp(lambda t: formula(t, 1e-6), x32)
        np.testing.assert_allclose(np.asarray(out), np.asarray(out32), rtol=1e-5, atol=1e-5)
        (g32,) = vjp32(cot)
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g32), rtol=1e-2, atol=1e-2 * np.abs(g32).max())
