"""scripts/toy_distill.py: the DMD / DCM toy benchmark (a tiny teacher on a synthetic latent mixture, then students).

The quick run checks the script end to end (final JSON line, every distance finite and above the data's own noise
floor); the slow run checks the benchmark's claim: each student is far closer to the data than the teacher's own
few-step sampler, and near the teacher's 50-step sampler (the README's table comes from the same default run).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("teacher_50", "teacher_fewstep", "dmd", "dcm")


def _run(*args, timeout):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one device: the script is single-device
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "toy_distill.py"), *args], capture_output=True,
                       text=True, timeout=timeout, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert list(out)[:4] == list(KEYS)
    return out


def test_quick_run_prints_the_result_line():
    out = _run("--quick", timeout=600)
    for k in (*KEYS, "data_vs_data"):
        assert math.isfinite(out[k]) and out[k] > 0, (k, out[k])
    # a sampler cannot be closer to the data than a fresh data sample is (the estimate's noise floor)
    assert all(out[k] > out["data_vs_data"] for k in KEYS), out


@pytest.mark.slow
def test_students_beat_the_few_step_teacher_and_approach_50_steps():
    out = _run(timeout=3000)
    for k in ("dmd", "dcm"):
        assert out[k] < 0.6 * out["teacher_fewstep"], out
        assert out[k] < 2.0 * out["teacher_50"], out
