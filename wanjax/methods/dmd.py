"""DMD distillation (DMD2 form) as a trainer method: student LoRA + critic LoRA over ONE frozen base (teacher)."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import optax

from wanjax import lora as lora_lib
from wanjax import optim, students
from wanjax.losses import dmd as dmdlib
from wanjax.losses import flow_matching as fmlib
from wanjax.methods import Context, Method
from wanjax.models.transformer import transformer_forward

logger = logging.getLogger(__name__)

# The distillation_config keys DMD reads (configs/common.py `dmd_options` gives their defaults; tested equal).
OPTIONS = frozenset({
    "dmd_denoising_steps", "min_timestep_ratio", "max_timestep_ratio", "generator_update_interval",
    "real_score_guidance_scale", "fake_score_guidance_scale", "fake_score_lr", "fake_score_betas", "fake_score_eps",
    "fake_score_weight_decay", "fake_score_grad_clip", "min_score_timestep", "timestep_shift", "ts_schedule",
    "ts_schedule_max", "last_step_only", "num_training_frames", "flow_matching_weight", "num_frame_per_block",
    "independent_first_frame", "same_step_across_blocks", "context_noise",
})

# Self-Forcing options: a bidirectional Wan student rolls the whole clip out at once.
NO_EFFECT = {
    "num_frame_per_block": "block-causal (Self-Forcing) rollout; the Wan student is bidirectional and denoises "
                           "the whole clip at once",
    "independent_first_frame": "block-causal (Self-Forcing) rollout option; no blocks in a bidirectional student",
    "same_step_across_blocks": "block-causal (Self-Forcing) rollout option; no blocks in a bidirectional student",
    "context_noise": "noise on the cached context of earlier blocks; a bidirectional student has no block cache",
}


def parse_steps(text) -> tuple[float, ...]:
    if isinstance(text, (list, tuple)):
        return tuple(float(t) for t in text)
    return tuple(float(t) for t in str(text).split(",") if t.strip())


def dmd_config(c) -> dmdlib.DMDConfig:
    d = c.distillation_config
    return dmdlib.DMDConfig(
        denoising_steps=parse_steps(d.dmd_denoising_steps), shift=float(c.flow_schedule_shift),
        generator_update_interval=int(d.generator_update_interval),
        real_score_guidance_scale=float(d.real_score_guidance_scale),
        fake_score_guidance_scale=float(d.fake_score_guidance_scale),
        min_timestep_ratio=float(d.min_timestep_ratio), max_timestep_ratio=float(d.max_timestep_ratio),
        timestep_shift=float(d.timestep_shift), min_score_timestep=float(d.min_score_timestep),
        ts_schedule=bool(d.ts_schedule), ts_schedule_max=bool(d.ts_schedule_max), last_step_only=bool(d.last_step_only),
        flow_matching_weight=float(d.flow_matching_weight),
    )


def critic_optimizer(d) -> optax.GradientTransformation:
    """The critic's own AdamW (fake_score_*) after a gradient-norm clip (fake_score_grad_clip)."""
    return optim.clipped_adamw(d.fake_score_lr, d.fake_score_betas, d.fake_score_eps, d.fake_score_weight_decay,
                               d.fake_score_grad_clip)


def build(ctx: Context) -> Method:
    c, d = ctx.config, ctx.config.distillation_config
    cfg = dmd_config(c)
    for key, reason in NO_EFFECT.items():
        logger.warning("distillation_config.%s=%r has no effect: %s", key, d[key], reason)
    if int(c.gradient_accumulation_steps) != 1:
        raise ValueError("DMD steps one generator/critic update per optimizer step: set gradient_accumulation_steps=1")
    spec = ctx.lora_spec()
    gen_opt = optim.make_optimizer(ctx.optim)
    crit_opt = critic_optimizer(d)
    schedule = optim.make_schedule(ctx.optim)

    def init_state(key):
        gen = ctx.init_lora_params(spec, key)
        # the critic starts as the teacher (B = 0) and learns the student's distribution
        critic = lora_lib.init_lora(ctx.model, jax.random.fold_in(key, 2), rank=spec.rank, alpha=spec.alpha,
                                    targets=spec.targets).params
        return dmdlib.DMDState(step=jnp.zeros((), jnp.int32), gen=gen, gen_opt=gen_opt.init(gen), critic=critic,
                               critic_opt=crit_opt.init(critic), ema=optim.ema_init(gen) if c.use_ema else None,
                               rng=jax.random.key_data(jax.random.fold_in(key, 1)))

    def forward(base, adapter, x, t, context):
        return transformer_forward(ctx.model, base, x, t, context, lora=adapter)

    empty = ctx.text_embeds["empty"]

    def fm_loss(params, batch, rng, base):
        frozen = fmlib.Frozen(params=base, empty_prompt_embeds=empty)
        return fmlib.flow_matching_loss(params, frozen, batch, rng, model=ctx.model, lora=spec, fm=ctx.fm)[0]

    ema_update = None
    if c.use_ema:
        ema_update = functools.partial(optim.ema_update, decay=c.ema_decay, update_interval=c.ema_update_interval)
    frozen = dmdlib.DMDFrozen(params=ctx.base, uncond=ctx.text_embeds.get("negative", empty))

    def generator_phase(state, frozen, batch):
        return dmdlib.dmd_generator_phase(
            state, frozen, batch, forward=forward, gen_adapter=spec.wrap, critic_adapter=spec.wrap, cfg=cfg,
            gen_optimizer=gen_opt, max_latent_frames=int(d.num_training_frames) if d.num_training_frames else None,
            fm_loss=(lambda p, b, r: fm_loss(p, b, r, frozen.params)) if cfg.flow_matching_weight > 0 else None,
        )

    def critic_phase(state, frozen, batch, carry):
        return dmdlib.dmd_critic_phase(state, frozen, batch, carry, forward=forward, critic_adapter=spec.wrap,
                                       cfg=cfg, critic_optimizer=crit_opt, schedule=schedule, ema_update=ema_update)

    def step(state, frozen, batch):  # dmd_step: the two phases in one program
        state, carry = generator_phase(state, frozen, batch)
        return critic_phase(state, frozen, batch, carry)

    def exports(state, final: bool):
        gen = state.ema if (final and state.ema is not None) else optim.eval_params(state.gen_opt, state.gen)
        return {"pytorch_lora_weights": spec.wrap(gen), "fake_score_lora_weights": spec.wrap(state.critic)}

    meta = {"lora": {"rank": spec.rank, "alpha": spec.alpha, "targets": list(spec.targets), "state_key": "gen",
                     "opt_key": "gen_opt"},
            "student": {"kind": "dmd", "timesteps": list(cfg.denoising_steps), "shift": cfg.shift,
                        "sigmas": [float(s) for s in dmdlib.student_sigmas(cfg)]}}
    sigmas = dmdlib.student_sigmas(cfg)

    @functools.partial(jax.jit, static_argnames=("guidance",))
    def student(base, gen, noise, cond, uncond, key, guidance):
        return students.renoise_sample(ctx.model, base, noise, cond, sigmas, key, lora=spec.wrap(gen),
                                       negative_prompt_embeds=uncond if guidance > 1 else None,
                                       guidance_scale=guidance)

    def sample(state, ema, noise, cond, uncond, key, validator):
        """The 3-step student (re-noising over its sigmas); validation_guidance > 1 adds CFG."""
        gen = state.ema if ema else optim.eval_params(state.gen_opt, state.gen)
        return student(ctx.base, gen, noise, cond, uncond, key, guidance=float(validator.s.guidance))

    return Method("dmd", init_state, step, frozen, exports, meta, loss_key="fake_score_loss", sample=sample,
                  phases=(generator_phase, critic_phase))
