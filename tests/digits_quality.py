"""A quality checker for generated 8x8 digits: recognisable, diverse, not memorised, not noise.

`check(samples)` compares N generated images (N <= 297, values on the 0..16 scale of
scikit-learn's digits) with real digits: the first 1,500 (the training split the digits job
trains on) and the other 297 (held out, never seen in training). It returns a report of named
figures and the list of failed checks (empty: the samples pass).

An SVM's confidence alone cannot tell a good generator from a collapsed one: the 10 class-mean
images repeated 20 times score a mean confidence of 0.979 (above real digits' 0.90). So:

1. recognisable: mean SVM confidence >= real held-out digits' - 0.10. (A generator whose samples
   were real digits would score the real figure up to sampling noise, sd ~0.01 at N = 200; 0.10
   leaves room for slightly blurred strokes, and is far above what noise scores, ~0.2.)
2. classes covered: every class gets >= N / 40 samples (a quarter of its expected N / 10) and the
   class histogram is within total variation 0.2 of uniform. (At N = 200 sampling noise alone
   gives TV ~0.085 and a class count below 5 has probability < 1e-4 under uniform classes.)
3. no duplicates: the fraction of samples whose nearest other sample lies closer than the 5th
   percentile of the same nearest-neighbour distance among N real held-out digits is <= 0.15
   (real digits give 0.05 by construction; 3x that is clearly more than chance; mode collapse
   gives 1.0).
4. per-class spread: the mean distance of a class's samples to their class centroid is >= 0.6 of
   the real held-out digits' (averaged over classes): a diverse generator gives ~1, collapsing
   or averaging shrinks it (class means: 0). 0.6 allows the mild loss of diversity of EMA weights
   and few sampling steps, not a collapse.
5. not memorised: the distance from each sample to its nearest training image, against the same
   distance for held-out real digits: the fraction of samples closer to the training set than
   the held-out digits' 5th percentile is <= 0.15 (held-out: 0.05; a copier: 1.0), and the
   median distance is >= 0.7 of the held-out median.
6. digit-like: the median distance to the nearest training image is <= 1.5 of the held-out
   median (uniform noise lies ~4x farther than real digits do).

All thresholds were fixed from the reasoning above before any generated sample was scored.

References: the nearest-neighbour memorisation test of Meehan et al. 2020 ("A non-parametric
test to detect data-copying in generative models") in a simplified form; precision/recall-style
coverage (Kynkaanniemi et al. 2019) in the spirit of checks 2-4.
"""
from __future__ import annotations

import functools

import numpy as np
from scipy.spatial.distance import cdist
from sklearn.datasets import load_digits
from sklearn.svm import SVC

NUM_TRAIN = 1500
THRESHOLDS = {
    "conf_margin": 0.10, "min_class_frac": 1 / 40, "max_tv": 0.2, "max_duplicate_frac": 0.15,
    "min_spread_ratio": 0.6, "max_copy_frac": 0.15, "min_nn_ratio": 0.7, "max_nn_ratio": 1.5,
}


@functools.lru_cache(maxsize=1)
def reference():
  """(train [1500, 64], held-out [297, 64], SVM fitted on train), values 0..16."""
  d = load_digits()
  x = d.images.reshape(len(d.images), -1).astype(np.float64)
  clf = SVC(probability=True, gamma=0.001, C=10.0, random_state=0).fit(x[:NUM_TRAIN],
                                                                       d.target[:NUM_TRAIN])
  return x[:NUM_TRAIN], x[NUM_TRAIN:], clf


def _nn_within(x: np.ndarray) -> np.ndarray:
  """Distance from each row to its nearest other row."""
  dist = cdist(x, x)
  np.fill_diagonal(dist, np.inf)
  return dist.min(1)


def _spread(x: np.ndarray, labels: np.ndarray) -> float:
  """Mean over classes (with >= 2 members) of the mean distance to the class centroid."""
  values = [np.linalg.norm(x[labels == c] - x[labels == c].mean(0), axis=1).mean()
            for c in range(10) if np.sum(labels == c) >= 2]
  return float(np.mean(values)) if values else 0.0


def check(samples: np.ndarray, seed: int = 0) -> tuple[dict, list[str]]:
  """Quality figures and the failed checks for samples [N, 8, 8] (or [N, 8, 8, 1]) on 0..16."""
  train, held, clf = reference()
  x = np.asarray(samples, np.float64).reshape(len(samples), -1)
  n = len(x)
  if not 10 <= n <= len(held):
    raise ValueError(f"samples must hold 10..{len(held)} images, got {n}")
  real = held[np.random.RandomState(seed).choice(len(held), n, replace=False)]
  probs, real_probs = clf.predict_proba(x), clf.predict_proba(real)
  labels, real_labels = probs.argmax(1), real_probs.argmax(1)
  counts = np.bincount(labels, minlength=10)
  real_nn, gen_nn = _nn_within(real), _nn_within(x)
  held_to_train, gen_to_train = cdist(held, train).min(1), cdist(x, train).min(1)
  t = THRESHOLDS
  r = {
      "mean_conf": float(probs.max(1).mean()), "real_mean_conf": float(real_probs.max(1).mean()),
      "min_class_count": int(counts.min()),
      "tv_from_uniform": float(0.5 * np.abs(counts / n - 0.1).sum()),
      "duplicate_frac": float(np.mean(gen_nn < np.percentile(real_nn, 5))),
      "spread_ratio": _spread(x, labels) / _spread(real, real_labels),
      "copy_frac": float(np.mean(gen_to_train < np.percentile(held_to_train, 5))),
      "nn_ratio": float(np.median(gen_to_train) / np.median(held_to_train)),
  }
  failed = []
  if r["mean_conf"] < r["real_mean_conf"] - t["conf_margin"]:
    failed.append("recognisable")
  if r["min_class_count"] < n * t["min_class_frac"] or r["tv_from_uniform"] > t["max_tv"]:
    failed.append("classes")
  if r["duplicate_frac"] > t["max_duplicate_frac"]:
    failed.append("duplicates")
  if r["spread_ratio"] < t["min_spread_ratio"]:
    failed.append("spread")
  if r["copy_frac"] > t["max_copy_frac"] or r["nn_ratio"] < t["min_nn_ratio"]:
    failed.append("memorised")
  if r["nn_ratio"] > t["max_nn_ratio"]:
    failed.append("digit_like")
  return {k: round(v, 3) for k, v in r.items()}, failed
