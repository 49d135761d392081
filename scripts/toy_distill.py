"""Proof without real weights that wanjax's DMD and DCM distillers work (docs/spec/distillation.md, last section).

    python scripts/toy_distill.py [--quick] [--seed 0] [--steps-teacher N] [--steps-dmd N] [--steps-dcm N]
                                  [--only all|dmd|dcm] [--teacher-cache teacher.npz] [--set FIELD=VALUE ...]
                                  [--out results.json]

--teacher-cache saves the trained teacher (numpy .npz, tagged with the teacher's settings) and reuses it on the
next run with the same settings; --only trains one student and skips the extra baselines; --set overrides any
Settings field (e.g. --set dmd_eval_every=1000 logs the DMD student's distance and mode shares during training
and adds "dmd_trace" to the JSON).

1. Data: a synthetic latent distribution in the transformer's layout (B, C, F, H, W) = (B, 4, 1, 4, 4): a mixture
   of well-separated Gaussian modes, MODES_PER_CLASS modes per class, small per-mode noise. Each class has a
   fixed random "prompt embedding"; a separate fixed random embedding plays the empty prompt (caption dropout,
   CFG's unconditional branch). A class-conditional sample is multimodal, so few-step Euler (which averages
   the modes it has not yet decided between) is visibly worse than many-step Euler.
2. Teacher: a tiny Wan transformer (wanjax.WanConfig, all parameters trained, AdamW) by flow matching
   (schedules.sample_sigmas / add_noise / velocity_target), with caption dropout so CFG is defined.
3. Distillation with wanjax's own code over ONE frozen base (the teacher):
   - DMD (losses.dmd.dmd_step): student LoRA + critic LoRA, 3 student steps (1000, 757, 522), student sampler
     losses.dmd.student_sample;
   - DCM (losses.dcm.dcm_step, semantic mode, 4 phases, EMA consistency target), sampler losses.dcm.dcm_sample.
4. Distance: sliced Wasserstein-1 (exact 1-D W1 by sorting, averaged over random unit projections of the
   flattened latents) between N generated latents and N fresh data latents, same class balance.

Progress goes to stderr; the final stdout line is one JSON object:
    {"teacher_50": d, "teacher_fewstep": d, "dmd": d, "dcm": d, ...extras}
teacher_fewstep is the teacher's own 3-step Euler sampler (diffusers' Euler schedule with the DMD student's
shift), i.e. the teacher at the DMD student's step count. Extras: data_vs_data (noise floor of the estimate),
teacher_3_student_sigmas (Euler over exactly the DMD student's sigmas), teacher_3_renoise (the DMD sampler run
with the teacher = the DMD student before training), teacher_4 (4-step Euler over the DCM student's sigmas),
teacher_3_best / teacher_4_best (the best few-step teacher Euler over a sweep of shifts), and timings.

DMD settings (why they are what they are). DMD is mode-seeking: the share of samples a class gives each of its
modes is set by how the student partitions noise space, and only the high-noise part of the score difference
(x0_fake - x0_real) pushes that partition; its low-noise part, amplified by the 1 / mean|x_gen - x0_real|
normalisation, only sharpens each sample onto its nearest mode, and the critic's errors there are as large as the
mode-balancing signal. With AdamW(b1=0) every generator step moves the LoRA by about lr whatever the gradient's
signal-to-noise, so at a high lr the mode allocation random-walks (the raw student's worst mode-share deviation
sat at 0.2-0.37 at lr 1e-3) and an under-covered mode is hard to win back. The earlier settings (interval 3,
lr 1e-3 with cosine decay over steps_dmd, EMA 0.995) worked at 3000 steps only because the decay froze the
student early; at 9000 steps the lr stayed high for ~6000 steps and the student collapsed (SW 0.225, worst
mode-share deviation 0.52). Fixes, measured at 3000 / 9000 steps (seed 0, teacher_50 0.048, teacher_fewstep
0.182): generator_update_interval 5 (DMD2's two-timescale rule) alone halves the collapse but does not stop it;
with a constant generator lr 4e-4 (no schedule tied to the run length) and EMA 0.998 the student reaches SW 0.075
at 3000 steps and stays at 0.072-0.079 up to 9000 (mode-share deviation ~0.1, the teacher's own 50-step ~0.05).
No real data is used (flow-matching anchor off: dmd_fm_weight 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from wanjax import lora as lora_lib  # noqa: E402
from wanjax import optim  # noqa: E402
from wanjax import schedules  # noqa: E402
from wanjax import students  # noqa: E402
from wanjax.losses import dcm as dcmlib  # noqa: E402
from wanjax.losses import dmd as dmdlib  # noqa: E402
from wanjax.losses.flow_matching import LoraSpec  # noqa: E402
from wanjax.models.config import WanConfig  # noqa: E402
from wanjax.models.transformer import param_shapes, transformer_forward  # noqa: E402

F32 = jnp.float32
LATENT = (4, 1, 4, 4)  # (C, F, H, W)
TEXT_LEN, TEXT_DIM = 4, 16


# ---------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Settings:
    seed: int = 0
    # data: classes x modes_per_class Gaussian modes in R^(C F H W) = R^64
    classes: int = 4
    modes_per_class: int = 3
    mode_scale: float = 1.0  # mode means ~ N(0, mode_scale^2) per element (modes ~11 apart)
    mode_std: float = 0.2  # per-mode noise
    # teacher: 3 blocks, width 64 (2 heads x 32), all parameters trained
    width_heads: int = 2
    head_dim: int = 32
    ffn_dim: int = 256
    layers: int = 3
    steps_teacher: int = 3000
    batch_teacher: int = 128
    lr_teacher: float = 1e-3  # AdamW, warmup + cosine decay
    train_shift: float = 3.0  # flow_schedule_shift of the teacher's flow-matching sigmas
    caption_dropout: float = 0.1
    # sampling / evaluation
    sample_shift: float = 3.0  # shift of the teacher's 50-step Euler schedule
    cfg: float = 1.0  # teacher guidance everywhere (teacher sampling, DMD real score, DCM distill_cfg); 1 = off
    n_eval: int = 2048
    projections: int = 256
    # LoRA (student, critic): rank 32 of width 64, every Dense of the blocks and the output head
    lora_rank: int = 32
    lora_targets: tuple = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                           "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2", "proj_out")
    # DMD
    steps_dmd: int = 3000
    batch_dmd: int = 64
    dmd_timesteps: tuple = (1000.0, 757.0, 522.0)
    dmd_shift: float = 1.0  # student sigmas s(t / 1000): 1, 0.757, 0.522
    # (robust settings, see "DMD settings" in the module docstring: the previous 3 / 1e-3 cosine / 0.995 collapsed
    # modes at 9000 steps)
    dmd_interval: int = 5  # generator_update_interval (the critic updates every step: DMD2's two-timescale rule)
    dmd_score_shift: float = 3.0  # timestep_shift of the score-timestep window (more weight on high noise)
    lr_dmd: float = 4e-4  # generator AdamW(b1=0)
    lr_dmd_schedule: str = "constant"  # "constant" or "cosine" (decay to 10% over steps_dmd)
    lr_critic: float = 3e-3  # critic AdamW(b1=0), constant
    dmd_ema: float = 0.998  # EMA of the student LoRA (optim.ema_update), used for sampling
    dmd_fm_weight: float = 0.0  # flow_matching_weight: generator flow-matching loss on REAL latents (0 = off)
    dmd_eval_every: int = 0  # > 0: evaluate the student every this many DMD steps (log + "dmd_trace" in the JSON)
    # DCM (semantic mode, 4 phases, EMA consistency target, decay 0.95)
    steps_dcm: int = 2000
    batch_dcm: int = 64
    dcm_euler_steps: int = 40
    dcm_shift: float = 2.0  # grid tau_j = s(j / E); student sigmas 1, 0.857, 0.667, 0.4
    lr_dcm: float = 1e-3  # AdamW, cosine decay to 10%
    # reporting
    shift_sweep: tuple = (1.0, 2.0, 3.0, 5.0, 8.0)  # shifts tried for the best few-step teacher
    chunk: int = 500  # optimizer steps per jitted lax.scan call
    extras: bool = True  # the extra few-step teacher baselines (each sampler costs a compile)


def quick(s: Settings) -> Settings:
    return dataclasses.replace(s, steps_teacher=300, steps_dmd=60, steps_dcm=60, n_eval=256, projections=64,
                               batch_teacher=64, batch_dmd=16, batch_dcm=16, chunk=300, extras=False)


def log(msg: str) -> None:
    print(f"[toy_distill {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------------------------
class ToyData:
    """Class-conditional mixture of Gaussians in latent layout; class k owns `modes_per_class` modes."""

    def __init__(self, s: Settings, rng: np.random.Generator):
        self.s = s
        self.means = (s.mode_scale * rng.standard_normal((s.classes, s.modes_per_class, *LATENT))).astype(np.float32)
        self.prompts = rng.standard_normal((s.classes, TEXT_LEN, TEXT_DIM)).astype(np.float32)
        self.empty = rng.standard_normal((TEXT_LEN, TEXT_DIM)).astype(np.float32)

    def labels(self, n: int) -> np.ndarray:
        """A balanced label set (every class n / classes times, the remainder to the first classes)."""
        return np.arange(n) % self.s.classes

    def sample(self, rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
        mode = rng.integers(0, self.s.modes_per_class, labels.shape[0])
        noise = rng.standard_normal((labels.shape[0], *LATENT)).astype(np.float32)
        return self.means[labels, mode] + self.s.mode_std * noise

    def batch(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """A training batch drawn inside jit: (latents (n, C, F, H, W), prompt embeddings (n, L, D), labels)."""
        k_label, k_mode, k_noise = jax.random.split(key, 3)
        labels = jax.random.randint(k_label, (n,), 0, self.s.classes)
        mode = jax.random.randint(k_mode, (n,), 0, self.s.modes_per_class)
        x0 = jnp.asarray(self.means)[labels, mode] + self.s.mode_std * jax.random.normal(k_noise, (n, *LATENT), F32)
        return x0, jnp.asarray(self.prompts)[labels], labels


def run_chunks(name: str, step, carry, consts, steps: int, chunk: int, metric_keys: tuple[str, ...],
               every: int = 0, on_chunk=None):
    """Runs `steps` calls of `step(consts, carry, i) -> (carry, metrics)` as jitted lax.scan chunks (no host
    round trip per step; `consts`, e.g. the frozen base, are arguments, not baked-in constants); logs the chunk
    means of the finite metrics. With every > 0, chunks also end on multiples of `every` and
    `on_chunk(carry, done)` runs there."""

    @functools.partial(jax.jit, static_argnums=3)
    def run(carry, consts, start, n):
        return jax.lax.scan(lambda c, i: step(consts, c, i), carry, start + jnp.arange(n))

    done = 0
    while done < steps:
        n = min(chunk, steps - done)
        if every > 0:
            n = min(n, every - done % every)
        carry, m = run(carry, consts, jnp.asarray(done, jnp.int32), n)
        done += n
        parts = []
        for k in metric_keys:
            v = np.asarray(m[k], np.float64)
            v = v[np.isfinite(v)]
            parts.append(f"{k} {v.mean():.4g}" if v.size else f"{k} -")
        log(f"{name} step {done}/{steps} " + " ".join(parts))
        if on_chunk is not None and every > 0 and done % every == 0:
            on_chunk(carry, done)
    return carry


# ---------------------------------------------------------------------------------------------------------
# Distance
# ---------------------------------------------------------------------------------------------------------
def sliced_wasserstein(a: np.ndarray, b: np.ndarray, proj: np.ndarray) -> float:
    """Mean over projections of the exact 1-D W1 between equal-size samples (sorted differences)."""
    a = np.asarray(a, np.float64).reshape(a.shape[0], -1)
    b = np.asarray(b, np.float64).reshape(b.shape[0], -1)
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs equal sample counts and dims, got {a.shape} vs {b.shape}")
    if not np.isfinite(a).all():
        return float("inf")
    pa, pb = np.sort(a @ proj.T, axis=0), np.sort(b @ proj.T, axis=0)
    return float(np.mean(np.abs(pa - pb)))


def mode_stats(data: "ToyData", x: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """Distance (RMS per element) of each sample to the nearest mode of its class (the data's own is mode_std):
    median and 90th percentile; and the largest deviation of a class's mode shares from uniform (mode collapse:
    one mode of a class missing entirely gives >= 1 / modes_per_class)."""
    means = data.means[labels].reshape(len(x), data.s.modes_per_class, -1)
    rms = np.sqrt(np.mean(np.square(np.asarray(x).reshape(len(x), 1, -1) - means), axis=-1))
    near, idx = rms.min(1), rms.argmin(1)
    m = data.s.modes_per_class
    dev = max(np.abs(np.bincount(idx[labels == c], minlength=m) / max(1, np.sum(labels == c)) - 1 / m).max()
              for c in range(data.s.classes))
    return float(np.median(near)), float(np.quantile(near, 0.9)), float(dev)


def describe(data: "ToyData", x: np.ndarray, labels: np.ndarray) -> str:
    """mode_stats for the log."""
    med, p90, dev = mode_stats(data, x, labels)
    return f"nearest-mode RMS median {med:.3f} p90 {p90:.3f}; mode shares max deviation {dev:.3f}"


def projections(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    p = rng.standard_normal((n, dim))
    return p / np.linalg.norm(p, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------------------
# Teacher
# ---------------------------------------------------------------------------------------------------------
def teacher_config(s: Settings) -> WanConfig:
    return WanConfig(patch_size=(1, 2, 2), num_attention_heads=s.width_heads, attention_head_dim=s.head_dim,
                     in_channels=LATENT[0], out_channels=LATENT[0], text_dim=TEXT_DIM, freq_dim=64,
                     ffn_dim=s.ffn_dim, num_layers=s.layers, rope_max_seq_len=32)


def init_teacher(config: WanConfig, rng: np.random.Generator) -> dict:
    """The modules' own initialisers (lecun-normal kernels, zero biases, unit norm scales, randn / sqrt(dim)
    modulation tables), drawn directly from the param shapes: running `WanTransformer.init` costs 5-10 s of tracing on
    a small CPU, and wanjax.init_params (0.02 * randn everywhere, norm scales included) is meant for tests."""
    shapes = param_shapes(config)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    out = []
    for path, sd in leaves:
        name = path[-1].key
        stacked = path[0].key == "blocks"
        shape = sd.shape
        if name == "kernel":
            fan_in = int(np.prod(shape[1 if stacked else 0:-1]))
            out.append(rng.standard_normal(shape) / np.sqrt(fan_in))
        elif name == "bias":
            out.append(np.zeros(shape))
        elif name == "scale":
            out.append(np.ones(shape))
        elif name == "scale_shift_table":
            out.append(rng.standard_normal(shape) / np.sqrt(config.inner_dim))
        else:
            raise ValueError(f"no initialiser for parameter {jax.tree_util.keystr(path)}")
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a, F32) for a in out])


def train_teacher(s: Settings, config: WanConfig, data: ToyData, key: jax.Array) -> dict:
    """Full-parameter flow matching (all weights, no LoRA), AdamW with warmup + cosine decay."""
    params = init_teacher(config, np.random.default_rng(s.seed + 10))
    sched = optax.warmup_cosine_decay_schedule(0.0, s.lr_teacher, min(200, s.steps_teacher // 10 + 1),
                                               s.steps_teacher, s.lr_teacher * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
    opt_state = opt.init(params)
    empty = jnp.asarray(data.empty)
    prompts = jnp.asarray(data.prompts)

    def loss_fn(p, x0, labels, rng):
        k_sigma, k_noise, k_drop = jax.random.split(rng, 3)
        b = x0.shape[0]
        sigma = schedules.sample_sigmas(k_sigma, b, sampler="logit_normal", shift=s.train_shift)
        noise = jax.random.normal(k_noise, x0.shape, F32)
        xt = schedules.add_noise(x0, noise, sigma)
        drop = jax.random.uniform(k_drop, (b,)) < s.caption_dropout
        ctx = jnp.where(drop[:, None, None], empty[None], prompts[labels])
        v = transformer_forward(config, p, xt, 1000.0 * sigma, ctx)
        return jnp.mean(jnp.square(v - schedules.velocity_target(x0, noise)))

    def step(_, carry, i):
        p, o = carry
        k_data, k_loss = jax.random.split(jax.random.fold_in(key, i))
        x0, _, labels = data.batch(k_data, s.batch_teacher)
        loss, g = jax.value_and_grad(loss_fn)(p, x0, labels, k_loss)
        u, o = opt.update(g, o, p)
        return (optax.apply_updates(p, u), o), {"loss": loss}

    params, _ = run_chunks("teacher", step, (params, opt_state), None, s.steps_teacher, s.chunk, ("loss",))
    return params


TEACHER_FIELDS = ("seed", "classes", "modes_per_class", "mode_scale", "mode_std", "width_heads", "head_dim",
                  "ffn_dim", "layers", "steps_teacher", "batch_teacher", "lr_teacher", "train_shift",
                  "caption_dropout", "chunk")


def teacher_cached(s: Settings, config: WanConfig, data: ToyData, key: jax.Array, path: str | None) -> dict:
    """train_teacher, or its params from `path` (numpy .npz) when that file was written with the same teacher
    settings; otherwise trains and (re)writes it. The teacher is deterministic given the settings, so the cache
    only saves time."""
    tag = json.dumps({k: getattr(s, k) for k in TEACHER_FIELDS}, sort_keys=True)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(config))
    names = [jax.tree_util.keystr(p) for p, _ in leaves]
    if path and os.path.exists(path):
        with np.load(path) as z:
            if str(z["__settings__"]) == tag and all(n in z for n in names) and \
                    all(z[n].shape == tuple(sd.shape) for n, (_, sd) in zip(names, leaves)):
                log(f"teacher loaded from {path}")
                return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(z[n], F32) for n in names])
        log(f"teacher cache {path} was written with other settings: retraining")
    params = train_teacher(s, config, data, key)
    if path:
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        tmp = path + ".tmp.npz"
        np.savez(tmp, __settings__=np.asarray(tag), **{jax.tree_util.keystr(p): np.asarray(v) for p, v in flat})
        os.replace(tmp, path)
        log(f"teacher saved to {path}")
    return params


# ---------------------------------------------------------------------------------------------------------
# Samplers (all wanjax's own)
# ---------------------------------------------------------------------------------------------------------
def make_forward(config: WanConfig):
    def forward(base, adapter, x, t, context):
        return transformer_forward(config, base, x, t, context, lora=adapter)

    return forward


def teacher_euler(config, params, data: ToyData, noise, labels, sigmas, g: float) -> np.ndarray:
    """Teacher Euler from noise over `sigmas` (N+1 entries, ending in 0): wanjax.students.euler_sample (unrolled,
    for few steps) or, for many steps, one jitted Euler step of the same denoiser in a Python loop."""
    ctx = jnp.asarray(data.prompts[labels])
    neg = jnp.asarray(data.empty)
    sigmas = np.asarray(sigmas, np.float32)
    if len(sigmas) <= 9:
        fn = jax.jit(lambda p, n, c: students.euler_sample(config, p, n, c, sigmas, negative_prompt_embeds=neg,
                                                             guidance_scale=g))
        return np.asarray(fn(params, jnp.asarray(noise), ctx))
    denoise = students.transformer_denoiser(config, params, negative_prompt_embeds=neg, guidance_scale=g)

    @jax.jit
    def step(x, s, s_next):
        sv = jnp.full((x.shape[0],), s, F32)
        return x + (s_next - s) * denoise(None, x, sv, ctx)

    x = jnp.asarray(noise, F32)
    for i in range(len(sigmas) - 1):
        x = step(x, sigmas[i], sigmas[i + 1])
    return np.asarray(x)


# ---------------------------------------------------------------------------------------------------------
# DMD
# ---------------------------------------------------------------------------------------------------------
def train_dmd(s: Settings, config, params, data: ToyData, spec: LoraSpec, key, on_eval=None):
    """DMD with losses.dmd.dmd_step; `on_eval(state, done)` runs every s.dmd_eval_every steps (if > 0)."""
    cfg = dmdlib.DMDConfig(denoising_steps=s.dmd_timesteps, shift=s.dmd_shift, generator_update_interval=s.dmd_interval,
                           real_score_guidance_scale=s.cfg, fake_score_guidance_scale=0.0,
                           timestep_shift=s.dmd_score_shift, flow_matching_weight=s.dmd_fm_weight)
    if s.lr_dmd_schedule == "cosine":
        gen_lr = optax.cosine_decay_schedule(s.lr_dmd, s.steps_dmd, 0.1)
    elif s.lr_dmd_schedule == "constant":
        gen_lr = optax.constant_schedule(s.lr_dmd)
    else:
        raise ValueError(f"lr_dmd_schedule {s.lr_dmd_schedule!r}: expected 'cosine' or 'constant'")
    gen_opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(gen_lr, b1=0.0, b2=0.999, weight_decay=0.0))
    crit_opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(s.lr_critic, b1=0.0, b2=0.999,
                                                                       weight_decay=0.0))
    gen = lora_lib.init_lora(config, jax.random.fold_in(key, 0), rank=spec.rank, alpha=spec.alpha,
                             targets=spec.targets).params
    critic = lora_lib.init_lora(config, jax.random.fold_in(key, 2), rank=spec.rank, alpha=spec.alpha,
                                targets=spec.targets).params
    state = dmdlib.DMDState(step=jnp.zeros((), jnp.int32), gen=gen, gen_opt=gen_opt.init(gen), critic=critic,
                            critic_opt=crit_opt.init(critic), ema=optim.ema_init(gen),
                            rng=jax.random.key_data(jax.random.fold_in(key, 1)))
    frozen = dmdlib.DMDFrozen(params=params, uncond=jnp.asarray(data.empty))
    forward = make_forward(config)
    empty = jnp.asarray(data.empty)

    def fm_loss(gen_params, batch, rng):
        """The optional regression anchor: the student's flow-matching loss on real latents (caption dropout as
        for the teacher). Only used with dmd_fm_weight > 0; it is the one place DMD sees real data."""
        x0, prompts = batch["latents"], batch["prompt_embeds"]
        k_sigma, k_noise, k_drop = jax.random.split(rng, 3)
        b = x0.shape[0]
        sigma = schedules.sample_sigmas(k_sigma, b, sampler="logit_normal", shift=s.train_shift)
        noise = jax.random.normal(k_noise, x0.shape, F32)
        drop = jax.random.uniform(k_drop, (b,)) < s.caption_dropout
        ctx = jnp.where(drop[:, None, None], empty[None], prompts)
        v = forward(frozen.params, spec.wrap(gen_params), schedules.add_noise(x0, noise, sigma), 1000.0 * sigma, ctx)
        return jnp.mean(jnp.square(v - schedules.velocity_target(x0, noise)))

    step = functools.partial(dmdlib.dmd_step, forward=forward, gen_adapter=spec.wrap,
                             critic_adapter=spec.wrap, cfg=cfg, gen_optimizer=gen_opt, critic_optimizer=crit_opt,
                             schedule=gen_lr, ema_update=functools.partial(optim.ema_update, decay=s.dmd_ema),
                             fm_loss=fm_loss if s.dmd_fm_weight > 0 else None)
    data_key = jax.random.fold_in(key, 3)

    def body(frozen, state, i):  # DMD needs prompts and the latent shape only: no real latents (unless fm_loss)
        x0, prompts, _ = data.batch(jax.random.fold_in(data_key, i), s.batch_dmd)
        latents = x0 if s.dmd_fm_weight > 0 else jnp.zeros_like(x0)
        return step(state, frozen, {"latents": latents, "prompt_embeds": prompts})

    state = run_chunks("dmd", body, state, frozen, s.steps_dmd, s.chunk,
                       ("dmd_loss", "fake_score_loss", "generator_grad_norm"), every=s.dmd_eval_every,
                       on_chunk=on_eval)
    return state, cfg


def dmd_sampler(config, spec, cfg, key):
    """The DMD student sampler (losses.dmd.student_sample), jitted once: fn(base, gen LoRA params or None, noise,
    context) (None: the teacher itself)."""
    forward = make_forward(config)
    sigmas = dmdlib.student_sigmas(cfg)

    @jax.jit
    def fn(params, gen, n, c):
        def denoise(adapter, x, sigma, ctx):
            return forward(params, adapter, x, 1000.0 * sigma, ctx)

        return dmdlib.student_sample(denoise, spec.wrap(gen) if gen is not None else None, n, c,
                                     jnp.asarray(sigmas), key)

    return fn


def sample_dmd(config, params, data, spec, gen, cfg, noise, labels, key) -> np.ndarray:
    """The DMD student sampler with LoRA params `gen` (None: the teacher itself)."""
    fn = dmd_sampler(config, spec, cfg, key)
    return np.asarray(fn(params, gen, jnp.asarray(noise), jnp.asarray(data.prompts[labels])))


# ---------------------------------------------------------------------------------------------------------
# DCM
# ---------------------------------------------------------------------------------------------------------
def dcm_config(s: Settings) -> dcmlib.DCMConfig:
    return dcmlib.DCMConfig(mode="semantic", euler_steps=s.dcm_euler_steps, shift=s.dcm_shift, multiphase=4,
                            distill_cfg=s.cfg, target="ema", target_decay=0.95)


def train_dcm(s: Settings, config, params, data: ToyData, spec: LoraSpec, key):
    cfg = dcm_config(s)
    lr = optax.cosine_decay_schedule(s.lr_dcm, s.steps_dcm, 0.1)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.0))
    gen = lora_lib.init_lora(config, jax.random.fold_in(key, 0), rank=spec.rank, alpha=spec.alpha,
                             targets=spec.targets).params
    state = dcmlib.DCMState(step=jnp.zeros((), jnp.int32), gen=gen, gen_opt=opt.init(gen),
                            target=jax.tree_util.tree_map(jnp.array, gen), detail=None, detail_opt=None,
                            detail_target=None, disc=None, disc_opt=None, ema=None, detail_ema=None,
                            rng=jax.random.key_data(jax.random.fold_in(key, 1)))
    frozen = dcmlib.DCMFrozen(params=params, uncond=jnp.asarray(data.empty), empty=jnp.asarray(data.empty))
    step = functools.partial(dcmlib.dcm_step, forward=make_forward(config), features=None, disc_apply=None,
                             wrap=spec.wrap, cfg=cfg, optimizer=opt, disc_optimizer=None,
                             schedule=lr, patch_size=config.patch_size)
    data_key = jax.random.fold_in(key, 3)

    def body(frozen, state, i):  # consistency distillation starts from real latents
        x0, prompts, _ = data.batch(jax.random.fold_in(data_key, i), s.batch_dcm)
        return step(state, frozen, {"latents": x0, "prompt_embeds": prompts})

    state = run_chunks("dcm", body, state, frozen, s.steps_dcm, s.chunk, ("dcm_loss", "grad_norm"))
    return state, cfg


def sample_dcm(config, params, data, spec, state, cfg, noise, labels) -> np.ndarray:
    forward = make_forward(config)

    def denoise(adapter, x, sigma, ctx):
        return forward(params, adapter, x, 1000.0 * sigma, ctx)

    fn = jax.jit(lambda gen, n, c: dcmlib.dcm_sample(denoise, {"semantic": spec.wrap(gen)}, n, c, cfg))
    return np.asarray(fn(state.gen, jnp.asarray(noise), jnp.asarray(data.prompts[labels])))


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny budget (for the test): numbers are not meaningful")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps-teacher", type=int)
    ap.add_argument("--steps-dmd", type=int)
    ap.add_argument("--steps-dcm", type=int)
    ap.add_argument("--cfg", type=float, help="teacher guidance scale (v_u + g (v_c - v_u)) everywhere")
    ap.add_argument("--only", choices=("all", "dmd", "dcm"), default="all",
                    help="dmd / dcm: train that student only and skip the extra teacher baselines")
    ap.add_argument("--teacher-cache", metavar="PATH",
                    help="load the trained teacher from this .npz if it was saved with the same teacher settings, "
                         "else train it and save it there")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override any Settings field, e.g. --set dmd_interval=5 --set lr_dmd_schedule=constant")
    ap.add_argument("--out", help="also write the JSON result here")
    args = ap.parse_args(argv)
    s = Settings(seed=args.seed)
    if args.quick:
        s = quick(s)
    for name in ("steps_teacher", "steps_dmd", "steps_dcm", "cfg"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            ap.error(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
        kind = type(getattr(s, name))
        if kind is bool:
            v = value.lower() in ("1", "true", "yes")
        elif kind is tuple:
            v = tuple(type(getattr(s, name)[0])(x) for x in value.split(","))
        else:
            v = kind(value)
        setattr(s, name, v)
    if args.only != "all":
        s.extras = False
    if args.set or args.only != "all":
        log(f"settings: {dataclasses.asdict(s)}")
    t_start = time.perf_counter()
    timings = {}

    data = ToyData(s, np.random.default_rng(s.seed))
    config = teacher_config(s)
    key = jax.random.key(s.seed)
    dim = int(np.prod(LATENT))
    proj = projections(np.random.default_rng(s.seed + 100), s.projections, dim)
    ev = np.random.default_rng(s.seed + 200)
    labels = data.labels(s.n_eval)
    ref = data.sample(ev, labels)  # the data every sampler is compared with
    noise = ev.standard_normal((s.n_eval, *LATENT)).astype(np.float32)  # the same starting noise for every sampler
    res: dict[str, float] = {}

    def dist(x):
        log(f"  {describe(data, x, labels)}")
        return sliced_wasserstein(x, ref, proj)

    res["data_vs_data"] = dist(data.sample(ev, labels))
    log(f"data vs data (noise floor) {res['data_vs_data']:.4f}")

    t0 = time.perf_counter()
    params = teacher_cached(s, config, data, jax.random.fold_in(key, 1), args.teacher_cache)
    timings["teacher_train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    _, sig50 = schedules.euler_schedule(50, s.sample_shift)
    res["teacher_50"] = dist(teacher_euler(config, params, data, noise, labels, sig50, s.cfg))
    log(f"teacher 50-step Euler (shift {s.sample_shift}): {res['teacher_50']:.4f}")
    _, sig3 = schedules.euler_schedule(3, s.dmd_shift)
    res["teacher_fewstep"] = res["teacher_3"] = dist(teacher_euler(config, params, data, noise, labels, sig3, s.cfg))
    log(f"teacher 3-step Euler (shift {s.dmd_shift}, sigmas {np.round(sig3, 3).tolist()}): {res['teacher_3']:.4f}")
    if s.extras:
        dmd_sig = np.append(dmdlib.student_sigmas(dmdlib.DMDConfig(denoising_steps=s.dmd_timesteps, shift=s.dmd_shift)), 0)
        res["teacher_3_student_sigmas"] = dist(teacher_euler(config, params, data, noise, labels, dmd_sig, s.cfg))
        log(f"teacher 3-step Euler over the DMD student's sigmas {np.round(dmd_sig, 3).tolist()}: "
            f"{res['teacher_3_student_sigmas']:.4f}")
        dcm_sig = dcmlib.dcm_student_sigmas(dcm_config(s))
        res["teacher_4"] = dist(teacher_euler(config, params, data, noise, labels, dcm_sig, s.cfg))
        log(f"teacher 4-step Euler over the DCM student's sigmas {np.round(dcm_sig, 3).tolist()}: {res['teacher_4']:.4f}")
        for n in (3, 4):
            best = min(dist(teacher_euler(config, params, data, noise, labels, schedules.euler_schedule(n, sh)[1], s.cfg))
                       for sh in s.shift_sweep)
            res[f"teacher_{n}_best"] = best
            log(f"teacher {n}-step Euler, best over shifts {list(s.shift_sweep)}: {best:.4f}")
    timings["teacher_eval_s"] = time.perf_counter() - t0

    spec = LoraSpec(rank=s.lora_rank, alpha=float(s.lora_rank), targets=lora_lib.parse_targets(s.lora_targets))
    sample_key = jax.random.key(s.seed + 300)
    cfg_dmd = dmdlib.DMDConfig(denoising_steps=s.dmd_timesteps, shift=s.dmd_shift)
    if s.extras:
        res["teacher_3_renoise"] = dist(sample_dmd(config, params, data, spec, None, cfg_dmd, noise, labels,
                                                   sample_key))
        log(f"DMD sampler with the teacher (the student before training): {res['teacher_3_renoise']:.4f}")

    if args.only in ("all", "dmd"):
        sampler = dmd_sampler(config, spec, cfg_dmd, sample_key)
        ctx = jnp.asarray(data.prompts[labels])
        trace = []

        def on_eval(state, done):  # the EMA student (what is sampled at the end) and the raw student
            row = {"step": done}
            for name, gen in (("ema", state.ema), ("raw", state.gen)):
                x = np.asarray(sampler(params, gen, jnp.asarray(noise), ctx))
                row[name] = sliced_wasserstein(x, ref, proj)
                row[f"{name}_mode_dev"] = mode_stats(data, x, labels)[2]
            trace.append(row)
            log(f"dmd eval step {done}: ema {row['ema']:.4f} (mode dev {row['ema_mode_dev']:.3f}), "
                f"raw {row['raw']:.4f} (mode dev {row['raw_mode_dev']:.3f})")

        t0 = time.perf_counter()
        state, cfg_dmd = train_dmd(s, config, params, data, spec, jax.random.fold_in(key, 2), on_eval)
        timings["dmd_train_s"] = time.perf_counter() - t0
        x = np.asarray(sampler(params, state.ema, jnp.asarray(noise), ctx))
        res["dmd"] = dist(x)
        res["dmd_mode_dev"] = mode_stats(data, x, labels)[2]
        if trace:
            res["dmd_trace"] = trace
        log(f"DMD student (3 steps, sigmas {np.round(dmdlib.student_sigmas(cfg_dmd), 3).tolist()}): {res['dmd']:.4f}")

    if args.only in ("all", "dcm"):
        t0 = time.perf_counter()
        state, cfg_dcm = train_dcm(s, config, params, data, spec, jax.random.fold_in(key, 3))
        timings["dcm_train_s"] = time.perf_counter() - t0
        res["dcm"] = dist(sample_dcm(config, params, data, spec, state, cfg_dcm, noise, labels))
        log(f"DCM student (4 steps, sigmas {np.round(dcmlib.dcm_student_sigmas(cfg_dcm), 3).tolist()}): "
            f"{res['dcm']:.4f}")

    timings["total_s"] = time.perf_counter() - t_start
    out = {k: res.get(k, float("nan")) for k in ("teacher_50", "teacher_fewstep", "dmd", "dcm")}
    out.update({k: v for k, v in res.items() if k not in out})
    out.update({k: round(v, 1) for k, v in timings.items()})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
