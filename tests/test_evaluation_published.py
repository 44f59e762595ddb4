"""Metrics from features equal to the published packages on the same features.

pytorch-fid 0.3.0 (FID), torch-fidelity 0.4.0 (FID, IS, KID, precision/recall) and prdc 0.2
(precision/recall, density/coverage), run side by side; see published_evaluators.py for how the
torch packages are imported without torchvision.
"""
import numpy as np
import pytest
import prdc   # a test requirement (requirements-test.txt): never skipped
import torch

from diffusion_jax.evaluation import metrics
import published_evaluators_testlib as published_evaluators


def _features(seed: int, n: int, d: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
  """Correlated, skewed (non-Gaussian) features [n, d] in float64, like post-ReLU activations."""
  rng = np.random.default_rng(seed)
  mix = np.random.default_rng(99).normal(size=(d, d)) / np.sqrt(d)
  z = rng.normal(size=(n, d)) @ mix * scale + shift
  return np.log1p(np.exp(z))  # softplus: positive and skewed.


@pytest.fixture(scope="module")
def fake_real():
  return _features(0, 400, 32, shift=0.3, scale=1.2), _features(1, 500, 32)


def test_fid_equals_pytorch_fid_and_torch_fidelity(fake_real):
  fake, real = fake_real
  stats = metrics.feature_statistics(fake) + metrics.feature_statistics(real)
  ours = metrics.frechet_distance(*stats)
  # pytorch-fid runs the same float64 computation (scipy sqrtm): equal to round-off.
  pytorch_fid = published_evaluators.pytorch_fid_frechet_distance()(*stats)
  assert ours == pytest.approx(pytorch_fid, rel=1e-12, abs=1e-12)
  # torch-fidelity: its own statistics (np.mean / np.cov of the features) and the trace of the
  # square root from eigenvalues instead of sqrtm. Both are backward stable in float64; with
  # covariance condition numbers ~1e2 and D = 32 the two traces agree to ~D cond eps ~ 1e-12
  # relative to tr(S) ~ 10, so 1e-9 relative on the FID (~1) leaves margin.
  fid_module = published_evaluators.torch_fidelity("metric_fid")
  stat_fake = fid_module.fid_features_to_statistics(torch.from_numpy(fake))
  stat_real = fid_module.fid_features_to_statistics(torch.from_numpy(real))
  np.testing.assert_allclose(stats[0], stat_fake["mu"], rtol=1e-13, atol=1e-13)
  np.testing.assert_allclose(stats[1], stat_fake["sigma"], rtol=1e-12, atol=1e-13)
  fidelity = fid_module.fid_statistics_to_metric(stat_fake, stat_real, verbose=False)
  assert ours == pytest.approx(fidelity[fid_module.KEY_METRIC_FID], rel=1e-9)


def test_defaults_are_torch_fidelity_defaults():
  defaults = published_evaluators.torch_fidelity("defaults").DEFAULTS
  assert defaults["isc_splits"] == 10 and defaults["samples_shuffle"] is True
  assert defaults["rng_seed"] == metrics.DEFAULT_SEED
  assert (defaults["kid_subsets"], defaults["kid_subset_size"]) == (100, 1000)
  assert (defaults["kid_kernel_poly_degree"], defaults["kid_kernel_poly_gamma"],
          defaults["kid_kernel_poly_coef0"]) == (3, None, 1)
  assert defaults["prc_neighborhood"] == 3


@pytest.mark.parametrize("shuffle", [True, False])
def test_inception_score_equals_torch_fidelity(shuffle):
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(1000, 50)) * 3.0
  mean, std = metrics.inception_score(logits, splits=10, shuffle=shuffle)
  isc = published_evaluators.torch_fidelity("metric_isc")
  out = isc.isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=shuffle,
                                   rng_seed=metrics.DEFAULT_SEED)
  # Same float64 operations in another order (softmax by log-sum-exp vs torch's): ~1e-15 each,
  # exp of means of ~1000 terms: 1e-12 relative is round-off with margin.
  assert mean == pytest.approx(out[isc.KEY_METRIC_ISC_MEAN], rel=1e-12)
  assert std == pytest.approx(out[isc.KEY_METRIC_ISC_STD], rel=1e-9, abs=1e-12)


def test_inception_score_closed_forms():
  # Confident predictions spread evenly over C classes give IS = C; identical predictions give 1.
  c = 10
  confident = np.tile(np.eye(c) * 50.0, (20, 1))
  # (Unshuffled: each split holds every class equally often, so p(y) is uniform.)
  assert metrics.inception_score(confident, splits=2, shuffle=False)[0] == pytest.approx(c, rel=1e-12)
  assert metrics.inception_score(np.ones((40, c)), splits=4) == pytest.approx((1.0, 0.0))


def test_kernel_distance_equals_torch_fidelity(fake_real):
  fake, real = fake_real
  kwargs = {"kid_subsets": 20, "kid_subset_size": 300, "rng_seed": metrics.DEFAULT_SEED,
            "verbose": False}
  kid = published_evaluators.torch_fidelity("metric_kid")
  out = kid.kid_features_to_metric(torch.from_numpy(fake), torch.from_numpy(real), **kwargs)
  mean, std = metrics.kernel_distance(fake, real, num_subsets=20, subset_size=300)
  # Same subsets (same RandomState draws), float64 kernels with sums in another order: the MMD
  # (~1e-1) is a difference of sums of 1e5 kernel values ~1, so ~1e5 * 1e-16 = 1e-11 absolute.
  assert mean == pytest.approx(out[kid.KEY_METRIC_KID_MEAN], rel=1e-9, abs=1e-11)
  assert std == pytest.approx(out[kid.KEY_METRIC_KID_STD], rel=1e-8, abs=1e-11)


def test_kernel_distance_closed_form():
  # Linear kernel (degree 1, coef0 0, gamma 1): unbiased MMD^2 = |mean x - mean y|^2 minus the
  # within-set diagonal corrections, i.e. exactly the U-statistic computed by brute force.
  rng = np.random.default_rng(5)
  x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) + 1.0
  brute = (sum(x[i] @ x[j] for i in range(6) for j in range(6) if i != j) / 30
           + sum(y[i] @ y[j] for i in range(6) for j in range(6) if i != j) / 30
           - 2 * sum(x[i] @ y[j] for i in range(6) for j in range(6)) / 36)
  mean, std = metrics.kernel_distance(x, y, num_subsets=1, subset_size=6, degree=1, gamma=1.0,
                                      coef0=0.0)
  assert mean == pytest.approx(brute, rel=1e-12) and std == 0.0


def test_precision_recall_equals_torch_fidelity_and_prdc(fake_real):
  fake, real = fake_real
  precision, recall = metrics.precision_recall(real, fake, k=3, chunk=128)
  prc = published_evaluators.torch_fidelity("metric_prc")
  expected = prc.calculate_precision_recall_full(torch.from_numpy(fake), torch.from_numpy(real),
                                                 neighborhood=3)
  # Fractions of counts: exact unless a distance ties a radius to round-off (measure zero here).
  assert 0 < precision < 1 and 0 < recall < 1  # Not degenerate: some points in, some out.
  # torch-fidelity averages in float32 (0.24 -> 0.2399999946): compare the counts.
  assert round(precision * len(fake)) == round(expected[0] * len(fake))
  assert round(recall * len(real)) == round(expected[1] * len(real))
  published = prdc.compute_prdc(real_features=real, fake_features=fake, nearest_k=3)
  assert (precision, recall) == pytest.approx((published["precision"], published["recall"]),
                                              abs=1e-12)


@pytest.mark.parametrize("k", [3, 5])
def test_density_coverage_equal_prdc(fake_real, k):
  fake, real = fake_real
  published = prdc.compute_prdc(real_features=real, fake_features=fake, nearest_k=k)
  density, coverage = metrics.density_coverage(real, fake, k=k, chunk=100)
  assert 0 < coverage < 1
  assert density == pytest.approx(published["density"], abs=1e-12)
  assert coverage == pytest.approx(published["coverage"], abs=1e-12)


def test_same_set_is_perfect():
  x = _features(7, 200, 8)
  assert metrics.precision_recall(x, x) == (1.0, 1.0)
  density, coverage = metrics.density_coverage(x, x, k=5)
  assert coverage == 1.0


def test_bad_arguments_raise():
  x = np.zeros((10, 4))
  with pytest.raises(ValueError, match="splits"):
    metrics.inception_score(x, splits=11)
  with pytest.raises(ValueError, match="subset_size"):
    metrics.kernel_distance(x, x, subset_size=11)
  with pytest.raises(ValueError, match="same D"):
    metrics.precision_recall(x, np.zeros((10, 3)))
  with pytest.raises(ValueError, match="k must"):
    metrics.density_coverage(x, x, k=10)
