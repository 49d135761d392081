"""Attention kernels: selection by platform, XLA == a numpy reference, the "cpu" kernel (hand-written backward) ==
numpy / XLA in values and gradients, splash (Pallas interpret mode on CPU) == XLA, the TPU / cuDNN paths lower for
their platforms, and every remat policy gives the gradients of no remat ("attention": without re-running the
kernels' forward)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import wanjax
from wanjax.models import attention as attn


def np_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v in float64, (B, S, H, D)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def qkv(seed, b=2, q_len=37, kv_len=23, heads=3, d=16, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    shapes = ((b, q_len, heads, d), (b, kv_len, heads, d), (b, kv_len, heads, d))
    return tuple(jax.random.normal(key, s, jnp.float32).astype(dtype) for key, s in zip(keys, shapes))


# ---------------------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "backend, dtype, head_dim, expected",
    [
        ("gpu", jnp.bfloat16, 128, "cudnn"),
        ("gpu", jnp.float16, 64, "cudnn"),
        ("gpu", jnp.float32, 128, "xla"),  # cuDNN flash attention is half precision only
        ("gpu", jnp.bfloat16, 12, "xla"),  # head_dim not a multiple of 8
        ("gpu", jnp.bfloat16, 256, "xla"),
        ("tpu", jnp.bfloat16, 128, "splash"),
        ("tpu", jnp.float32, 12, "splash"),
        ("cpu", jnp.bfloat16, 128, "cpu"),
        ("cpu", jnp.float32, 128, "cpu"),
    ],
)
def test_auto_picks_kernel_by_platform(monkeypatch, backend, dtype, head_dim, expected):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert attn.resolve_attention_impl("auto", dtype, head_dim) == expected
    for impl in ("xla", "cpu", "cudnn", "splash"):  # an explicit choice is kept
        assert attn.resolve_attention_impl(impl, dtype, head_dim) == impl


def test_auto_avoids_cudnn_for_odd_lengths(monkeypatch):
    """JAX's cuDNN training path refuses odd sequence lengths (e.g. I2V's 257 image tokens): auto uses XLA there."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attn.resolve_attention_impl("auto", jnp.bfloat16, 128, (32760, 512)) == "cudnn"
    assert attn.resolve_attention_impl("auto", jnp.bfloat16, 128, (32760, 257)) == "xla"


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match=r"'flash'.*'auto', 'xla', 'cpu', 'cudnn', 'splash'"):
        attn.resolve_attention_impl("flash", jnp.float32)
    q, k, v = qkv(0)
    with pytest.raises(ValueError, match="expected one of"):
        attn.dot_product_attention(q, k, v, impl="sdpa")
    with pytest.raises(ValueError, match=r"attention='flash'.*expected one of \('auto', 'xla', 'cpu', 'cudnn', 'splash'\)"):
        wanjax.WanConfig(attention="flash")
    with pytest.raises(ValueError, match=r"remat_policy='some'.*'offload'"):
        wanjax.WanConfig(remat_policy="some")


def test_cudnn_refused_where_it_cannot_run():
    q, k, v = qkv(0, dtype=jnp.float32)
    with pytest.raises(ValueError, match="bfloat16/float16"):
        attn.dot_product_attention(q, k, v, impl="cudnn")
    if jax.default_backend() != "gpu":
        qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
        with pytest.raises(ValueError, match="NVIDIA GPU"):
            attn.dot_product_attention(qb, kb, vb, impl="cudnn")


# ---------------------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("q_len, kv_len", [(37, 23), (64, 64)])
def test_xla_matches_numpy_float32(q_len, kv_len):
    q, k, v = qkv(1, q_len=q_len, kv_len=kv_len)
    out = attn.dot_product_attention(q, k, v, impl="xla")
    assert out.dtype == jnp.float32 and out.shape == q.shape
    np.testing.assert_allclose(np.asarray(out), np_attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_xla_matches_numpy_bfloat16():
    q, k, v = qkv(2, d=64, dtype=jnp.bfloat16)
    out = attn.dot_product_attention(q, k, v, impl="xla")
    assert out.dtype == jnp.bfloat16
    expected = np_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    err = np.abs(np.asarray(out, np.float64) - expected).max() / np.abs(expected).max()
    assert err < 2e-2, err  # bf16 has 8 mantissa bits: ~4e-3 per rounding


def _loss_and_grads(impl, q, k, v):
    """sum(sin(attention)) and its gradients w.r.t. q, k, v (a cotangent that is not all ones)."""
    def loss(q, k, v):
        out = attn.dot_product_attention(q, k, v, impl=impl)
        return jnp.sum(jnp.sin(out.astype(jnp.float32))), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


@pytest.mark.parametrize("q_len, kv_len, d", [(37, 23, 16), (64, 64, 64), (50, 77, 128)])
def test_cpu_kernel_matches_numpy_and_xla_float32(q_len, kv_len, d):
    """The hand-written backward: values against float64 numpy, gradients against autodiff of the XLA kernel."""
    q, k, v = qkv(4, q_len=q_len, kv_len=kv_len, d=d)
    out, grads = _loss_and_grads("cpu", q, k, v)
    assert out.dtype == jnp.float32 and out.shape == q.shape
    np.testing.assert_allclose(np.asarray(out), np_attention(q, k, v), rtol=1e-5, atol=1e-6)
    _, want = _loss_and_grads("xla", q, k, v)
    for name, a, b in zip("qkv", grads, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-6, err_msg=f"d{name}")


def test_cpu_kernel_gradients_match_finite_differences():
    """Independent of any other kernel: directional derivatives in float64 numpy vs the custom VJP."""
    q, k, v = qkv(5, b=1, q_len=9, kv_len=7, heads=2, d=8)
    _, grads = _loss_and_grads("cpu", q, k, v)
    rng = np.random.default_rng(0)
    args = [np.asarray(x, np.float64) for x in (q, k, v)]

    def f(*xs):
        return np.sum(np.sin(np_attention(*xs)))

    for i in range(3):
        direction = rng.standard_normal(args[i].shape)
        eps = 1e-6
        plus, minus = list(args), list(args)
        plus[i], minus[i] = args[i] + eps * direction, args[i] - eps * direction
        numeric = (f(*plus) - f(*minus)) / (2 * eps)
        analytic = float(np.sum(np.asarray(grads[i], np.float64) * direction))
        assert abs(numeric - analytic) <= 1e-4 * max(1.0, abs(numeric)), (i, numeric, analytic)


def test_cpu_kernel_bfloat16_within_xla_error():
    """bf16: the cpu kernel's error against float64 is of the order of the XLA kernel's own bf16 error."""
    q, k, v = qkv(6, d=64, dtype=jnp.bfloat16)
    expected = np_attention(*(x.astype(jnp.float32) for x in (q, k, v)))
    out, grads = _loss_and_grads("cpu", q, k, v)
    ref_out, ref_grads = _loss_and_grads("xla", q, k, v)
    _, grads32 = _loss_and_grads("xla", *(x.astype(jnp.float32) for x in (q, k, v)))
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)

    def err(a, b):
        return np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() / np.abs(np.asarray(b)).max()

    assert err(out, expected) <= 2 * max(err(ref_out, expected), 4e-3)
    for name, a, r, b in zip("qkv", grads, ref_grads, grads32):
        assert err(a, b) <= 2 * max(err(r, b), 4e-3), f"d{name}: {err(a, b)} vs xla's {err(r, b)}"


def _splash_vs_xla(monkeypatch, q_len, kv_len, blocks):
    monkeypatch.setattr(attn, "SPLASH_BLOCK_Q", blocks[0])
    monkeypatch.setattr(attn, "SPLASH_BLOCK_KV", blocks[1])
    monkeypatch.setattr(attn, "SPLASH_BLOCK_KV_COMPUTE", blocks[2])
    q, k, v = qkv(3, b=2, q_len=q_len, kv_len=kv_len, heads=2, d=32)

    def loss(impl, q, k, v):
        out = attn.dot_product_attention(q, k, v, impl=impl)
        return jnp.sum(jnp.sin(out)), out

    (_, got), g_got = jax.value_and_grad(lambda *a: loss("splash", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (_, want), g_want = jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    for a, b in zip(g_got, g_want):
        scale = np.abs(np.asarray(b)).max()
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-4 * scale


@pytest.mark.parametrize(
    "q_len, kv_len, blocks",
    [
        (200, 77, (512, 1024, 512)),  # the real tiles, capped to short sequences; keys padded (segment ids)
        (300, 384, (128, 256, 128)),  # several q / kv tiles, queries padded, kv tile = 2 compute blocks
    ],
)
def test_splash_interpret_matches_xla(monkeypatch, q_len, kv_len, blocks):
    """The TPU kernel itself (forward and fused backward) in Pallas interpret mode on CPU."""
    _splash_vs_xla(monkeypatch, q_len, kv_len, blocks)


def test_splash_lowers_for_tpu():
    """The non-interpret kernel with Wan-sized tiles lowers to a Mosaic TPU custom call (forward and backward)."""
    q = jax.ShapeDtypeStruct((1, 1560, 4, 128), jnp.bfloat16)  # 2 x 30 x 52 latent tokens: a padded q tile
    k = jax.ShapeDtypeStruct((1, 512, 4, 128), jnp.bfloat16)  # text keys

    def loss(q, k, v):
        return attn.splash_attention(q, k, v, interpret=False).astype(jnp.float32).sum()

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 2  # forward + fused dq/dk/dv


def test_cudnn_lowers_for_cuda(monkeypatch):
    """The cuDNN path builds the flash-attention custom call (CPU has no cuDNN: its version probe is stubbed)."""
    import jax._src.cudnn.fused_attention_stablehlo as fused

    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fused, "check_compute_capability", lambda cap: True)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    q = jax.ShapeDtypeStruct((2, 300, 4, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 78, 4, 128), jnp.bfloat16)

    def loss(q, k, v):
        return attn.dot_product_attention(q, k, v, impl="auto").astype(jnp.float32).sum()

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
    assert "__cudnn$fmha" in text


def test_model_with_splash_matches_xla():
    """The whole tiny model with attention='splash' (interpret mode here) equals attention='xla'."""
    config = wanjax.WanConfig.from_diffusers(ref.T2V)
    params = wanjax.init_params(config, jax.random.key(0))
    inp = {k: jnp.asarray(v) for k, v in ref.inputs(ref.T2V, seed=1).items()}

    def run(impl):
        return np.asarray(wanjax.transformer_forward(config.replace(attention=impl), params, inp["hidden_states"],
                                                     inp["timestep"], inp["encoder_hidden_states"]))

    want = run("xla")
    assert ref.rel_err(run("splash"), want) < 1e-5


# ---------------------------------------------------------------------------------------------------------
# Remat policies
# ---------------------------------------------------------------------------------------------------------
def _tiny_model_value_and_grad(attention: str = "auto"):
    """(policy -> value_and_grad of sum(out^2) over (params, hidden_states), params, hidden_states): tiny T2V."""
    base = wanjax.WanConfig.from_diffusers(ref.T2V).replace(attention=attention)
    params = wanjax.init_params(base, jax.random.key(1))
    inp = {k: jnp.asarray(v) for k, v in ref.inputs(ref.T2V, seed=2).items()}

    def value_and_grad(policy):
        config = base.replace(remat_policy=policy)

        def loss(params, x):
            out = wanjax.transformer_forward(config, params, x, inp["timestep"], inp["encoder_hidden_states"])
            return jnp.sum(out**2)

        return jax.value_and_grad(loss, argnums=(0, 1))

    return value_and_grad, params, inp["hidden_states"]


def test_remat_offload_same_grads():
    """"offload" gives the grads of "none" (tests/test_compile.py checks "full" and "dots" the same way), and it
    really moves the named attention tensors to host memory (device_puts to MemorySpace.Host in the jaxpr: 2
    attention modules x 4 names; XLA:CPU compiles them away, GPU/TPU to host transfers)."""
    value_and_grad, params, x = _tiny_model_value_and_grad()
    want = jax.tree_util.tree_leaves(jax.jit(value_and_grad("none"))(params, x))
    got = jax.tree_util.tree_leaves(jax.jit(value_and_grad("offload"))(params, x))
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    jaxpr = str(jax.make_jaxpr(value_and_grad("offload"))(params, x))
    assert "MemorySpace.Host" in jaxpr


def _count_in_jaxpr(fn, args, predicate) -> int:
    """Equations of `fn`'s jaxpr, nested ones included (remat, scan, vmap'd kernels), for which predicate(eqn)."""
    return sum(bool(predicate(eqn)) for eqn in ref.jaxpr_eqns(fn, *args))


def _exp_eqns(eqn) -> bool:
    return eqn.primitive.name == "exp"


def test_remat_attention_does_not_rerun_the_cpu_kernel():
    """With remat "attention" the tiny model's gradient re-runs no attention forward: its softmax exps are those of
    no remat (forward + the backward's recomputed probabilities), and "full" has one more per attention call."""
    value_and_grad, params, x = _tiny_model_value_and_grad("cpu")
    exps = {p: _count_in_jaxpr(value_and_grad(p), (params, x), _exp_eqns) for p in ("none", "full", "attention")}
    assert exps["attention"] == exps["none"] == exps["full"] - 2, exps  # 2 attention calls per (scanned) block
    got = jax.jit(value_and_grad("attention"))(params, x)
    want = jax.jit(value_and_grad("none"))(params, x)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _plain_dots(eqn) -> bool:  # products without batch dimensions: the linear layers (not the attention core)
    return eqn.primitive.name == "dot_general" and not eqn.params["dimension_numbers"][1][0]


def test_remat_dots_recomputes_no_linear_layer_product():
    """"dots" saves the products without batch dimensions (every linear layer's, computed inside dot's forward
    rule): its gradient jaxpr has exactly as many of them as no remat's, "full" more (they are recomputed)."""
    value_and_grad, params, x = _tiny_model_value_and_grad()
    plain = {p: _count_in_jaxpr(value_and_grad(p), (params, x), _plain_dots) for p in ("none", "full", "dots")}
    assert plain["dots"] == plain["none"] < plain["full"], plain


@pytest.mark.parametrize("kernel", ["cpu", "xla"])
def test_remat_matmuls_and_projections_recompute_only_what_they_say(monkeypatch, kernel):
    """"matmuls" saves every linear layer's output (and each attention kernel's outputs): its gradient jaxpr has
    exactly the products of no remat's and the same softmax exps (the attention core is not run again);
    "projections" has one product more per (scanned) block, the FFN's up-projection it recomputes. Under the `xla`
    kernel (nothing of it saved) both re-run the attention core: the 2 attention calls' score products. Gradients are
    no remat's. The norms' row sums are taken as the reductions GPU/TPU run (on CPU they are dots, which the
    recomputed norms would add)."""
    from wanjax.models import transformer

    monkeypatch.setattr(transformer, "_row_sum", transformer.row_sum_plain)
    value_and_grad, params, x = _tiny_model_value_and_grad(kernel)
    policies = ("none", "matmuls", "projections")
    plain = {p: _count_in_jaxpr(value_and_grad(p), (params, x), _plain_dots) for p in policies}
    assert plain["matmuls"] == plain["none"] and plain["projections"] == plain["none"] + 1, plain
    exps = {p: _count_in_jaxpr(value_and_grad(p), (params, x), _exp_eqns) for p in policies}
    rerun = 0 if kernel == "cpu" else 2
    assert exps["matmuls"] == exps["projections"] == exps["none"] + rerun, exps
    want = jax.tree_util.tree_leaves(jax.jit(value_and_grad("none"))(params, x))
    for policy in ("matmuls", "projections"):
        got = jax.tree_util.tree_leaves(jax.jit(value_and_grad(policy))(params, x))
        for a, b in zip(got, want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _remat_block(kernel):
    """A block-like function (projections, attention, a nonlinearity) for jax.checkpoint with a policy."""
    def block(w, x):
        q, k, v = (jnp.einsum("bshd,de->bshe", x, w * (i + 1)) for i in range(3))
        return jnp.tanh(kernel(q, k, v).astype(jnp.float32)).sum()

    return block


@pytest.mark.parametrize("policy, forwards", [("full", 2), ("attention", 1)])
def test_remat_attention_saves_the_cudnn_forward(monkeypatch, policy, forwards):
    """cuDNN (traced on CPU, its version probe stubbed): under "full" the backward runs the kernel's forward again,
    under "attention" its outputs (output, softmax stats) are saved and it runs once."""
    import jax._src.cudnn.fused_attention_stablehlo as fused

    from wanjax.models.transformer import _REMAT_POLICIES

    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fused, "check_compute_capability", lambda cap: True)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    block = _remat_block(lambda q, k, v: attn.dot_product_attention(q, k, v, impl="cudnn"))
    x = jnp.ones((1, 64, 2, 64), jnp.bfloat16)
    w = jnp.full((64, 64), 0.01, jnp.bfloat16)
    grad = jax.grad(jax.checkpoint(block, policy=_REMAT_POLICIES[policy]))
    count = _count_in_jaxpr(grad, (w, x), lambda e: e.primitive.name == attn._CUDNN_FORWARD_PRIMITIVE)
    assert count == forwards


def test_remat_attention_saves_the_splash_forward():
    """Splash (Pallas interpret mode): "attention" keeps the forward kernel's outputs, so it runs once, not twice
    as under "full"; gradients unchanged."""
    from wanjax.models.transformer import _REMAT_POLICIES

    block = _remat_block(lambda q, k, v: attn.splash_attention(q, k, v, interpret=True))
    x = jax.random.normal(jax.random.key(0), (1, 128, 2, 128), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (128, 128), jnp.float32) * 0.05

    def is_fwd(e):
        return e.primitive.name == "pallas_call" and str(e.params["name"]).startswith(attn._SPLASH_FORWARD_KERNEL)

    grads = {}
    for policy, forwards in (("full", 2), ("attention", 1)):
        grad = jax.grad(jax.checkpoint(block, policy=_REMAT_POLICIES[policy]))
        assert _count_in_jaxpr(grad, (w, x), is_fwd) == forwards, policy
        grads[policy] = np.asarray(jax.jit(grad)(w, x))
    np.testing.assert_allclose(grads["attention"], grads["full"], rtol=1e-5, atol=1e-6)
