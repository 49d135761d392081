"""Where a benchmarked step's time goes: the ops of a JAX profiler trace and of a torch profile, per step, as JSON.

bench.py --profile DIR calls these after timing: `jax_profile` traces a few calls with jax.profiler (the trace, for
TensorBoard / Perfetto, stays in DIR) and sums the trace's events by name for each process in it (the host, and on a
GPU its device: there each event is a kernel, and its `hlo_op` names the XLA op it runs); `torch_profile` does the
same for a torch step with torch.profiler (self time per op: device time on CUDA, CPU time otherwise). Events nest
on the host (a program's thunks inside its execution), so a host process's sums overlap; a device's kernels do not
(one stream). Nothing is measured here that the timings rely on: profiling runs after them.
"""

from __future__ import annotations

import collections
import gzip
import json
from pathlib import Path

NAME_CHARS = 160  # kernel names (cutlass, cuDNN) run to hundreds of characters


def _short(name: str) -> str:
    return name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 3] + "..."


def summarise_jax_trace(trace_dir: str | Path, steps: int, top: int = 25) -> dict:
    """Per process of the newest trace under `trace_dir`: its events' summed time per step (ms) and the `top` event
    names by time, with calls per step; GPU kernels also grouped by the XLA op (`hlo_op`) they belong to."""
    traces = sorted(Path(trace_dir).glob("plugins/profile/*/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}/plugins/profile: did jax.profiler write one?")
    with gzip.open(traces[-1], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    process = {e["pid"]: e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name" and "args" in e}
    time_us = collections.defaultdict(lambda: collections.defaultdict(float))
    calls = collections.defaultdict(collections.Counter)
    by_op = collections.defaultdict(lambda: collections.defaultdict(float))
    for e in events:
        if e.get("ph") != "X" or "dur" not in e or e["name"].startswith("$"):  # "$file.py:line": Python frames
            continue
        pname = process.get(e.get("pid"), str(e.get("pid")))
        time_us[pname][e["name"]] += float(e["dur"])
        calls[pname][e["name"]] += 1
        hlo_op = (e.get("args") or {}).get("hlo_op")
        if hlo_op:
            by_op[pname][hlo_op] += float(e["dur"])
    processes = []
    for pname, times in time_us.items():
        ranked = sorted(times.items(), key=lambda kv: -kv[1])
        entry = {
            "process": pname, "events_ms_per_step": round(sum(times.values()) / steps / 1e3, 3),
            "top": [{"name": _short(n), "ms_per_step": round(t / steps / 1e3, 4),
                     "calls_per_step": round(calls[pname][n] / steps, 2)} for n, t in ranked[:top]],
        }
        if by_op[pname]:
            entry["top_hlo_ops"] = [{"hlo_op": _short(n), "ms_per_step": round(t / steps / 1e3, 4)}
                                    for n, t in sorted(by_op[pname].items(), key=lambda kv: -kv[1])[:top]]
        processes.append(entry)
    processes.sort(key=lambda p: -p["events_ms_per_step"])
    return {"trace": str(traces[-1]), "steps": steps, "processes": processes}


def jax_profile(call, steps: int, trace_dir: str | Path, top: int = 25) -> dict:
    """Trace `steps` calls of `call` (each blocks itself) with jax.profiler into `trace_dir`; their summary."""
    import jax

    Path(trace_dir).mkdir(parents=True, exist_ok=True)
    try:
        options = jax.profiler.ProfileOptions()
        options.python_tracer_level = 0  # XLA's ops and kernels, not Python frames (they are filtered out anyway)
        kwargs = {"profiler_options": options}
    except (AttributeError, TypeError):  # a JAX without ProfileOptions
        kwargs = {}
    with jax.profiler.trace(str(trace_dir), **kwargs):
        for _ in range(steps):
            call()
    return summarise_jax_trace(trace_dir, steps, top)


def torch_profile(call, steps: int, top: int = 25) -> dict:
    """torch.profiler over `steps` calls of `call` (each synchronises itself): the `top` ops by self time per step
    (device time when CUDA ran, else CPU time), with calls per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            call()
    rows = prof.key_averages()

    def self_us(r) -> float:
        if cuda:
            return float(getattr(r, "self_device_time_total", getattr(r, "self_cuda_time_total", 0.0)))
        return float(r.self_cpu_time_total)

    ranked = sorted(rows, key=lambda r: -self_us(r))
    return {
        "steps": steps, "time": "self device (CUDA) time" if cuda else "self CPU time",
        "ops_ms_per_step": round(sum(self_us(r) for r in rows) / steps / 1e3, 3),
        "top": [{"name": _short(r.key), "ms_per_step": round(self_us(r) / steps / 1e3, 4),
                 "calls_per_step": round(r.count / steps, 2)} for r in ranked[:top] if self_us(r) > 0],
    }
