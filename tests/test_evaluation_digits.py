"""The offline digits metric: a reproducible cached classifier and Frechet distances in its features."""
import dataclasses

import jax
import numpy as np
import pytest

from diffusion_jax.evaluation import digits
from diffusion_jax.evaluation import metrics


@pytest.fixture(scope="module")
def splits():
  return digits._split("train")[0], digits._split("test")[0]


def test_training_is_reproducible(tmp_path, monkeypatch):
  # A short run (the settings are a different cache key): two trainings give the same bits,
  # and the cached file loads back to them.
  monkeypatch.setenv(digits.CACHE_ENV, str(tmp_path))
  settings = dataclasses.replace(digits.DEFAULT_SETTINGS, num_steps=30)
  first = digits.train_classifier(settings)
  second = digits.train_classifier(settings)
  jax.tree.map(np.testing.assert_array_equal, first, second)
  assert digits.cache_path(settings).startswith(str(tmp_path))
  digits._save(digits.cache_path(settings), first, settings)
  jax.tree.map(np.testing.assert_array_equal, digits._load(digits.cache_path(settings)), first)
  assert settings.key() != digits.DEFAULT_SETTINGS.key()


def test_classifier_is_accurate():
  # The brief's sanity bar: a digits classifier worth its features classifies held-out digits
  # well (an SVM reaches ~0.95 on this split).
  assert digits.classifier_accuracy("test") > 0.9


def test_features_shape_and_batching(splits):
  train, _ = splits
  features = digits.digits_features(train[:37])
  assert features.shape == (37, digits.DEFAULT_SETTINGS.feature_dim)
  assert features.dtype == np.float64
  # Batching (and padding of the last batch) does not change an image's features: the network
  # is per-example, so the same program gives the same bits up to the batch size's float32
  # matmul blocking (~1e-6 relative).
  np.testing.assert_allclose(digits.digits_features(train[:37], batch_size=8), features,
                             rtol=1e-5, atol=1e-5)


def test_frechet_distance_orders_quality(splits):
  # Thresholds set by reasoning, not by the numbers: the same set against itself is 0; noise is
  # far worse than the real-vs-real floor; real training digits are close to it.
  train, test = splits
  mu, sigma = metrics.feature_statistics(digits.digits_features(test))
  assert abs(metrics.frechet_distance(mu, sigma, *digits.reference_statistics("test"))) < 1e-6
  floor = digits.real_floor()
  assert floor > 0
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, (500, 8, 8, 1)).astype(np.uint8)
  assert digits.digits_frechet_distance(noise) > 5 * floor
  assert digits.digits_frechet_distance(train[:500]) < 2 * floor


def test_bad_images_raise():
  with pytest.raises(ValueError, match="uint8"):
    digits.digits_features(np.zeros((4, 8, 8, 1), np.float32))
  with pytest.raises(ValueError, match=r"\[N, 8, 8, 1\]"):
    digits.digits_features(np.zeros((4, 16, 16, 1), np.uint8))
  with pytest.raises(ValueError, match="reference"):
    digits.digits_frechet_distance(np.zeros((4, 8, 8, 1), np.uint8), reference="val")
