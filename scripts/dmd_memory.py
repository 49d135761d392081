"""Compiled memory of one DMD step (student + critic LoRAs over ONE frozen base), no weights needed. Prints JSON.

    python scripts/dmd_memory.py [--model 1.3b|14b|both] [--frames 17 --height 240 --width 416] [--rank 128]

Everything is abstract (ShapeDtypeStructs): the step is lowered and compiled for the current backend and XLA's
memory analysis is read: argument bytes (frozen base + LoRA states + batch), temporaries, outputs. The claim to
check: the step's peak is about one copy of the base (plus small adapters and activations), not two or three.
On CPU, XLA's attention materialises the (heads x S x S) logits, so keep the clip modest there; on GPU, cuDNN
flash attention does not.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import optax

from wanjax import lora as lora_lib
from wanjax.losses import dmd as dmdlib
from wanjax.models.config import WanConfig
from wanjax.models.transformer import param_shapes, transformer_forward

MODELS = {
    "1.3b": WanConfig(num_attention_heads=12, ffn_dim=8960, num_layers=30, remat_policy="full"),
    "14b": WanConfig(num_attention_heads=40, ffn_dim=13824, num_layers=40, remat_policy="full"),
}


def measure(name: str, frames: int, height: int, width: int, rank: int, base_dtype=jnp.bfloat16) -> dict:
    model = MODELS[name]
    spec_targets = lora_lib.DEFAULT_TARGETS
    gen_opt = optax.adamw(1e-5)
    crit_opt = optax.adamw(1e-5)
    cfg = dmdlib.DMDConfig()

    def init_state(key):
        gen = lora_lib.init_lora(model, key, rank=rank, targets=spec_targets).params
        critic = lora_lib.init_lora(model, key, rank=rank, targets=spec_targets).params
        return dmdlib.DMDState(step=jnp.zeros((), jnp.int32), gen=gen, gen_opt=gen_opt.init(gen), critic=critic,
                               critic_opt=crit_opt.init(critic), ema=None, rng=jax.random.key_data(key))

    state = jax.eval_shape(init_state, jax.random.key(0))
    frozen = dmdlib.DMDFrozen(params=param_shapes(model, base_dtype), uncond=jax.ShapeDtypeStruct((512, model.text_dim), jnp.float32))
    lat = (1, model.in_channels, 1 + (frames - 1) // 4, height // 8, width // 8)
    batch = {"latents": jax.ShapeDtypeStruct(lat, jnp.float32),
             "prompt_embeds": jax.ShapeDtypeStruct((1, 512, model.text_dim), jnp.float32)}

    def wrap(p):
        return lora_lib.LoraWeights(params=p, rank=rank, alpha=float(rank), targets=spec_targets)

    def forward(base, adapter, x, t, ctx):
        return transformer_forward(model, base, x, t, ctx, lora=adapter)

    step = functools.partial(dmdlib.dmd_step, forward=forward, gen_adapter=wrap, critic_adapter=wrap, cfg=cfg,
                             gen_optimizer=gen_opt, critic_optimizer=crit_opt, schedule=lambda s: 1e-5)
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, frozen, batch).compile()
    mem = compiled.memory_analysis()
    nbytes = lambda tree: sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    base_b, state_b = nbytes(frozen.params), nbytes(state)
    peak = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    tokens = lat[2] * (lat[3] // 2) * (lat[4] // 2)
    return {
        "model": name, "backend": jax.default_backend(), "base_dtype": jnp.dtype(base_dtype).name, "latents": list(lat), "tokens": tokens, "lora_rank": rank,
        "base_bytes": base_b, "trainable_state_bytes": state_b,
        "argument_bytes": mem.argument_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
        "output_bytes": mem.output_size_in_bytes, "alias_bytes": mem.alias_size_in_bytes,
        "peak_estimate_bytes": peak, "peak_over_base": round(peak / base_b, 3),
        "if_critic_were_a_second_base_bytes": peak + base_b,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["1.3b", "14b", "both"], default="both")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--width", type=int, default=416)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--base-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="XLA:CPU computes bf16 dots by upcasting the weights to f32 in temporaries, which "
                         "inflates CPU temp bytes; float32 shows the step's own structure on CPU")
    args = ap.parse_args()
    names = ["1.3b", "14b"] if args.model == "both" else [args.model]
    for name in names:
        print(json.dumps(measure(name, args.frames, args.height, args.width, args.rank, jnp.dtype(args.base_dtype))),
              flush=True)


if __name__ == "__main__":
    main()
