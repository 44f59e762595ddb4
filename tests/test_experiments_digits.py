"""Sample quality of the digits job: the checker (tests/digits_quality.py) first, on fakes that
must fail and real digits that must pass (fast), then on the README Quickstart's trained run
(slow, the session's `quickstart_run`).

The old test asked only that an SVM recognise the samples; fed the 10 class-mean images repeated
20 times, or 10 memorised training digits repeated, it passed (mean confidence 0.979). The
checker adds class coverage, duplicates, per-class spread, memorisation and digit-likeness; its
thresholds are reasoned in its docstring and were fixed before any generated sample was scored.
"""
import os
import subprocess
import sys

import digits_quality
import numpy as np
import pytest
import training_testlib as tl
from sklearn.datasets import load_digits

N = 200


def _digits():
  d = load_digits()
  return d.images, d.target


def fake(kind: str) -> np.ndarray:
  """[N, 8, 8] stand-ins for a generator's output on the 0..16 scale."""
  images, labels = _digits()
  train, train_labels = images[:1500], labels[:1500]
  rs = np.random.RandomState(0)
  if kind == "class_means":                # mode collapse to one image per class
    means = np.stack([train[train_labels == c].mean(0) for c in range(10)])
    return np.tile(means, (N // 10, 1, 1))
  if kind == "memorised_10_repeated":      # ten training digits, each output 20 times
    return np.tile(train[:10], (N // 10, 1, 1))
  if kind == "memorised_200":              # copies of the training set, no repeats
    return train[rs.choice(1500, N, replace=False)]
  if kind == "memorised_plus_noise":       # copies with pixel noise of sd 1 (of 16)
    return np.clip(train[rs.choice(1500, N, replace=False)] + rs.normal(0, 1, (N, 8, 8)), 0, 16)
  if kind == "uniform_noise":
    return rs.uniform(0, 16, (N, 8, 8))
  if kind == "one_class":                  # every sample a different real '3'
    threes = images[labels == 3]
    return threes[rs.choice(len(threes), N, replace=True)] + rs.normal(0, 0.5, (N, 8, 8))
  raise ValueError(kind)


@pytest.mark.parametrize("kind,must_fail", [
    ("class_means", {"duplicates", "spread"}),
    ("memorised_10_repeated", {"duplicates", "spread", "memorised"}),
    ("memorised_200", {"memorised"}),
    ("memorised_plus_noise", {"memorised"}),
    ("uniform_noise", {"recognisable", "classes", "digit_like"}),
    ("one_class", {"classes"}),
])
def test_checker_rejects_collapsed_memorised_and_noise(kind, must_fail):
  report, failed = digits_quality.check(fake(kind))
  assert must_fail <= set(failed), (kind, report, failed)


def test_checker_accepts_held_out_real_digits():
  images, _ = _digits()
  report, failed = digits_quality.check(images[1500:1500 + N])
  assert not failed, report
  # The fakes' SVM confidence alone would have passed the old test: what it missed.
  collapsed, _ = digits_quality.check(fake("class_means"))
  assert collapsed["mean_conf"] > report["mean_conf"]


def test_checker_rejects_bad_sizes():
  with pytest.raises(ValueError, match="samples"):
    digits_quality.check(np.zeros((5, 8, 8)))


@pytest.mark.slow
@pytest.mark.xdist_group("quickstart")
def test_quickstart_samples_pass_the_quality_checker(quickstart_run, tmp_path):
  """200 fresh samples (EMA params, the run's own sampler) from the Quickstart's trained model."""
  out = str(tmp_path / "samples.npz")
  proc = subprocess.run([sys.executable, "-m", "experiments.sample",
                         f"--workdir={quickstart_run.workdir}", f"--num_samples={N}",
                         f"--out={out}", "--seed=0"],
                        env=tl.subprocess_env(1), cwd=tl.REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  images = np.load(out)["images"]
  assert images.shape == (N, 8, 8, 1) and os.path.exists(out[:-4] + ".png")
  report, failed = digits_quality.check(images[..., 0].astype(np.float64) * 16.0 / 255.0)
  print(f"\nquality of the Quickstart's samples: {report}")
  assert not failed, (failed, report)
