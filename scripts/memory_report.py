"""Compiled per-device memory of wanjax train steps at real shapes, abstractly (no weights). One JSON line each.

    python scripts/memory_report.py [--model 1.3b,14b] [--method lora,dmd,dcm] [--devices 1,8]
                                    [--frames 81 --height 480 --width 832 | --tokens N] [--batch 1]
                                    [--remat full] [--attention auto|xla|chunked] [--base-dtype bfloat16]
                                    [--rank R] [--cpu-licm]

For every (model, method, mesh) the step train.py jits for that method (configs/<method>.py quickstart settings:
LoRA flow matching; DMD generator + critic LoRAs over one base; DCM semantic) is built over a Wan base made of
`jax.ShapeDtypeStruct`s (bf16 with diffusers' float32 modules, nothing allocated), lowered with the trainer's
shardings (base: `param_shardings`, trainables: `fsdp_shardings`, batch: `batch_sharding`) on a mesh of N devices
(fsdp=N; N > 1 simulated on CPU with XLA_FLAGS=--xla_force_host_platform_device_count, set here by re-executing),
compiled, and XLA's memory analysis read. `dmd_generator` / `dmd_critic` are the two programs the trainer runs per
DMD step (`Method.phases`), each compiled alone. `--batch` is per device: the global batch is batch x N (the
trainer needs it divisible by N).

Printed per line: per-device argument / output / temp / alias / generated-code bytes, peak estimate =
arguments + temporaries + outputs - aliased, `fits_80GB` (peak <= 75.7 GiB: JAX's pool on an 80 GB H100 with
the trainer's gpu_memory_fraction 0.95; the rest for the CUDA context and workspaces), and an analytic estimate
to check it against (base and trainable-state bytes per device from the shardings, exact; activations per remat
policy, approximate; see `analytic`).

CAVEATS. The numbers are XLA's analysis for the backend that compiled (CPU here). XLA:CPU computes bf16 dots by
upcasting operands to float32 (extra f32 temporaries) and its memory analysis and buffer assignment differ from
the GPU compiler's (no cuDNN attention, different fusion and rematerialisation), so read CPU figures as an
estimate of GPU memory, not a measurement. XLA's own attention materialises (B, heads, S, S) float32 logits, ~172
GB per layer for 14B at 32,760 tokens, where cuDNN flash attention keeps O(S); `--attention chunked` (default on
CPU) therefore swaps in a query-chunked, rematerialised attention (same math) standing in for flash attention's
memory; the norms' row sums are compiled as the reductions GPU/TPU run (the model takes them as dots on CPU). And
XLA:CPU's while-loop-invariant code motion hoists those f32 upcasts out of the layer loops (f32
copies of every stacked weight and of the saved block inputs: 17.8 GB instead of 8.9 GB of temporaries for the
1.3B LoRA step), so on CPU the report compiles without that pass unless `--cpu-licm`. `--attention xla --cpu-licm`
gives the literal CPU program but for those row sums.

FSDP LAYOUT. The trainer runs the step under `use_mesh(mesh)`, so the transformer pins its (B, S, ...) activations
to the batch split over data x fsdp (weights all-gathered, activations local; `wanjax.sharding.constrain_tokens`).
Before that pin XLA propagated the fsdp-sharded weights' layout into the activations (1.3B LoRA, 8 devices: 42 GiB
per device, against 8.7 with it); the analytic estimate assumes the pinned layout.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COUNT_FLAG = "--xla_force_host_platform_device_count"
NO_LICM = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"
GiB = 1024**3
# "fits on an 80 GB GPU": what JAX's memory pool holds on an H100 80GB (81559 MiB) with the trainer's default
# gpu_memory_fraction 0.95 (75.7 GiB; the rest: CUDA context, cuDNN / cuBLAS workspaces). JAX's own default pool,
# 0.75, would hold 59.7 GiB.
FIT_LIMIT_BYTES = int(0.95 * 81559 * 2**20)
CAVEAT = ("XLA:CPU memory analysis: bf16 dots are upcast to f32 on CPU and buffer assignment differs from GPU; "
          "an estimate of GPU memory, not a measurement")
METHODS = ("lora", "dmd", "dmd_generator", "dmd_critic", "dcm")
CONFIG_FILE = {"lora": "lora", "dmd": "dmd", "dmd_generator": "dmd", "dmd_critic": "dmd", "dcm": "dcm"}


def ensure_xla_flags(n_devices: int, cpu_licm: bool) -> None:
    """Re-execute this process with the XLA flags the measurement needs, unless XLA_FLAGS already has them:
    N simulated CPU devices, and on CPU (only) no while-loop-invariant code motion (see `--cpu-licm`).

    Must run before JAX starts its backends (the first `jax.devices()`): the count flag only affects the host
    platform, and the LICM flag is only added when the default backend is the CPU."""
    import jax

    flags = os.environ.get("XLA_FLAGS", "")
    extra = []
    if n_devices > 1 and COUNT_FLAG not in flags:
        extra.append(f"{COUNT_FLAG}={n_devices}")
    if not cpu_licm and NO_LICM not in flags and jax.default_backend() == "cpu":
        extra.append(NO_LICM)
    if extra:
        env = dict(os.environ, XLA_FLAGS=" ".join([flags, *extra]).strip())
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


# -------------------------------------------------------------------------------------------------------------
# Models, shapes, the trainer's method objects over an abstract base
# -------------------------------------------------------------------------------------------------------------
def model_presets():
    from wanjax.models.config import WanConfig

    return {
        # released Wan2.1 T2V shapes (tests/test_compile.py checks their parameter counts)
        "1.3b": WanConfig(num_attention_heads=12, ffn_dim=8960, num_layers=30),
        "14b": WanConfig(num_attention_heads=40, ffn_dim=13824, num_layers=40),
        # for CPU benchmarks and tests: the real layout at a small width
        "small": WanConfig(num_attention_heads=4, attention_head_dim=64, text_dim=256, freq_dim=256, ffn_dim=1024,
                           num_layers=4),
        "tiny-wide": WanConfig(num_attention_heads=4, attention_head_dim=128, text_dim=64, freq_dim=32, ffn_dim=2048,
                               num_layers=2),  # weights dominate the arguments: a sharding check
        "tiny": WanConfig(num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=32, ffn_dim=64,
                          num_layers=2),
    }


def latent_shape(model, frames: int, height: int, width: int, batch: int) -> tuple[int, ...]:
    """Latents of a (frames, height, width) clip under Wan's VAE: 4x time (+1 first frame), 8x space."""
    return (batch, model.in_channels, 1 + (frames - 1) // 4, height // 8, width // 8)


def tokens_of(model, lat: tuple[int, ...]) -> int:
    pt, ph, pw = model.patch_size
    return (lat[2] // pt) * (lat[3] // ph) * (lat[4] // pw)


def load_config(name: str):
    """configs/<name>.py get_config() (the quickstart settings the trainer runs)."""
    spec = importlib.util.spec_from_file_location(f"_wanjax_config_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def abstract_base(model, dtype, shardings=None):
    """The base params as ShapeDtypeStructs in the dtypes loading gives them (`param_shapes(model, dtype)`)."""
    import jax

    from wanjax.models.transformer import param_shapes

    shapes = param_shapes(model, dtype)
    if shardings is None:
        return shapes
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def build_method(method: str, model, base, text_embeds: dict, overrides: dict | None = None):
    """The trainer's `Method` for configs/<method>.py (+ overrides) over `base` (arrays or abstract)."""
    from wanjax import lora as lora_lib
    from wanjax import methods, optim
    from wanjax.losses.flow_matching import FlowMatchingConfig

    c = load_config(CONFIG_FILE[method])
    for key, value in (overrides or {}).items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    alpha = float(c.lora_alpha) if c.lora_alpha is not None else float(c.lora_rank)
    optim_cfg = optim.OptimConfig.from_mapping({**c.to_dict(), "gradient_accumulation_steps": 1})
    sampler = "uniform" if c.flow_use_uniform_schedule else "beta" if c.flow_use_beta_schedule else "logit_normal"
    fm = FlowMatchingConfig(sampler=sampler, shift=float(c.flow_schedule_shift),
                            auto_shift=bool(c.flow_schedule_auto_shift), logit_std=float(c.flow_sigmoid_scale),
                            caption_dropout_probability=float(c.caption_dropout_probability))
    ctx = methods.Context(config=c, model=model, base=base, text_embeds=text_embeds,
                          lora_targets=lora_lib.parse_targets(c.lora_target_modules), lora_alpha=alpha, init_lora=None,
                          optim=optim_cfg, fm=fm)
    name = {"lora": "lora", "dcm": "dcm"}.get(method, "dmd")
    built = methods.build(name, ctx)
    if method in ("dmd_generator", "dmd_critic"):
        built = dataclasses.replace(built, step=_dmd_half(method, built))
    return built, c


def _dmd_half(method: str, built):
    """One of the trainer's two DMD programs (`Method.phases`): the generator phase (rollout, student update) or
    the critic phase (critic update on the student's sample; its input sample is zeros of the right shape here)."""
    import jax
    import jax.numpy as jnp

    generator_phase, critic_phase = built.phases
    if method == "dmd_generator":
        return generator_phase

    def critic_only(state, frozen, batch):
        carry = jax.eval_shape(generator_phase, state, frozen, batch)[1]
        carry = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), carry)
        return critic_phase(state, frozen, batch, carry)

    return critic_only


def mesh_context(mesh):
    """The trainer's activation-mesh context: `use_mesh(mesh)` on more than one device (as train.py)."""
    import contextlib

    from wanjax import sharding

    return sharding.use_mesh(mesh) if mesh.size > 1 else contextlib.nullcontext()


# -------------------------------------------------------------------------------------------------------------
# Attention stand-in for flash attention's memory on backends without it
# -------------------------------------------------------------------------------------------------------------
def _chunk_size(seq: int, target: int) -> int:
    return max(d for d in range(1, min(seq, target) + 1) if seq % d == 0)


def chunked_attention(q, k, v, *, impl: str = "auto", chunk: int = 256, **kwargs):
    """softmax(q k^T / sqrt(d)) v one query chunk at a time, each chunk rematerialised in the backward pass.

    The model's own `dot_product_attention` with the XLA kernel on each chunk (other keyword arguments passed on):
    the same result, memory O(S D + heads x chunk x S_kv) instead of O(heads x S x S_kv), like flash attention
    (whose O(S) statistics this overstates by one chunk's float32 logits). The output carries the kernels' output
    checkpoint name, so remat "attention" keeps it as it keeps a flash kernel's (not the heads x S statistics)."""
    import jax
    from jax.ad_checkpoint import checkpoint_name

    from wanjax.models.attention import KERNEL_RESIDUAL_NAMES, dot_product_attention

    del impl
    b, s, h, d = q.shape
    c = _chunk_size(s, chunk)
    if c == s:
        return checkpoint_name(dot_product_attention(q, k, v, impl="xla", **kwargs), KERNEL_RESIDUAL_NAMES[0])

    @jax.checkpoint
    def one(qc):
        return dot_product_attention(qc, k, v, impl="xla", **kwargs)

    out = jax.lax.map(one, q.reshape(b, s // c, c, h, d).swapaxes(0, 1))
    return checkpoint_name(out.swapaxes(0, 1).reshape(b, s, h, d), KERNEL_RESIDUAL_NAMES[0])


def use_attention(kind: str) -> str:
    """Install the attention the step will compile with; returns what it is called in the report."""
    import jax

    from wanjax.models import transformer
    from wanjax.models.attention import dot_product_attention

    if kind == "auto":
        kind = "model" if jax.default_backend() in ("gpu", "tpu") else "chunked"
    transformer.dot_product_attention = chunked_attention if kind == "chunked" else dot_product_attention
    # The norms' row sums as GPU/TPU compile them (reductions): on CPU the model takes them as dots, faster there
    # but with XLA:CPU's extra float32 temporaries (+2.5 GiB for the 1.3B LoRA step), which a GPU never has.
    transformer._row_sum = transformer.row_sum_plain
    return {"chunked": "chunked (flash-attention stand-in)", "xla": "xla (materialised logits)"}.get(
        kind, "model (cuDNN flash on GPU)")


# -------------------------------------------------------------------------------------------------------------
# Analytic estimate
# -------------------------------------------------------------------------------------------------------------
def tree_bytes(tree, *, per_device: bool = True) -> int:
    """Bytes of a pytree of arrays / ShapeDtypeStructs; per device: each leaf's shard under its sharding."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        shape = x.shape
        sharding = getattr(x, "sharding", None)
        if per_device and sharding is not None:
            shape = sharding.shard_shape(shape)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


PASSES = {  # (largest batch multiple of a gradient-free pass, for the activation estimate), see `analytic`
    "lora": 1, "dmd": 2, "dmd_generator": 2, "dmd_critic": 1, "dcm": 2,
}


def analytic(model, method: str, *, tokens: int, batch: int, text_len: int, act_bytes: int, remat: str,
             base_bytes: int, state_bytes: int, batch_bytes: int, fsdp: int, block_bytes: int) -> dict:
    """A hand count of the step's peak per device, to sanity-check the compiled analysis.

    Per sample and block (S tokens, D width, F FFN width, L text tokens, act_bytes per activation element):
      residuals of one block for its backward ~ (15 S D + S F + 2 L D) elements + heads x S float32 (flash lse):
        LoRA'd projection inputs, q/k/v before and after norm + RoPE, attention outputs, norm inputs, GELU input
      backward transients ~ (4 S D + 2 S F) elements (incoming / outgoing gradients, GELU grad)
      forward-only pass (rollouts, teacher / critic scores, CFG at batch 2) ~ (4 S D + 2 S F) elements
    Saved across blocks: remat "full" (and "offload", on the device) the block inputs (L_blocks x S D); "dots" the
    matmul outputs (L_blocks x (7 S D + S F)); "attention" the block inputs and, per attention call (self and
    cross), its output and softmax statistics (L_blocks x (3 S D + 2 heads x S float32)); "projections" those and
    the attention layers' linear outputs (self q, k, v, out; cross q, out; the text k, v: L_blocks x (9 S D + 2 L D
    + 2 heads x S float32)); "matmuls" the FFN's hidden activation too (+ L_blocks x S F); "none" every block's
    residuals.
    activations = saved + max(one block's residuals + backward transients, forward-only pass at `PASSES` x batch)
    weights: base + trainable state per device (exact, from the shardings); with fsdp > 1 two gathered blocks of
    base weights in flight (current + prefetched); gradients + optimizer update transients ~ 2 x the trainables'
    parameters (bounded by the state bytes).
    Materialised attention (XLA, not flash) would add batch x heads x S^2 x 4 bytes x 2 (logits, probabilities)
    per pass: `attention_logits_bytes`.
    """
    S, D, F, H, nl = tokens, model.inner_dim, model.ffn_dim, model.num_attention_heads, model.num_layers
    residual = batch * ((15 * S * D + S * F + 2 * text_len * D) * act_bytes + H * S * 4)
    backward = batch * (4 * S * D + 2 * S * F) * act_bytes
    forward_only = PASSES[method] * batch * (4 * S * D + 2 * S * F) * act_bytes
    projections = nl * batch * ((9 * S * D + 2 * text_len * D) * act_bytes + 2 * H * S * 4)
    saved = {"full": nl * batch * S * D * act_bytes, "offload": nl * batch * S * D * act_bytes,
             "dots": nl * batch * (7 * S * D + S * F) * act_bytes,
             "attention": nl * batch * (3 * S * D * act_bytes + 2 * H * S * 4),
             "projections": projections,
             "matmuls": projections + nl * batch * S * F * act_bytes,
             "none": nl * residual}[remat]
    activations = saved + max(residual + backward, forward_only)
    gathered = 0 if fsdp == 1 else 2 * block_bytes
    grads = state_bytes // 2  # moments dominate the state; gradients + updates ~ one parameter copy each
    peak = base_bytes + state_bytes + batch_bytes + gathered + grads + activations
    return {
        "base_bytes": base_bytes, "trainable_state_bytes": state_bytes, "batch_bytes": batch_bytes,
        "gathered_weights_bytes": gathered, "grad_update_bytes": grads, "saved_activation_bytes": saved,
        "block_residual_bytes": residual, "backward_transient_bytes": backward, "forward_pass_bytes": forward_only,
        "activation_bytes": activations, "attention_logits_bytes": PASSES[method] * batch * H * S * S * 4 * 2,
        "peak_bytes": peak, "peak_GiB": round(peak / GiB, 2), "fits_80GB": peak <= FIT_LIMIT_BYTES,
    }


# -------------------------------------------------------------------------------------------------------------
# One measurement
# -------------------------------------------------------------------------------------------------------------
def measure(model_name: str, method: str, n_devices: int, args) -> dict:
    import jax
    import jax.numpy as jnp

    from wanjax.models.transformer import param_shapes
    from wanjax.sharding import batch_sharding, fsdp_shardings, make_mesh, param_shardings, replicated

    model = model_presets()[model_name].replace(remat_policy=args.remat)
    devices = jax.devices()
    if len(devices) < n_devices:
        devices = jax.devices("cpu")
    if len(devices) < n_devices:
        raise RuntimeError(f"{n_devices} devices requested, {len(devices)} available (set {COUNT_FLAG})")
    mesh = make_mesh(data=1, fsdp=n_devices, devices=devices[:n_devices])
    base_dtype = jnp.dtype(args.base_dtype)
    base = abstract_base(model, base_dtype, param_shardings(param_shapes(model), mesh))
    rep = replicated(mesh)
    embeds = {"empty": jax.ShapeDtypeStruct((args.text_len, model.text_dim), jnp.float32, sharding=rep)}
    overrides = {"lora_rank": args.rank, "lora_alpha": float(args.rank)} if args.rank else {}
    built, c = build_method(method, model, base, embeds, overrides)

    abstract_state = jax.eval_shape(built.init_state, jax.random.key(0))
    state_shardings = fsdp_shardings(abstract_state, mesh)
    state = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state,
                                   state_shardings)
    frames, height, width = args.frames, args.height, args.width
    lat = latent_shape(model, frames, height, width, args.batch * n_devices)
    if args.tokens:  # latent frames for about that many tokens at this height x width
        per_frame = (lat[3] // model.patch_size[1]) * (lat[4] // model.patch_size[2])
        lat = (*lat[:2], max(1, round(args.tokens / per_frame)) * model.patch_size[0], *lat[3:])
    batch = {"latents": jax.ShapeDtypeStruct(lat, jnp.float32, sharding=batch_sharding(mesh, 5)),
             "prompt_embeds": jax.ShapeDtypeStruct((lat[0], args.text_len, model.text_dim), jnp.float32,
                                                   sharding=batch_sharding(mesh, 3))}
    jitted = jax.jit(built.step, in_shardings=(state_shardings, None, None), out_shardings=(state_shardings, None),
                     donate_argnums=(0,))
    t0 = time.perf_counter()
    with mesh_context(mesh):
        compiled = jitted.lower(state, built.frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    peak = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    base_b, state_b = tree_bytes(base), tree_bytes(state)
    frozen_b, batch_b = tree_bytes(built.frozen), tree_bytes(batch)
    tokens = tokens_of(model, lat)
    act_bytes = 4 if base_dtype == jnp.float32 else 2
    est = analytic(model, method, tokens=tokens, batch=args.batch, text_len=args.text_len, act_bytes=act_bytes,
                   remat=model.remat_policy, base_bytes=base_b, state_bytes=state_b, batch_bytes=batch_b,
                   fsdp=n_devices, block_bytes=tree_bytes(base["blocks"], per_device=False) // model.num_layers)
    return {
        "model": model_name, "method": method, "devices": n_devices, "mesh": dict(mesh.shape),
        "backend": devices[0].platform, "attention": args.attention_label, "remat": model.remat_policy,
        "base_dtype": base_dtype.name, "latents_global": list(lat), "per_device_batch": args.batch,
        "tokens": tokens, "text_len": args.text_len, "lora_rank": int(c.lora_rank), "optimizer": c.optimizer,
        "use_ema": bool(c.use_ema), "compile_s": round(compile_s, 1),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "per_device": {
            "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
            "temp_bytes": mem.temp_size_in_bytes, "alias_bytes": mem.alias_size_in_bytes,
            "generated_code_bytes": mem.generated_code_size_in_bytes, "peak_estimate_bytes": peak,
            "peak_GiB": round(peak / GiB, 2),
            "expected_argument_bytes": state_b + frozen_b + batch_b,  # from the shardings: checks the sharding
        },
        "fits_80GB": peak <= FIT_LIMIT_BYTES,
        "analytic": est,
        "caveat": CAVEAT if devices[0].platform == "cpu" else "",
    }


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default="1.3b,14b", help="comma list of 1.3b, 14b, small, tiny, tiny-wide")
    ap.add_argument("--method", default="lora,dmd,dcm", help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--devices", default="1,8", help="comma list of mesh sizes (fsdp=N)")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--tokens", type=int, default=0, help="override the latent frames to get about this many tokens")
    ap.add_argument("--batch", type=int, default=1, help="per device (global = batch x devices)")
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--rank", type=int, default=0, help="LoRA rank (0: the method config's: lora 16, dmd/dcm 128)")
    ap.add_argument("--remat", default="full",
                    help="remat policy of the blocks: none | full | dots | offload | attention | projections | matmuls")
    ap.add_argument("--attention", choices=["auto", "xla", "chunked", "model"], default="auto",
                    help="auto: the model's kernel on GPU/TPU, the chunked flash stand-in on CPU")
    ap.add_argument("--base-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--cpu-licm", action="store_true",
                    help="keep XLA:CPU's while-loop-invariant code motion (off by default on CPU: it hoists the f32 "
                         "upcasts of whole stacked weights and saved activations out of the layer loops, buffers a "
                         "GPU program never has; ~2x the 1.3B LoRA temporaries)")
    args = ap.parse_args(argv)
    args.models = [m.strip() for m in args.model.split(",") if m.strip()]
    args.methods = [m.strip() for m in args.method.split(",") if m.strip()]
    args.device_counts = [int(n) for n in args.devices.split(",") if n.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        ap.error(f"unknown methods {bad}; expected {METHODS}")
    return args


def main(argv=None):
    args = parse_args(argv)
    ensure_xla_flags(max(args.device_counts), args.cpu_licm)
    sys.path.insert(0, str(ROOT))
    args.attention_label = use_attention(args.attention)
    for name in args.models:
        for method in args.methods:
            for n in args.device_counts:
                try:
                    row = measure(name, method, n, args)
                except Exception as e:  # noqa: BLE001 - one failure must not hide the other rows
                    row = {"model": name, "method": method, "devices": n, "error": f"{type(e).__name__}: {e}"[:2000]}
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
