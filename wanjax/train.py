"""The trainer: `python -m wanjax.train --config configs/lora.py[:variant] [--config.key=value ...] [--dry_run]`.

Orchestration only; the math lives in pure step functions (wanjax/losses). Phases:
  1. resolve and validate everything (config, model files, cache, LoRA file) before any compute
  2. mesh and the frozen base, sharded as it is read
  3. trainable state (LoRA, optimizer, EMA), sharded
  4. data iterator, checkpoints, resume
  5. the loop: batches -> jitted step -> metrics -> checkpoints + LoRA export
  6. final export: pytorch_lora_weights.safetensors + config.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger("wanjax.train")

REPORT_TO = ("wandb", "none")
DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32, "no": jnp.float32}


class ConfigError(ValueError):
    """A setting that cannot work; raised before any compute."""


# =========================================================================================================
# Phase 1: resolve and validate
# =========================================================================================================
@dataclasses.dataclass(frozen=True)
class Resolved:
    """What the run will use, decided and checked before any compute."""

    model_path: str  # the diffusers pipeline: VAE, text encoder, scheduler (validation, caching)
    transformer_path: str  # where the base transformer is read
    subfolder: str | None
    base_dtype: Any
    reader: Any  # ParamReader of the base transformer (headers read, no weights)
    manifest: Any
    lora_targets: tuple[str, ...]
    lora_alpha: float
    init_lora: Any  # LoraWeights or None
    optim: Any  # OptimConfig
    fm: Any  # FlowMatchingConfig
    iterator: Any  # the data iterator (its batch plan already validated)
    method: str = "lora"
    max_train_steps: int = 0  # optimizer steps of the run (from num_train_epochs when that is set)


def resolve(config) -> Resolved:
    from wanjax import lora as lora_lib
    from wanjax import optim
    from wanjax.data import pipeline, records
    from wanjax.model_source import resolve_model
    from wanjax.losses.flow_matching import FlowMatchingConfig
    from wanjax.transformer_io import open_reader

    if config.model_type != "lora":
        raise ConfigError(f"model_type={config.model_type!r}: wanjax trains LoRA adapters ('lora')")
    if config.mixed_precision not in DTYPES:
        raise ConfigError(f"mixed_precision={config.mixed_precision!r}: expected one of {sorted(DTYPES)}")
    if config.train_batch_size < 1 or config.gradient_accumulation_steps < 1:
        raise ConfigError("train_batch_size and gradient_accumulation_steps must be >= 1")
    if config.use_ema and not 0.0 < config.ema_decay < 1.0:
        raise ConfigError(f"ema_decay={config.ema_decay}: expected a number in (0, 1)")
    if config.log_every < 1:
        raise ConfigError(f"log_every={config.log_every}: expected >= 1 (log every N optimizer steps)")
    if config.checkpoints_total_limit < 0:
        raise ConfigError(f"checkpoints_total_limit={config.checkpoints_total_limit}: expected >= 0 (0 keeps every "
                          "checkpoint)")
    if config.lora_export_format not in lora_lib.FORMATS:
        raise ConfigError(f"lora_export_format={config.lora_export_format!r}: expected one of {lora_lib.FORMATS}")
    for key in ("seed", "validation_seed"):  # JAX keys take 32 bits: a larger seed would repeat a smaller one's noise
        if config.get(key) is not None and not 0 <= config[key] < 2**32:
            raise ConfigError(f"{key}={config[key]}: expected an integer in [0, 2**32)")
    if config.report_to not in REPORT_TO:
        raise ConfigError(f"report_to={config.report_to!r}: expected one of {REPORT_TO} (wanjax logs to "
                          "output_dir/metrics.jsonl and, with 'wandb', to Weights & Biases)")
    if config.max_train_steps < 0 or config.num_train_epochs < 0 or (config.max_train_steps > 0) == (
            config.num_train_epochs > 0):
        raise ConfigError(f"max_train_steps={config.max_train_steps}, num_train_epochs={config.num_train_epochs}: "
                          "set exactly one of them > 0 and the other to 0 (as SimpleTuner)")
    if config.tiny_assets_dir:
        from wanjax import tiny

        tiny.ensure_assets(config.tiny_assets_dir)

    try:
        source = resolve_model(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    path, sub = source.transformer, source.subfolder
    key = ("pretrained_transformer_model_name_or_path" if config.get("pretrained_transformer_model_name_or_path")
           else "pretrained_model_name_or_path")
    try:
        reader = open_reader(path, subfolder=sub, expert=source.expert)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{key}={path!r}: {e}") from None
    except Exception as e:  # hub errors (offline, missing repo) come in many types
        raise ConfigError(f"{key}={path!r}: not a local path and the hub download failed: {e}") from None
    model = reader.config
    if model.image_conditioning:
        raise ConfigError(
            f"{path}: {model.image_conditioning}: image-conditioned (I2V) training needs conditioning latents in the "
            "cache, which the LoRA trainer does not build yet"
        )

    if config.data_backend_config:
        # no cache yet, new files or changed settings: the same code as `python -m wanjax.cache` (which caches only
        # what is missing, and refuses a cache made with other settings)
        from wanjax.cache import CacheError, build_cache, pending

        try:
            why = pending(config)
            if why is not None:
                logger.info("cache_dir=%s: %s: caching %s first", config.cache_dir, why, config.data_backend_config)
                build_cache(config)
        except (ValueError, CacheError) as e:
            raise ConfigError(f"caching {config.data_backend_config}: {e}") from None
    try:
        manifest = records.read_manifest(config.cache_dir)
        records.validate_cache(manifest, latent_channels=model.in_channels, text_dim=model.text_dim)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"cache_dir={config.cache_dir!r}: {e}") from None
    if not (Path(config.cache_dir) / "empty_prompt.safetensors").exists():
        raise ConfigError(f"cache_dir={config.cache_dir!r}: empty_prompt.safetensors (the cached embedding of \"\", "
                          "used for caption dropout) is missing")

    if int(config.lora_rank) < 1:
        raise ConfigError(f"lora_rank={config.lora_rank}: expected >= 1")
    try:
        targets = lora_lib.parse_targets(config.lora_target_modules)
        lora_lib.lora_shapes(model, int(config.lora_rank), targets)  # each target a layer of this model
    except ValueError as e:
        raise ConfigError(f"lora_target_modules={config.lora_target_modules!r}: {e}") from None
    alpha = float(config.lora_alpha) if config.lora_alpha is not None else float(config.lora_rank)
    init = None
    if config.init_lora:
        try:
            init = lora_lib.load_lora(config.init_lora, config=model)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"init_lora={config.init_lora!r}: {e}") from None

    sampler = "uniform" if config.flow_use_uniform_schedule else "beta" if config.flow_use_beta_schedule else "logit_normal"
    fm = FlowMatchingConfig(
        sampler=sampler, shift=float(config.flow_schedule_shift), auto_shift=bool(config.flow_schedule_auto_shift),
        logit_std=float(config.flow_sigmoid_scale), beta_alpha=float(config.flow_beta_schedule_alpha),
        beta_beta=float(config.flow_beta_schedule_beta),
        caption_dropout_probability=float(config.caption_dropout_probability),
    )
    try:  # the batch plan is checked here too (e.g. no bucket fills a global batch), before weights load
        iterator = pipeline.make_batch_iterator(
            config.cache_dir, global_batch_size=config.train_batch_size * config.gradient_accumulation_steps,
            seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count(),
            worker_count=config.data_workers,
        )
    except ValueError as e:
        raise ConfigError(f"cache_dir={config.cache_dir!r}: {e}") from None
    # SimpleTuner's num_train_epochs: epochs of the batch plan, each global batch one optimizer step
    total = int(config.max_train_steps) or int(config.num_train_epochs) * iterator.batches_per_epoch
    if config.num_train_epochs > 0:
        logger.info("num_train_epochs=%d: %d optimizer steps (%d per epoch)", config.num_train_epochs, total,
                    iterator.batches_per_epoch)
    try:
        # Accumulation happens inside the step (micro-batches scanned), so the optimizer sees one mean gradient.
        optim_cfg = optim.OptimConfig.from_mapping(
            {**config.to_dict(), "gradient_accumulation_steps": 1, "max_train_steps": total})
        optim.make_optimizer(optim_cfg)  # refuses unknown names now, not after loading 14B weights
    except ValueError as e:
        raise ConfigError(str(e)) from None
    method = config.distillation_method or "lora"
    if method not in ("lora", "dmd", "dcm"):
        raise ConfigError(f"distillation_method={method!r}: expected None (LoRA flow matching), 'dmd' or 'dcm'")
    if method == "dmd":
        from wanjax.methods.dmd import dmd_config

        try:
            dmd_config(config)
        except ValueError as e:
            raise ConfigError(f"distillation_config: {e}") from None
        if config.gradient_accumulation_steps != 1:
            raise ConfigError("DMD updates generator and critic once per optimizer step: set gradient_accumulation_steps=1")
    if method == "dcm":
        from wanjax.methods.dcm import dcm_config

        try:
            dcm_config(config, model)
        except ValueError as e:
            raise ConfigError(f"distillation_config: {e}") from None
        if config.gradient_accumulation_steps != 1:
            raise ConfigError("DCM updates the student once per optimizer step: set gradient_accumulation_steps=1")
    if manifest.prompt_only:
        dmd_prompts = method == "dmd" and not float(config.distillation_config.flow_matching_weight) > 0
        if not dmd_prompts:
            why = ("distillation_config.flow_matching_weight > 0 trains on real latents" if method == "dmd"
                   else f"{'LoRA flow matching' if method == 'lora' else 'DCM'} trains on real latents")
            raise ConfigError(f"cache_dir={config.cache_dir!r}: datasets {manifest.prompt_only} are prompts only (no "
                              f"latents); {why}. Prompt-only caches are for DMD (distillation_method='dmd').")
    return Resolved(source.pipeline, path, sub, DTYPES[config.mixed_precision], reader, manifest, targets, alpha,
                    init, optim_cfg, fm, iterator, method, total)


# =========================================================================================================
# Phases 2-6
# =========================================================================================================
def _check_layout(config, mesh, model, manifest, method: str) -> None:
    """The batch, the heads and every cached clip's tokens against the mesh, before the base loads: each would
    otherwise fail at its first traced step (a bucket first drawn hours in fails again on every resume)."""
    from wanjax.sharding import attention_specs

    dp, procs = mesh.shape["data"] * mesh.shape["fsdp"], jax.process_count()
    if config.train_batch_size % dp:
        raise ConfigError(f"train_batch_size={config.train_batch_size} (the global batch of one forward/backward) must "
                          f"be divisible by data x fsdp = {dp}")
    if config.train_batch_size % procs:
        raise ConfigError(f"train_batch_size={config.train_batch_size} must be divisible by {procs} processes")
    if dp % procs:  # each process loads its own rows, so one batch shard must not span processes
        raise ConfigError(f"mesh={dict(mesh.shape)}: context x tensor spans processes; each of the {procs} processes "
                          f"loads its own rows of the batch, so data x fsdp ({dp}) must be a multiple of the process "
                          "count: keep context and tensor within a host")
    c = mesh.shape["context"]
    if c == 1:
        return
    try:  # the heads as the attention kernel splits them (its own check, run here before the base loads)
        attention_specs(mesh, (dp, c, model.num_attention_heads, model.attention_head_dim), self_attention=True)
    except ValueError as e:
        raise ConfigError(f"mesh.context={c}: {e}") from None
    frames = None
    if method == "dmd" and config.distillation_config.num_training_frames:
        frames = int(config.distillation_config.num_training_frames)  # DMD cuts latents to this many frames
    pt, ph, pw = model.patch_size
    bad = {}
    for name, count in manifest.active_buckets.items():
        _, f, h, w = (int(x) for x in name.split("x"))
        tokens = (min(f, frames) if frames else f) // pt * (h // ph) * (w // pw)
        if count and tokens % c:
            bad[name] = tokens
    if bad:
        raise ConfigError(f"mesh.context={c}: the cache at {config.cache_dir} holds clips whose token count does not "
                          f"divide by it (latent shape CxFxHxW: tokens): {bad}; pick a context size dividing them, "
                          "or other frame counts / resolutions for those datasets")


def _abstract(tree, shardings):
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _global_batch(local: dict, mesh) -> dict:
    """Per-process numpy batch -> global arrays, batch axis sharded over data x fsdp."""
    from wanjax.sharding import batch_sharding

    out = {}
    for k in ("latents", "prompt_embeds"):
        arr = np.asarray(local[k], np.float32)
        global_shape = (arr.shape[0] * jax.process_count(), *arr.shape[1:])
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, arr.ndim), arr, global_shape)
    return out


def _export(method, state, output_dir: Path, fmt: str, *, final: bool) -> list[str]:
    """Write the method's adapters as LoRA files in output_dir (process 0; every process calls this: adapters sharded
    over processes, e.g. `fsdp` across hosts, are gathered first, a collective)."""
    from jax.experimental import multihost_utils

    from wanjax import lora as lora_lib

    paths = []
    for stem, adapter in method.exports(state, final).items():
        path = output_dir / f"{stem}.safetensors"
        params = adapter.params
        if any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in jax.tree_util.tree_leaves(params)):
            params = multihost_utils.process_allgather(params, tiled=True)
        if jax.process_index() == 0:
            host = adapter.replace(params=jax.tree_util.tree_map(np.asarray, params))
            lora_lib.save_lora(host, path, format=fmt)
        paths.append(str(path))
    return paths


def _cached_text_embeds(cache_dir: str, text_len: int, mesh, negative_prompt: str | None) -> dict:
    """The cache's empty-prompt embedding ("empty") and, when the cache holds `negative_prompt`
    (validation_negative_prompt, distillation CFG's unconditional prompt), "negative"; zero-padded to text_len."""
    from wanjax.data import records
    from wanjax.sharding import replicated

    found = {"empty": records.read_text_embeds(Path(cache_dir) / records.EMPTY_PROMPT_FILE).get("empty")}
    if negative_prompt:
        found["negative"] = records.read_prompt_embeds(cache_dir).get(negative_prompt)
        if found["negative"] is None:
            logger.info("validation_negative_prompt is not in the cache (%s): CFG's unconditional branch in "
                        "distillation uses the empty prompt; re-run the caching job to cache it", cache_dir)
    return {name: jax.device_put(jnp.asarray(records.pad_tokens(np.asarray(e, np.float32), text_len)),
                                 replicated(mesh)) for name, e in found.items() if e is not None}


def run(config) -> dict:
    """Train; returns a summary dict. Every bad setting raises ConfigError before compute starts."""
    from wanjax import methods
    from wanjax.checkpoint import Checkpointer
    from wanjax.metrics import MetricsWriter
    from wanjax.models.transformer import param_shapes
    from wanjax.sharding import fsdp_shardings, make_mesh, param_shardings, use_mesh
    from wanjax.transformer_io import materialize

    # -- 1. resolve -------------------------------------------------------------------------------------
    from wanjax import hub, validation

    try:  # before resolve(), which may run the (long) caching job
        val_settings = validation.settings_from_config(config)
    except validation.ValidationConfigError as e:
        raise ConfigError(str(e)) from None
    output_dir = Path(config.output_dir)
    resume = _resume_point(config, output_dir)
    try:  # before resolve() too: a mesh these devices cannot make is a typo, found in a second
        mesh = make_mesh(**dict(config.mesh))
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e} ({jax.process_count()} process(es))") from None
    r = resolve(config)
    _check_layout(config, mesh, r.reader.config, r.manifest, r.method)
    if jax.process_index() == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        _write_config(config, output_dir)

    validator = None  # built before the base loads: a bad validation setup fails before the big reads
    if val_settings is not None:
        try:
            validator = validation.Validator(val_settings, output_dir=output_dir, pipeline=r.model_path,
                                             cache_dir=config.cache_dir, text_len=r.manifest.text_len,
                                             model_config=r.reader.config)
        except validation.ValidationConfigError as e:
            raise ConfigError(str(e)) from None

    # -- 2. the frozen base, read straight into its shardings ---------------------------------------------
    model = r.reader.config.replace(attention=config.model.attention, remat_policy=config.model.remat_policy)
    base = materialize(r.reader, dtype=r.base_dtype, shardings=param_shardings(param_shapes(model), mesh))
    ctx = methods.Context(config=config, model=model, base=base,
                          text_embeds=_cached_text_embeds(config.cache_dir, r.manifest.text_len, mesh,
                                                          config.validation_negative_prompt),
                          lora_targets=r.lora_targets, lora_alpha=r.lora_alpha, init_lora=r.init_lora, optim=r.optim,
                          fm=r.fm)
    try:
        method = methods.build(r.method, ctx)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    # -- 3. trainable state, sharded ------------------------------------------------------------------------
    rng = jax.random.key(config.seed)
    abstract = jax.eval_shape(method.init_state, rng)
    state_shardings = fsdp_shardings(abstract, mesh)
    state = jax.jit(method.init_state, out_shardings=state_shardings)(rng)

    # -- 4. data, checkpoints, resume ------------------------------------------------------------------------
    iterator = r.iterator
    ckpt = Checkpointer(output_dir, max_to_keep=config.checkpoints_total_limit)
    start = 0
    if resume is not None:
        ckpt_dir, step = resume
        _check_resume_meta(ckpt_dir / str(step), method, config.optimizer)
        source = ckpt if ckpt_dir == ckpt.directory else Checkpointer(directory=ckpt_dir, max_to_keep=None)
        try:
            state, _, data_changed = source.restore(step, _abstract(abstract, state_shardings), iterator)
        except (ValueError, KeyError, TypeError) as e:  # orbax: shapes or tree structure of another run's state
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"resume_from_checkpoint: {ckpt_dir / str(step)} does not fit this run's trainable "
                              f"state ({first[:300]}): was lora_rank, lora_target_modules, optimizer, use_ema or "
                              "the method changed since it was saved?") from None
        start = int(state.step)
        logger.info("resumed from %s/%d", ckpt_dir, step)
        if start > r.max_train_steps:
            logger.warning("checkpoint %d is past max_train_steps=%d: nothing to train; its weights (step %d) are "
                           "exported", step, r.max_train_steps, start)
        if data_changed:
            logger.warning("the data changed since checkpoint %d (%s): weights and optimizer resume, the batches start "
                           "a fresh order (the run is no longer the one an uninterrupted run would have made)",
                           step, data_changed)

    # -- 5. hub, the loop ---------------------------------------------------------------------------------
    pusher = hub.pusher_from_config(config)

    if method.phases is None:
        step_fn = jax.jit(method.step, in_shardings=(state_shardings, None, None),
                          out_shardings=(state_shardings, None), donate_argnums=(0,))
    else:  # two programs (e.g. DMD's generator then critic update): lower peak memory
        phase_1 = jax.jit(method.phases[0], in_shardings=(state_shardings, None, None),
                          out_shardings=(state_shardings, None), donate_argnums=(0,))
        phase_2 = jax.jit(method.phases[1], in_shardings=(state_shardings, None, None, None),
                          out_shardings=(state_shardings, None), donate_argnums=(0,))

        def step_fn(state, frozen, batch):
            state, carry = phase_1(state, frozen, batch)
            return phase_2(state, frozen, batch, carry)
    total = r.max_train_steps
    writer = MetricsWriter(output_dir, report_to=config.report_to, project=config.tracker_project_name,
                           run_name=config.tracker_run_name, config=config.to_dict(), total_steps=total,
                           initial_step=start, resume=resume is not None, loss_key=method.loss_key)
    meta = {**method.meta, "method": method.name, "model": model.to_diffusers(), "seed": int(config.seed),
            "optimizer": config.optimizer}
    fmt = config.lora_export_format
    # the model's activation constraints (batch over data x fsdp, tokens over `context`) refer to the mesh in
    # effect; jax.set_mesh takes effect when called, so each use makes a fresh context manager
    activation_mesh = functools.partial(use_mesh, mesh) if mesh.size > 1 else contextlib.nullcontext
    losses = []
    t0 = time.perf_counter()
    step = start
    try:
        while step < total:
            batch = _global_batch(next(iterator), mesh)
            with activation_mesh():
                state, metrics = step_fn(state, method.frozen, batch)
            step += 1
            if step % config.log_every == 0 or step == total:
                metrics = jax.device_get(metrics)
                losses.append(float(metrics[method.loss_key]))
                writer.log(step, metrics)
            writer.advance()
            if config.checkpoint_step_interval and step % config.checkpoint_step_interval == 0 and step < total:
                ckpt.save(step, state, iterator, meta)
                exported = _export(method, state, output_dir, fmt, final=False)
                if pusher is not None:
                    pusher.push_checkpoint(step, exported)
            if validator is not None and step % validator.s.interval == 0 and step < total:
                with activation_mesh():
                    _validate(validator, writer, step, method, state)
        # -- 6. final checkpoint + export, then the last validation (which cannot lose them) -----------------
        if ckpt.latest_step() != step:  # a rerun of a finished run resumes at the end: nothing new to save
            ckpt.save(step, state, iterator, meta)
        ckpt.wait()
        paths = _export(method, state, output_dir, fmt, final=True)
        if validator is not None and step > start:
            with activation_mesh():
                _validate(validator, writer, step, method, state)
        if pusher is not None:
            videos = validator.videos if validator is not None else []
            card = hub.card_from_config(config, repo_id=pusher.repo_id, steps=step, meta=meta, validation=[
                {"prompt": v.prompt, "path": f"validation/{v.path.name}"} for v in videos] if videos else None)
            pusher.push_final(output_dir, [*paths, *(v.path for v in videos)], card)
    finally:
        writer.close()
        ckpt.close()
    return {"steps": step, "start_step": start, "losses": losses, "lora": paths[0], "exports": paths,
            "seconds": round(time.perf_counter() - t0, 3)}


def _resume_point(config, output_dir: Path) -> tuple[Path, int] | None:
    """`resume_from_checkpoint` as (checkpoints folder, step), checked before any compute: a path that is not a
    checkpoint, or a start that would write over checkpoints already in output_dir (a fresh start into a run's
    folder, or a resume from an older step while later ones exist there) is refused, never overwritten."""
    from wanjax.checkpoint import checkpoint_dir, resolve_resume

    try:
        resume = resolve_resume(config.resume_from_checkpoint, output_dir)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    own = checkpoint_dir(output_dir)
    existing = sorted(int(p.name) for p in own.iterdir() if p.name.isdigit()) if own.is_dir() else []
    start = resume[1] if resume is not None else 0
    later = [s for s in existing if s > start]
    if later:
        what = "a fresh run" if resume is None else f"resuming from step {start}"
        raise ConfigError(f"output_dir={str(output_dir)!r} holds checkpoints {later} after step {start}: {what} would "
                          "write over them. resume_from_checkpoint='latest' continues that run; to branch from an "
                          "earlier step, move the later checkpoints away or use a new output_dir")
    return resume


def _check_resume_meta(step_dir: Path, method, optimizer: str) -> None:
    """The checkpoint's method, adapter (rank, alpha, targets) and optimizer against this run's, before restoring
    (optimizers of one state layout, e.g. adamw and adamw_bf16, would otherwise resume each other's moments)."""
    from wanjax.checkpoint import read_meta

    try:
        saved = read_meta(step_dir)
    except (OSError, ValueError) as e:
        raise ConfigError(f"resume_from_checkpoint: {e}") from None
    lora_keys = ("rank", "alpha", "targets")
    ours = {"method": method.name, "optimizer": optimizer, **{k: method.meta.get("lora", {}).get(k) for k in lora_keys}}
    theirs = {"method": saved.get("method"), "optimizer": saved.get("optimizer"),
              **{k: saved.get("lora", {}).get(k) for k in lora_keys}}
    diff = [f"{k}: saved {theirs[k]!r}, now {ours[k]!r}" for k in ours
            if theirs[k] is not None and json.loads(json.dumps(theirs[k])) != json.loads(json.dumps(ours[k]))]
    if diff:
        raise ConfigError(f"resume_from_checkpoint: {step_dir} was saved by another setup ({'; '.join(diff)}): set "
                          "the same method, LoRA settings and optimizer, or start a new output_dir")


def _validate(validator, writer, step: int, method, state) -> None:
    """One validation round; an error there is logged, never the end of the training run."""
    t = time.perf_counter()
    try:
        videos = validator.run(step, method, state)
    except Exception:  # noqa: BLE001 - rendering (OOM, a file system error) must not kill hours of training
        logger.exception("validation at step %d failed; training goes on", step)
        return
    writer.log_videos(step, {v.key: v.path for v in videos}, captions={v.key: v.prompt for v in videos})
    logger.info("validation at step %d: %d video(s) in %s (%.1f s)", step, len(videos), validator.dir,
                time.perf_counter() - t)


def _write_config(config, output_dir: Path, extra: dict | None = None) -> None:
    data = json.loads(config.to_json_best_effort())
    if extra:
        data.update(extra)
    tmp = output_dir / "config.json.partial"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, output_dir / "config.json")


# =========================================================================================================
# Command line
# =========================================================================================================
def foreign_distillation_options(method: str | None, keys: list[str]) -> str | None:
    """Why command-line keys `keys` (dotted) are refused: a distillation_config option that only another method
    than `method` (None: LoRA flow matching) reads would have no effect. None when there is none."""
    from wanjax.methods import dcm, dmd

    readers = {"dmd": dmd.OPTIONS, "dcm": dcm.OPTIONS}
    for key in keys:
        section, _, name = key.partition(".")
        name = name.split(".")[0]
        if section != "distillation_config" or not name or name in readers.get(method or "lora", ()):
            continue
        owner = next((m for m, names in readers.items() if name in names), None)
        if owner is not None:
            return (f"--config.{key} is a {owner.upper()} option, but distillation_method={method!r}: it would have "
                    f"no effect (set distillation_method={owner!r}, or leave it out)")
    return None


def main(argv: list[str] | None = None) -> int:
    from wanjax import cli

    argv = list(sys.argv if argv is None else argv)
    parsed = cli.parse(argv, dry_run_flag=True)
    if isinstance(parsed, int):
        return parsed
    config, dry_run = parsed
    if (why := foreign_distillation_options(config.distillation_method, cli.overridden_keys(argv))) is not None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    if dry_run:
        print(config.to_json_best_effort(indent=2, sort_keys=True))
        return 0
    cli.setup_logging()
    if (code := cli.start_jax(config)) is not None:
        return code
    try:
        summary = run(config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        print(json.dumps({"summary": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
