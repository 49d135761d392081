"""Sigma math against diffusers: sampling schedules bit for bit, shift / auto shift, training samplers, noising."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from scipy import stats

from wanjax import schedules as S

SHIFTS = [1.0, 2.5, 3.0, 5.0, 7.0, 12.0, 17.0, 0.7]
STEPS = [1, 2, 3, 8, 20, 40, 50, 1000]


@pytest.mark.parametrize("shift", SHIFTS)
def test_euler_schedule_matches_diffusers(shift):
    for n in STEPS:
        ref = FlowMatchEulerDiscreteScheduler(shift=shift)
        ref.set_timesteps(n)
        timesteps, sigmas = S.euler_schedule(n, shift)
        assert timesteps.dtype == np.float32 and sigmas.dtype == np.float32
        np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())
        np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())


@pytest.mark.parametrize("shift", SHIFTS)
def test_unipc_schedule_matches_diffusers(shift):
    for n in STEPS:
        ref = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
        ref.set_timesteps(n)
        timesteps, sigmas = S.unipc_schedule(n, shift)
        assert timesteps.dtype == np.int64 and sigmas.dtype == np.float32
        np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())
        np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())


def test_schedules_spec_examples():
    _, sigmas = S.euler_schedule(2, 7.0)
    np.testing.assert_allclose(sigmas, [1.0, 0.046756, 0.0], atol=1e-6)
    timesteps, sigmas = S.unipc_schedule(50, 3.0)
    assert timesteps[:3].tolist() == [999, 993, 986] and timesteps[-1] == 60
    assert sigmas[0] == np.float32(1 - 1e-6) and sigmas[-1] == 0.0 and len(sigmas) == 51
    with pytest.raises(ValueError):
        S.euler_schedule(0, 3.0)


def test_shift_sigma():
    u = np.linspace(0, 1, 101)
    np.testing.assert_allclose(S.shift_sigma(u, 1.0), u)
    for shift in (0.5, 3.0, 17.0):
        s = S.shift_sigma(u, shift)
        assert s[0] == 0 and s[-1] == 1 and np.all(np.diff(s) > 0)
        assert (np.all(s[1:-1] > u[1:-1])) == (shift > 1)
        np.testing.assert_allclose(np.asarray(S.shift_sigma(jnp.asarray(u, jnp.float32), shift)), s, rtol=1e-6)
    # The scheduler's training sigmas are s(t / 1000).
    ref = FlowMatchEulerDiscreteScheduler(shift=5.0)
    np.testing.assert_allclose(S.shift_sigma(np.arange(1000, 0, -1) / 1000, 5.0), ref.sigmas.numpy(), rtol=1e-6)


@pytest.mark.parametrize("seq_len", [64, 256, 1560, 4096, 32760])
def test_auto_shift_matches_diffusers(seq_len):
    shift = S.auto_shift(seq_len)
    assert shift == pytest.approx(math.exp(calculate_shift(seq_len)), rel=1e-12)
    # exp(mu) as a plain shift is diffusers' dynamic (exponential) time shift.
    ref = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    ref.set_timesteps(30, mu=calculate_shift(seq_len))
    ours = S.shift_sigma(np.linspace(1.0, 1e-3, 30), shift)
    np.testing.assert_allclose(ref.sigmas.numpy()[:-1], ours, rtol=2e-6)
    assert S.auto_shift(256) == pytest.approx(math.exp(0.5)) and S.auto_shift(4096) == pytest.approx(math.exp(1.15))


def test_sample_sigmas_logit_normal_reproduces_formula():
    rng = jax.random.key(0)
    n = jax.random.normal(rng, (16,), jnp.float32)
    got = S.sample_sigmas(rng, 16, shift=5.0, logit_mean=0.3, logit_std=1.7)
    want = S.shift_sigma(jax.nn.sigmoid(0.3 + 1.7 * n), 5.0)
    assert got.shape == (16,) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    unshifted = S.sample_sigmas(rng, 16, shift=None)
    np.testing.assert_allclose(np.asarray(unshifted), np.asarray(jax.nn.sigmoid(n)), rtol=1e-6)


def _unshift(sigma, shift):
    return sigma / (shift - (shift - 1) * sigma)  # inverse of s(u)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sample_sigmas_distributions(shift):
    rng = jax.random.key(1)
    n = 100_000
    for sampler, dist in (
        ("logit_normal", None),
        ("uniform", stats.uniform()),
        ("beta", stats.beta(2.0, 3.0)),
    ):
        sig = np.asarray(S.sample_sigmas(rng, n, sampler=sampler, shift=shift, beta_alpha=2.0, beta_beta=3.0))
        assert sig.shape == (n,) and np.all((sig >= 0) & (sig <= 1))
        u = _unshift(sig.astype(np.float64), shift)
        if dist is None:
            logit = np.log(u / (1 - u))
            assert abs(logit.mean()) < 0.02 and abs(logit.std() - 1.0) < 0.02
        else:
            assert stats.kstest(u, dist.cdf).pvalue > 1e-3, sampler
    # A shift > 1 moves mass to high noise.
    base = np.asarray(S.sample_sigmas(rng, n, shift=None)).mean()
    assert np.asarray(S.sample_sigmas(rng, n, shift=3.0)).mean() > base + 0.1


def test_sample_sigmas_jit_and_shift_precedence():
    rng = jax.random.key(2)
    f = jax.jit(functools.partial(S.sample_sigmas, batch=8, sampler="beta", shift=5.0))
    np.testing.assert_allclose(np.asarray(f(rng)), np.asarray(S.sample_sigmas(rng, 8, sampler="beta", shift=5.0)))
    plain = S.sample_sigmas(rng, 8, shift=None)
    auto = S.sample_sigmas(rng, 8, shift=None, auto_shift=True, seq_len=1560)
    np.testing.assert_allclose(np.asarray(auto), np.asarray(S.shift_sigma(plain, S.auto_shift(1560))), rtol=1e-6)
    # SimpleTuner: a static flow_schedule_shift > 0 wins over flow_schedule_auto_shift.
    static = S.sample_sigmas(rng, 8, shift=3.0, auto_shift=True, seq_len=1560)
    np.testing.assert_allclose(np.asarray(static), np.asarray(S.sample_sigmas(rng, 8, shift=3.0)))
    with pytest.raises(ValueError, match="seq_len"):
        S.sample_sigmas(rng, 8, shift=0.0, auto_shift=True)
    with pytest.raises(ValueError, match="logit_normal, uniform, beta"):
        S.sample_sigmas(rng, 8, sampler="cosmap")


def test_noising_helpers():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 4, 2, 5, 6)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    sigma = np.array([0.1, 0.5, 0.97], np.float32)
    xt = S.add_noise(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(sigma))
    want = (1 - sigma[:, None, None, None, None]) * x0 + sigma[:, None, None, None, None] * noise
    np.testing.assert_allclose(np.asarray(xt), want, rtol=1e-6, atol=1e-6)
    # diffusers' scale_noise is the same interpolation.
    ref = FlowMatchEulerDiscreteScheduler(shift=1.0)
    for i in range(3):
        t = torch.tensor([float(sigma[i]) * 1000])
        out = ref.scale_noise(torch.from_numpy(x0[i : i + 1]), t, torch.from_numpy(noise[i : i + 1]))
        np.testing.assert_allclose(np.asarray(xt[i : i + 1]), out.numpy(), rtol=1e-5, atol=1e-5)
    v = S.velocity_target(jnp.asarray(x0), jnp.asarray(noise))
    np.testing.assert_allclose(np.asarray(v), noise - x0)
    np.testing.assert_allclose(np.asarray(S.x0_from_velocity(xt, jnp.asarray(sigma), v)), x0, atol=1e-5)
    # Scalar sigma broadcasts too; a 2-D sigma is refused.
    np.testing.assert_allclose(
        np.asarray(S.add_noise(jnp.asarray(x0), jnp.asarray(noise), 0.25)), 0.75 * x0 + 0.25 * noise, atol=1e-6
    )
    with pytest.raises(ValueError):
        S.add_noise(jnp.asarray(x0), jnp.asarray(noise), jnp.ones((3, 1)))
