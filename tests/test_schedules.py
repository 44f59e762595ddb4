"""Schedules against float64 closed forms written here, independently of diffusion_jax.schedules.

References: Ho et al. 2020 (linear); Nichol & Dhariwal 2021 eq. 17 (cosine, rescaled linear);
Chen 2023 algorithm 1 (sigmoid); Lin et al. 2024 algorithm 1 (zero terminal SNR).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax as dj

FIELDS = ("betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
          "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
          "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
          "posterior_mean_coef1", "posterior_mean_coef2", "snr")


# --- Independent float64 references (loops and scalar math, not the library's vector code). ---

def ref_linear(T):
  scale = 1000.0 / T
  lo, hi = 1e-4 * scale, 0.02 * scale
  return np.array([lo + (hi - lo) * i / (T - 1) for i in range(T)]) if T > 1 else np.array([lo])


def ref_scaled_linear(T, start=0.00085, end=0.012):
  a, b = math.sqrt(start), math.sqrt(end)
  return np.array([(a + (b - a) * i / (T - 1)) ** 2 for i in range(T)])


def ref_cosine(T, s=0.008):
  f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
  return np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])


def ref_sigmoid(T, start=-3.0, end=3.0, tau=1.0):
  # Chen 2023, algorithm 1: gamma(u) = (sig(end/tau) - sig((u(end-start)+start)/tau))
  #                                   / (sig(end/tau) - sig(start/tau)), clipped at 1e-9.
  sig = lambda z: 1.0 / (1.0 + math.exp(-z))
  def gamma(u):
    v_start, v_end = sig(start / tau), sig(end / tau)
    g = (v_end - sig((u * (end - start) + start) / tau)) / (v_end - v_start)
    return min(max(g, 1e-9), 1.0)
  return np.array([min(1 - gamma((i + 1) / T) / gamma(i / T), 0.999) for i in range(T)])


def ref_fields(betas):
  """Every Schedule field by scalar loops (Ho et al. 2020 eqs. 4, 6, 7)."""
  T = len(betas)
  out = {k: np.zeros(T) for k in FIELDS}
  abar = 1.0
  for t, b in enumerate(betas):
    prev = abar
    abar = abar * (1 - b)
    out["betas"][t] = b
    out["alphas"][t] = 1 - b
    out["alphas_cumprod"][t] = abar
    out["alphas_cumprod_prev"][t] = prev
    out["sqrt_alphas_cumprod"][t] = math.sqrt(abar)
    out["sqrt_one_minus_alphas_cumprod"][t] = math.sqrt(1 - abar)
    out["sqrt_recip_alphas_cumprod"][t] = 1 / math.sqrt(abar)
    out["sqrt_recipm1_alphas_cumprod"][t] = math.sqrt(1 / abar - 1)
    out["posterior_variance"][t] = b * (1 - prev) / (1 - abar)
    out["posterior_mean_coef1"][t] = math.sqrt(prev) * b / (1 - abar)
    out["posterior_mean_coef2"][t] = math.sqrt(1 - b) * (1 - prev) / (1 - abar)
    out["snr"][t] = abar / (1 - abar)
  pv = out["posterior_variance"]
  out["posterior_log_variance_clipped"] = np.log(np.concatenate([pv[1:2], pv[1:]]))
  return out


def assert_schedule_matches(schedule, betas64, rtol=2e-6):
  ref = ref_fields(betas64)
  for name in FIELDS:
    got = np.asarray(getattr(schedule, name))
    assert got.dtype == np.float32 and got.shape == (len(betas64),), name
    # float32 storage of float64 values: relative error <= 2^-24 ~ 6e-8; allow a few ulps.
    np.testing.assert_allclose(got, ref[name].astype(np.float32), rtol=rtol, atol=0, err_msg=name)


@pytest.mark.parametrize("T", [1000, 4000, 250, 21])
def test_linear_closed_form_with_improved_ddpm_rescaling(T):
  s = dj.get_schedule("linear", T)
  assert_schedule_matches(s, ref_linear(T))
  # The rescaling keeps the process: for any T, alpha_bar at the end is close to T = 1000's.
  if T >= 250:
    np.testing.assert_allclose(float(s.alphas_cumprod[-1]), np.prod(1 - ref_linear(1000)),
                               rtol=0.5)


def test_linear_without_rescale_and_custom_ends():
  s = dj.get_schedule("linear", 500, rescale=False)
  np.testing.assert_allclose(np.asarray(s.betas), np.linspace(1e-4, 0.02, 500), rtol=1e-6)
  s = dj.get_schedule("linear", 1000, beta_start=1e-3, beta_end=0.05)
  np.testing.assert_allclose(np.asarray(s.betas)[[0, -1]], [1e-3, 0.05], rtol=1e-6)


@pytest.mark.parametrize("T", [1000, 50])
def test_scaled_linear_closed_form(T):
  assert_schedule_matches(dj.get_schedule("scaled_linear", T), ref_scaled_linear(T))


@pytest.mark.parametrize("T", [1000, 4000, 100])
def test_cosine_closed_form_with_cap(T):
  s = dj.get_schedule("cosine", T)
  ref = ref_cosine(T)
  assert ref[-1] == 0.999  # the cap is active at the last step, so the test exercises it
  assert_schedule_matches(s, ref)
  np.testing.assert_array_equal(np.asarray(s.betas)[-1], np.float32(0.999))


@pytest.mark.parametrize("T,kw", [(1000, {}), (256, dict(start=0.0, end=3.0, tau=0.7)),
                                  (1000, dict(start=-3.0, end=3.0, tau=1.1))])
def test_sigmoid_closed_form(T, kw):
  s = dj.get_schedule("sigmoid", T, **kw)
  ref = ref_sigmoid(T, **kw)
  assert_schedule_matches(s, ref)
  # Alpha bar decreases from ~1 to ~0.
  abar = np.asarray(s.alphas_cumprod)
  assert np.all(np.diff(abar) < 0) and abar[0] > 0.99 and abar[-1] < 1e-3


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine", "sigmoid"])
def test_zero_terminal_snr(name):
  T = 1000
  base = dj.get_schedule(name, T)
  s = dj.get_schedule(name, T, zero_terminal_snr=True)
  abar = np.asarray(s.alphas_cumprod)
  assert abar[-1] == 0.0 and float(s.snr[-1]) == 0.0 and float(s.betas[-1]) == 1.0
  # First step kept; SNR strictly decreasing (the ordering of all other steps is kept).
  np.testing.assert_allclose(abar[0], np.asarray(base.alphas_cumprod)[0], rtol=1e-6)
  snr = np.asarray(s.snr)
  assert np.all(np.diff(snr) < 0)
  # Lin et al. 2024, algorithm 1, in float64 by hand: sqrt(abar) shifted and scaled affinely.
  b = {"linear": ref_linear, "scaled_linear": ref_scaled_linear, "cosine": ref_cosine,
       "sigmoid": ref_sigmoid}[name](T)
  sq = np.sqrt(np.cumprod(1 - b))
  sq_new = (sq - sq[-1]) / (sq[0] - sq[-1]) * sq[0]
  np.testing.assert_allclose(abar, (sq_new ** 2).astype(np.float32), rtol=1e-5, atol=1e-12)
  # Finite where they must be: everything but the 1/abar fields at the last step.
  for f in FIELDS:
    vals = np.asarray(getattr(s, f))
    if f in ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"):
      vals = vals[:-1]
    assert np.all(np.isfinite(vals)), f


def test_from_betas_fields_and_pytree():
  betas = np.array([0.01, 0.2, 0.5, 0.9])
  s = dj.from_betas(betas)
  assert_schedule_matches(s, betas)
  assert s.num_timesteps == 4
  # An immutable pytree that passes through jit with T still static.
  leaves = jax.tree.leaves(s)
  assert len(leaves) == len(dataclass_fields(s))
  f = jax.jit(lambda sc: sc.alphas_cumprod * sc.num_timesteps)
  np.testing.assert_allclose(np.asarray(f(s)), np.cumprod(1 - betas) * 4, rtol=1e-6)
  with pytest.raises(Exception):
    s.betas = jnp.zeros(4)  # frozen


def dataclass_fields(s):
  import dataclasses
  return dataclasses.fields(s)


def test_from_betas_single_step():
  s = dj.from_betas([0.3])
  assert float(s.posterior_variance[0]) == 0.0
  assert np.isfinite(float(s.posterior_log_variance_clipped[0]))


@pytest.mark.parametrize("bad", [[], [[0.1]], [0.1, 0.0], [0.1, 1.5], [0.1, np.nan]])
def test_from_betas_rejects_bad_betas(bad):
  with pytest.raises(ValueError, match="betas"):
    dj.from_betas(bad)


def test_unknown_name_lists_allowed_names():
  with pytest.raises(ValueError) as info:
    dj.get_schedule("cosin", 1000)
  msg = str(info.value)
  for name in ("linear", "scaled_linear", "cosine", "sigmoid"):
    assert name in msg
  assert "cosin" in msg


@pytest.mark.parametrize("T", [0, -5, 10.0, 1000.5, "1000", True, None])
def test_bad_num_timesteps(T):
  with pytest.raises(ValueError, match="num_timesteps"):
    dj.get_schedule("linear", T)


def test_numpy_integer_T_accepted():
  assert dj.get_schedule("cosine", np.int64(20)).num_timesteps == 20


def test_rescaled_linear_too_few_steps_is_a_clear_error():
  # 0.02 * 1000 / T >= 1 for T <= 20: no valid process, so a ValueError naming the fix.
  with pytest.raises(ValueError, match="rescale=False"):
    dj.get_schedule("linear", 20)
  assert dj.get_schedule("linear", 10, rescale=False).num_timesteps == 10
