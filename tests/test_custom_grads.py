"""The transformer's hand-written derivatives (written out for XLA:CPU speed, saved-activation memory and
bf16 products) equal autodiff of their formulas: `standardize` (LayerNorm / RMSNorm core), `gelu_tanh` and
`dot` (every linear layer's matmul), custom VJPs that keep their input in its own dtype, in value and gradient,
float32 and bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
import wanjax
from wanjax import lora as wl
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


# ---------------------------------------------------------------------------------------------------------
# dot: the linear layers' matmul
# ---------------------------------------------------------------------------------------------------------
def _dot_autodiff(x, w):
    return jnp.dot(x, w, preferred_element_type=x.dtype)


@pytest.fixture(params=["cpu", "gpu"])
def backend(request, monkeypatch):
    """The backend the model's code sees (jax.default_backend), traced afresh (jax caches traced functions)."""
    monkeypatch.setattr(tf.jax, "default_backend", lambda: request.param)
    jax.clear_caches()
    yield request.param
    monkeypatch.undo()
    jax.clear_caches()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("argnums", [(0,), (1,), (0, 1)])
def test_dot_matches_autodiff_of_jnp_dot(dtype, argnums, backend):
    """The value is the exact (here float64) product of the operands rounded once to their dtype (accumulated in
    float32, not in bf16); the gradients are autodiff's of jnp.dot with the result in the operands' dtype: the same
    sums (in another order), so they differ at most by the rounding of their dtype. Both forms of the product: the
    CPU's (a float32 result, rounded after) and the other backends' (the result written in bf16), the latter run
    here on the CPU by making the model see another backend."""
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (2, 5, 512)).astype(dtype)
    w = (jax.random.normal(k[1], (512, 24)) * 0.2).astype(dtype)
    cot = jax.random.normal(k[2], (2, 5, 24))

    def loss(dot):
        return lambda x, w: jnp.sum(dot(x, w).astype(jnp.float32) * cot)

    y = tf.dot(x, w)
    assert y.dtype == dtype
    results = {str(e.params["preferred_element_type"]) for e in _dot_generals(jax.grad(loss(tf.dot), argnums), x, w)}
    assert results == {"float32" if backend == "cpu" else str(jnp.dtype(dtype))}, results  # the form under test
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    ulp = 1e-6 if dtype == jnp.float32 else 2.0**-8  # half a bf16 ulp (relative) plus float32 accumulation
    np.testing.assert_allclose(np.asarray(y, np.float64), exact, rtol=ulp, atol=1e-4)
    got = jax.jit(jax.grad(loss(tf.dot), argnums=argnums))(x, w)
    want = jax.jit(jax.grad(loss(_dot_autodiff), argnums=argnums))(x, w)
    for g, g_want, i in zip(got, want, argnums):
        assert g.dtype == (x, w)[i].dtype
        rtol = 1e-6 if dtype == jnp.float32 else 2.0**-7  # one bf16 ulp: the same f32 sum rounded either way
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_want, np.float32), rtol=rtol, atol=1e-5)


def _dot_generals(fn, *args) -> list:
    """The dot_general equations of fn's jaxpr, nested ones included (scan, remat, custom_vjp rules)."""
    return [eqn for eqn in ref.jaxpr_eqns(fn, *args) if eqn.primitive.name == "dot_general"]


def test_dot_computes_and_saves_only_what_is_differentiated():
    """A frozen weight (the base under LoRA) gets no gradient product and its input is not saved for one: the
    gradient with respect to x alone holds the forward and dx products, not dw's."""
    x, w = jnp.ones((2, 5, 8)), jnp.ones((8, 3))
    f = lambda x, w: jnp.sum(tf.dot(x, w))  # noqa: E731
    shapes = {argnums: sorted(tuple(e.outvars[0].aval.shape) for e in _dot_generals(jax.grad(f, argnums), x, w))
              for argnums in ((0,), (1,), (0, 1))}
    # each jaxpr holds the primal product twice (custom_vjp keeps the primal function beside its forward rule)
    assert shapes[(0,)].count((8, 3)) == 0 and shapes[(0,)].count((2, 5, 8)) == 1
    assert shapes[(1,)].count((2, 5, 8)) == 0 and shapes[(1,)].count((8, 3)) == 1
    assert shapes[(0, 1)].count((2, 5, 8)) == 1 and shapes[(0, 1)].count((8, 3)) == 1
    _, residuals = jax.linearize(lambda x: f(x, w), x)  # x only: w kept, x not
    kept = [leaf.shape for leaf in jax.tree_util.tree_leaves(residuals)]
    assert (2, 5, 8) not in kept, kept


def test_dot_refuses_mixed_dtypes():
    with pytest.raises(TypeError, match="float32 and bfloat16"):
        tf.dot(jnp.ones((2, 4)), jnp.ones((4, 3), jnp.bfloat16))


def test_bf16_lora_gradient_products_are_bf16():
    """The LoRA step's gradient in bf16 (the tiny T2V model, LoRA on attention and FFN): every product takes both
    operands in one dtype (bf16 for the linear layers; autodiff paired the float32 cotangent with the bf16 weight or
    activation, a float32 product once lowered) and no frozen weight gets a gradient product."""
    config = wanjax.WanConfig.from_diffusers(ref.T2V)
    params = wanjax.init_params(config, jax.random.key(1), jnp.bfloat16)  # float32 modules kept, as loaded
    inp = {k: jnp.asarray(v) for k, v in ref.inputs(ref.T2V, seed=2).items()}
    lora = wl.init_lora(config, jax.random.key(3), rank=4, targets=wl.DEFAULT_TARGETS + ("ffn.net.0.proj",
                                                                                         "ffn.net.2"))

    def loss(lora):
        out = wanjax.transformer_forward(config, params, inp["hidden_states"], inp["timestep"],
                                         inp["encoder_hidden_states"], lora=lora)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    dots = _dot_generals(jax.grad(loss), lora)
    mixed = [tuple((str(v.aval.dtype), v.aval.shape) for v in e.invars) for e in dots
             if e.invars[0].aval.dtype != e.invars[1].aval.dtype]
    assert mixed == []
    bf16 = [e for e in dots if e.invars[0].aval.dtype == jnp.bfloat16]
    assert len(bf16) > 50
    # no (tokens, d_in) x (tokens, d_out) product except LoRA's A / B gradients (rank 4 on one side)
    weight_grads = [e for e in bf16 if all(v.aval.ndim == 3 for v in e.invars) and e.outvars[0].aval.ndim == 2]
    assert weight_grads and all(4 in e.outvars[0].aval.shape for e in weight_grads)


def test_bf16_lora_gradient_saves_no_float32_activation():
    """Without remat, a bf16 LoRA gradient keeps no token-sized float32 tensor: the norms take their bf16 input
    (float32 inside `standardize`) and the linear layers write bf16, so what the backward reads is bf16 but for
    per-token statistics and per-sample modulation (diffusers' float32 islands: norm1 / norm3 of x.float())."""
    from jax._src.ad_checkpoint import saved_residuals

    config = wanjax.WanConfig.from_diffusers(ref.T2V).replace(remat_policy="none")
    params = wanjax.init_params(config, jax.random.key(1), jnp.bfloat16)
    inp = {k: jnp.asarray(v) for k, v in ref.inputs(ref.T2V, seed=2).items()}
    lora = wl.init_lora(config, jax.random.key(3), rank=4, targets=wl.DEFAULT_TARGETS + ("ffn.net.0.proj",
                                                                                         "ffn.net.2"))
    x = inp["hidden_states"].astype(jnp.bfloat16)
    tokens = x.shape[2] * (x.shape[3] // 2) * (x.shape[4] // 2)

    def loss(lora):
        out = wanjax.transformer_forward(config, params, x, inp["timestep"],
                                         inp["encoder_hidden_states"].astype(jnp.bfloat16), lora=lora)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    saved = [aval for aval, _ in saved_residuals(loss, lora)]
    token_sized = [a for a in saved if tokens in a.shape and a.shape[-1] >= config.inner_dim]
    assert len(token_sized) >= 10  # the blocks' saved activations (stacked over the layer scan), the head's
    assert [(a.shape, str(a.dtype)) for a in token_sized if a.dtype != jnp.bfloat16] == []

