"""Optimizer, learning-rate schedule, gradient clipping, accumulation and EMA with SimpleTuner's names and behaviour.

Users bring SimpleTuner configs, so each option does what it did there (read from bghira/SimpleTuner:
helpers/training/optimizer_param.py, custom_schedule.py, ema.py, trainer.py). Where SimpleTuner's behaviour is a
PyTorch storage artefact (bf16 stochastic rounding, Kahan sums, delayed weight decay) the float32 math it approximates
is used instead; every divergence is named in the docstring that owns it.

Step counting: the schedule is evaluated at the number of completed optimizer updates (0 for the first update), the
count an `optax.scale_by_schedule` inside the inner optimizer keeps. With gradient accumulation the inner optimizer runs
once per `gradient_accumulation_steps` micro-steps (optax.MultiSteps), so the schedule advances once per update, as
torch's scheduler does under accelerate. EMA steps take SimpleTuner's 1-based `global_step` (updates done so far).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """SimpleTuner's optimizer options. Defaults are SimpleTuner's (field registry) unless noted.

    `adam_beta1/2`, `adam_epsilon`, `adam_weight_decay`: SimpleTuner declares 0.9 / 0.999 / 1e-8 / 1e-2 but only
    passes them to DeepSpeed; every other optimizer uses its own table defaults (see `optimizer_hyperparams`). Here they
    default to None (= that table) and, when set, override it. `optimizer_beta1/2` override the betas when both are
    set, and `optimizer_config` ("eps=1e-6,weight_decay=0.0") overrides everything, as in SimpleTuner.
    `lr_end` is the floor of cosine/sine, the end of polynomial, and the `min_lr` of cosine_with_min_lr.
    """

    optimizer: str = "adamw_bf16"
    learning_rate: float = 4e-7
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 0
    max_train_steps: int | None = None
    lr_end: float = 4e-7
    lr_num_cycles: int = 1
    lr_power: float = 0.8
    adam_beta1: float | None = None
    adam_beta2: float | None = None
    adam_epsilon: float | None = None
    adam_weight_decay: float | None = None
    optimizer_beta1: float | None = None
    optimizer_beta2: float | None = None
    optimizer_config: str | None = None
    max_grad_norm: float = 2.0
    grad_clip_method: str = "value"
    gradient_accumulation_steps: int = 1
    prodigy_steps: int | None = None

    def __post_init__(self):
        for name, ok, expected in (("learning_rate", self.learning_rate > 0, "> 0"),
                                   ("lr_warmup_steps", self.lr_warmup_steps >= 0, ">= 0"),
                                   ("lr_end", self.lr_end >= 0, ">= 0"),
                                   ("lr_num_cycles", self.lr_num_cycles >= 1, ">= 1")):
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)}: expected {expected}")

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> OptimConfig:
        """Pick this class's keys from a SimpleTuner config dict (other keys ignored); numbers given as strings cast."""
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in options or options[f.name] is None:
                continue
            value, kind = options[f.name], str(f.type)
            kw[f.name] = float(value) if "float" in kind else int(value) if "int" in kind else value
        return cls(**kw)


# --------------------------------------------------------------------------------------------------------------------
# Learning-rate schedules
# --------------------------------------------------------------------------------------------------------------------
SCHEDULERS: tuple[str, ...] = (
    "constant", "constant_with_warmup", "linear", "cosine", "sine", "cosine_with_restarts", "polynomial",
    "cosine_with_min_lr",
)


def _scheduler_name(cfg: OptimConfig) -> str:
    name = cfg.lr_scheduler.strip().lower()
    name = {"cosine_with_warmup": "cosine"}.get(name, name)  # SimpleTuner's alias
    if name == "constant" and cfg.lr_warmup_steps > 0:  # SimpleTuner's normalize_lr_scheduler_value
        name = "constant_with_warmup"
    if name not in SCHEDULERS:
        raise ValueError(f"unknown lr_scheduler {cfg.lr_scheduler!r}; known: {', '.join(SCHEDULERS)}")
    if _optimizer_spec(cfg.optimizer).kind == "schedulefree":  # its own warmup then constant, whatever lr_scheduler
        ruled = "constant_with_warmup" if cfg.lr_warmup_steps > 0 else "constant"
        if name != ruled:
            logger.warning("lr_scheduler=%r is not used by %s (schedule-free: lr_warmup_steps of warmup, then "
                           "constant); the logged lr is the one it applies", cfg.lr_scheduler, cfg.optimizer)
        name = ruled
    return name


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Learning rate as a function of completed optimizer updates, step for step as SimpleTuner's torch scheduler.

    - constant, constant_with_warmup, linear, cosine_with_restarts: diffusers' `get_scheduler` (linear warmup
      step / max(1, warmup), then the decay over `max_train_steps`; `lr_num_cycles` for restarts). SimpleTuner's own
      cosine_with_restarts holds the lr constant (its T_cur = step % -1 == 0, a bug it warns about); diffusers' is used.
    - cosine: SimpleTuner's `Cosine` scheduler, not diffusers': lr_end + (lr - lr_end) (1 + cos(pi k / T)) / 2 with
      T = `lr_warmup_steps` (1000 when 0), no warmup, periodic past T. That is why SimpleTuner configs set
      lr_warmup_steps = max_train_steps for one half-cosine over the run.
    - sine: SimpleTuner's `Sine`: lr_end + (lr - lr_end) (1 + sin(pi k / T)) / 2, T = lr_warmup_steps (must be > 0).
    - polynomial: SimpleTuner's (= transformers') warmup then (lr - lr_end) (1 - p)^lr_power + lr_end, lr_end after
      `max_train_steps`. Where warmup == max_train_steps torch divides by zero at that step; here it gives lr_end.
    - cosine_with_min_lr: transformers' `get_cosine_with_min_lr_schedule_with_warmup(min_lr=lr_end)` (not a SimpleTuner
      scheduler; diffusers' get_scheduler refuses the name).
    SimpleTuner truncates cosine/sine lrs to 1e-9 (floor(lr * 1e9) / 1e9); that display artefact is not reproduced.
    With several processes SimpleTuner scales the step counts by num_processes and accelerate steps the scheduler
    num_processes times per update, which cancels: per-update semantics are the same on any number of devices.
    """
    name = _scheduler_name(cfg)
    lr, lr_end, warmup = float(cfg.learning_rate), float(cfg.lr_end), int(cfg.lr_warmup_steps)
    total = cfg.max_train_steps
    if name in ("linear", "cosine_with_restarts", "polynomial", "cosine_with_min_lr") and total is None:
        raise ValueError(f"lr_scheduler {name!r} needs max_train_steps")
    if name == "polynomial" and not lr > lr_end:
        raise ValueError(f"lr_end ({lr_end}) must be smaller than learning_rate ({lr}) for the polynomial scheduler")
    if name == "sine" and warmup <= 0:
        raise ValueError("the sine scheduler uses lr_warmup_steps as its period; it must be > 0")

    def warm(k):
        return k / max(1, warmup)

    def schedule(count):
        k = jnp.asarray(count, jnp.float32)
        if name == "constant":
            factor = jnp.ones_like(k)
        elif name == "constant_with_warmup":
            factor = jnp.where(k < warmup, warm(k), 1.0)
        elif name == "linear":
            factor = jnp.where(k < warmup, warm(k), jnp.maximum(0.0, (total - k) / max(1, total - warmup)))
        elif name == "cosine_with_restarts":
            progress = (k - warmup) / max(1, total - warmup)
            decay = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(math.pi * jnp.mod(cfg.lr_num_cycles * progress, 1.0))))
            factor = jnp.where(k < warmup, warm(k), jnp.where(progress >= 1.0, 0.0, decay))
        elif name == "cosine_with_min_lr":
            rate = lr_end / lr
            progress = (k - warmup) / max(1, total - warmup)
            decay = 0.5 * (1.0 + jnp.cos(math.pi * progress)) * (1 - rate) + rate  # transformers' num_cycles=0.5
            factor = jnp.where(k < warmup, warm(k), jnp.maximum(0.0, decay))
        elif name == "polynomial":
            remaining = 1.0 - (k - warmup) / max(1, total - warmup)
            decay = ((lr - lr_end) * jnp.maximum(remaining, 0.0) ** cfg.lr_power + lr_end) / lr
            factor = jnp.where(k < warmup, warm(k), jnp.where(k >= total, lr_end / lr, decay))
        else:  # cosine / sine: absolute lrs between lr_end and lr
            period = warmup if warmup > 0 else 1000
            wave = jnp.cos(math.pi * k / period) if name == "cosine" else jnp.sin(math.pi * k / period)
            return (lr_end + (lr - lr_end) * (1.0 + wave) / 2).astype(jnp.float32)
        return (lr * factor).astype(jnp.float32)

    return schedule


# --------------------------------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------------------------------
class _Spec(NamedTuple):
    kind: str
    defaults: dict[str, float]


_ADAMW_TORCH = {"b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 1e-2}
# SimpleTuner's optimizer_choices default_settings (betas, eps, weight_decay; prodigy's d0 / d_coef).
OPTIMIZERS: dict[str, _Spec] = {
    "adamw_bf16": _Spec("adamw_bf16", {"b1": 0.9, "b2": 0.999, "eps": 1e-6, "weight_decay": 1e-2}),
    "adamw": _Spec("adamw", _ADAMW_TORCH),
    "torch-adamw": _Spec("adamw", _ADAMW_TORCH),
    "optimi-adamw": _Spec("adamw", {"b1": 0.9, "b2": 0.99, "eps": 1e-6, "weight_decay": 0.0}),
    "adamw_schedulefree": _Spec("schedulefree", _ADAMW_TORCH),
    "lion": _Spec("lion", {"b1": 0.9, "b2": 0.99, "weight_decay": 0.0}),
    "optimi-lion": _Spec("lion", {"b1": 0.9, "b2": 0.99, "weight_decay": 0.0}),
    "adafactor": _Spec("adafactor", {}),
    "prodigy": _Spec("prodigy", {"b1": 0.9, "b2": 0.99, "eps": 1e-8, "weight_decay": 0.0, "d0": 1e-6, "d_coef": 1.0}),
}
# SimpleTuner skips clipping for these (they bound their own steps).
_NO_CLIP = ("prodigy",)
_CONFIG_KEYS = {"beta1": "b1", "beta2": "b2", "eps": "eps", "weight_decay": "weight_decay", "d0": "d0",
                "d_coef": "d_coef"}


def _optimizer_spec(name: str) -> _Spec:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def parse_optimizer_config(text: str | None) -> dict[str, Any]:
    """SimpleTuner's "key=value,..." string; values typed its way ('.' or 'e-' -> float, digits -> int, bools, none)."""
    out: dict[str, Any] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"optimizer_config entry {item!r} is not key=value")
        key, raw = key.strip(), raw.strip()
        low = raw.lower()
        if "." in raw or "e-" in low:
            out[key] = float(raw)
        elif raw.isdigit():
            out[key] = int(raw)
        else:
            out[key] = {"true": True, "false": False, "none": None}.get(low, raw)
    return out


def optimizer_hyperparams(cfg: OptimConfig) -> dict[str, Any]:
    """The optimizer's resolved hyperparameters: table defaults < adam_* < optimizer_beta1/2 < optimizer_config.

    Unknown optimizer_config keys (kahan_sum, foreach, stochastic_rounding, ...) are dropped with a warning, as
    SimpleTuner drops arguments its optimizer class does not accept.
    """
    spec = _optimizer_spec(cfg.optimizer)
    hp = dict(spec.defaults)
    overrides = {"b1": cfg.adam_beta1, "b2": cfg.adam_beta2, "eps": cfg.adam_epsilon,
                 "weight_decay": cfg.adam_weight_decay}
    hp.update({k: v for k, v in overrides.items() if v is not None and k in hp})
    if cfg.optimizer_beta1 is not None and cfg.optimizer_beta2 is not None and "b1" in hp:
        hp.update(b1=cfg.optimizer_beta1, b2=cfg.optimizer_beta2)
    dropped = []
    for key, value in parse_optimizer_config(cfg.optimizer_config).items():
        if _CONFIG_KEYS.get(key) in hp:
            hp[_CONFIG_KEYS[key]] = float(value)
        else:
            dropped.append(key)
    if dropped:
        logger.warning("optimizer_config keys not used by %s: %s", cfg.optimizer, ", ".join(sorted(dropped)))
    return hp


def scale_by_adamw_bf16(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """SimpleTuner's AdamWBF16 direction: sqrt(1 - b2^t) m_t / (sqrt(v_t) + eps).

    Unlike torch's AdamW it has no first-moment bias correction (early steps are (1 - b1^t) times smaller) and eps is
    not rescaled by sqrt(1 - b2^t). Its bf16 stochastic rounding and compensated sums are storage artefacts that
    float32 parameters do not need.
    """

    def init(params):
        zeros = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=jax.tree.map(jnp.copy, zeros))

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
        corr = jnp.sqrt(1 - jnp.asarray(b2, jnp.float32) ** count.astype(jnp.float32))
        out = jax.tree.map(lambda m, v: corr * m / (jnp.sqrt(v) + eps), mu, nu)
        return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: g * min(1, max_norm / (||g|| + 1e-6)) (optax's omits the 1e-6)."""

    def update(updates, state, params=None):
        del params
        coef = jnp.minimum(max_norm / (optax.global_norm(updates) + 1e-6), 1.0)
        return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def clipped_adamw(lr: float, betas, eps: float, weight_decay: float, grad_clip: float | None
                  ) -> optax.GradientTransformation:
    """torch AdamW after a torch-style gradient-norm clip (none when grad_clip is unset or <= 0): the auxiliary
    networks' own optimizers (DMD critic: fake_score_*, DCM discriminator: discriminator_*)."""
    b1, b2 = (float(b) for b in betas)
    adamw = optax.adamw(float(lr), b1=b1, b2=b2, eps=float(eps), weight_decay=float(weight_decay))
    if grad_clip and float(grad_clip) > 0:
        return optax.chain(clip_by_global_norm_torch(float(grad_clip)), adamw)
    return adamw


def make_clip(cfg: OptimConfig) -> optax.GradientTransformation | None:
    """SimpleTuner's clipping: "value" = torch clip_grad_value_ (each element to [-m, m]), "norm" = clip_grad_norm_.

    None (no clipping) when grad_clip_method is "none", max_grad_norm <= 0, or the optimizer is prodigy.
    """
    method = cfg.grad_clip_method.strip().lower()
    if method not in ("value", "norm", "none"):
        raise ValueError(f"unknown grad_clip_method {cfg.grad_clip_method!r}; known: value, norm, none")
    if method == "none" or cfg.max_grad_norm <= 0 or cfg.optimizer in _NO_CLIP:
        return None
    m = float(cfg.max_grad_norm)
    return optax.clip(m) if method == "value" else clip_by_global_norm_torch(m)


def _freeze_prodigy_d(inner: optax.GradientTransformation, steps: int) -> optax.GradientTransformation:
    """prodigyplus' `prodigy_steps`: after `steps` updates the step-size estimate d stops changing."""

    def update(updates, state, params=None, **extra):
        out, new = inner.update(updates, state, params, **extra)
        frozen = state.count >= steps
        return out, new._replace(estim_lr=jnp.where(frozen, state.estim_lr, new.estim_lr))

    return optax.GradientTransformationExtraArgs(inner.init, update)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformationExtraArgs:
    """The update rule: clipping (before the optimizer, on the accumulated gradient) -> optimizer, in MultiSteps.

    - adamw / torch-adamw / optimi-adamw: optax.adamw (torch.optim.AdamW's math; optimi's Kahan sums are for bf16).
    - adamw_bf16 (SimpleTuner's default): `scale_by_adamw_bf16` + decoupled weight decay lr * wd * p every step
      (AdamWBF16 accumulates that decay and applies it in lumps of >= 5e-3; the average is the same).
    - lion / optimi-lion: optax.lion, optimi's defaults betas (0.9, 0.99), weight_decay 0 (p *= 1 - lr wd).
    - adafactor: optax.adafactor with optax's defaults (SimpleTuner removed its adafactor; no parity intended).
    - prodigy: optax.contrib.prodigy (plain Prodigy-AdamW, not SimpleTuner's schedule-free prodigyplus), betas
      (0.9, 0.99), d0 1e-6, d_coef 1; learning_rate multiplies d (SimpleTuner uses 1.0); `prodigy_steps` > 0 freezes d
      after that many updates; no clipping, as SimpleTuner. When the schedule starts at 0 (warmup) Prodigy's
      `safeguard_warmup` is on: its first D estimate would otherwise be 0 / 0.
    - adamw_schedulefree: optax.contrib.schedule_free_adamw at learning_rate with lr_warmup_steps of warmup; like
      SimpleTuner it ignores lr_scheduler. Evaluate / EMA / save `eval_params(opt_state, params)`.
    gradient_accumulation_steps > 1 wraps everything in optax.MultiSteps (mean of the micro-step gradients, one inner
    update per k calls, zero updates in between); with 1 it is not wrapped, which saves a gradient-sized buffer.
    `update` needs `params`. The state holds only arrays (jit / shard it like the params).
    `update(..., step=s)` reads the schedule at the trainer's step s (optimizer steps done, traced) instead of the
    optimizer's own update count: a student updated on some steps only (DMD's generator_update_interval, DCM's dual
    experts) follows the run's schedule, as SimpleTuner's scheduler steps every global step. Without `step` the
    count is used (equal when every step updates).
    """
    spec = _optimizer_spec(cfg.optimizer)
    if cfg.gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {cfg.gradient_accumulation_steps}")
    hp = optimizer_hyperparams(cfg)
    schedule = make_schedule(cfg)
    safeguard = float(schedule(0)) == 0.0
    tx = _build(cfg, spec, hp, schedule, safeguard=safeguard)
    if spec.kind == "schedulefree":  # its lr is its own warmup over its own count (SimpleTuner: the same)
        return tx

    def update(updates, state, params=None, *, step=None, **extra):
        at = tx if step is None else _build(cfg, spec, hp, lambda _: schedule(step), safeguard=safeguard)
        return at.update(updates, state, params, **extra)

    return StepScheduled(tx.init, update)


class StepScheduled(optax.GradientTransformationExtraArgs):
    """A transformation whose `update` takes `step=`: the trainer's step its lr schedule is read at."""


def update_at(tx: optax.GradientTransformation, grads, opt_state, params, step):
    """`tx.update` with the lr of trainer step `step` when `tx` reads it (`make_optimizer`'s), else by its count."""
    if isinstance(tx, StepScheduled):
        return tx.update(grads, opt_state, params, step=step)
    return tx.update(grads, opt_state, params)


def _build(cfg: OptimConfig, spec: _Spec, hp: dict[str, Any], schedule: optax.Schedule, *, safeguard: bool
           ) -> optax.GradientTransformationExtraArgs:
    """`make_optimizer`'s chain with the lr `schedule` (its state does not depend on the schedule)."""
    if spec.kind == "adamw":
        tx = optax.adamw(schedule, b1=hp["b1"], b2=hp["b2"], eps=hp["eps"], weight_decay=hp["weight_decay"])
    elif spec.kind == "adamw_bf16":
        tx = optax.chain(
            scale_by_adamw_bf16(hp["b1"], hp["b2"], hp["eps"]),
            optax.add_decayed_weights(hp["weight_decay"]),
            optax.scale_by_learning_rate(schedule),
        )
    elif spec.kind == "lion":
        tx = optax.lion(schedule, b1=hp["b1"], b2=hp["b2"], weight_decay=hp["weight_decay"])
    elif spec.kind == "adafactor":
        tx = optax.adafactor(learning_rate=schedule)
    elif spec.kind == "prodigy":
        tx = optax.contrib.prodigy(
            schedule, betas=(hp["b1"], hp["b2"]), eps=hp["eps"], estim_lr0=hp["d0"], estim_lr_coef=hp["d_coef"],
            weight_decay=hp["weight_decay"], safeguard_warmup=safeguard,
        )
        if cfg.prodigy_steps:
            tx = _freeze_prodigy_d(tx, int(cfg.prodigy_steps))
    else:  # schedulefree
        tx = optax.contrib.schedule_free_adamw(
            float(cfg.learning_rate), warmup_steps=cfg.lr_warmup_steps or None, b1=hp["b1"], b2=hp["b2"],
            eps=hp["eps"], weight_decay=hp["weight_decay"],
        )
    clip = make_clip(cfg)
    tx = optax.chain(clip, tx) if clip is not None else optax.with_extra_args_support(tx)
    if cfg.gradient_accumulation_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.gradient_accumulation_steps).gradient_transformation()
    return tx


def eval_params(opt_state: optax.OptState, params: optax.Params) -> optax.Params:
    """Weights to evaluate / average / save: schedule-free's x sequence when present, else `params` unchanged."""
    is_sf = lambda x: isinstance(x, optax.contrib.ScheduleFreeState)  # noqa: E731
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_sf) if is_sf(s)]
    return optax.contrib.schedule_free_eval_params(found[0], params) if found else params


# --------------------------------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------------------------------
EMA_DECAY = 0.995  # SimpleTuner's ema_decay default


def ema_init(params: optax.Params) -> optax.Params:
    """EMA weights start as a float32 copy of the trainable params (SimpleTuner keeps them in weight_dtype)."""
    return jax.tree.map(lambda p: jnp.array(p, dtype=jnp.float32), params)


def ema_decay_at(step, decay: float = EMA_DECAY) -> jax.Array:
    """SimpleTuner's EMAModel.get_decay (diffusers' warmup-free form): 0 at step <= 1, then min((1+s)/(10+s), decay)
    with s = step - 1. SimpleTuner builds it with update_after_step 0, use_ema_warmup False, min_decay 0."""
    s = jnp.maximum(jnp.asarray(step, jnp.float32) - 1.0, 0.0)
    return jnp.where(s <= 0, 0.0, jnp.minimum((1.0 + s) / (10.0 + s), decay)).astype(jnp.float32)


def ema_update(
    ema: optax.Params, params: optax.Params, step, *, decay: float = EMA_DECAY, update_interval: int | None = None
) -> optax.Params:
    """One EMA step after optimizer update number `step` (1-based, SimpleTuner's global_step after its increment).

    Updates only when step % update_interval == 0 (`ema_update_interval`; None = every step; SimpleTuner's default is
    None in older releases and 10 in newer ones): ema <- ema - (1 - d) (ema - params) with d = ema_decay_at(step).
    Jit-able with a traced `step`.
    """
    d = ema_decay_at(step, decay)
    do = jnp.asarray(True) if update_interval is None else (jnp.asarray(step) % update_interval == 0)
    return jax.tree.map(lambda e, p: jnp.where(do, e - (1.0 - d) * (e - p.astype(jnp.float32)), e), ema, params)
