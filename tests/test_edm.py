"""EDM preconditioning and loss on Gaussian data x ~ N(0, s^2 I), where the optimal denoiser is
D*(y; sigma) = s^2 / (s^2 + sigma^2) y. The coefficient formulas below are written from the
paper's table 1, independently of the library's.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import edm

SD = 0.5     # sigma_data


def paper_coefficients(sigma, precond):
  """Table 1 of Karras et al. 2022, in float64 NumPy."""
  sigma = np.asarray(sigma, np.float64)
  if precond == "edm":
    return (SD**2 / (sigma**2 + SD**2), sigma * SD / np.sqrt(sigma**2 + SD**2),
            1 / np.sqrt(sigma**2 + SD**2), np.log(sigma) / 4)
  if precond == "ve":
    return np.ones_like(sigma), sigma, np.ones_like(sigma), np.log(sigma / 2)
  t = (np.sqrt(0.1**2 + 2 * 19.9 * np.log1p(sigma**2)) - 0.1) / 19.9
  return np.ones_like(sigma), -sigma, 1 / np.sqrt(sigma**2 + 1), 999 * t


def sigma_from_noise(c_noise, precond):
  if precond == "edm":
    return np.exp(4 * c_noise)
  if precond == "ve":
    return 2 * np.exp(c_noise)
  t = c_noise / 999
  return np.sqrt(np.expm1(0.5 * 19.9 * t**2 + 0.1 * t))


def optimal_raw(data_std, precond):
  """F*(u, c_noise): the raw network that makes D exact for N(0, data_std^2) data."""
  def raw(u, c_noise):
    sigma = sigma_from_noise(np.asarray(c_noise, np.float64), precond)
    c_skip, c_out, c_in, _ = paper_coefficients(sigma, precond)
    gain = (data_std**2 / (data_std**2 + sigma**2) - c_skip) / (c_in * c_out)
    return jnp.asarray(gain, jnp.float32)[:, None] * u
  return raw


@pytest.mark.parametrize("precond", ["edm", "ve", "vp"])
def test_coefficients_follow_table_1(precond):
  sigma = np.array([0.002, 0.1, 0.5, 1.0, 10.0, 80.0])
  got = edm.coefficients(jnp.asarray(sigma, jnp.float32), precond=precond, sigma_data=SD)
  # float32 evaluation of a few elementary functions: ~1e-6 relative.
  for g, e in zip(got, paper_coefficients(sigma, precond), strict=True):
    np.testing.assert_allclose(np.asarray(g), e, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("precond", ["edm", "ve", "vp"])
def test_preconditioned_denoiser_is_exact_with_the_optimal_raw_network(precond):
  rng = np.random.default_rng(0)
  sigma = np.exp(rng.normal(-1.2, 1.2, 64)).clip(0.01, 50)
  y = (rng.normal(size=(64, 3)) * np.sqrt(SD**2 + sigma[:, None] ** 2)).astype(np.float32)
  # The raw network is exact only up to float32 evaluation of sigma from c_noise, so the
  # check is relative to |y|, with float32 error amplified by c_out / c_in ratios (< 1e2).
  out = np.asarray(edm.denoiser(optimal_raw(SD, precond), jnp.asarray(y),
                                jnp.asarray(sigma, jnp.float32), precond=precond,
                                sigma_data=SD), np.float64)
  expected = SD**2 / (SD**2 + sigma[:, None] ** 2) * y
  np.testing.assert_allclose(out, expected, atol=2e-4 * np.abs(y).max())


def test_edm_training_target_has_unit_variance_when_data_matches_sigma_data():
  sigma = np.geomspace(0.002, 80, 50)
  c_skip, c_out, _, _ = paper_coefficients(sigma, "edm")
  # Var[(x - c_skip (x + sigma n)) / c_out] with Var x = SD^2:
  var = ((1 - c_skip) ** 2 * SD**2 + c_skip**2 * sigma**2) / c_out**2
  np.testing.assert_allclose(var, 1.0, rtol=1e-12)
  got = edm.coefficients(jnp.asarray(sigma, jnp.float32), sigma_data=SD)
  var_lib = ((1 - np.asarray(got.c_skip, np.float64)) ** 2 * SD**2
             + np.asarray(got.c_skip, np.float64) ** 2 * sigma**2) / np.asarray(got.c_out,
                                                                              np.float64) ** 2
  np.testing.assert_allclose(var_lib, 1.0, rtol=1e-5)


def test_loss_of_the_optimal_network_is_one_per_dimension():
  # With data std = sigma_data, lambda(sigma) E(D* - x)^2 = (sigma^2 + s^2) / (sigma s)^2 *
  # s^2 sigma^2 / (s^2 + sigma^2) = 1 for every sigma: the expected loss is exactly 1.
  n, dims = 1 << 15, 3
  x0 = SD * jax.random.normal(jax.random.PRNGKey(0), (n, dims))
  # Eager (not jitted): the test's optimal network evaluates sigma in float64 NumPy.
  loss = np.asarray(edm.training_loss(optimal_raw(SD, "edm"), x0, jax.random.PRNGKey(1)),
                    np.float64)
  se = loss.std(ddof=1) / math.sqrt(n)
  assert abs(loss.mean() - 1.0) < 5 * se, (loss.mean(), se)


def test_training_sigmas_are_log_normal():
  log_sigma = np.log(np.asarray(edm.training_sigmas(jax.random.PRNGKey(2), 1 << 16)))
  se_mean = 1.2 / math.sqrt(log_sigma.size)
  assert abs(log_sigma.mean() - (-1.2)) < 5 * se_mean
  # The sample std of n normals has standard error ~ std / sqrt(2 n).
  assert abs(log_sigma.std() - 1.2) < 5 * 1.2 / math.sqrt(2 * log_sigma.size)


def test_vp_sigma_and_time_are_inverse():
  t = np.linspace(1e-3, 1, 20)
  np.testing.assert_allclose(np.asarray(edm.vp_time(edm.vp_sigma(jnp.asarray(t, jnp.float32)))),
                             t, rtol=1e-4)


def test_unknown_preconditioning_is_named():
  with pytest.raises(ValueError, match="precond='ddpm'"):
    edm.coefficients(jnp.ones(2), precond="ddpm")
