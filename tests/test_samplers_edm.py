"""EDM's samplers (Heun, algorithm 1, and the stochastic algorithm 2 with S_churn > 0) on 2-D
Gaussian data with the exact denoiser: the sample moments equal the exact moments of the
*discretised* sampler, propagated in float64 NumPy.

With a Gaussian target N(mu, S) the denoiser is linear, D(x; s) = mu + K(s) (x - mu) with
K(s) = S (S + s^2 I)^-1, so every step of either algorithm maps (x - mu) and its fresh noise
linearly: x' - mu = Q (x - mu) + a Q xi. The reference propagates the mean and covariance through
those maps (written here from the paper's pseudo-code), so the only tolerance is Monte-Carlo
error: 5 standard errors.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax as dj
from diffusion_jax.samplers import ode

MU = np.array([0.3, -0.2])
S = np.array([[0.25, 0.1], [0.1, 0.16]])
N_SAMPLES = 1 << 14
NUM_STEPS = 12
SCHEDULE = dj.get_schedule("cosine", 250)


def exact_eps_model():
  """eps(x_vp, t) of the Gaussian target, sigma(t) by log-sigma interpolation of the table."""
  table = np.sqrt((1 - np.asarray(SCHEDULE.alphas_cumprod, np.float64))
                  / np.asarray(SCHEDULE.alphas_cumprod, np.float64))
  log_table = jnp.asarray(np.log(table), jnp.float32)
  lam, vecs = np.linalg.eigh(S)
  lam, vecs, mu = (jnp.asarray(v, jnp.float32) for v in (lam, vecs, MU))

  def model_fn(x_vp, t):
    sigma = jnp.exp(jnp.interp(t.astype(jnp.float32), jnp.arange(250.0), log_table))[:, None]
    x = x_vp * jnp.sqrt(1 + sigma**2)
    coords = (x - mu) @ vecs
    denoised = mu + (coords * lam / (lam + sigma**2)) @ vecs.T
    return (x - denoised) / sigma
  return model_fn


def reference_moments(sigmas, s_churn, s_tmin, s_tmax, s_noise):
  """Mean and covariance of EDM algorithm 1/2 output with the exact linear denoiser (float64)."""
  eye = np.eye(2)
  gain = lambda s: S @ np.linalg.inv(S + s**2 * eye)
  n = len(sigmas) - 1
  m, c = -MU.copy(), (1 + sigmas[0] ** 2) * eye       # offset from mu; VP prior at sigma_max
  for i in range(n):
    s, s_next = sigmas[i], sigmas[i + 1]
    gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= s <= s_tmax else 0.0
    s_hat = s * (1 + gamma)
    a = math.sqrt(s_hat**2 - s**2) * s_noise
    if s_next > 0:
      d_hat = (eye - gain(s_hat)) / s_hat
      p = eye + (s_next - s_hat) * d_hat
      q = eye + 0.5 * (s_next - s_hat) * (d_hat + (eye - gain(s_next)) / s_next @ p)
    else:
      q = gain(s_hat)
    m, c = q @ m, q @ c @ q.T + a**2 * q @ q.T
  return m + MU, c


@pytest.mark.parametrize("s_churn, s_tmin, s_tmax, s_noise", [
    (0.0, 0.0, float("inf"), 1.0),          # algorithm 1 (deterministic Heun)
    (40.0, 0.05, 50.0, 1.003),              # EDM's ImageNet-64 stochastic setting
    (80.0, 0.0, float("inf"), 1.0),         # churn at every step (gamma capped at sqrt 2 - 1)
])
def test_heun_moments_equal_the_discretised_reference(s_churn, s_tmin, s_tmax, s_noise):
  sampler = dj.get_sampler("heun", num_steps=NUM_STEPS, thresholding="none")
  x = jax.jit(lambda key: sampler(exact_eps_model(), SCHEDULE, (N_SAMPLES, 2), key,
                                  s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                                  s_noise=s_noise))(jax.random.PRNGKey(0))
  x = np.asarray(x, np.float64)
  sigmas = np.asarray(ode.sigma_grid(SCHEDULE, NUM_STEPS)[0], np.float64)
  mean, cov = reference_moments(sigmas, s_churn, s_tmin, s_tmax, s_noise)
  se_mean = np.sqrt(np.diag(cov) / N_SAMPLES)
  assert np.all(np.abs(x.mean(0) - mean) < 5 * se_mean), (x.mean(0), mean, se_mean)
  # Standard error of a sample covariance entry: sqrt((C_ii C_jj + C_ij^2) / n).
  se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / N_SAMPLES)
  assert np.all(np.abs(np.cov(x.T) - cov) < 5 * se_cov), (np.cov(x.T), cov, se_cov)


@pytest.mark.parametrize("s_churn", [0.0, 40.0])
def test_the_reference_converges_to_the_target(s_churn):
  # A check of the reference's algebra: with many steps the discretised sampler is the exact
  # one. Heun's error is second order (0.06 on cov at 12 steps, 0.005 at 36); at 400 steps
  # what remains is the start from sigma_max = 80 with the VP prior, which leaves a fraction
  # ~ S / 80^2 of the initial mean offset -mu: ~ 1e-3.
  sigmas = np.asarray(ode.sigma_grid(SCHEDULE, 400)[0], np.float64)
  mean, cov = reference_moments(sigmas, s_churn, 0.05, 50.0, 1.0)
  np.testing.assert_allclose(cov, S, atol=1e-3)
  np.testing.assert_allclose(mean, MU, atol=2e-3)


def test_zero_churn_is_algorithm_1_bit_for_bit():
  sampler = dj.get_sampler("heun", num_steps=8, thresholding="none")
  run = jax.jit(lambda key, churn: sampler(exact_eps_model(), SCHEDULE, (64, 2), key,
                                           s_churn=churn))
  plain = jax.jit(lambda key: sampler(exact_eps_model(), SCHEDULE, (64, 2), key))
  np.testing.assert_array_equal(run(jax.random.PRNGKey(1), 0.0), plain(jax.random.PRNGKey(1)))
