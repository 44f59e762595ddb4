"""Metrics from features: closed forms and float64 references (published packages side by side
live in test_evaluation_published.py)."""
import warnings

import numpy as np
import pytest

from diffusion_jax.evaluation import metrics


def _random_spd(rng: np.random.Generator, d: int, condition: float = 10.0) -> np.ndarray:
  """A symmetric positive definite [d, d] matrix with eigenvalues in [1, condition]."""
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  return (q * np.linspace(1.0, condition, d)) @ q.T


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
  """The symmetric square root of a symmetric PSD matrix by eigh (independent of sqrtm)."""
  w, v = np.linalg.eigh(a)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _reference_fd(mu1, s1, mu2, s2) -> float:
  """tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2): the symmetric form, by eigh only."""
  r1 = _psd_sqrt(s1)
  cross = np.trace(_psd_sqrt(r1 @ s2 @ r1))
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross)


@pytest.mark.parametrize("d", [1, 4, 64])
def test_diagonal_covariances_closed_form(d):
  # Commuting diagonal covariances: d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
  rng = np.random.default_rng(d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  a, b = rng.uniform(0.5, 4.0, d), rng.uniform(0.5, 4.0, d)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  # Terms of size ~4 d; sqrtm's Schur method is backward stable: error ~ d * eps * 4 d.
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10 * d * d)


def test_scalar_gaussians():
  # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s1, s2.
  got = metrics.frechet_distance(np.array([1.0]), np.array([[4.0]]),
                                 np.array([-2.0]), np.array([[9.0]]))
  assert got == pytest.approx(9.0 + 1.0, abs=1e-12)


@pytest.mark.parametrize("d", [3, 32])
def test_general_covariances_match_symmetric_form(d):
  rng = np.random.default_rng(10 + d)
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  got = metrics.frechet_distance(mu1, s1, mu2, s2)
  # Condition numbers <= 10, entries ~10, d terms: float64 round-off ~ d * 10 * eps * cond.
  np.testing.assert_allclose(got, _reference_fd(mu1, s1, mu2, s2), rtol=0, atol=1e-9 * d)


def test_identical_statistics_give_zero():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
  mu, sigma = metrics.feature_statistics(features)
  got = metrics.frechet_distance(mu, sigma, mu, sigma)
  # sqrtm(S^2) recovers S to ~ cond(S) * eps relative: tr(S) * 1e-8 is a generous bound.
  assert abs(got) < 1e-8 * np.trace(sigma)


def test_translation_only_gives_squared_mean_distance():
  rng = np.random.default_rng(1)
  sigma = _random_spd(rng, 8)
  mu1 = rng.normal(size=8)
  mu2 = mu1 + 0.5
  assert metrics.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(8 * 0.25, abs=1e-9)


def test_feature_statistics_match_numpy_cov():
  rng = np.random.default_rng(2)
  features = rng.normal(size=(100, 5)).astype(np.float32)
  mu, sigma = metrics.feature_statistics(features)
  assert mu.dtype == np.float64 and sigma.dtype == np.float64
  np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=1e-14, atol=1e-15)
  np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False),
                             rtol=1e-12, atol=1e-14)


def test_singular_covariance_warns_and_falls_back():
  rng = np.random.default_rng(3)
  few = rng.normal(size=(5, 10))  # 5 samples in 10 dimensions: rank 4.
  mu1, s1 = metrics.feature_statistics(few)
  mu2, s2 = metrics.feature_statistics(rng.normal(size=(5, 10)))
  with pytest.warns(RuntimeWarning, match="singular"):
    value = metrics.frechet_distance(mu1, s1, mu2, s2)
  assert np.isfinite(value)


def test_full_rank_does_not_warn():
  rng = np.random.default_rng(4)
  mu, sigma = metrics.feature_statistics(rng.normal(size=(200, 10)))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    metrics.frechet_distance(mu, sigma, mu + 1, sigma)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="sigma1"):
    metrics.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
  with pytest.raises(ValueError, match="mu1 and mu2"):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
  with pytest.raises(ValueError, match="features"):
    metrics.feature_statistics(np.zeros((4,)))
  with pytest.raises(ValueError, match="at least 2"):
    metrics.feature_statistics(np.zeros((1, 3)))
  with pytest.raises(ValueError, match="NaN"):
    metrics.feature_statistics(np.full((3, 3), np.nan))
