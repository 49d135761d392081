"""LoRA fine-tuning with flow matching (SimpleTuner's Wan LoRA job) as a trainer method."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from wanjax import optim
from wanjax.losses import flow_matching as fmlib
from wanjax.methods import Context, Method


def build(ctx: Context) -> Method:
    c = ctx.config
    spec = ctx.lora_spec()
    optimizer = optim.make_optimizer(ctx.optim)
    schedule = optim.make_schedule(ctx.optim)

    def init_state(key):
        params = ctx.init_lora_params(spec, key)
        return fmlib.TrainState(step=jnp.zeros((), jnp.int32), lora=params, opt_state=optimizer.init(params),
                                ema=optim.ema_init(params) if c.use_ema else None,
                                rng=jax.random.key_data(jax.random.fold_in(key, 1)))

    ema_update = None
    if c.use_ema:
        ema_update = functools.partial(optim.ema_update, decay=c.ema_decay, update_interval=c.ema_update_interval)
    loss_fn = functools.partial(fmlib.flow_matching_loss, model=ctx.model, lora=spec, fm=ctx.fm)
    step = functools.partial(fmlib.train_step, loss_fn=loss_fn, optimizer=optimizer, schedule=schedule,
                             ema_update=ema_update, accum=int(c.gradient_accumulation_steps))

    def exports(state, final: bool):
        # checkpoints export the trained adapter (a schedule-free optimizer's x sequence); the final export prefers
        # the EMA weights when kept
        params = state.ema if (final and state.ema is not None) else optim.eval_params(state.opt_state, state.lora)
        return {"pytorch_lora_weights": spec.wrap(params)}

    def sample(state, ema, noise, cond, uncond, key, validator):
        """WanPipeline's loop (wanjax.sample) with the adapter: validation_scheduler / steps / guidance."""
        from wanjax.sample import sample as pipeline_sample
        from wanjax.validation import method_sampler_kwargs

        del key  # the pipeline's samplers are deterministic given the noise
        params = state.ema if ema else optim.eval_params(state.opt_state, state.lora)
        return pipeline_sample(ctx.model, ctx.base, noise, cond, negative_prompt_embeds=uncond, lora=spec.wrap(params),
                               **method_sampler_kwargs(validator))

    frozen = fmlib.Frozen(params=ctx.base, empty_prompt_embeds=ctx.text_embeds["empty"])
    meta = {"lora": {"rank": spec.rank, "alpha": spec.alpha, "targets": list(spec.targets)}}
    return Method("lora", init_state, step, frozen, exports, meta, sample=sample)
