"""Step-time benchmarks of wanjax training and sampling at real shapes; prints one JSON document.

    python scripts/bench.py                     # GPU/TPU: Wan2.1 1.3B, 480x832x81 (32,760 tokens), batch 1, bf16, remat
    python scripts/bench.py --small             # small Wan-shaped model (4 blocks, width 256), 768 tokens (CPU default)
    python scripts/bench.py --model 14b --steps 10 --peak-tflops 989
    python scripts/bench.py --small --vs-torch  # + the same LoRA step and forward in diffusers + peft (torch),
                                                # and the ratios (each pair re-timed alternately: same load)
    python scripts/bench.py --small --attention xla   # another attention kernel (default auto: see report.config)

Benchmarks (each isolated: a failure is reported as {"error": ...} and the others still run):
  lora_train_step      flow-matching LoRA step (configs/lora.py, AdamW, no clipping / EMA, as the torch step)
  dmd_generator_step   a DMD iteration that updates the student (configs/dmd.py; last_step_only so the rollout
                       length is fixed): rollout, student grad, critic + teacher-CFG scores, and the critic update
                       that DMD2 runs every iteration
  dmd_critic_step      a DMD iteration that updates only the critic (generator_update_interval > 1): rollout,
                       student sample, critic grad
                       (both DMD steps run as train.py runs them: two programs, the generator phase then the
                       critic phase; `programs` in the report)
  sample_step          one sampling step with CFG (wanjax.sample, UniPC, 1 step: cond + uncond as one batch of 2)
  forward              one transformer forward of the base model (no adapter) on the batch: the "1.3B forward"
  dcm_step             (optional, --bench dcm_step) a DCM semantic step (configs/dcm.py)
--vs-torch: diffusers' WanTransformer3DModel + peft LoRA (same config, rank, targets; random weights; bf16 on
GPU, fp32 on CPU; SDPA; gradient checkpointing with remat) on the same device: forward, MSE, backward, AdamW.
Its time alone, and both LoRA steps re-timed alternately (`interleaved`: same machine load for both, each timed
call right after an untimed one of its own; the reported `ratio_torch_over_jax` = torch / JAX of those medians;
> 1: JAX faster).
With `forward` benchmarked too, the same model's forward with its adapter disabled (no grad) is compared the
same way (`torch_forward`, `forward_ratio_torch_over_jax`). JAX's GPU memory preallocation is turned off for
--vs-torch (XLA_PYTHON_CLIENT_PREALLOCATE=false unless set), so that torch in the same process gets memory; JAX's
pool may take --gpu-memory-fraction of the GPU (default 0.95, as the trainer; JAX's own 0.75 is too little for 14B DMD).
--profile DIR: after the timings, each benchmark's step is traced (--profile-steps calls; jax.profiler, the trace in
DIR/NAME for TensorBoard / Perfetto) and its report gets `profile`: per process (host; a GPU's kernels) the top ops
by time per step (scripts/profile_summary.py); with --vs-torch torch's step and forward get the same from
torch.profiler. Where a step below its target spends its time, from the same run.
Each: compile time, median step time over --steps calls after --warmup (jax.block_until_ready), tokens/s, analytic
TFLOP/s, XLA's compiled cost-analysis FLOPs, MFU / HFU against --peak-tflops (default: a table by device kind,
bf16 dense; none on CPU), and the device's peak_bytes_in_use so far (GPU/TPU; null on CPU).

FLOPs (analytic, per sample; S video tokens, L text tokens, D width, F FFN width, C text_dim, r LoRA rank):
  per block    8 S D^2 (self-attn q,k,v,o) + 4 S^2 D (QK^T, AV) + 4 S D^2 (cross q,o) + 4 L D^2 (cross k,v)
               + 4 S L D (cross QK^T, AV) + 4 S D F (FFN) + LoRA 2 n r (in + out) per adapted layer (n = S or L)
  outside      patch embedding 2 S p C_in D, text embedder 2 L (C D + D^2), time embedding, proj_out 2 S D p C_out
  forward      = layers x per block + outside
  a train pass = 3 forwards (backward = 2 x forward, the usual convention) + the blocks' forward again with
                 remat "full"/"offload", but for each FFN's output product (the block's output is kept) ("dots":
                 + the attention-core FLOPs only; "attention": + all but them; "projections": + the FFN
                 up-projections; "matmuls": + nothing)
  frozen base  the LoRA step's `frozen_base_flops` / `mfu_frozen_base`: forward + the backward a LoRA step cannot do
                 without: no weight gradient of the frozen base (its layers' input gradients only, none for the
                 text K / V and the embeddings), the attention cores' 4 backward products, the adapters' gradients;
                 nothing recomputed (1.3B at 480x832x81: ~2.7 forwards, against the convention's 3)
  steps        lora = 1 train pass; dmd generator = (n-1) rollout + train pass (student) + fake score (1, or 2
               with fake CFG) + teacher CFG (2) + train pass (critic); dmd critic = (n-1) + 1 + train pass;
               dcm = teacher CFG (2) + target (1) + train pass; sample step = 2 forwards; forward = 1
  tflops / hfu count the convention's train pass plus remat's recompute; model_tflops / mfu leave the recompute
  out. XLA's cost analysis is printed beside it (it may count a scanned layer loop's body once). These formulas
  are checked against the products in the jaxprs (tests/test_bench.py): the forward exactly, and the LoRA step as
  forward + frozen-base backward + the recompute (remat's, and the `cpu` kernel's scores), exactly.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# bf16 dense peak TFLOP/s by device kind (substring of jax's device_kind, lower case; first match wins): NVIDIA's
# data sheets (H100 SXM "NVIDIA H100 80GB HBM3" 989, PCIe 756, NVL 835), Google's TPU pages
PEAK_TFLOPS = (
    ("h100 pcie", 756.0), ("h100 nvl", 835.0), ("h100", 989.0), ("h800", 989.0), ("h200", 989.0), ("b200", 2250.0),
    ("a100", 312.0),
    ("v5 lite", 197.0), ("v5e", 197.0), ("v5p", 459.0), ("v5", 459.0),
    ("v6 lite", 918.0), ("v6e", 918.0), ("v4", 275.0),
)
BENCHMARKS = ("lora_train_step", "dmd_generator_step", "dmd_critic_step", "sample_step", "forward", "dcm_step")
DEFAULT_BENCHMARKS = BENCHMARKS[:5]
SHAPES = {  # (frames, height, width) in pixels
    "1.3b": (81, 480, 832), "14b": (81, 480, 832), "small": (9, 256, 256), "tiny": (9, 64, 64),
}


def peak_tflops_for(kind: str, platform_name: str) -> float | None:
    if platform_name == "cpu":
        return None
    low = kind.lower()
    for key, value in PEAK_TFLOPS:
        if key in low:
            return value
    return None


# -------------------------------------------------------------------------------------------------------------
# FLOPs
# -------------------------------------------------------------------------------------------------------------
_SEQ = {"attn1": "S", "attn2.to_q": "S", "attn2.to_out.0": "S", "attn2.to_k": "L", "attn2.to_v": "L",
        "ffn.net.0.proj": "S", "ffn.net.2": "S"}


def _lora_layers(model, tokens: int, text_len: int, targets: tuple[str, ...]):
    """(n, d_in, d_out, on_video) of each adapted layer in a block: n rows (S video or L text tokens)."""
    S, L, D, F = tokens, text_len, model.inner_dim, model.ffn_dim
    for t in targets:
        seq = _SEQ.get(t, _SEQ.get(t.split(".")[0]))
        if seq is None:
            raise ValueError(f"bench's FLOP formulas cover LoRA on the blocks' attention and FFN layers, not {t!r}")
        d_in, d_out = (D, F) if t == "ffn.net.0.proj" else (F, D) if t == "ffn.net.2" else (D, D)
        yield (S if seq == "S" else L), d_in, d_out, seq == "S"


def block_flops(model, tokens: int, text_len: int, rank: int = 0, targets: tuple[str, ...] = ()) -> float:
    """Analytic FLOPs of one block's forward for one sample (see the module docstring)."""
    S, L, D, F = tokens, text_len, model.inner_dim, model.ffn_dim
    block = 8 * S * D * D + 4 * S * S * D + 4 * S * D * D + 4 * L * D * D + 4 * S * L * D + 4 * S * D * F
    return float(block + sum(2 * n * rank * (d_in + d_out) for n, d_in, d_out, _ in _lora_layers(
        model, tokens, text_len, targets)))


def forward_flops(model, tokens: int, text_len: int, rank: int = 0, targets: tuple[str, ...] = ()) -> float:
    """Analytic FLOPs of one transformer forward for one sample (see the module docstring)."""
    S, L, D = tokens, text_len, model.inner_dim
    p = math.prod(model.patch_size)
    outside = (2 * S * p * model.in_channels * D + 2 * L * (model.text_dim * D + D * D)
               + 2 * (model.freq_dim * D + D * D + 6 * D * D) + 2 * S * D * p * model.out_channels)
    return float(model.num_layers * block_flops(model, tokens, text_len, rank, targets) + outside)


def attention_core_flops(model, tokens: int, text_len: int) -> float:
    return float(model.num_layers * (4 * tokens * tokens * model.inner_dim + 4 * tokens * text_len * model.inner_dim))


def frozen_base_backward_flops(model, tokens: int, text_len: int, rank: int, targets: tuple[str, ...]) -> float:
    """Analytic FLOPs of a LoRA step's backward for one sample with nothing recomputed and no frozen weight's gradient:
    per block the frozen linear layers' input gradients (1 x their forward; none for cross-attention's text K / V),
    the attention cores' dP, dV, dQ, dK (2 x their forward), and each adapter's dB, dA and, on video tokens, its input
    gradient; outside the blocks only proj_out's input gradient (the patch, text and time embeddings hold nothing
    trained and take no differentiated input)."""
    S, L, D, F = tokens, text_len, model.inner_dim, model.ffn_dim
    block = 8 * S * D * D + 8 * S * S * D + 4 * S * D * D + 8 * S * L * D + 4 * S * D * F
    for n, d_in, d_out, video in _lora_layers(model, tokens, text_len, targets):
        # dB = (x A)^T dy, d(x A) = dy B^T, dA = x^T d(x A), and dx = d(x A) A^T where x is differentiated
        block += 2 * n * rank * (2 * d_out + d_in + (d_in if video else 0))
    return float(model.num_layers * block + 2 * S * D * math.prod(model.patch_size) * model.out_channels)


def train_pass(model, tokens, text_len, rank, targets) -> tuple[float, float, float]:
    """(FLOPs executed, FLOPs without remat's recompute, forward + frozen-base backward) of a LoRA train pass for one
    sample. The first two count the backward as 2 forwards (the convention behind MFU); the third what a LoRA step
    cannot do without (`frozen_base_backward_flops`)."""
    fwd = forward_flops(model, tokens, text_len, rank, targets)
    # what remat runs again: the blocks' forward but for the FFN's output product (with its adapter's B), whose
    # result is the block's output, saved as the next block's input
    S, D, F = tokens, model.inner_dim, model.ffn_dim
    last = 2 * S * F * D + (2 * S * rank * D if "ffn.net.2" in targets else 0)
    blocks = model.num_layers * (block_flops(model, tokens, text_len, rank, targets) - last)
    core = attention_core_flops(model, tokens, text_len)
    # "projections": each block's FFN up-projection (with its adapter's B: x A is kept); "matmuls": nothing
    up = model.num_layers * 2 * S * D * F * (1 + (rank / D if "ffn.net.0.proj" in targets else 0))
    extra = {"full": blocks, "offload": blocks, "dots": core, "attention": blocks - core,
             "projections": up}.get(model.remat_policy, 0.0)
    return 3 * fwd + extra, 3 * fwd, fwd + frozen_base_backward_flops(model, tokens, text_len, rank, targets)


# -------------------------------------------------------------------------------------------------------------
# Timing
# -------------------------------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def peak_memory() -> int | None:
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats raise or return None
        return None
    return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None


def cost_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def time_calls(call, steps: int, warmup: int) -> list[float]:
    """Wall times of `steps` calls after `warmup` calls; each call must block (block_until_ready) itself."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


def summarise(times, *, compile_s, tokens, batch, flops, model_flops, compiled_flops, peak, forwards, what) -> dict:
    t = statistics.median(times)
    out = {
        "what": what, "step_time_s": t, "step_times_s": [round(x, 6) for x in times], "compile_s": round(compile_s, 3),
        "tokens_per_s": tokens * batch / t, "forward_equivalents": forwards,
        "analytic_flops": flops, "tflops": flops / t / 1e12, "model_tflops": model_flops / t / 1e12,
        "compiled_cost_analysis_flops": compiled_flops,
        "mfu": None, "hfu": None, "peak_memory_bytes": peak_memory(),
    }
    if peak:
        out["mfu"] = model_flops / t / 1e12 / peak
        out["hfu"] = flops / t / 1e12 / peak
    return out


# -------------------------------------------------------------------------------------------------------------
# JAX benchmarks
# -------------------------------------------------------------------------------------------------------------
class Setup:
    """Model, base weights, clip shapes and inputs shared by the JAX benchmarks."""

    def __init__(self, args):
        import jax
        import jax.numpy as jnp
        import numpy as np

        from memory_report import latent_shape, model_presets, tokens_of
        from wanjax.models.transformer import init_params

        self.model = model_presets()[args.model].replace(remat_policy=args.remat, attention=args.attention)
        self.dtype = jnp.dtype(args.dtype)
        self.batch, self.text_len = args.batch, args.text_len
        frames, height, width = args.frames, args.height, args.width
        self.latents_shape = latent_shape(self.model, frames, height, width, args.batch)
        self.tokens = tokens_of(self.model, self.latents_shape)
        # random weights in the dtypes loading gives them, drawn leaf by leaf (never a float32 copy of the model)
        self.base = init_params(self.model, jax.random.key(0), self.dtype)
        self.n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(self.base))
        k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
        self.latents = jax.random.normal(k1, self.latents_shape, jnp.float32)
        self.prompt = jax.random.normal(k2, (args.batch, args.text_len, self.model.text_dim), jnp.float32)
        self.empty = jax.random.normal(k3, (args.text_len, self.model.text_dim), jnp.float32) * 0.1
        jax.block_until_ready((self.base, self.latents, self.prompt, self.empty))


def bench_train(setup: Setup, args, name: str) -> dict:
    """A trainer step (the Method's step train.py jits) timed with donated state."""
    import jax

    from memory_report import build_method

    method = {"lora_train_step": "lora", "dmd_generator_step": "dmd", "dmd_critic_step": "dmd",
              "dcm_step": "dcm"}[name]
    overrides = {}
    if args.rank:
        overrides.update(lora_rank=args.rank, lora_alpha=float(args.rank))
    if method == "lora":  # the step the torch comparison runs: AdamW, no clipping, no EMA
        overrides.update(optimizer="adamw", grad_clip_method="none", use_ema=False)
    if method == "dmd":
        overrides["distillation_config.last_step_only"] = True  # fixed rollout length: a stable time
        overrides["distillation_config.generator_update_interval"] = 1 if name == "dmd_generator_step" else 10**9
    built, c = build_method(method, setup.model, setup.base, {"empty": setup.empty}, overrides)
    state = jax.jit(built.init_state)(jax.random.key(0))
    if name == "dmd_critic_step":  # step 1 with a huge interval: the generator is never updated
        state = state.replace(step=state.step + 1)
    batch = {"latents": setup.latents, "prompt_embeds": setup.prompt}
    t0 = time.perf_counter()
    step, compiled_flops = _compile_step(built, state, batch)
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def call():
        new, metrics = step(holder["state"], built.frozen, batch)
        jax.block_until_ready((new, metrics))
        holder["state"] = new

    times = time_calls(call, args.steps, args.warmup)
    rank, targets = int(c.lora_rank), tuple(built.meta["lora"]["targets"])
    m, S, L = setup.model, setup.tokens, setup.text_len
    fwd = forward_flops(m, S, L, rank, targets)
    fwd_base = forward_flops(m, S, L)
    tp, tp_model, tp_frozen = train_pass(m, S, L, rank, targets)
    d = c.distillation_config
    n_steps = len(str(d.dmd_denoising_steps).split(","))
    fake = 2 if float(d.fake_score_guidance_scale) != 0 else 1
    if name == "lora_train_step":
        flops, model_flops = tp, tp_model
        fw = flops / fwd
        what = "flow-matching LoRA step: forward, MSE, backward, AdamW"
    elif name == "dmd_generator_step":
        inference = (n_steps - 1) * fwd + fake * fwd + 2 * fwd_base
        flops, model_flops = inference + 2 * tp, inference + 2 * tp_model
        fw = flops / fwd
        what = ("DMD iteration updating the student: rollout, student grad, critic + teacher-CFG scores, critic "
                "update")
    elif name == "dmd_critic_step":
        inference = (n_steps - 1) * fwd + fwd
        flops, model_flops = inference + tp, inference + tp_model
        fw = flops / fwd
        what = "DMD iteration updating only the critic: rollout, student sample, critic grad"
    else:
        inference = 2 * fwd_base + fwd
        flops, model_flops = inference + tp, inference + tp_model
        fw = flops / fwd
        what = "DCM semantic step: teacher CFG Euler step, EMA-target jump, student grad"
    b = setup.batch
    out = summarise(times, compile_s=compile_s, tokens=S, batch=b, flops=flops * b, model_flops=model_flops * b,
                    compiled_flops=compiled_flops, peak=args.peak, forwards=round(fw, 3), what=what)
    out.update(lora_rank=rank, optimizer=c.optimizer, trainable_params=_trainable(holder["state"]),
               programs=1 if built.phases is None else 2)
    if name == "lora_train_step":  # the MFU convention counts weight gradients the frozen base never needs
        out["frozen_base_flops"] = tp_frozen * b
        out["mfu_frozen_base"] = tp_frozen * b / out["step_time_s"] / 1e12 / args.peak if args.peak else None
    args.calls[name] = call  # for --profile, and re-timed alternately with torch's step (`interleaved`)
    return out


def _compile_step(built, state, batch):
    """(step(state, frozen, batch), compiled FLOPs) run as train.py runs it: one donated program, or the Method's
    two phases (DMD: generator phase, then critic phase) as two programs, which is what keeps 14B DMD's peak
    under 80 GB (the one-program `step` holds both halves' saved activations at once)."""
    import jax

    if built.phases is None:
        compiled = jax.jit(built.step, donate_argnums=(0,)).lower(state, built.frozen, batch).compile()
        return compiled, cost_flops(compiled)
    phase_1, phase_2 = built.phases
    lowered_1 = jax.jit(phase_1, donate_argnums=(0,)).lower(state, built.frozen, batch)
    carry = lowered_1.out_info[1]  # phase 1's output shapes: no second trace for them
    c1 = lowered_1.compile()
    c2 = jax.jit(phase_2, donate_argnums=(0,)).lower(state, built.frozen, batch, carry).compile()
    f1, f2 = cost_flops(c1), cost_flops(c2)

    def step(state, frozen, batch):
        state, carry = c1(state, frozen, batch)
        return c2(state, frozen, batch, carry)

    return step, (None if f1 is None or f2 is None else f1 + f2)


def _trainable(state) -> int:
    import jax

    tree = state.lora if hasattr(state, "lora") else state.gen
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))


def bench_sample(setup: Setup, args) -> dict:
    """One denoising step with CFG: wanjax.sample (UniPC, 1 step, batched cond + uncond), else two forwards."""
    import jax
    import jax.numpy as jnp

    neg = setup.empty[None]
    try:
        from wanjax.sample import sample as sample_fn
    except ImportError:
        sample_fn = None
    if sample_fn is not None:
        def run():
            return sample_fn(setup.model, setup.base, setup.latents, setup.prompt, negative_prompt_embeds=neg,
                             num_inference_steps=1, guidance_scale=5.0)

        what = "wanjax.sample: 1 UniPC step, CFG as one batch of 2 (cond + uncond)"
        t0 = time.perf_counter()
        jax.block_until_ready(run())  # compiles (jitted inside)
        compile_s = time.perf_counter() - t0
        compiled_flops = None
    else:
        from wanjax.models.transformer import transformer_forward

        def cfg_step(params, x, ctx, neg):
            b = x.shape[0]
            t = jnp.full((2 * b,), 500.0)
            v = transformer_forward(setup.model, params, jnp.concatenate([x, x]).astype(setup.dtype), t,
                                    jnp.concatenate([ctx, jnp.broadcast_to(neg, ctx.shape)]).astype(setup.dtype))
            v_c, v_u = jnp.split(v.astype(jnp.float32), 2)
            return x + (-0.02) * (v_u + 5.0 * (v_c - v_u))

        what = "transformer_forward on cond + uncond (batch 2) + guidance + Euler update"
        t0 = time.perf_counter()
        compiled = jax.jit(cfg_step).lower(setup.base, setup.latents, setup.prompt, neg).compile()
        compile_s = time.perf_counter() - t0
        compiled_flops = cost_flops(compiled)

        def run():
            return compiled(setup.base, setup.latents, setup.prompt, neg)

    def call():
        jax.block_until_ready(run())

    times = time_calls(call, args.steps, args.warmup)
    args.calls["sample_step"] = call  # for --profile
    flops = 2 * forward_flops(setup.model, setup.tokens, setup.text_len) * setup.batch
    return summarise(times, compile_s=compile_s, tokens=setup.tokens, batch=setup.batch, flops=flops,
                     model_flops=flops, compiled_flops=compiled_flops, peak=args.peak, forwards=2, what=what)


def bench_forward(setup: Setup, args) -> dict:
    """One transformer forward of the base model (no adapter) on the batch, timestep 500."""
    import jax
    import jax.numpy as jnp

    from wanjax.models.transformer import transformer_forward

    def forward(params, x, ctx):
        t = jnp.full((x.shape[0],), 500.0)
        return transformer_forward(setup.model, params, x.astype(setup.dtype), t, ctx.astype(setup.dtype))

    t0 = time.perf_counter()
    compiled = jax.jit(forward).lower(setup.base, setup.latents, setup.prompt).compile()
    compile_s = time.perf_counter() - t0

    def call():
        jax.block_until_ready(compiled(setup.base, setup.latents, setup.prompt))

    times = time_calls(call, args.steps, args.warmup)
    flops = forward_flops(setup.model, setup.tokens, setup.text_len) * setup.batch
    out = summarise(times, compile_s=compile_s, tokens=setup.tokens, batch=setup.batch, flops=flops,
                    model_flops=flops, compiled_flops=cost_flops(compiled), peak=args.peak, forwards=1,
                    what=f"transformer_forward of the base model, batch {setup.batch}")
    args.calls["forward"] = call  # for --profile, and re-timed alternately with torch's forward (`interleaved`)
    return out


# -------------------------------------------------------------------------------------------------------------
# diffusers + peft (torch) LoRA step and forward
# -------------------------------------------------------------------------------------------------------------
def bench_torch(args, model_cfg, latents_shape, rank: int, targets: tuple[str, ...]):
    """diffusers WanTransformer3DModel + peft LoRA (same config, rank, targets; random weights): forward, MSE,
    backward, AdamW; SDPA attention (diffusers' default processor); gradient checkpointing when remat is on.
    Returns (report, the blocking step function, the blocking forward function (adapter disabled, no grad),
    the forward's report maker)."""
    import diffusers
    import peft
    import torch
    from diffusers import WanTransformer3DModel

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = {k: v for k, v in model_cfg.to_diffusers().items() if not k.startswith("_")}
    model = WanTransformer3DModel(**cfg).to(device=device, dtype=dtype)
    model.requires_grad_(False)
    model.add_adapter(peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights=True))
    trainable = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in trainable:
        p.requires_grad_(True)
    if model_cfg.remat_policy != "none":
        model.enable_gradient_checkpointing()
    model.train()
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(0)
    b = latents_shape[0]
    x0 = torch.randn(latents_shape, generator=g).to(device)
    ctx = torch.randn((b, args.text_len, model_cfg.text_dim), generator=g).to(device=device, dtype=dtype)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step():
        sigma = torch.rand((b,), device=device)
        noise = torch.randn_like(x0)
        s = sigma.view(b, 1, 1, 1, 1)
        xt = ((1 - s) * x0 + s * noise).to(dtype)
        v = model(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=ctx, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(v.float(), noise - x0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()

    def forward():  # the base model: adapter layers skipped, no autograd, no checkpointing
        model.disable_adapters()
        try:
            with torch.inference_mode():
                model(hidden_states=x0.to(dtype), timestep=torch.full((b,), 500.0, device=device),
                      encoder_hidden_states=ctx, return_dict=False)
            sync()
        finally:
            model.enable_adapters()

    def forward_report(times: list[float]) -> dict:
        return {"what": "diffusers WanTransformer3DModel forward, adapter disabled, inference_mode (SDPA)",
                "device": device, "dtype": str(dtype).removeprefix("torch."), "step_time_s": statistics.median(times),
                "step_times_s": [round(x, 6) for x in times]}

    t0 = time.perf_counter()
    step()  # first call: allocations, autotuning
    first_s = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = time_calls(step, args.steps, max(0, args.warmup - 1))
    t = statistics.median(times)
    out = {
        "what": "diffusers WanTransformer3DModel + peft LoRA: forward, MSE, backward, AdamW (SDPA attention"
                + (", gradient checkpointing)" if model_cfg.remat_policy != "none" else ")"),
        "device": device, "dtype": str(dtype).removeprefix("torch."), "torch_threads": torch.get_num_threads(),
        "step_time_s": t, "step_times_s": [round(x, 6) for x in times], "first_step_s": round(first_s, 3),
        "tokens_per_s": (latents_shape[2] * latents_shape[3] * latents_shape[4] // math.prod(model_cfg.patch_size))
        * b / t,
        "trainable_params": sum(p.numel() for p in trainable),
        "peak_memory_bytes": int(torch.cuda.max_memory_allocated()) if device == "cuda" else None,
        "torch_version": torch.__version__, "diffusers_version": diffusers.__version__,
        "peft_version": peft.__version__,
    }
    return out, step, forward, forward_report


def interleaved(jax_call, torch_step, steps: int) -> dict:
    """The JAX and torch calls timed alternately, so that both see the same machine load (on a shared host separate
    medians can differ by load alone); the ratio reported is of these medians. Each timed call directly follows an
    untimed call of the same function (j j t t j j ...): the steady state of training, where steps run back to
    back. Timing each call cold, right after the other framework's (with or without a pause), measured the
    switch instead: on a 2-core CPU a 60 ms JAX forward took 63 ms back to back, 68-76 ms after a 0.1 s sleep and
    70-82 ms after a torch call (XLA's worker threads are woken and preempted), torch's 58-62 ms in every case."""
    jt, tt = [], []
    for _ in range(steps):
        for call, times in ((jax_call, jt), (torch_step, tt)):
            call()
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    j, t = statistics.median(jt), statistics.median(tt)
    return {"jax_step_time_s": j, "torch_step_time_s": t, "jax_step_times_s": [round(x, 6) for x in jt],
            "torch_step_times_s": [round(x, 6) for x in tt], "ratio_torch_over_jax": t / j}


def _guarded(fn, *a) -> dict:
    """A profile, or the error that stopped it: profiling must not lose the timings already taken."""
    try:
        return fn(*a)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"[:2000]}


# -------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", choices=sorted(SHAPES), default=None,
                    help="default: 1.3b on GPU/TPU, small on CPU")
    ap.add_argument("--small", action="store_true", help="the small model and clip (--model small)")
    ap.add_argument("--frames", type=int, default=None, help="pixel frames (default: the model's: 81 or 17)")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=None,
                    help="timed calls per benchmark, median reported (default: 5; 3 for the small / tiny models)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls after compiling")
    ap.add_argument("--remat", default="full",
                    help="remat policy: none | full | dots | offload | attention | projections | matmuls")
    ap.add_argument("--attention", default="auto", help="attention kernel: auto | xla | cpu | cudnn | splash")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                    help="base weights / activations (default: bfloat16 on GPU/TPU, float32 on CPU)")
    ap.add_argument("--rank", type=int, default=0, help="LoRA rank (0: each method config's: lora 16, dmd/dcm 128)")
    ap.add_argument("--bench", default=",".join(DEFAULT_BENCHMARKS), help=f"comma list of {', '.join(BENCHMARKS)}")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by device kind)")
    ap.add_argument("--vs-torch", action="store_true", help="also time diffusers + peft's LoRA step (torch)")
    ap.add_argument("--gpu-memory-fraction", type=float, default=0.95,
                    help="JAX's GPU memory pool, as the trainer's config.gpu_memory_fraction (JAX's default 0.75 "
                         "holds too little for 14B DMD); XLA_(PYTHON_)CLIENT_MEM_FRACTION in the environment wins")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="after timing, trace --profile-steps calls of each benchmark (jax.profiler, traces in "
                         "DIR/NAME; torch.profiler with --vs-torch) and report each one's top ops (`profile`)")
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch.set_num_threads for --vs-torch (0: torch's default, one per core). On a loaded "
                         "host torch's CPU threads can stall (observed: 20x slower with 2 threads than 1)")
    args = ap.parse_args(argv)
    args.benches = [b.strip() for b in args.bench.split(",") if b.strip()]
    args.calls = {}  # benchmark name -> its blocking call, set by the bench_* functions
    bad = [b for b in args.benches if b not in BENCHMARKS]
    if bad:
        ap.error(f"unknown benchmarks {bad}; expected {BENCHMARKS}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.vs_torch:  # before jax starts: its default 75% GPU preallocation would starve torch in this process
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from wanjax.sharding import set_gpu_memory_fraction

    try:  # as the trainer does (cli.start_jax)
        memory_fraction = set_gpu_memory_fraction(args.gpu_memory_fraction, "--gpu-memory-fraction")
    except ValueError as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        return 2
    import jax

    dev = jax.devices()[0]
    on_cpu = dev.platform == "cpu"
    if args.small:
        args.model = "small"
    args.model = args.model or ("small" if on_cpu else "1.3b")
    frames, height, width = SHAPES[args.model]
    args.frames, args.height, args.width = args.frames or frames, args.height or height, args.width or width
    args.dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    args.steps = args.steps or (3 if args.model in ("small", "tiny") else 5)
    args.peak = args.peak_tflops if args.peak_tflops else peak_tflops_for(dev.device_kind, dev.platform)

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"platform": dev.platform, "kind": dev.device_kind, "count": jax.device_count(),
                   "host": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
        "jax_version": jax.__version__, "python": platform.python_version(),
        "model": args.model, "dtype": args.dtype, "remat": args.remat, "batch": args.batch, "text_len": args.text_len,
        "clip": {"frames": args.frames, "height": args.height, "width": args.width},
        "steps": args.steps, "warmup": args.warmup, "peak_tflops": args.peak, "gpu_memory_fraction": memory_fraction,
        "flops_note": "analytic; train pass = 3 forwards + remat's recompute; see scripts/bench.py docstring",
        "benchmarks": {},
    }
    try:
        setup = Setup(args)
    except Exception as e:  # noqa: BLE001 - report, do not crash: the JSON is the interface
        report["error"] = f"setup: {type(e).__name__}: {e}"
        print(json.dumps(report))
        return 1
    m = setup.model
    from wanjax.models.attention import resolve_attention_impl

    report.update(latents=list(setup.latents_shape), tokens=setup.tokens, params=setup.n_params,
                  config={"num_layers": m.num_layers, "inner_dim": m.inner_dim, "heads": m.num_attention_heads,
                          "ffn_dim": m.ffn_dim, "text_dim": m.text_dim,
                          "attention": resolve_attention_impl(m.attention, setup.dtype, m.attention_head_dim)})
    from profile_summary import jax_profile, torch_profile

    kept = {}
    for name in args.benches:
        log(f"{name} ...")
        try:
            runner = {"sample_step": bench_sample, "forward": bench_forward}.get(name)
            result = runner(setup, args) if runner else bench_train(setup, args, name)
        except Exception as e:  # noqa: BLE001 - one failure must not stop the other benchmarks
            result = {"error": f"{type(e).__name__}: {e}"[:2000]}
        log(f"{name}: {result.get('step_time_s', result.get('error'))}")
        call = args.calls.pop(name, None)
        if args.profile and call is not None:
            log(f"{name}: profiling {args.profile_steps} calls ...")
            result["profile"] = _guarded(jax_profile, call, args.profile_steps, Path(args.profile) / name)
        if args.vs_torch and name in ("lora_train_step", "forward") and call is not None:
            kept[name] = call  # re-timed alternately with torch's (see `interleaved`)
        report["benchmarks"][name] = result
        del call  # the others' programs and state go before the next benchmark
        gc.collect()
    if args.vs_torch:
        log("torch (diffusers + peft) LoRA step ...")
        jax_lora = report["benchmarks"].get("lora_train_step", {})
        try:
            from memory_report import load_config
            from wanjax import lora as lora_lib

            c = load_config("lora")
            rank = args.rank or int(c.lora_rank)
            targets = lora_lib.parse_targets(c.lora_target_modules)
            result, torch_step, torch_forward, forward_report = bench_torch(args, m, setup.latents_shape, rank,
                                                                             targets)
            if jax_lora.get("step_time_s"):
                result["ratio_torch_over_jax_separate_runs"] = result["step_time_s"] / jax_lora["step_time_s"]
            jax_call = kept.get("lora_train_step")
            if jax_call is not None:
                log("JAX and torch LoRA steps, interleaved ...")
                result["interleaved"] = interleaved(jax_call, torch_step, args.steps)
                report["ratio_torch_over_jax"] = result["interleaved"]["ratio_torch_over_jax"]
            if args.profile:
                log("torch LoRA step: profiling ...")
                result["profile"] = _guarded(torch_profile, torch_step, args.profile_steps)
        except Exception as e:  # noqa: BLE001 - torch problems must not lose the JAX numbers
            result = {"error": f"{type(e).__name__}: {e}"[:2000]}
            torch_forward = None
        jax_forward = kept.get("forward")
        if jax_forward is not None and torch_forward is not None:
            log("JAX and torch forwards, interleaved ...")
            try:
                torch_forward()  # first call: allocations
                fwd = forward_report(time_calls(torch_forward, args.steps, max(0, args.warmup - 1)))
                fwd["interleaved"] = interleaved(jax_forward, torch_forward, args.steps)
                report["forward_ratio_torch_over_jax"] = fwd["interleaved"]["ratio_torch_over_jax"]
                if args.profile:
                    fwd["profile"] = _guarded(torch_profile, torch_forward, args.profile_steps)
            except Exception as e:  # noqa: BLE001 - keep the LoRA comparison
                fwd = {"error": f"{type(e).__name__}: {e}"[:2000]}
            report["torch_forward"] = fwd
        log(f"torch: {result.get('step_time_s', result.get('error'))}, ratio {report.get('ratio_torch_over_jax')}, "
            f"forward ratio {report.get('forward_ratio_torch_over_jax')}")
        report["torch_lora_train_step"] = result
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
