"""Peak host memory of weight conversion and loading on a 1.3B-shaped random checkpoint. Prints JSON.

    python scripts/measure_convert_memory.py [--workdir /tmp/wanjax_mem] [--keep]

Writes a random Wan2.1-T2V-1.3B-shaped diffusers folder (bf16, diffusers' float32 modules in float32, sharded
like the release), then runs each step in a fresh process and reads its peak RSS (ru_maxrss):
diffusers -> wanjax, wanjax -> diffusers, and load_transformer (bf16, into the CPU device).
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

import wanjax
from wanjax.transformer_io import write_diffusers

WAN21_13B = dict(num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                 freq_dim=256, ffn_dim=8960, num_layers=30)


class RandomReader:
    """Random tensors generated on demand (never the whole model in memory)."""

    def __init__(self, config):
        self.config, self.source = config, "random"
        self.shapes = wanjax.transformer_io._shapes(config)

    def dtype(self, path):
        return np.dtype(np.float32)

    def read(self, path, layers=None):
        shape = self.shapes[path]
        if layers is not None:
            shape = (len(range(shape[0])[layers]), *shape[1:])
        rng = np.random.default_rng(abs(hash(path)) % 2**32)
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)


CHILD = r"""
import json, resource, sys
import jax.numpy as jnp
from wanjax.transformer_io import open_reader, write_wanjax, write_diffusers, load_transformer
step, src, dst = sys.argv[1:4]
if step == "to_wanjax":
    write_wanjax(open_reader(src), dst)
elif step == "to_diffusers":
    write_diffusers(open_reader(src), dst)
elif step == "load_bf16":
    config, params = load_transformer(src, dtype=jnp.bfloat16)
    [p.block_until_ready() for p in __import__("jax").tree_util.tree_leaves(params)]
elif step == "baseline":
    import jax; jax.numpy.zeros(1).block_until_ready()
print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run(step, src="", dst=""):
    r = subprocess.run([sys.executable, "-c", CHILD, step, str(src), str(dst)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{step} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_bytes"]


def folder_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.suffix == ".safetensors")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/wanjax_mem")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    config = wanjax.WanConfig(**WAN21_13B)
    import jax.numpy as jnp

    write_diffusers(RandomReader(config), work / "diffusers", dtype=jnp.bfloat16, max_shard_bytes=2 * 10**9)
    weights_bytes = folder_bytes(work / "diffusers")
    result = {
        "model": "Wan2.1-T2V-1.3B shape (random), bf16 + float32 modules",
        "weights_bytes": weights_bytes,
        "baseline_python_jax_rss_bytes": run("baseline"),
        "diffusers_to_wanjax_peak_rss_bytes": run("to_wanjax", work / "diffusers", work / "wanjax"),
        "wanjax_to_diffusers_peak_rss_bytes": run("to_diffusers", work / "wanjax", work / "back"),
        "load_transformer_bf16_peak_rss_bytes": run("load_bf16", work / "wanjax"),
    }
    for k in list(result):
        if k.endswith("_peak_rss_bytes"):
            result[k.replace("_bytes", "_over_weights")] = round(result[k] / weights_bytes, 3)
    print(json.dumps(result))
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
