"""DCM distillation (phase-wise consistency, semantic + fine) as a trainer method: the student LoRA (optionally a
semantic and a detail expert), EMA consistency targets and, in fine mode, discriminator heads, over ONE frozen base."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import optax

from wanjax import optim, students
from wanjax.losses import dcm as dcmlib
from wanjax.methods import Context, Method
from wanjax.models.config import WanConfig
from wanjax.models.transformer import transformer_forward

logger = logging.getLogger(__name__)

DETAIL_EXPORT = "detail_expert_lora_weights"  # the detail expert's LoRA file (dual experts), beside the student's

# The distillation_config keys DCM reads (configs/common.py `dcm_options` gives their defaults; tested equal).
OPTIONS = frozenset({
    "mode", "euler_steps", "euler_timesteps", "dcm_shift", "multiphase", "distill_cfg", "adv_weight", "model_family",
    "discriminator_head_stride", "discriminator_total_layers", "discriminator_width", "discriminator_lr",
    "discriminator_betas", "discriminator_eps", "discriminator_weight_decay", "discriminator_grad_clip",
    "adv_sigma_range", "pseudo_huber_c", "temporal_loss_weight", "temporal_frame_stride", "target_model",
    "ema_target_decay", "dual_experts", "expert_boundary",
})


def euler_steps(d) -> int:
    """E from `euler_steps` (SimpleTuner's docs) or `euler_timesteps` (its code); both set must agree."""
    a, b = d.euler_steps, d.euler_timesteps
    if a is not None and b is not None and int(a) != int(b):
        raise ValueError(f"euler_steps={a} and euler_timesteps={b} disagree; they are one setting (set one)")
    value = a if a is not None else b
    return 50 if value is None else int(value)  # 50: SimpleTuner's default when neither is set


def dcm_config(c, model: WanConfig | None = None) -> dcmlib.DCMConfig:
    """The typed DCM options of config `c`; raises ValueError on a setting that cannot work (call before compute)."""
    d = c.distillation_config
    shift = float(c.flow_schedule_shift)
    if d.dcm_shift is not None and float(d.dcm_shift) != shift:
        raise ValueError(f"dcm_shift={d.dcm_shift} differs from flow_schedule_shift={shift}: the grid the student "
                         "is trained on and the sampler it ships with must share one shift (leave dcm_shift unset)")
    if d.model_family not in (None, "wan"):
        raise ValueError(f"distillation_config.model_family={d.model_family!r}: wanjax distils Wan ('wan')")
    layers = d.discriminator_total_layers
    if model is not None and layers is not None and int(layers) != model.num_layers:
        raise ValueError(f"discriminator_total_layers={d.discriminator_total_layers}, but the base has "
                         f"{model.num_layers} blocks (the heads are derived from the model; leave it unset)")
    if model is not None and d.mode == "fine" and model.has_image_embedder:
        raise ValueError("DCM fine mode supports text-to-video bases only")
    betas = tuple(float(x) for x in d.discriminator_betas)
    if len(betas) != 2 or not all(0 <= x < 1 for x in betas) or float(d.discriminator_lr) <= 0:
        raise ValueError(f"discriminator_betas={d.discriminator_betas}, discriminator_lr={d.discriminator_lr}: "
                         "expected two betas in [0, 1) and a positive learning rate")
    return dcmlib.DCMConfig(
        mode=str(d.mode), euler_steps=euler_steps(d), shift=shift, multiphase=int(d.multiphase),
        distill_cfg=float(d.distill_cfg), huber_c=float(d.pseudo_huber_c),
        temporal_weight=float(d.temporal_loss_weight), temporal_stride=int(d.temporal_frame_stride),
        target=str(d.target_model), target_decay=float(d.ema_target_decay), dual_experts=bool(d.dual_experts),
        expert_boundary=float(d.expert_boundary), adv_weight=float(d.adv_weight),
        adv_sigma_range=float(d.adv_sigma_range), head_stride=int(d.discriminator_head_stride),
        disc_width=int(d.discriminator_width), caption_dropout_probability=float(c.caption_dropout_probability),
    )


def discriminator_optimizer(d) -> optax.GradientTransformation:
    """AdamW (discriminator_lr, betas, eps, weight decay) after a torch-style gradient-norm clip."""
    return optim.clipped_adamw(d.discriminator_lr, d.discriminator_betas, d.discriminator_eps,
                               d.discriminator_weight_decay, d.discriminator_grad_clip)


def build(ctx: Context) -> Method:
    c, d = ctx.config, ctx.config.distillation_config
    cfg = dcm_config(c, ctx.model)
    if int(c.gradient_accumulation_steps) != 1:
        raise ValueError("DCM takes one consistency (+ discriminator) update per optimizer step: set "
                         "gradient_accumulation_steps=1")
    spec = ctx.lora_spec()
    optimizer = optim.make_optimizer(ctx.optim)
    schedule = optim.make_schedule(ctx.optim)
    layers = dcmlib.feature_layers(ctx.model.num_layers, cfg.head_stride)
    disc = dcmlib.Discriminator(num_heads=len(layers), width=cfg.disc_width, groups=cfg.disc_groups)
    disc_opt = discriminator_optimizer(d) if cfg.fine else None

    def adapter(key):
        return ctx.init_lora_params(spec, key)

    def init_state(key):
        gen = adapter(key)
        detail = adapter(jax.random.fold_in(key, 3)) if cfg.dual_experts else None
        copy = functools.partial(jax.tree_util.tree_map, lambda x: jnp.array(x, jnp.float32))
        ema_target = cfg.target == "ema"
        disc_params = None
        if cfg.fine:
            dummy = [jnp.zeros((1, 1, ctx.model.inner_dim), jnp.float32)] * len(layers)
            disc_params = disc.init(jax.random.fold_in(key, 4), dummy, (1, 1, 1))["params"]
        return dcmlib.DCMState(
            step=jnp.zeros((), jnp.int32), gen=gen, gen_opt=optimizer.init(gen),
            target=copy(gen) if ema_target else None,
            detail=detail, detail_opt=optimizer.init(detail) if detail is not None else None,
            detail_target=copy(detail) if (ema_target and detail is not None) else None,
            disc=disc_params, disc_opt=disc_opt.init(disc_params) if cfg.fine else None,
            ema=optim.ema_init(gen) if c.use_ema else None,
            detail_ema=optim.ema_init(detail) if (c.use_ema and detail is not None) else None,
            rng=jax.random.key_data(jax.random.fold_in(key, 1)),
        )

    def forward(base, adapter_obj, x, t, context):
        return transformer_forward(ctx.model, base, x, t, context, lora=adapter_obj)

    def features(base, x, t, context):
        return dcmlib.base_features(ctx.model, base, x, t, context, stride=cfg.head_stride)

    def disc_apply(params, feats, grid):
        return disc.apply({"params": params}, feats, grid)

    ema_update = None
    if c.use_ema:
        ema_update = functools.partial(optim.ema_update, decay=c.ema_decay, update_interval=c.ema_update_interval)
    empty = ctx.text_embeds["empty"]
    frozen = dcmlib.DCMFrozen(params=ctx.base, uncond=ctx.text_embeds.get("negative", empty), empty=empty)
    if "negative" not in ctx.text_embeds:
        logger.info("DCM teacher CFG uses the empty-prompt embedding as unconditional (no negative prompt cached)")
    step = functools.partial(
        dcmlib.dcm_step, forward=forward, features=features if cfg.fine else None,
        disc_apply=disc_apply if cfg.fine else None, wrap=spec.wrap, cfg=cfg, optimizer=optimizer,
        disc_optimizer=disc_opt, schedule=schedule, patch_size=ctx.model.patch_size, ema_update=ema_update,
    )

    def exports(state, final: bool):
        def pick(trained, ema):
            return ema if (final and ema is not None) else trained

        out = {"pytorch_lora_weights": spec.wrap(pick(optim.eval_params(state.gen_opt, state.gen), state.ema))}
        if cfg.dual_experts:
            detail = optim.eval_params(state.detail_opt, state.detail)
            out[DETAIL_EXPORT] = spec.wrap(pick(detail, state.detail_ema))
        return out

    sigmas = [float(s) for s in dcmlib.dcm_student_sigmas(cfg)]
    lora_meta = {"rank": spec.rank, "alpha": spec.alpha, "targets": list(spec.targets), "state_key": "gen",
                 "opt_key": "gen_opt"}
    student = {"kind": "dcm", "sigmas": sigmas, "shift": cfg.shift, "euler_steps": cfg.euler_steps,
               "multiphase": cfg.multiphase, "experts": list(dcmlib.dcm_student_experts(cfg))}
    if cfg.dual_experts:
        lora_meta["detail_state_key"] = "detail"
        student["detail_lora"] = DETAIL_EXPORT
        # the detail expert runs the steps that start at sigma <= switch_sigma
        student["switch_sigma"] = float(dcmlib.dcm_grid(cfg)[dcmlib.split_index(cfg)])
    meta = {"lora": lora_meta, "student": student, "dcm": {"mode": cfg.mode, "target": cfg.target,
                                                           "discriminator_layers": list(layers) if cfg.fine else []}}
    switch_sigma = student.get("switch_sigma")

    @functools.partial(jax.jit, static_argnames=("guidance",))
    def student_sample(base, gen, detail, noise, cond, uncond, guidance):
        return students.euler_sample(
            ctx.model, base, noise, cond, sigmas, lora=spec.wrap(gen),
            lora_switch=spec.wrap(detail) if detail is not None else None, switch_sigma=switch_sigma,
            negative_prompt_embeds=uncond if guidance > 1 else None, guidance_scale=guidance)

    def sample(state, ema, noise, cond, uncond, key, validator):
        """The 4-step student (Euler over its phase floors; the detail expert below switch_sigma when dual)."""
        del key
        gen = state.ema if ema else optim.eval_params(state.gen_opt, state.gen)
        detail = (state.detail_ema if ema else optim.eval_params(state.detail_opt, state.detail)) if (
            cfg.dual_experts) else None
        return student_sample(ctx.base, gen, detail, noise, cond, uncond, guidance=float(validator.s.guidance))

    return Method("dcm", init_state, step, frozen, exports, meta, loss_key="dcm_loss", sample=sample)
