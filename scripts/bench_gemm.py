"""Matrix-product rates of JAX (XLA) and torch at the Wan transformer's shapes; prints one JSON document.

    python scripts/bench_gemm.py                   # CPU: the small model (768 tokens, width 256); GPU: 1.3B
    python scripts/bench_gemm.py --model 1.3b --dtype bfloat16
    python scripts/bench_gemm.py --shapes 768x256x1024,4:768x64x768   # [batch:]MxKxN, batch = heads
    taskset -c 0 python scripts/bench_gemm.py --torch-threads 1       # one core for both

What the step benchmarks (scripts/bench.py) are made of: every product of a block's forward at the model's
token count S, text length L, width D, FFN width F and heads H x head_dim d:
  linear  S x D x D (q, k, v, out), S x D x F and S x F x D (FFN), L x D x D (text keys / values)
  attn    H batched S x d x S (Q K^T), S x S x d (P V), S x d x L and S x L x d (cross-attention)
For each: JAX (one jitted product, blocked on), torch (torch.mm / torch.bmm on the same device, --torch-threads)
and, on CPU in float32, numpy (its BLAS), each framework over all shapes in turn: the median time of --calls calls after --warmup, and GFLOP/s =
2 batch M K N / time. `ratio_torch_over_jax` > 1: JAX's product is faster.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def model_shapes(model, tokens: int, text_len: int) -> list[tuple[str, int, int, int, int]]:
    """(name, batch, M, K, N) of one block's products at `tokens` video and `text_len` text tokens."""
    S, L, D, F = tokens, text_len, model.inner_dim, model.ffn_dim
    H, d = model.num_attention_heads, model.attention_head_dim
    return [
        ("linear S x D x D", 1, S, D, D), ("ffn in S x D x F", 1, S, D, F), ("ffn out S x F x D", 1, S, F, D),
        ("text kv L x D x D", 1, L, D, D),
        ("self Q K^T", H, S, d, S), ("self P V", H, S, S, d),
        ("cross Q K^T", H, S, d, L), ("cross P V", H, S, L, d),
    ]


def parse_shapes(spec: str) -> list[tuple[str, int, int, int, int]]:
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        batch, _, mkn = item.rpartition(":")
        try:
            m, k, n = (int(x) for x in mkn.split("x"))
            b = int(batch) if batch else 1
        except ValueError:
            raise SystemExit(f"--shapes: {item!r} is not [batch:]MxKxN (e.g. 768x256x1024 or 4:768x64x768)")
        if min(b, m, k, n) < 1:
            raise SystemExit(f"--shapes: {item!r} has a size below 1")
        out.append((item, b, m, k, n))
    return out


def median_time(call, calls: int, warmup: int) -> float:
    from bench import time_calls

    return statistics.median(time_calls(call, calls, warmup))


def gflops(row: dict, seconds: float) -> float:
    return 2.0 * row["batch"] * row["m"] * row["k"] * row["n"] / seconds / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default=None, help="shapes of this preset (1.3b, 14b, small, tiny; default: small "
                                                  "on CPU, 1.3b elsewhere) at bench.py's clip for it")
    ap.add_argument("--shapes", default=None, help="instead of --model: comma list of [batch:]MxKxN")
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="default: float32 on CPU, bfloat16 elsewhere")
    ap.add_argument("--calls", type=int, default=30, help="timed calls per product (median reported)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true", help="JAX only")
    ap.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = ap.parse_args(argv)
    if not args.no_torch:  # as bench.py: JAX's default 75% GPU preallocation would starve torch in this process
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench import SHAPES
    from memory_report import latent_shape, model_presets, tokens_of

    dev = jax.devices()[0]
    on_cpu = dev.platform == "cpu"
    dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    if args.shapes:
        shapes, source = parse_shapes(args.shapes), "--shapes"
    else:
        name = args.model or ("small" if on_cpu else "1.3b")
        presets = model_presets()
        if name not in presets or name not in SHAPES:
            raise SystemExit(f"--model {name!r}: expected one of {sorted(set(presets) & set(SHAPES))}")
        model = presets[name]
        frames, height, width = SHAPES[name]
        tokens = tokens_of(model, latent_shape(model, frames, height, width, 1))
        shapes, source = model_shapes(model, tokens, args.text_len), f"{name}: {tokens} tokens, text {args.text_len}"

    # One framework at a time over all shapes: a BLAS's worker threads spin for a while after each call, and
    # timing JAX right after torch or numpy measured that contention (JAX's rates fell by up to half).
    rng = np.random.default_rng(0)
    operands = []
    for label, b, m, k, n in shapes:
        a_np = rng.standard_normal((b, m, k), dtype=np.float32)
        b_np = rng.standard_normal((b, k, n), dtype=np.float32)
        if b == 1:  # a linear layer: (B, S, D) @ (D, F) folds B and S into M, no batch dimension
            a_np, b_np = a_np[0], b_np[0]
        operands.append((a_np, b_np))
    rows = [{"name": label, "batch": b, "m": m, "k": k, "n": n} for label, b, m, k, n in shapes]
    product = jax.jit(jnp.matmul)
    for row, (a_np, b_np) in zip(rows, operands):
        a, w = jnp.asarray(a_np, dtype), jnp.asarray(b_np, dtype)
        row["jax_s"] = median_time(lambda: product(a, w).block_until_ready(), args.calls, args.warmup)
        row["jax_gflops"] = gflops(row, row["jax_s"])

    torch = None
    if not args.no_torch:
        import torch

        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
    torch_device = "cuda" if (torch is not None and dev.platform == "gpu" and torch.cuda.is_available()) else "cpu"
    if torch is not None:
        tdt = getattr(torch, dtype)
        sync = torch.cuda.synchronize if torch_device == "cuda" else (lambda: None)
        with torch.inference_mode():
            for row, (a_np, b_np) in zip(rows, operands):
                ta, tb = (torch.from_numpy(x).to(torch_device, tdt) for x in (a_np, b_np))
                mm = torch.mm if row["batch"] == 1 else torch.bmm

                def torch_call(mm=mm, ta=ta, tb=tb):
                    mm(ta, tb)
                    sync()

                row["torch_s"] = median_time(torch_call, args.calls, args.warmup)
                row["torch_gflops"] = gflops(row, row["torch_s"])
                row["ratio_torch_over_jax"] = row["torch_s"] / row["jax_s"]
    if on_cpu and dtype == "float32":
        for row, (a_np, b_np) in zip(rows, operands):
            row["numpy_s"] = median_time(lambda: np.matmul(a_np, b_np), args.calls, args.warmup)
            row["numpy_gflops"] = gflops(row, row["numpy_s"])

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"platform": dev.platform, "kind": dev.device_kind, "host": platform.processor() or platform.machine(),
                   "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0))},
        "jax_version": jax.__version__, "torch_version": None if torch is None else torch.__version__,
        "torch_device": None if torch is None else torch_device,
        "torch_threads": None if torch is None else torch.get_num_threads(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "dtype": dtype, "shapes_from": source,
        "calls": args.calls, "warmup": args.warmup, "products": rows,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
