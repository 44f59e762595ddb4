"""End to end with an exact model: data x0 ~ N(mu, Sigma) in 2-D (non-diagonal Sigma).

For Gaussian data the optimal predictions are affine in x_t (Gaussian conditioning), with
M_t = abar_t Sigma + (1 - abar_t) I:
  E[x0 | x_t]  = mu + sqrt(abar) Sigma M^-1 (x_t - sqrt(abar) mu)
  E[eps | x_t] = sqrt(1 - abar) M^-1 (x_t - sqrt(abar) mu)
  E[v | x_t]   = sqrt(abar) E[eps | x_t] - sqrt(1 - abar) E[x0 | x_t].
Every step of the ancestral sampler is then affine plus Gaussian noise, so the law of its output
is exactly Gaussian with moments (m, C) that a float64 recursion computes. We check:
  1. dj.sample's Monte-Carlo mean and covariance match (m, C) within K standard errors;
  2. they match the data's (mu, Sigma) within K standard errors, after checking in float64
     that the sampler's own discretisation bias |C - Sigma| is below one standard error at
     this sample size (O(1/T); for fixed_small at T = 1000 it is 0.6 SE with the cosine
     schedule, 1.1 SE with the linear one, which is why this test uses the cosine schedule).
Standard errors for N Gaussian samples: mean_i: sqrt(C_ii / N); sample covariance_ij:
sqrt((C_ii C_jj + C_ij^2) / N). K = 4 (two-sided 6e-5 per statistic; ~20 statistics).

References: Ho et al. 2020, algorithm 2 and sec. 3.2 (the two variance choices).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax as dj
from diffusion_jax import schedules

MU = np.array([0.3, -0.2])
SIGMA = np.array([[0.5, 0.3], [0.3, 0.4]])
T = 1000
N = 20_000
K = 4.0
SCHEDULE_NAME = "cosine"


def affine_predictors():
  """Per-t (P [T, 2, 2], q [T, 2]) with prediction = P x_t + q, in float64, for eps, x0, v."""
  betas = schedules.BETA_SCHEDULES[SCHEDULE_NAME](T)
  abar = np.cumprod(1.0 - betas)
  eye = np.eye(2)
  out = {k: (np.zeros((T, 2, 2)), np.zeros((T, 2))) for k in ("eps", "x0", "v")}
  for t, a in enumerate(abar):
    m_inv = np.linalg.inv(a * SIGMA + (1 - a) * eye)
    p_eps, p_x0 = np.sqrt(1 - a) * m_inv, np.sqrt(a) * SIGMA @ m_inv
    shift = np.sqrt(a) * MU
    mats = {"eps": p_eps, "x0": p_x0, "v": np.sqrt(a) * p_eps - np.sqrt(1 - a) * p_x0}
    offs = {"eps": -p_eps @ shift, "x0": MU - p_x0 @ shift}
    offs["v"] = np.sqrt(a) * offs["eps"] - np.sqrt(1 - a) * offs["x0"]
    for k in out:
      out[k][0][t], out[k][1][t] = mats[k], offs[k]
  return betas, out


def exact_output_moments(betas, variance):
  """Mean and covariance of the sampler's output, propagated exactly in float64."""
  abar = np.cumprod(1.0 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  post_var = betas * (1 - abar_prev) / (1 - abar)
  sigma2 = post_var if variance == "fixed_small" else np.append(post_var[1], betas[1:])
  c1 = np.sqrt(abar_prev) * betas / (1 - abar)
  c2 = np.sqrt(1 - betas) * (1 - abar_prev) / (1 - abar)
  eye = np.eye(2)
  m, c = np.zeros(2), eye.copy()          # x_{T-1} ~ N(0, I)
  for t in range(T - 1, -1, -1):
    a = abar[t]
    p_x0 = np.sqrt(a) * SIGMA @ np.linalg.inv(a * SIGMA + (1 - a) * eye)
    A = c1[t] * p_x0 + c2[t] * eye       # mean = c1 E[x0|x_t] + c2 x_t
    b = c1[t] * (MU - p_x0 @ (np.sqrt(a) * MU))
    m = A @ m + b
    c = A @ c @ A.T + (sigma2[t] if t > 0 else 0.0) * eye
  return m, c


def standard_errors(c):
  se_mean = np.sqrt(np.diag(c) / N)
  se_cov = np.sqrt((np.outer(np.diag(c), np.diag(c)) + c ** 2) / N)
  return se_mean, se_cov


BETAS, PREDICTORS = affine_predictors()
# Each variant costs one compile (~3 s here) and one run (~1.5 s): four cover both variances and
# all three parameterizations.
VARIANTS = [("eps", "fixed_small"), ("eps", "fixed_large"), ("x0", "fixed_small"),
            ("v", "fixed_large")]


@pytest.fixture(scope="module")
def samples():
  """Samples for each (prediction, variance) variant; eps/x0/v share one key."""
  schedule = dj.get_schedule(SCHEDULE_NAME, T)
  key = jax.random.PRNGKey(0)
  out = {}
  for prediction, variance in VARIANTS:
    P, q = (jnp.asarray(a, jnp.float32) for a in PREDICTORS[prediction])

    def model_fn(x, t, P=P, q=q):
      return jnp.einsum("bij,bj->bi", P[t], x) + q[t]

    run = jax.jit(lambda k, model_fn=model_fn, prediction=prediction, variance=variance: dj.sample(
        model_fn, schedule, (N, 2), k, prediction=prediction, variance=variance,
        clip_denoised=False))
    out[prediction, variance] = np.asarray(run(key), np.float64)
  return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_moments_match_exact_sampler_law_and_data(samples, variant):
  x = samples[variant]
  assert np.all(np.isfinite(x))
  mean, cov = x.mean(axis=0), np.cov(x, rowvar=False)
  m, c = exact_output_moments(BETAS, variant[1])
  se_mean, se_cov = standard_errors(c)
  # 1. Against the exact law of this sampler.
  assert np.all(np.abs(mean - m) <= K * se_mean), (mean, m, se_mean)
  assert np.all(np.abs(cov - c) <= K * se_cov), (cov, c, se_cov)
  # 2. Against the data distribution; first make sure the sampler's own bias is below 1 SE here,
  #    so this is a test at the stated multiple of the Monte-Carlo error.
  assert np.all(np.abs(m - MU) <= se_mean) and np.all(np.abs(c - SIGMA) <= se_cov)
  assert np.all(np.abs(mean - MU) <= K * se_mean), (mean, MU, se_mean)
  assert np.all(np.abs(cov - SIGMA) <= K * se_cov), (cov, SIGMA, se_cov)


def rounding_gain(betas):
  """sqrt(sum_t ||A_0 ... A_(t-1)||^2): how a unit error made at each step of the ancestral
  chain (mean map x -> A_t x + b_t, exact in float64) reaches the output, added in quadrature."""
  abar = np.cumprod(1.0 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  c1 = np.sqrt(abar_prev) * betas / (1 - abar)
  c2 = np.sqrt(1 - betas) * (1 - abar_prev) / (1 - abar)
  gain, total = np.eye(2), 0.0
  for t, a in enumerate(abar):
    total += np.linalg.norm(gain, 2) ** 2
    p_x0 = np.sqrt(a) * SIGMA @ np.linalg.inv(a * SIGMA + (1 - a) * np.eye(2))
    gain = gain @ (c1[t] * p_x0 + c2[t] * np.eye(2))
  return np.sqrt(total)


def test_parameterizations_give_the_same_samples(samples):
  """Same key, same exact model written as eps, x0 or v: the same samples up to float32.

  Tolerance: each step rounds ~10 float32 operations on states of magnitude max|x| (the
  conversion to x0 and the posterior mean); those independent errors propagate through the
  exact chain gains and add in quadrature: rounding_gain (20.7 here, vs 576 for the worst-case
  linear sum) x 10 eps32 x max|x| (3.6) = 8.9e-5. Measured: 4.9e-6. The former atol 2e-3 was
  the worst-case linear sum and could not see an error of 100 ulps per step.
  """
  atol = rounding_gain(BETAS) * 10 * np.finfo(np.float32).eps * np.abs(samples["eps",
                                                                                 "fixed_small"]).max()
  np.testing.assert_allclose(samples["x0", "fixed_small"], samples["eps", "fixed_small"], rtol=0,
                             atol=atol)
  np.testing.assert_allclose(samples["v", "fixed_large"], samples["eps", "fixed_large"], rtol=0,
                             atol=atol)


def test_fixed_small_and_large_differ_as_predicted(samples):
  """fixed_small's covariance is below fixed_large's by the amount the exact recursion says."""
  _, c_small = exact_output_moments(BETAS, "fixed_small")
  _, c_large = exact_output_moments(BETAS, "fixed_large")
  got = np.cov(samples["eps", "fixed_large"], rowvar=False) - np.cov(
      samples["eps", "fixed_small"], rowvar=False)
  # Same key, so most Monte-Carlo noise cancels in the difference. Its standard error, measured
  # from 20 groups of N / 20 samples (the difference per group), sets the tolerance: K = 4
  # standard errors, as the other moment checks. (The former atol 5e-4 was 15% of the effect
  # itself, 3.2e-3; measured error 4.7e-5.)
  groups = [np.cov(a, rowvar=False) - np.cov(b, rowvar=False) for a, b in zip(
      np.split(samples["eps", "fixed_large"], 20), np.split(samples["eps", "fixed_small"], 20),
      strict=True)]
  se = np.std(groups, axis=0, ddof=1) / np.sqrt(20)
  assert np.all(np.abs(got - (c_large - c_small)) <= K * se), (got, c_large - c_small, se)
