"""Tiny diffusers reference models for parity tests, built offline with every parameter randomised, and the tests'
shared jaxpr walker."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import WanTransformer3DModel

# diffusers' own tiny test config (tests/models/transformers/test_models_transformer_wan.py).
T2V = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
    freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)
# I2V as the released 14B models: image embedder + added K/V projections (added_kv_proj_dim = inner dim).
I2V_ADDED_KV = dict(T2V, in_channels=8, image_dim=4, added_kv_proj_dim=24)
# FLF2V: I2V + learned position embedding over two images' tokens.
FLF2V = dict(I2V_ADDED_KV, pos_embed_seq_len=6)
# diffusers' I2V test config: image tokens just join the text context (no added K/V).
I2V_PLAIN = dict(T2V, in_channels=8, image_dim=4)
# TI2V-5B style: 48-channel latents in the real model; per-token timesteps.
TI2V = dict(T2V, in_channels=6, out_channels=6)
# Width where bf16 error means something: 2 heads of 128.
WIDE = dict(T2V, attention_head_dim=128, text_dim=64, ffn_dim=512)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norm weights around 1, the rest ~ 1/sqrt(fan_in)), scale_shift_table included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif p.ndim >= 2 and "scale_shift_table" not in name and "pos_embed" not in name:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
            else:
                p.copy_(0.5 * noise)
    return model


def make_model(cfg: dict, seed: int = 0) -> WanTransformer3DModel:
    return randomize(WanTransformer3DModel(**cfg), seed).eval()


def inputs(cfg: dict, *, batch=2, frames=3, height=4, width=6, text_len=7, per_token=False, image_tokens=3, seed=1):
    """Random inputs as numpy float32 arrays (diffusers layout)."""
    rng = np.random.default_rng(seed)
    out = {
        "hidden_states": rng.standard_normal((batch, cfg["in_channels"], frames, height, width), dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, text_len, cfg["text_dim"]), dtype=np.float32),
    }
    if per_token:
        seq = (frames // cfg["patch_size"][0]) * (height // 2) * (width // 2)
        t = rng.uniform(0, 1000, (batch, seq)).astype(np.float32)
        t[:, : (height // 2) * (width // 2)] = 0.0  # TI2V I2V mode: first latent frame is clean
        out["timestep"] = t
    else:
        out["timestep"] = rng.uniform(0, 1000, (batch,)).astype(np.float32)
    if cfg.get("image_dim"):
        n = batch * 2 if cfg.get("pos_embed_seq_len") else batch  # FLF2V: first and last image per sample
        tokens = cfg["pos_embed_seq_len"] // 2 if cfg.get("pos_embed_seq_len") else image_tokens
        out["encoder_hidden_states_image"] = rng.standard_normal((n, tokens, cfg["image_dim"]), dtype=np.float32)
    return out


def torch_forward(model, inp: dict, dtype=torch.float32) -> np.ndarray:
    kw = {k: torch.from_numpy(v).to(dtype) if k != "timestep" else torch.from_numpy(v) for k, v in inp.items()}
    with torch.no_grad():
        return model(**kw, return_dict=False)[0].float().numpy()


def rel_err(a, b) -> float:
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def jaxpr_eqns(fn, *args) -> list:
    """Every equation of fn's jaxpr at args, nested ones included (scan, remat, custom_vjp rules, vmap'd kernels)."""
    import jax
    import jax.extend

    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            found.append(eqn)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def dot_flops(fn, *args) -> float:
    """FLOPs of every product (dot_general: 2 x output size x contracted size) fn's jaxpr runs at args (arrays or
    ShapeDtypeStructs), a scan's body counted once per iteration, a cond's branches once if they hold the same
    products. Refused (ValueError): while loops (unknown trip count) and conds whose branches' products differ."""
    import math

    import jax
    import jax.extend

    def walk(jaxpr) -> float:
        total = 0.0
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "while":
                raise ValueError("dot_flops: a while loop's trip count is unknown")
            if name == "dot_general":
                (contract, _), _ = eqn.params["dimension_numbers"]
                k = math.prod(eqn.invars[0].aval.shape[i] for i in contract)
                total += 2 * math.prod(eqn.outvars[0].aval.shape) * k
            subs = [walk(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params)]
            if name == "cond":
                if len(set(subs)) > 1:
                    raise ValueError(f"dot_flops: a cond's branches run different products: {subs}")
                total += subs[0]
            else:
                total += sum(subs) * (eqn.params["length"] if name == "scan" else 1)
        return total

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)
