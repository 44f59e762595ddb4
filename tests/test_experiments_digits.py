"""The digits job: a classifier trained on real digits recognises the generated samples.

Trains the default digits config (DIGITS_TEST_STEPS overrides the step count for a shortened CI
run), samples 200 images with EMA params, and classifies them with a scikit-learn SVM trained on
the real training digits. Reports, for generated and for real held-out digits: the fraction
classified with confidence > 0.9, the mean confidence, and the class histogram's total variation
distance from uniform.
"""
import os

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.svm import SVC

from diffusion_jax.training import restore, trainer
from experiments import sample as sample_lib
from experiments.configs import digits

pytestmark = pytest.mark.slow


def _figures(clf, x16):
  probs = clf.predict_proba(x16.reshape(len(x16), -1))
  conf = probs.max(1)
  hist = np.bincount(probs.argmax(1), minlength=10) / len(x16)
  return {"confident_frac": float(np.mean(conf > 0.9)), "mean_conf": float(conf.mean()),
          "tv_from_uniform": float(0.5 * np.abs(hist - 0.1).sum()), "hist": hist.round(3)}


def test_digits_job_samples_are_recognisable(tmp_path):
  if jax.device_count() != 8:
    pytest.skip("expects the 8 fake devices of conftest")
  config = digits.get_config()
  config.data.data_dir = str(tmp_path / "tfds")
  steps = int(os.environ.get("DIGITS_TEST_STEPS", config.train.num_steps))
  config.train.num_steps = steps
  config.train.checkpoint_every = steps
  config.train.sample_every = 0
  config.sample.num_samples = 0
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir)

  d = load_digits()
  x, y = d.images, d.target
  clf = SVC(probability=True, gamma=0.001, C=10.0, random_state=0).fit(
      x[:1500].reshape(1500, -1), y[:1500])
  real = _figures(clf, x[1500:])
  loaded = restore.load_for_sampling(workdir, use_ema=True)
  images = sample_lib.sample_images(loaded, 200, seed=0, batch_size=200)
  gen = _figures(clf, images[..., 0].astype(np.float64) * 16.0 / 255.0)
  print(f"\n{steps} steps. real held-out: {real}\ngenerated: {gen}")
  assert real["confident_frac"] > 0.8
  assert gen["confident_frac"] > 0.6, gen
  assert gen["tv_from_uniform"] < 0.25, gen
