"""bits_per_dim and the discretised Gaussian likelihood against float64 references.

Data: x0 = a 2-D Gaussian N(mu, Sigma) (non-diagonal) discretised to the 256-level grid on
[-1, 1] (bins of width 2/255; Sigma is small enough that the mass beyond the grid is < 1e-13).
Model: the exact predictor of the continuous Gaussian (affine in x_t), fixed_small variance.

The bound. For any model p, the negative VLB of x0 upper-bounds -log p(x0), and the expected
model NLL upper-bounds the data entropy (cross entropy >= entropy), so
    H(P) <= E_P[-VLB]                                        (nats; / (D ln 2) for bits/dim)
with H(P) = -sum_bins P log P the closed-form NLL of the discretised data. The gap is the
joint KL(q(x_{0:T}) || p(x_{0:T})) and is not small for a fixed-variance model: it is computed
here exactly in float64 as E_P[-VLB] - H(P) with E_P[-VLB] evaluated term by term:
  prior: KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)), closed form;
  t >= 1: E KL = c1_t^2 E|x0 - E[x0|x_t]|^2 / (2 sigma_t^2) (means differ only through x0-hat,
          variances equal for fixed_small), with E|x0 - x0hat|^2 closed form given x0;
  t = 0: E[-log DG(x0; x0hat(x_1), sqrt(beta~_1))] over the Gaussian x0hat error, by 60-point
         Gauss-Hermite quadrature per dimension (the decoder factorises over dimensions).
The test then checks (a) dj.bits_per_dim's Monte-Carlo VLB (total, decoder and KL parts) equals
this float64 expectation on the same x0 within 4 standard errors, and its prior term exactly;
(b) the float64 E_P[-VLB] >= H(P), and bits_per_dim's average over x0 ~ P lies within 4 SE of
E_P[-VLB] (so >= H(P) up to Monte-Carlo error). Figures for this data (float64): H = 5.748
bits/dim, E[-VLB] = 6.421 bits/dim: a gap of 0.673 bits/dim, of which the fixed_small reverse
variances and the decoder (std sqrt(beta~_1) ~ 0.9 bin widths) account; a learned variance would
shrink it. The gap is therefore an exactly computed figure here, not a tolerance.

References: Ho et al. 2020, eq. 5 and sec. 3.3; Nichol & Dhariwal 2021, sec. 3.1 and appendix.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_ndtr, ndtr
from scipy.stats import norm

import diffusion_jax as dj
from diffusion_jax import schedules

T = 1000
MU = np.array([0.05, -0.1])
SIGMA = 0.01 * np.array([[1.0, 0.6], [0.6, 1.44]])
CENTERS = np.arange(256) * (2.0 / 255.0) - 1.0
HALF = 1.0 / 255.0
LN2 = math.log(2.0)
K = 4.0


def f64_log_dg(x, mean, log_scale):
  """float64 log-probability of x's bin under N(mean, exp(log_scale)^2), edges to +-inf."""
  s = np.exp(log_scale)
  up, lo = (x - mean + HALF) / s, (x - mean - HALF) / s
  flip = up + lo > 0   # Phi(up) - Phi(lo) = Phi(-lo) - Phi(-up): evaluate in the far tail
  a, b = np.where(flip, -lo, up), np.where(flip, -up, lo)
  mid = log_ndtr(a) + np.log1p(-np.exp(log_ndtr(b) - log_ndtr(a)))
  return np.where(x < -0.999, norm.logcdf(up), np.where(x > 0.999, norm.logsf(lo), mid))


# --- The discretised Gaussian likelihood ----------------------------------------------------------

@pytest.mark.parametrize("mean", [-7.0, -1.0, -0.9961, -0.3, 0.0, 0.0039, 0.62, 1.0, 3.0])
@pytest.mark.parametrize("log_scale", [-9.0, -5.0, -2.0, 0.0, 3.0])
def test_discretized_gaussian_sums_to_one_and_matches_scipy(mean, log_scale):
  x = jnp.asarray(CENTERS, jnp.float32)
  ll = np.asarray(dj.losses.discretized_gaussian_log_likelihood(
      x, jnp.full_like(x, mean), jnp.full_like(x, log_scale)), np.float64)
  assert np.all(np.isfinite(ll)) and np.all(ll <= 0)
  np.testing.assert_allclose(np.exp(ll).sum(), 1.0, atol=2e-5)
  ref = f64_log_dg(CENTERS.astype(np.float32).astype(np.float64), mean, log_scale)
  # Where a bin holds non-negligible mass: float32 log-probabilities to ~1e-4 relative. Far in a
  # tail, log p ~ -z^2/2 comes from the difference of two float32 log Phi values of that size,
  # each a few 1e-6 relative: allow 5e-5 relative there.
  big = ref > -20
  np.testing.assert_allclose(ll[big], ref[big], rtol=1e-4, atol=2e-5)
  np.testing.assert_allclose(ll[~big], ref[~big], rtol=5e-5)


def test_discretized_gaussian_bins():
  """One bin of a wide Gaussian is ~ width * density; the edge bins hold the tails."""
  x = jnp.asarray([0.0, -1.0, 1.0])
  ll = np.asarray(dj.losses.discretized_gaussian_log_likelihood(x, jnp.zeros(3),
                                                                jnp.zeros(3)))
  np.testing.assert_allclose(np.exp(ll[0]), 2 * HALF * norm.pdf(0.0), rtol=1e-4)
  np.testing.assert_allclose(np.exp(ll[1:]), norm.cdf(-1 + HALF), rtol=1e-5)


# --- bits_per_dim on discretised Gaussian data ----------------------------------------------------

def bin_probabilities():
  """P [256, 256] of the discretised N(MU, SIGMA): 16-point Gauss-Legendre in x1, exact in x2."""
  nodes, weights = np.polynomial.legendre.leggauss(16)
  x1 = CENTERS[:, None] + HALF * nodes[None, :]
  w1 = HALF * weights[None, :] * norm.pdf(x1, MU[0], math.sqrt(SIGMA[0, 0]))
  cond_mean = MU[1] + SIGMA[0, 1] / SIGMA[0, 0] * (x1 - MU[0])
  cond_std = math.sqrt(SIGMA[1, 1] - SIGMA[0, 1] ** 2 / SIGMA[0, 0])
  up = (CENTERS[None, None, :] + HALF - cond_mean[..., None]) / cond_std
  lo = (CENTERS[None, None, :] - HALF - cond_mean[..., None]) / cond_std
  return np.einsum("ik,ikj->ij", w1, ndtr(up) - ndtr(lo))


def schedule_f64():
  betas = schedules.BETA_SCHEDULES["linear"](T)
  abar = np.cumprod(1 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  post_var = betas * (1 - abar_prev) / (1 - abar)
  return betas, abar, np.sqrt(abar_prev) * betas / (1 - abar), np.append(post_var[1], post_var[1:])


def gain(a):
  """K with E[x0 | x_t] = MU + K (x_t - sqrt(a) MU)."""
  return math.sqrt(a) * SIGMA @ np.linalg.inv(a * SIGMA + (1 - a) * np.eye(2))


def expected_vlb_nats(x0):
  """E over the forward noise of -VLB(x0) in nats (summed over D = 2): prior, KL sum, decoder."""
  betas, abar, c1, sigma2 = schedule_f64()
  d = x0 - MU
  prior = 0.5 * np.sum((1 - abar[-1]) + abar[-1] * x0 ** 2 - 1 - math.log(1 - abar[-1]), axis=1)
  kl = np.zeros(len(x0))
  for t in range(1, T):
    a, k = abar[t], gain(abar[t])
    err2 = np.sum((d @ (math.sqrt(a) * k - np.eye(2)).T) ** 2, axis=1) + (1 - a) * np.trace(k @ k.T)
    kl += c1[t] ** 2 * err2 / (2 * sigma2[t])
  a, k = abar[0], gain(abar[0])
  err_mean = d @ (math.sqrt(a) * k - np.eye(2)).T          # x0hat - x0 ~ N(err_mean, err_var)
  err_var = (1 - a) * np.diag(k @ k.T)
  nodes, weights = np.polynomial.hermite_e.hermegauss(60)
  weights = weights / weights.sum()
  decoder = np.zeros(len(x0))
  for i in range(2):
    mean = x0[:, i:i + 1] + err_mean[:, i:i + 1] + math.sqrt(err_var[i]) * nodes[None, :]
    decoder -= f64_log_dg(x0[:, i:i + 1], mean, 0.5 * math.log(sigma2[0])) @ weights
  return prior, kl, decoder


@pytest.fixture(scope="module")
def exact():
  p = bin_probabilities()
  assert abs(p.sum() - 1) < 1e-12      # no mass beyond the grid worth counting
  keep = p > 1e-16
  i, j = np.nonzero(keep)
  grid_x0 = np.stack([CENTERS[i], CENTERS[j]], axis=1)
  prior, kl, decoder = expected_vlb_nats(grid_x0)
  w = p[keep] / p[keep].sum()
  entropy = -np.sum(p[keep] * np.log(p[keep]))
  return dict(p=p, entropy_bpd=entropy / (2 * LN2),
              vlb_bpd=np.sum(w * (prior + kl + decoder)) / (2 * LN2))


def test_bits_per_dim_matches_float64_vlb_and_bounds_the_nll(exact):
  # Theorem, in float64: the VLB is above the NLL of the discretised data.
  assert exact["vlb_bpd"] >= exact["entropy_bpd"]
  # Fine bins (width w = 2/255 << std): H(P) = h(N) - D log w + (w^2 / 24) J + O(w^4) nats,
  # J = tr(Sigma^-1) the Fisher information (entropy of a finely quantised variable).
  width = 2.0 / 255.0
  h_cont = 0.5 * math.log(np.linalg.det(2 * math.pi * math.e * SIGMA))
  fisher = np.trace(np.linalg.inv(SIGMA))
  approx = (h_cont - 2 * math.log(width) + width ** 2 / 24 * fisher) / (2 * LN2)
  assert abs(exact["entropy_bpd"] - approx) < (width ** 2 / 24 * fisher) ** 2

  n = 2000
  rng = np.random.default_rng(0)
  flat = rng.choice(256 * 256, size=n, p=(exact["p"] / exact["p"].sum()).ravel())
  x0 = np.stack([CENTERS[flat // 256], CENTERS[flat % 256]], axis=1)
  betas, abar, _, _ = schedule_f64()
  P = np.stack([np.sqrt(1 - a) * np.linalg.inv(a * SIGMA + (1 - a) * np.eye(2)) for a in abar])
  q = -np.einsum("tij,j->ti", P, MU) * np.sqrt(abar)[:, None]
  P32, q32 = jnp.asarray(P, jnp.float32), jnp.asarray(q, jnp.float32)
  model_fn = lambda x, t: jnp.einsum("bij,bj->bi", P32[t], x) + q32[t]    # exact E[eps | x_t]
  schedule = dj.get_schedule("linear", T)
  out = jax.jit(lambda x, k: dj.bits_per_dim(model_fn, schedule, x, k, clip_denoised=False))(
      jnp.asarray(x0, jnp.float32), jax.random.PRNGKey(0))
  total, prior_j, terms = (np.asarray(a, np.float64) for a in out)
  assert total.shape == (n,) and terms.shape == (n, T)
  np.testing.assert_allclose(total, prior_j + terms.sum(axis=1), rtol=1e-5)

  prior, kl, decoder = expected_vlb_nats(x0)
  # The prior term is deterministic: to float32 precision.
  np.testing.assert_allclose(prior_j, prior / (2 * LN2), rtol=1e-4, atol=1e-9)
  # (a) Same x0, Monte Carlo over the forward noise: mean difference within K standard errors.
  for got, want in ((total, (prior + kl + decoder) / (2 * LN2)), (terms[:, 0], decoder / (2 * LN2)),
                    (terms[:, 1:].sum(axis=1), kl / (2 * LN2))):
    diff = got - want
    se = diff.std(ddof=1) / math.sqrt(n)
    assert abs(diff.mean()) <= K * se, (diff.mean(), se)
  # (b) The bound, on the Monte-Carlo estimate (x0 drawn from P).
  se_total = total.std(ddof=1) / math.sqrt(n)
  assert total.mean() >= exact["entropy_bpd"] - K * se_total
  assert abs(total.mean() - exact["vlb_bpd"]) <= K * se_total
  print(f"H(P) {exact['entropy_bpd']:.4f}  E[-VLB] float64 {exact['vlb_bpd']:.4f}  "
        f"bits_per_dim {total.mean():.4f} +- {se_total:.4f} bits/dim")
