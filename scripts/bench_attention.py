"""Attention kernels alone at Wan's self-attention shape; prints one JSON document.

    python scripts/bench_attention.py                        # 1.3B at 480x832x81: B=1, S=32760, 12 heads x 128, bf16
    python scripts/bench_attention.py --seq 4096 --impls xla # smaller / CPU

Per kernel: the forward, and forward + backward (the gradient of <out, ct> with respect to q, k, v), median wall
times over --steps calls, with TFLOP/s counted as the model's products (forward 4 B H S^2 D; forward + backward 3
forwards, the MFU convention; a flash backward runs 2.5 forwards of products, recomputing the scores), and the
largest error of the output and of dq / dk / dv against float32 XLA attention, over the first --check-queries queries
(the reference's gradients use a cotangent that is zero elsewhere), relative to the reference's largest magnitude.

Kernels (--impls):
  cudnn   jax.nn.dot_product_attention(implementation="cudnn"), what wanjax's `auto` runs on NVIDIA GPUs
  xla     jax.nn.dot_product_attention(implementation="xla") (materialises the S x S scores: short --seq only)
  mosaic  the Pallas Mosaic GPU FlashAttention-3 kernel (jax.experimental.pallas.ops.gpu.attention_mgpu, Hopper),
          one entry per tile config (`mosaic:BQ:BKV` forward tiles; backward tiles of its tests). It stages its
          operands in float16 shared memory (so they are given in float16) and needs the sequence to be a multiple
          of its tiles: it runs on the largest such prefix, reported as `seq` (the rate is comparable, the shape
          is not exactly Wan's). Its scores are not scaled: q is pre-scaled by 1/sqrt(D).
A kernel that fails is reported as {"error": ...}; the others still run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MOSAIC_FWD_TILES = ((64, 128), (64, 256))
MOSAIC_BWD_TILES = (64, 128, 128, 64)  # block_q_dq, block_kv_dq, block_q_dkv, block_kv_dkv (as JAX's tests)


def log(msg: str) -> None:
    print(f"[bench_attention] {msg}", file=sys.stderr, flush=True)


def timed(fn, args, steps: int, warmup: int) -> tuple[float, list[float], float]:
    """(median, times, compile seconds) of `steps` blocking calls of fn(*args) after the compiling call and `warmup`."""
    import jax

    from bench import time_calls

    def call():
        jax.block_until_ready(fn(*args))

    t0 = time.perf_counter()
    call()
    compile_s = time.perf_counter() - t0
    times = time_calls(call, steps, warmup)
    return statistics.median(times), times, compile_s


def reference(q, k, v, ct, n: int):
    """float32 softmax attention of the first n queries, and its gradients for the cotangent ct[:, :n]."""
    import jax
    import jax.numpy as jnp

    f32 = jnp.float32

    def attend(q, k, v):
        s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(f32), k.astype(f32)) * q.shape[-1] ** -0.5
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v.astype(f32))

    out, vjp = jax.vjp(attend, q[:, :n], k, v)
    dq, dk, dv = vjp(ct[:, :n].astype(f32))
    return out, dq, dk, dv


def rel_err(got, want) -> float:
    import jax.numpy as jnp

    return float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)) / jnp.maximum(jnp.max(jnp.abs(want)), 1e-30))


def kernels(impls: list[str]):
    """name -> (attend(q, k, v) on the given arrays, operand dtype or None for the input's, sequence multiple)."""
    import jax
    import jax.numpy as jnp

    out = {}
    for name in impls:
        if name in ("cudnn", "xla"):
            out[name] = (lambda q, k, v, impl=name: jax.nn.dot_product_attention(q, k, v, implementation=impl),
                         None, 1)
        elif name == "mosaic":
            from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu

            bq_dq, bkv_dq, bq_dkv, bkv_dkv = MOSAIC_BWD_TILES
            for bq, bkv in MOSAIC_FWD_TILES:
                config = mgpu.TuningConfig(block_q=bq, block_kv=bkv, max_concurrent_steps=2, compute_wgs_bwd=2,
                                           block_q_dq=bq_dq, block_kv_dq=bkv_dq, block_q_dkv=bq_dkv,
                                           block_kv_dkv=bkv_dkv)

                def attend(q, k, v, config=config):
                    scaled = (q.astype(jnp.float32) * q.shape[-1] ** -0.5).astype(q.dtype)
                    return mgpu.attention(scaled, k, v, config)

                multiple = max(2 * bq, bkv, 2 * bq_dq, 2 * bkv_dkv, bq_dkv, bkv_dq)
                out[f"mosaic:{bq}:{bkv}"] = (attend, jnp.float16, multiple)
        else:
            raise SystemExit(f"unknown kernel {name!r}: expected cudnn, xla or mosaic")
    return out


def bench_kernel(attend, dtype, multiple, q, k, v, ct, refs: dict, args) -> dict:
    """Times of one kernel; `refs` caches the float32 reference per sequence length."""
    import jax
    import jax.numpy as jnp

    seq = q.shape[1] // multiple * multiple
    if seq != q.shape[1]:
        q, k, v, ct = (x[:, :seq] for x in (q, k, v, ct))
    n = min(args.check_queries, seq)
    if n and seq not in refs:
        refs[seq] = reference(q, k, v, ct, n)
    if dtype is not None:
        q, k, v, ct = (x.astype(dtype) for x in (q, k, v, ct))
    b, s, h, d = q.shape
    fwd_flops = 4.0 * b * h * s * s * d
    forward = jax.jit(attend)

    def loss(q, k, v, ct):
        return jnp.sum(attend(q, k, v).astype(jnp.float32) * ct.astype(jnp.float32))

    train = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    report = {"seq": s, "operand_dtype": str(q.dtype)}
    t, times, c = timed(forward, (q, k, v), args.steps, args.warmup)
    report["forward"] = {"time_s": t, "times_s": [round(x, 6) for x in times], "compile_s": round(c, 2),
                         "tflops": fwd_flops / t / 1e12}
    t, times, c = timed(train, (q, k, v, ct), args.steps, args.warmup)
    report["forward_backward"] = {"time_s": t, "times_s": [round(x, 6) for x in times], "compile_s": round(c, 2),
                                  "tflops": 3 * fwd_flops / t / 1e12,
                                  "backward_time_s": t - report["forward"]["time_s"]}
    report["error_vs_float32"] = None
    if n:
        r_out, r_dq, r_dk, r_dv = refs[seq]
        out = forward(q, k, v)[:, :n]
        ct_n = jnp.zeros_like(ct).at[:, :n].set(ct[:, :n])
        dq, dk, dv = train(q, k, v, ct_n)
        report["error_vs_float32"] = {"queries": n, "out": rel_err(out, r_out), "dq": rel_err(dq[:, :n], r_dq),
                                      "dk": rel_err(dk, r_dk), "dv": rel_err(dv, r_dv)}
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=32760, help="tokens (480x832x81 on Wan's VAE and patch: 32,760)")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--impls", default="cudnn,mosaic", help="comma list of cudnn, xla, mosaic")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--check-queries", type=int, default=512, help="queries compared with float32 (0: none)")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    shape = (args.batch, args.seq, args.heads, args.head_dim)
    keys = jax.random.split(jax.random.key(0), 4)
    # q, k as after Wan's RMSNorm (unit RMS per head), v and the cotangent unit normal
    q, k, v, ct = (jax.random.normal(key, shape, jnp.float32).astype(args.dtype) for key in keys)
    refs = {}
    device = jax.devices()[0]
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": device.device_kind, "jax": jax.__version__,
              "shape_bshd": list(shape), "dtype": args.dtype, "steps": args.steps,
              "flops_note": "forward 4 B H S^2 D; forward_backward 3x that (MFU convention)", "kernels": {}}
    for name, (attend, dtype, multiple) in kernels(args.impls.split(",")).items():
        log(f"{name} ...")
        try:
            report["kernels"][name] = bench_kernel(attend, dtype, multiple, q, k, v, ct, refs, args)
        except Exception as e:  # noqa: BLE001 - one kernel's failure is reported, the others still run
            report["kernels"][name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        log(json.dumps(report["kernels"][name])[:400])
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
