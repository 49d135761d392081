"""Context parallelism on the `context` mesh axis (8 simulated CPU devices, tests/conftest.py): tokens split over
`context`, self-attention via all-to-all over heads; forward and flow-matching gradients equal one device's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import wanjax
from wanjax import lora as lora_lib
from wanjax import sharding
from wanjax.losses import flow_matching as fm

# 8 heads: divisible by every context size tried; 2 x 8 x 8 = 128 latent patches.
CONFIG = wanjax.WanConfig(
    num_attention_heads=8, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16, ffn_dim=64,
    num_layers=2, rope_max_seq_len=32, attention="xla",
)
BATCH, TEXT_LEN = 2, 7


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    normal = lambda scale: lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), jnp.float32)  # noqa: E731
    params = jax.tree_util.tree_map(normal(0.2), wanjax.param_shapes(CONFIG))  # O(0.2): every path matters
    lora_params = jax.tree_util.tree_map(normal(0.1), lora_lib.lora_shapes(CONFIG, 2))  # B != 0: grads everywhere
    spec = fm.LoraSpec(rank=2, alpha=4.0, targets=lora_lib.parse_targets(lora_lib.DEFAULT_TARGETS))
    batch = {
        "latents": jnp.asarray(rng.standard_normal((BATCH, 4, 2, 16, 16)), jnp.float32),
        "prompt_embeds": jnp.asarray(rng.standard_normal((BATCH, TEXT_LEN, 16)), jnp.float32),
    }
    loss = functools.partial(fm.flow_matching_loss, rng=jax.random.key(3), model=CONFIG, lora=spec,
                             fm=fm.FlowMatchingConfig())
    value_and_grad = jax.jit(jax.value_and_grad(lambda lp, frozen, b: loss(lp, frozen, b)[0]))
    forward = jax.jit(lambda p, x, t, c: wanjax.transformer_forward(CONFIG, p, x, t, c))
    frozen = fm.Frozen(params=params, empty_prompt_embeds=jnp.zeros((TEXT_LEN, 16)))
    t = jnp.array([300.0, 800.0])
    want_out = forward(params, batch["latents"], t, batch["prompt_embeds"])
    want_loss, want_grads = value_and_grad(lora_params, frozen, batch)
    return dict(params=params, lora_params=lora_params, batch=batch, t=t, forward=forward,
                value_and_grad=value_and_grad, want_out=want_out, want_loss=want_loss, want_grads=want_grads)


@pytest.mark.parametrize("mesh_shape", [dict(data=2, fsdp=1, context=4), dict(data=1, fsdp=1, context=8)])
def test_context_parallel_matches_one_device(setup, mesh_shape):
    s = setup
    mesh = sharding.make_mesh(**mesh_shape)
    with sharding.use_mesh(mesh):
        batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in s["batch"].items()}
        params = jax.device_put(s["params"], sharding.param_shardings(s["params"], mesh))
        frozen = fm.Frozen(params=params, empty_prompt_embeds=jnp.zeros((TEXT_LEN, 16)))
        fwd_args = (params, batch["latents"], s["t"], batch["prompt_embeds"])
        out = s["forward"](*fwd_args)
        loss, grads = s["value_and_grad"](s["lora_params"], frozen, batch)
        fwd_hlo = s["forward"].lower(*fwd_args).compile().as_text()
        grad_hlo = s["value_and_grad"].lower(s["lora_params"], frozen, batch).compile().as_text()

    assert rel(out, s["want_out"]) < 1e-5
    assert rel(loss, s["want_loss"]) < 1e-5
    for g, w in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(s["want_grads"])):
        assert rel(g, w) < 1e-5
    # The sequence really is split: the tokens <-> heads switches around self-attention are all-to-alls
    # (q, k, v in, the output back; inside the scanned block body), forward and backward.
    assert fwd_hlo.count("all-to-all(") >= 4
    assert grad_hlo.count("all-to-all(") >= 8
    # ... and no device ever holds all tokens of the hidden state (96 wide): no all-gather yields (B, S=128, 96).
    assert not any("all-gather(" in line and "128,96]" in line.split("all-gather(")[0] for line in fwd_hlo.splitlines())


def test_without_context_axis_nothing_changes(setup):
    """context = 1 (the default mesh): no activation constraints, so no all-to-all; values as on one device."""
    s = setup
    mesh = sharding.make_mesh(data=2, fsdp=1, devices=jax.devices()[:2])
    with sharding.use_mesh(mesh):
        params = jax.device_put(s["params"], sharding.param_shardings(s["params"], mesh))
        x = jax.device_put(s["batch"]["latents"], sharding.batch_sharding(mesh, 5))
        args = (params, x, s["t"], s["batch"]["prompt_embeds"])
        out = s["forward"](*args)
        hlo = s["forward"].lower(*args).compile().as_text()
    assert "all-to-all(" not in hlo
    assert rel(out, s["want_out"]) < 1e-5


def test_batch_sharding_ignores_context():
    mesh = sharding.make_mesh(data=2, fsdp=1, context=4)
    assert sharding.batch_sharding(mesh, 5).spec == P(("data", "fsdp"), None, None, None, None)
    assert sharding.context_size(mesh) == 4
    assert sharding.context_size() == 1  # no mesh set
    with sharding.use_mesh(mesh):
        assert sharding.context_size() == 4
        assert sharding.token_spec(sharding.current_mesh(), (2, 128, 96)) == P("data", "context", None)
        q, kv, out = sharding.attention_specs(sharding.current_mesh(), (2, 128, 8, 12), self_attention=True)
        assert q == kv == out == P("data", None, "context", None)
        q, kv, out = sharding.attention_specs(sharding.current_mesh(), (2, 128, 8, 12), self_attention=False)
        assert q == out == P("data", "context", None, None) and kv == P("data", None, None, None)


def test_bad_context_sizes_are_refused():
    x = jax.ShapeDtypeStruct((2, 4, 2, 16, 16), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.float32)
    c = jax.ShapeDtypeStruct((2, TEXT_LEN, 16), jnp.float32)
    six_heads = CONFIG.replace(num_attention_heads=6)
    mesh = sharding.make_mesh(data=2, fsdp=1, context=4)
    heads_error = "num_attention_heads=6 must be divisible by the `context`"
    with sharding.use_mesh(mesh), pytest.raises(ValueError, match=heads_error):
        jax.eval_shape(lambda p, x, t, c: wanjax.transformer_forward(six_heads, p, x, t, c),
                       wanjax.param_shapes(six_heads), x, t, c)
    odd_tokens = jax.ShapeDtypeStruct((2, 4, 3, 2, 2), jnp.float32)  # 3 tokens over context = 4
    with sharding.use_mesh(mesh), pytest.raises(ValueError, match=r"sequence \(3 tokens\) must be divisible"):
        jax.eval_shape(lambda p, x, t, c: wanjax.transformer_forward(CONFIG, p, x, t, c),
                       wanjax.param_shapes(CONFIG), odd_tokens, t, c)


@pytest.mark.parametrize("remat", ["none", "matmuls"])
def test_cpu_kernel_under_context_parallelism(setup, remat):
    """The `cpu` kernel (CPU's default; XLA ops with a custom VJP, partitioned by XLA like `xla`) on the Ulysses
    layout: forward and LoRA gradients equal one-device XLA's (no remat), through all-to-alls; also with remat
    "matmuls" (named linear outputs and kernel residuals saved across the all-to-alls)."""
    s = setup
    config = CONFIG.replace(attention="cpu", remat_policy=remat)
    spec = fm.LoraSpec(rank=2, alpha=4.0, targets=lora_lib.parse_targets(lora_lib.DEFAULT_TARGETS))
    loss = functools.partial(fm.flow_matching_loss, rng=jax.random.key(3), model=config, lora=spec,
                             fm=fm.FlowMatchingConfig())
    value_and_grad = jax.jit(jax.value_and_grad(lambda lp, frozen, b: loss(lp, frozen, b)[0]))
    forward = jax.jit(lambda p, x, t, c: wanjax.transformer_forward(config, p, x, t, c))
    mesh = sharding.make_mesh(data=2, fsdp=1, context=4)
    with sharding.use_mesh(mesh):
        batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in s["batch"].items()}
        params = jax.device_put(s["params"], sharding.param_shardings(s["params"], mesh))
        frozen = fm.Frozen(params=params, empty_prompt_embeds=jnp.zeros((TEXT_LEN, 16)))
        out = forward(params, batch["latents"], s["t"], batch["prompt_embeds"])
        loss_value, grads = value_and_grad(s["lora_params"], frozen, batch)
        grad_hlo = value_and_grad.lower(s["lora_params"], frozen, batch).compile().as_text()
    assert rel(out, s["want_out"]) < 1e-5
    assert rel(loss_value, s["want_loss"]) < 1e-5
    for g, w in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(s["want_grads"])):
        assert rel(g, w) < 1e-5
    assert grad_hlo.count("all-to-all(") >= 8


def test_splash_under_context_parallelism(setup):
    """The Pallas kernel (interpret mode on CPU) inside shard_map on the Ulysses layout equals one-device XLA."""
    s = setup
    mesh = sharding.make_mesh(data=2, fsdp=1, context=4)
    config = CONFIG.replace(attention="splash")
    with sharding.use_mesh(mesh):
        params = jax.device_put(s["params"], sharding.param_shardings(s["params"], mesh))
        x = jax.device_put(s["batch"]["latents"], sharding.batch_sharding(mesh, 5))
        out = jax.jit(lambda p, x, t, c: wanjax.transformer_forward(config, p, x, t, c))(
            params, x, s["t"], s["batch"]["prompt_embeds"])
    assert rel(out, s["want_out"]) < 1e-5


def test_cudnn_under_context_parallelism_lowers_for_cuda(monkeypatch):
    """bf16 'auto' on a GPU picks cuDNN; under context parallelism it runs in shard_map (XLA cannot split its custom
    call along the sequence). Lowered for CUDA with cuDNN's version probe stubbed: CPU has no cuDNN."""
    import jax._src.cudnn.fused_attention_stablehlo as fused

    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fused, "check_compute_capability", lambda cap: True)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    config = CONFIG.replace(attention_head_dim=16, attention="auto")
    params = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16), wanjax.param_shapes(config))
    x = jax.ShapeDtypeStruct((2, 4, 2, 16, 16), jnp.bfloat16)
    t = jax.ShapeDtypeStruct((2,), jnp.float32)
    c = jax.ShapeDtypeStruct((2, 8, 16), jnp.bfloat16)
    loss = lambda p, x, t, c: wanjax.transformer_forward(config, p, x, t, c).astype(jnp.float32).sum()  # noqa: E731
    grad = jax.jit(jax.grad(loss))
    with sharding.use_mesh(sharding.make_mesh(data=2, fsdp=1, context=4)):
        text = grad.trace(params, x, t, c).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__cudnn$fmha") == 4  # self + cross attention, forward + backward (in the scanned body)
    assert "sdy.manual_computation" in text  # shard_map
