"""Conversion + forward demo on a tiny random Wan model, offline and torch-free.

    python scripts/demo.py [--out outputs/demo]

random params -> diffusers folder (save_transformer) -> wanjax checkpoint (converter) -> load_transformer ->
jitted forward -> diffusers folder again, checked bit-identical. Prints one JSON line.
"""

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import wanjax
from wanjax import safetensors_io as stio
from wanjax.transformer_io import open_reader, write_diffusers, write_wanjax

TINY = dict(num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16, text_dim=32, ffn_dim=128,
            num_layers=2, rope_max_seq_len=64)


def tensors(folder: Path) -> dict:
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    store = stio.TensorStore.from_index(index) if index.exists() else stio.TensorStore.from_paths(
        [folder / "diffusion_pytorch_model.safetensors"])
    return {k: store.read(k) for k in store.keys()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/demo")
    args = ap.parse_args()
    out = Path(args.out)

    config = wanjax.WanConfig(**TINY)
    params = wanjax.init_params(config, jax.random.key(0), dtype=jnp.bfloat16)
    wanjax.save_transformer(config, params, out / "diffusers", overwrite=True)
    write_wanjax(open_reader(out / "diffusers"), out / "wanjax", overwrite=True)
    config, params = wanjax.load_transformer(out / "wanjax", dtype=None)

    key = jax.random.key(1)
    latents = jax.random.normal(key, (1, 16, 5, 16, 16), jnp.float32)  # 5 latent frames = 17 video frames
    text = jax.random.normal(key, (1, 512, 32), jnp.float32)
    forward = jax.jit(wanjax.transformer_forward)
    t0 = time.perf_counter()
    v = forward(config, params, latents, jnp.array([500.0]), text).block_until_ready()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    v = forward(config, params, latents, jnp.array([250.0]), text).block_until_ready()
    step_s = time.perf_counter() - t0

    write_diffusers(open_reader(out / "wanjax"), out / "diffusers_again", overwrite=True)
    a, b = tensors(out / "diffusers"), tensors(out / "diffusers_again")
    identical = set(a) == set(b) and all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)
    summary = {
        "velocity_shape": list(v.shape),
        "velocity_finite": bool(np.isfinite(np.asarray(v, np.float32)).all()),
        "compile_plus_first_call_s": round(compile_s, 3),
        "second_call_s": round(step_s, 4),
        "tensors": len(a),
        "round_trip_bit_identical": identical,
        "out": str(out),
    }
    print(json.dumps(summary))
    if not (identical and summary["velocity_finite"]):
        raise SystemExit("demo failed: see the summary above")


if __name__ == "__main__":
    main()
