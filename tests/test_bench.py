"""scripts/bench.py and scripts/memory_report.py run and report sane numbers (subprocesses, CPU)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: int = 600) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # memory_report sets its own device count; bench runs on one device
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_bench(report: dict, names: list[str]) -> None:
    for key in ("date", "device", "jax_version", "tokens", "params", "benchmarks"):
        assert key in report, key
    assert report["device"]["platform"] == "cpu"
    assert report["config"]["attention"] in ("cpu", "xla")  # the kernel "auto" resolved to, or the one asked for
    for name in names:
        b = report["benchmarks"][name]
        assert "error" not in b, (name, b)
        for key in ("step_time_s", "tokens_per_s", "analytic_flops", "tflops", "model_tflops", "compile_s"):
            assert _positive(b[key]), (name, key, b[key])
        assert b["mfu"] is None and b["peak_memory_bytes"] is None  # CPU: no peak, no memory stats
        assert len(b["step_times_s"]) == report["steps"]


def test_bench_tiny_with_torch(tmp_path):
    names = ["lora_train_step", "sample_step", "forward"]
    out = _run("bench.py", "--model", "tiny", "--steps", "2", "--warmup", "0", "--text-len", "16", "--bench",
               ",".join(names), "--vs-torch", "--profile", str(tmp_path / "prof"))
    report = json.loads(out)
    _check_bench(report, names)
    for name in names:  # --profile: each step traced after its timings, its ops summed per step
        prof = report["benchmarks"][name]["profile"]
        assert "error" not in prof, prof
        assert Path(prof["trace"]).is_relative_to(tmp_path / "prof" / name) and Path(prof["trace"]).is_file()
        host = prof["processes"][0]
        assert prof["steps"] == 2 and _positive(host["events_ms_per_step"]) and host["top"]
        assert all(_positive(op["ms_per_step"]) and not op["name"].startswith("$") for op in host["top"])
        assert any("fusion" in op["name"] or "dot" in op["name"] for op in host["top"])  # XLA's ops are there
    for side in ("torch_lora_train_step", "torch_forward"):
        prof = report[side]["profile"]
        assert "error" not in prof and prof["time"] == "self CPU time", prof
        assert any(op["name"].startswith("aten::") and _positive(op["ms_per_step"]) for op in prof["top"])
    assert report["config"]["attention"] == "cpu"  # auto on CPU
    torch_step = report["torch_lora_train_step"]
    assert "error" not in torch_step, torch_step
    assert _positive(torch_step["step_time_s"]) and _positive(report["ratio_torch_over_jax"])
    inter = torch_step["interleaved"]  # JAX and torch re-timed alternately
    assert len(inter["jax_step_times_s"]) == len(inter["torch_step_times_s"]) == report["steps"]
    assert report["ratio_torch_over_jax"] == inter["ratio_torch_over_jax"]
    # same adapter on both sides: rank 16 on attn1/attn2 q, k, v, out of every block
    assert torch_step["trainable_params"] == report["benchmarks"]["lora_train_step"]["trainable_params"]
    # the forward: one forward's FLOPs (half a CFG sampling step's), compared with torch's the same way
    fwd, sample = report["benchmarks"]["forward"], report["benchmarks"]["sample_step"]
    assert fwd["forward_equivalents"] == 1 and fwd["analytic_flops"] == sample["analytic_flops"] / 2
    torch_fwd = report["torch_forward"]
    assert "error" not in torch_fwd, torch_fwd
    assert _positive(torch_fwd["step_time_s"]) and len(torch_fwd["step_times_s"]) == report["steps"]
    assert len(torch_fwd["interleaved"]["torch_step_times_s"]) == report["steps"]
    assert report["forward_ratio_torch_over_jax"] == torch_fwd["interleaved"]["ratio_torch_over_jax"] > 0


@pytest.mark.slow
def test_bench_small_all():
    names = ["lora_train_step", "dmd_generator_step", "dmd_critic_step", "sample_step", "forward"]
    report = json.loads(_run("bench.py", "--small", "--steps", "2", "--vs-torch"))
    _check_bench(report, names)
    assert _positive(report["ratio_torch_over_jax"])
    g, c = report["benchmarks"]["dmd_generator_step"], report["benchmarks"]["dmd_critic_step"]
    assert g["forward_equivalents"] > c["forward_equivalents"] > report["benchmarks"]["lora_train_step"][
        "forward_equivalents"]


def test_bench_gemm_rates():
    """bench_gemm: each product timed in JAX, torch and numpy, GFLOP/s = 2 b m k n / time; the model's shapes."""
    report = json.loads(_run("bench_gemm.py", "--shapes", "24x16x8,3:8x32x16", "--calls", "3", "--warmup", "1"))
    assert report["device"]["platform"] == "cpu" and report["dtype"] == "float32"
    (a, b) = report["products"]
    assert (a["batch"], a["m"], a["k"], a["n"]) == (1, 24, 16, 8) and (b["batch"], b["m"], b["k"], b["n"]) == (3, 8, 32, 16)
    for row in (a, b):
        for fw in ("jax", "torch", "numpy"):
            assert _positive(row[f"{fw}_s"]), (fw, row)
            flops = 2 * row["batch"] * row["m"] * row["k"] * row["n"]
            assert math.isclose(row[f"{fw}_gflops"], flops / row[f"{fw}_s"] / 1e9, rel_tol=1e-9)
        assert math.isclose(row["ratio_torch_over_jax"], row["torch_s"] / row["jax_s"], rel_tol=1e-9)
    tiny = json.loads(_run("bench_gemm.py", "--model", "tiny", "--no-torch", "--calls", "1", "--warmup", "0"))
    names = [r["name"] for r in tiny["products"]]
    assert "ffn in S x D x F" in names and "self P V" in names
    ffn = tiny["products"][names.index("ffn in S x D x F")]
    self_pv = tiny["products"][names.index("self P V")]
    assert "torch_s" not in ffn and ffn["k"] == 32 and ffn["n"] == 64  # tiny: width 2 x 16, FFN 64
    assert self_pv["batch"] == 2 and self_pv["k"] == self_pv["m"] and self_pv["n"] == 16  # heads, S x S x head_dim


def test_gpu_targets_refuses_unknown_part(tmp_path):
    """scripts/gpu_targets.sh names the part it does not know and what it expected, and runs nothing."""
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_targets.sh"), str(tmp_path / "out"), "bogus"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown part 'bogus'" in proc.stderr and "dmd14b" in proc.stderr
    assert list((tmp_path / "out").iterdir()) == []
    usage = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_targets.sh")], capture_output=True, text=True,
                           timeout=60)
    assert usage.returncode != 0 and "usage" in usage.stderr


def test_bench_attention_measures_a_kernel_against_float32(capsys):
    """scripts/bench_attention.py on CPU (XLA's attention, float32 and bf16 operands): times and TFLOP/s of forward
    and forward + backward, and the errors of the output and of dq / dk / dv against its float32 reference, which
    are float32-small for float32 operands and bf16-sized for bf16 ones (so the comparison sees the operands'
    rounding); an unknown kernel is refused by name."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_attention

    errs = {}
    for dtype in ("float32", "bfloat16"):
        assert bench_attention.main(["--seq", "200", "--heads", "2", "--head-dim", "32", "--impls", "xla",
                                     "--dtype", dtype, "--steps", "1", "--check-queries", "64"]) == 0
        report = json.loads(capsys.readouterr().out)
        xla = report["kernels"]["xla"]
        assert report["shape_bshd"] == [1, 200, 2, 32] and xla["seq"] == 200
        assert xla["forward"]["time_s"] > 0 and xla["forward_backward"]["tflops"] > 0
        errs[dtype] = xla["error_vs_float32"]
    assert errs["float32"]["queries"] == 64
    assert max(v for k, v in errs["float32"].items() if k != "queries") < 1e-5, errs
    assert all(1e-4 < errs["bfloat16"][k] < 3e-2 for k in ("out", "dq", "dk", "dv")), errs
    with pytest.raises(SystemExit, match="unknown kernel 'flash'"):
        bench_attention.main(["--seq", "64", "--impls", "flash"])


def _rows(out: str) -> dict:
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    for r in rows:
        assert "error" not in r, r
    return {r["devices"]: r for r in rows}


def test_memory_report_sharding_divides_arguments():
    """fsdp=8 holds ~1/8 of the base and trainables per device: a check that the arguments really are sharded."""
    out = _run("memory_report.py", "--model", "tiny-wide", "--method", "lora", "--devices", "1,8", "--frames", "5",
               "--height", "32", "--width", "32", "--text-len", "8")
    rows = _rows(out)
    one, eight = rows[1], rows[8]
    for r in (one, eight):
        pd = r["per_device"]
        for key in ("argument_bytes", "output_bytes", "temp_bytes", "peak_estimate_bytes"):
            assert _positive(pd[key]), (key, pd[key])
        assert pd["argument_bytes"] == pd["expected_argument_bytes"]  # the layout we asked for, per device
        assert r["fits_80GB"] is True and r["analytic"]["fits_80GB"] is True
        assert pd["peak_estimate_bytes"] == (pd["argument_bytes"] + pd["temp_bytes"] + pd["output_bytes"]
                                             - pd["alias_bytes"])
    assert eight["mesh"]["fsdp"] == 8 and eight["latents_global"][0] == 8  # batch 1 per device
    ratio = eight["per_device"]["argument_bytes"] / one["per_device"]["argument_bytes"]
    assert 1 / 8 <= ratio < 0.16, ratio
    assert eight["analytic"]["base_bytes"] < one["analytic"]["base_bytes"] / 6


def test_dot_flops_counts_scan_iterations_and_refuses_what_it_cannot_count():
    import jax
    import jax.numpy as jnp

    import reference as ref

    x, w = jnp.ones((4, 8)), jnp.ones((8, 8))
    scanned = lambda x, w: jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=3)[0]  # noqa: E731
    assert ref.dot_flops(scanned, x, w) == 3 * 2 * 4 * 8 * 8
    same = lambda p, x, w: jax.lax.cond(p, lambda: x @ w, lambda: 2 * (x @ w))  # noqa: E731
    assert ref.dot_flops(same, True, x, w) == 2 * 4 * 8 * 8
    with pytest.raises(ValueError, match="branches run different products"):
        ref.dot_flops(lambda p, x, w: jax.lax.cond(p, lambda: x @ w, lambda: x), True, x, w)
    with pytest.raises(ValueError, match="while loop"):
        ref.dot_flops(lambda x, w: jax.lax.while_loop(lambda c: c[0, 0] < 9, lambda c: c @ w, x), x, w)


@pytest.mark.parametrize("remat, targets", [("none", "to_q,to_k,to_v,to_out.0"), ("full", "to_q,to_k,to_v,to_out.0"),
                                            ("attention", "to_q,to_k,to_v,to_out.0"),
                                            ("projections", "attn1.to_q,attn2.to_v,ffn.net.0.proj,ffn.net.2"),
                                            ("matmuls", "to_q,to_k,to_v,to_out.0"),
                                            ("full", "attn1.to_q,attn2.to_v,ffn.net.0.proj,ffn.net.2")])
def test_analytic_flops_are_the_products_the_step_runs(monkeypatch, remat, targets):
    """bench's FLOP formulas (behind its TFLOP/s and MFU) against the products in the jaxprs it times: the forward
    exactly; the LoRA step (AdamW; LoRA on attn1 / attn2 q, k, v, out, or on some of them and the FFN) exactly =
    forward + the frozen-base backward (`frozen_base_flops`) + what this implementation recomputes: the `cpu`
    attention kernel's backward recomputes its scores (Q K^T), and remat runs the blocks' forward again (the part its
    policy does not keep). Row sums as plain reductions (on CPU they are dots, `row_sum_dot`, which are not matrix
    products of the model). Targets outside the blocks are refused, not miscounted."""
    import jax
    import jax.numpy as jnp

    import reference as ref

    sys.path.insert(0, str(ROOT / "scripts"))
    import bench
    from memory_report import build_method, latent_shape, model_presets, tokens_of

    import wanjax
    from wanjax.models import transformer

    monkeypatch.setattr(transformer, "_row_sum", transformer.row_sum_plain)
    # width != text_dim != ffn, S != L, so a misplaced factor shows
    model = model_presets()["tiny"].replace(remat_policy=remat, attention="cpu", text_dim=40, ffn_dim=56)
    shape = latent_shape(model, *bench.SHAPES["tiny"], 1)
    S, L = tokens_of(model, shape), 24
    base = wanjax.param_shapes(model)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    ctx = jax.ShapeDtypeStruct((1, L, model.text_dim), jnp.float32)
    fwd = ref.dot_flops(lambda p, x, c: wanjax.transformer_forward(model, p, x, jnp.ones((1,)), c), base, x, ctx)
    assert fwd == bench.forward_flops(model, S, L)
    with pytest.raises(ValueError, match="not 'proj_out'"):
        bench.forward_flops(model, S, L, 4, ("attn1.to_q", "proj_out"))

    built, c = build_method("lora", model, base, {"empty": jnp.zeros((L, model.text_dim))},
                            {"optimizer": "adamw", "grad_clip_method": "none", "use_ema": False,
                             "lora_target_modules": targets})
    rank, targets = int(c.lora_rank), tuple(built.meta["lora"]["targets"])
    assert len(targets) in (4, 8) and rank > 0
    state = jax.eval_shape(built.init_state, jax.random.key(0))
    step = ref.dot_flops(built.step, state, built.frozen, {"latents": x, "prompt_embeds": ctx})
    executed, conventional, frozen = bench.train_pass(model, S, L, rank, targets)
    D, F = model.inner_dim, model.ffn_dim
    scores = model.num_layers * (2 * S * S + 2 * S * L) * D  # Q K^T again in the kernel's backward
    # remat: each block's forward again but its last product (FFN out: the block's output is the next one's input,
    # kept), and under "attention" but the attention cores (their outputs and statistics are kept)
    last = 2 * S * F * D + (2 * S * rank * D if "ffn.net.2" in targets else 0)  # with its adapter's B product
    blocks = model.num_layers * (bench.block_flops(model, S, L, rank, targets) - last)
    # "projections": each block's FFN up-projection, and its adapter's B product where it has one ((x A) is kept)
    up = model.num_layers * (2 * S * D * F + (2 * S * rank * F if "ffn.net.0.proj" in targets else 0))
    again = {"none": 0, "full": blocks, "attention": blocks - bench.attention_core_flops(model, S, L),
             "projections": up, "matmuls": 0}[remat]
    assert step == frozen + scores + again
    assert executed == conventional + again and frozen < conventional


def test_peak_tflops_by_device_kind():
    """MFU's peak by jax's device_kind: the H100 variants apart (PCIe and NVL are slower than SXM), none on CPU or
    an unknown kind (MFU is then null, never a guess)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench

    for kind, peak in (("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
                       ("NVIDIA H200", 989.0), ("NVIDIA GH200 480GB", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                       ("TPU v5 lite", 197.0), ("TPU v5p", 459.0), ("TPU v6 lite", 918.0), ("TPU v4", 275.0)):
        assert bench.peak_tflops_for(kind, "gpu" if "NVIDIA" in kind else "tpu") == peak, kind
    assert bench.peak_tflops_for("NVIDIA RTX 9999", "gpu") is None
    assert bench.peak_tflops_for("cpu", "cpu") is None


def test_profile_summary_sums_a_trace_per_step(tmp_path):
    """profile_summary over a known trace: events summed by name per process and divided by the steps, device
    kernels also by their XLA op, Python frames ("$...") left out; no trace is a clear error."""
    import gzip

    sys.path.insert(0, str(ROOT / "scripts"))
    import profile_summary

    with pytest.raises(FileNotFoundError, match="trace.json.gz"):
        profile_summary.summarise_jax_trace(tmp_path, steps=2)
    run = tmp_path / "plugins" / "profile" / "2026_11_22"
    run.mkdir(parents=True)
    events = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "X", "pid": 1, "tid": 1, "name": "$bench.py:10 call", "ts": 0, "dur": 9000},
        {"ph": "X", "pid": 1, "tid": 2, "name": "fusion.1", "ts": 0, "dur": 1000},
        {"ph": "X", "pid": 1, "tid": 2, "name": "fusion.1", "ts": 5, "dur": 3000},
        {"ph": "X", "pid": 2, "tid": 7, "name": "sm90_gemm_kernel", "ts": 0, "dur": 6000, "args": {"hlo_op": "dot.3"}},
        {"ph": "X", "pid": 2, "tid": 7, "name": "sm90_gemm_kernel", "ts": 9, "dur": 2000, "args": {"hlo_op": "dot.4"}},
        {"ph": "X", "pid": 2, "tid": 7, "name": "flash_fprop", "ts": 20, "dur": 10000, "args": {"hlo_op": "cudnn.1"}},
        {"ph": "i", "pid": 2, "tid": 7, "name": "marker", "ts": 30},
    ]
    with gzip.open(run / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    out = profile_summary.summarise_jax_trace(tmp_path, steps=2, top=2)
    gpu, host = out["processes"]  # busiest first
    assert gpu["process"] == "/device:GPU:0" and gpu["events_ms_per_step"] == 9.0
    assert gpu["top"] == [{"name": "flash_fprop", "ms_per_step": 5.0, "calls_per_step": 0.5},
                          {"name": "sm90_gemm_kernel", "ms_per_step": 4.0, "calls_per_step": 1.0}]
    assert gpu["top_hlo_ops"] == [{"hlo_op": "cudnn.1", "ms_per_step": 5.0}, {"hlo_op": "dot.3", "ms_per_step": 3.0}]
    assert host == {"process": "/host:CPU", "events_ms_per_step": 2.0,
                    "top": [{"name": "fusion.1", "ms_per_step": 2.0, "calls_per_step": 1.0}]}
