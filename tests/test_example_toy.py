"""The runnable example learns its 2-D mixture in a few hundred steps and samples land on it."""
import math
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
import toy_2d  # noqa: E402


def test_toy_2d_learns_the_mixture():
  result = toy_2d.train_and_sample(num_steps=400, num_samples=2000)
  assert np.all(np.isfinite(result.samples)) and result.samples.shape == (2000, 2)
  assert result.losses[-50:].mean() < 0.8 * result.losses[:10].mean()
  # A point uniform on the data's square [-1, 1]^2 is within 4 std (0.2) of one of the 8 modes
  # with probability 8 pi 0.2^2 / 4 ~ 0.25: ask for twice that.
  uniform_rate = toy_2d.NUM_MODES * math.pi * (4 * toy_2d.MODE_STD) ** 2 / 4
  trained = toy_2d.on_mode_fraction(result.samples)
  assert trained >= 2 * uniform_rate, trained
  assert toy_2d.on_mode_fraction(result.untrained) < uniform_rate     # the check can fail
  # Every mode is found, none dominates: each holds >= 40% of an equal share of on-mode samples.
  counts = toy_2d.mode_counts(result.samples)
  assert counts.min() >= 0.4 * counts.sum() / toy_2d.NUM_MODES, counts
  # Better than the untrained model by a wide margin in mixture log-likelihood.
  assert (toy_2d.mixture_log_likelihood(result.samples).mean()
          > toy_2d.mixture_log_likelihood(result.untrained).mean() + 20)
