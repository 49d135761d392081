"""diffusers' flow-matching schedulers as pure JAX steps: `UniPCMultistepScheduler` (flow mode) and
`FlowMatchEulerDiscreteScheduler`.

A scheduler is a static schedule (timesteps, sigmas and, for UniPC, every per-step scalar coefficient, all
computed once on the host in float32 exactly as diffusers computes them in torch) plus a pure
`step(state, model_output, i, sample) -> (prev_sample, state)`. `i` may be traced and the state is a pytree, so a
whole denoising loop runs inside one `lax.fori_loop`. The schedulers are pytrees themselves (arrays as leaves,
the solver's structure static): pass one into a jitted loop as an argument and a new `flow_shift` reuses the
compiled loop; only the step count, the kind and the solver order change the compilation.

UniPC is WanPipeline's configuration (wanjax/tiny.py SCHEDULER_CONFIG): prediction_type="flow_prediction",
use_flow_sigmas=True, predict_x0=True, solver_type "bh2", final_sigmas_type="zero", any solver_order,
lower_order_final, disable_corrector. Per step i (diffusers' `step`):
  1. x0_i = x_i - sigma_i v_i                                      (`convert_model_output`)
  2. UniC: for i > 0 (and i - 1 not in disable_corrector), correct x_i with x0_i, the previous sample and the
     previous x0s at the order the previous predictor used         (`multistep_uni_c_bh_update`)
  3. UniP: predict x_{i+1} at order min(solver_order, i + 1, N - i [lower_order_final])
                                                                   (`multistep_uni_p_bh_update`)
The last step (sigma_N = 0) returns x0 exactly, as in diffusers.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from wanjax.schedules import euler_schedule, unipc_schedule

F32 = jnp.float32
SCHEDULERS = ("unipc", "euler")
SOLVER_TYPES = ("bh2",)  # bh1 (B(h) = h) is inf * 0 = NaN at the final sigma 0, in diffusers too


def _times(scalar: jax.Array, v: jax.Array) -> jax.Array:
    """torch's `0-dim float32 tensor * v`: computed in float32, rounded to v's dtype (bf16 stays bf16)."""
    return (scalar.astype(F32) * v.astype(F32)).astype(v.dtype)


# ---------------------------------------------------------------------------------------------------------
# FlowMatchEulerDiscreteScheduler
# ---------------------------------------------------------------------------------------------------------
@flax.struct.dataclass
class FlowMatchEuler:
    """FlowMatchEulerDiscreteScheduler(shift=S) after set_timesteps(N): x <- x + (sigma_{i+1} - sigma_i) v."""

    timesteps: np.ndarray  # (N,) float32, what the transformer sees
    sigmas: np.ndarray  # (N+1,) float32, trailing 0

    @property
    def num_inference_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def init_state(self, sample: jax.Array) -> tuple:
        del sample
        return ()

    def step(self, state: tuple, model_output: jax.Array, i, sample: jax.Array) -> tuple[jax.Array, tuple]:
        """diffusers' step: sample upcast to float32, dt * v in v's dtype, the result cast to v's dtype (so a bf16
        model keeps bf16 latents between steps, as diffusers does)."""
        sigmas = jnp.asarray(self.sigmas)
        dt = sigmas[i + 1] - sigmas[i]
        prev = sample.astype(F32) + _times(dt, model_output)
        return prev.astype(model_output.dtype), state


def flow_match_euler(num_inference_steps: int, flow_shift: float) -> FlowMatchEuler:
    timesteps, sigmas = euler_schedule(num_inference_steps, flow_shift)
    return FlowMatchEuler(timesteps=timesteps.astype(np.float32), sigmas=sigmas)


# ---------------------------------------------------------------------------------------------------------
# UniPCMultistepScheduler (flow mode)
# ---------------------------------------------------------------------------------------------------------
@flax.struct.dataclass
class UniPCState:
    """The multistep memory: the last `solver_order` x0 predictions (oldest first) and the sample before the last
    predictor step (the corrector's `last_sample`), float32."""

    model_outputs: jax.Array  # (solver_order, *sample.shape)
    last_sample: jax.Array  # sample.shape


@flax.struct.dataclass
class UniPC:
    """UniPCMultistepScheduler in flow mode after set_timesteps(N); every scalar the update needs, per step.

    Predictor at step i (order p): x_{i+1} = (p_a x - p_b m0) - p_c sum_k p_rho[k] (m_k - m0) / p_rk[k]
    Corrector at step i (order q):  x_i = (c_a x_{i-1} - c_b m0) - c_c (sum_k c_rho[k] (m_k - m0) / c_rk[k]
                                                                       + c_rho_t (x0_i - m0))
    with m0 the newest x0 in the memory and m_k the k-th older one; unused terms have rho 0, rk 1.
    """

    timesteps: np.ndarray  # (N,) float32 (diffusers: int64, exact in float32)
    sigmas: np.ndarray  # (N+1,) float32, trailing 0
    p_a: np.ndarray  # (N,) sigma_{i+1} / sigma_i
    p_b: np.ndarray  # (N,) alpha_{i+1} h_phi_1
    p_c: np.ndarray  # (N,) alpha_{i+1} B(h)
    p_rk: np.ndarray  # (N, K-1)
    p_rho: np.ndarray  # (N, K-1)
    c_on: np.ndarray  # (N,) bool: the corrector runs at step i
    c_a: np.ndarray
    c_b: np.ndarray
    c_c: np.ndarray
    c_rk: np.ndarray  # (N, K-1)
    c_rho: np.ndarray  # (N, K-1)
    c_rho_t: np.ndarray  # (N,)
    orders: tuple[int, ...] = flax.struct.field(pytree_node=False)  # predictor order per step (diagnostic)
    solver_order: int = flax.struct.field(pytree_node=False, default=2)

    @property
    def num_inference_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def init_state(self, sample: jax.Array) -> UniPCState:
        shape = tuple(sample.shape)
        return UniPCState(model_outputs=jnp.zeros((self.solver_order, *shape), F32), last_sample=jnp.zeros(shape, F32))

    def step(self, state: UniPCState, model_output: jax.Array, i, sample: jax.Array) -> tuple[jax.Array, UniPCState]:
        """One diffusers `step`: returns (x_{i+1} float32, new state). `i` is the step index (int or traced)."""
        k_hist = self.solver_order
        tab = {f: jnp.asarray(getattr(self, f))[i] for f in (
            "sigmas", "p_a", "p_b", "p_c", "p_rk", "p_rho", "c_on", "c_a", "c_b", "c_c", "c_rk", "c_rho", "c_rho_t")}
        x = sample.astype(F32)
        x0 = x - _times(tab["sigmas"], model_output)  # convert_model_output; float32 (the sample's dtype)
        hist = state.model_outputs

        def res(h, m0, rk, rho):
            # einsum("k,bkc...->bc...", rhos, D1s) with D1_k = (m_k - m0) / rk_k; m_k the k-th older output
            out = jnp.zeros_like(m0)
            for k in range(1, k_hist):
                out = out + rho[k - 1] * ((h[k_hist - 1 - k] - m0) / rk[k - 1])
            return out

        # UniC: corrects x_i with x0_i (model_t), before the memory moves on.
        m0 = hist[-1]
        corr = (tab["c_a"] * state.last_sample - tab["c_b"] * m0) - tab["c_c"] * (
            res(hist, m0, tab["c_rk"], tab["c_rho"]) + tab["c_rho_t"] * (x0 - m0))
        x = jnp.where(tab["c_on"], corr, x)
        hist = jnp.concatenate([hist[1:], x0[None]], axis=0)
        # UniP from the corrected x_i.
        prev = (tab["p_a"] * x - tab["p_b"] * x0) - tab["p_c"] * res(hist, x0, tab["p_rk"], tab["p_rho"])
        return prev, UniPCState(model_outputs=hist, last_sample=x)


def _bh_coefficients(sigma_t, sigma_s0, sigma_prev: Sequence, order: int, corrector: bool):
    """diffusers' multistep_uni_{p,c}_bh_update scalars in float32, as torch computes them: (a, b, c, rks[:-1],
    rhos for the D1 terms, rho_t (corrector only))."""
    f = np.float32
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        def lam(s):
            s = f(s)
            return np.log(f(1) - s) - np.log(s)  # alpha = 1 - sigma; log(0) = -inf at the final sigma

        sigma_t, sigma_s0 = f(sigma_t), f(sigma_s0)
        alpha_t = f(1) - sigma_t
        lambda_s0 = lam(sigma_s0)
        h = f(lam(sigma_t) - lambda_s0)
        rks = [f((lam(s) - lambda_s0) / h) for s in sigma_prev] + [f(1)]
        rks_arr = np.asarray(rks, np.float32)
        hh = f(-h)  # predict_x0
        h_phi_1 = f(np.expm1(hh))
        h_phi_k = f(h_phi_1 / hh - f(1))
        b_h = f(np.expm1(hh))  # bh2
        rows, b, factorial = [], [], 1
        for i in range(1, order + 1):
            rows.append(rks_arr ** (i - 1))
            b.append(f(h_phi_k * f(factorial) / b_h))
            factorial *= i + 1
            h_phi_k = f(h_phi_k / hh - f(1 / factorial))
        r, b = np.stack(rows).astype(np.float32), np.asarray(b, np.float32)
        rho_t = f(0)
        if corrector:
            rhos = np.array([0.5], np.float32) if order == 1 else np.linalg.solve(r, b).astype(np.float32)
            rhos, rho_t = rhos[:-1], rhos[-1]
        elif order == 1:
            rhos = np.zeros(0, np.float32)
        elif order == 2:
            rhos = np.array([0.5], np.float32)
        else:
            rhos = np.linalg.solve(r[:-1, :-1], b[:-1]).astype(np.float32)
        a = f(sigma_t / sigma_s0)
        return a, f(alpha_t * h_phi_1), f(alpha_t * b_h), rks_arr[:-1], rhos, rho_t


def unipc_multistep(
    num_inference_steps: int,
    flow_shift: float,
    *,
    solver_order: int = 2,
    solver_type: str = "bh2",
    lower_order_final: bool = True,
    disable_corrector: Sequence[int] = (),
) -> UniPC:
    """UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=S, ...)
    .set_timesteps(N), WanPipeline's scheduler with its defaults."""
    if solver_order < 1:
        raise ValueError(f"solver_order={solver_order}: expected >= 1")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type={solver_type!r}: expected one of {SOLVER_TYPES} (with the final sigma 0 of flow "
                         "sigmas, bh1's last step is inf * 0 = NaN, in diffusers too)")
    if not lower_order_final and solver_order > 1 and num_inference_steps > 1:
        # the final sigma is 0 (lambda = inf): a multistep last step divides by 0, diffusers returns inf
        raise ValueError("lower_order_final=False with solver_order > 1 reaches sigma = 0 with a multistep update "
                         "(non-finite in diffusers too); keep lower_order_final=True")
    timesteps, sigmas = unipc_schedule(num_inference_steps, flow_shift)
    n, k1 = num_inference_steps, solver_order - 1
    tab = {name: np.zeros(n, np.float32) for name in ("p_a", "p_b", "p_c", "c_a", "c_b", "c_c", "c_rho_t")}
    for name in ("p_rk", "p_rho", "c_rk", "c_rho"):
        tab[name] = np.zeros((n, k1), np.float32)
    tab["p_rk"][:] = tab["c_rk"][:] = 1.0
    c_on = np.zeros(n, bool)
    orders = []
    for i in range(n):
        # diffusers: this_order = min(solver_order, N - i [lower_order_final]), then min(., lower_order_nums + 1)
        order = min(solver_order, n - i) if lower_order_final else solver_order
        order = min(order, i + 1)
        if i > 0 and (i - 1) not in disable_corrector:
            q = orders[-1]  # the corrector runs at the order the previous predictor used
            a, b, c, rks, rhos, rho_t = _bh_coefficients(
                sigmas[i], sigmas[i - 1], [sigmas[i - 1 - k] for k in range(1, q)], q, True)
            c_on[i] = True
            tab["c_a"][i], tab["c_b"][i], tab["c_c"][i], tab["c_rho_t"][i] = a, b, c, rho_t
            tab["c_rk"][i, : q - 1], tab["c_rho"][i, : q - 1] = rks, rhos
        a, b, c, rks, rhos, _ = _bh_coefficients(
            sigmas[i + 1], sigmas[i], [sigmas[i - k] for k in range(1, order)], order, False)
        tab["p_a"][i], tab["p_b"][i], tab["p_c"][i] = a, b, c
        tab["p_rk"][i, : order - 1], tab["p_rho"][i, : order - 1] = rks, rhos
        orders.append(order)
    return UniPC(timesteps=timesteps.astype(np.float32), sigmas=sigmas, c_on=c_on, orders=tuple(orders),
                 solver_order=solver_order, **tab)


Scheduler = Any  # FlowMatchEuler | UniPC: .timesteps, .sigmas, .num_inference_steps, .init_state, .step


def make_scheduler(name: str, num_inference_steps: int, flow_shift: float, **options) -> Scheduler:
    """"unipc" (WanPipeline's default) or "euler"; `options` go to `unipc_multistep`."""
    if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps!r}: expected an integer >= 1")
    if not np.isfinite(flow_shift) or flow_shift <= 0:
        raise ValueError(f"flow_shift={flow_shift!r}: expected a positive number")
    if name == "unipc":
        return unipc_multistep(int(num_inference_steps), float(flow_shift), **options)
    if name == "euler":
        if options:
            raise ValueError(f"the euler scheduler takes no options, got {sorted(options)}")
        return flow_match_euler(int(num_inference_steps), float(flow_shift))
    raise ValueError(f"scheduler={name!r}: expected one of {SCHEDULERS}")


DEFAULT_FLOW_SHIFT = 3.0  # WanPipeline's 480p scheduler


def config_flow_shift(scheduler_config: dict) -> float:
    """The shift a diffusers scheduler_config.json sets (UniPC's `flow_shift`, Euler's `shift`), else 3."""
    return float(scheduler_config.get("flow_shift") or scheduler_config.get("shift") or DEFAULT_FLOW_SHIFT)
