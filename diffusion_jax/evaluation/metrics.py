"""Sample-quality metrics computed from features, in float64 NumPy, as the published evaluators do.

Every function takes features that a network (the FID Inception net, the digits classifier)
already produced; none knows which network that was.

- `feature_statistics(features [N, D]) -> (mu [D], sigma [D, D])`: mean and unbiased covariance.
- `frechet_distance(mu1, sigma1, mu2, sigma2)`: ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)),
  with scipy's matrix square root and pytorch-fid's eps-offset fallback (FID).
- `inception_score(logits [N, C])`: exp E[KL(p(y|x) || p(y))] over 10 splits (IS).
- `kernel_distance(features1, features2)`: unbiased MMD^2 with the cubic polynomial kernel over
  random subsets (KID), subsets drawn as torch-fidelity draws them.
- `precision_recall(real, fake, k=3)`: k-NN manifold precision and recall (Kynkaanniemi et al.).
- `density_coverage(real, fake, k=5)`: density and coverage (Naeem et al.).

Conventions follow torch-fidelity 0.4.0 (IS shuffle, KID subsets, P/R's `<=`) and prdc 0.2
(density/coverage's strict `<`), so that the same features give the same numbers.

References: Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
Nash Equilibrium", arXiv:1706.08500, Sec. 3 (FID); Dowson & Landau 1982 (the Frechet distance of
Gaussians); pytorch-fid `fid_score.calculate_frechet_distance` (the numerical recipe); Salimans
et al. 2016, arXiv:1606.03498, Sec. 4 (IS); Binkowski et al. 2018, arXiv:1801.01401, Sec. 4 (KID);
Kynkaanniemi et al. 2019, arXiv:1904.06991, Sec. 3 (P/R); Naeem et al. 2020, arXiv:2002.09797,
Sec. 4 (density/coverage).
"""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np

from diffusion_jax import _checks
import scipy.linalg

# pytorch-fid adds eps * I to both covariances when sqrtm(S1 S2) is not finite.
FID_EPS = 1e-6
# pytorch-fid tolerates imaginary parts of the square root's diagonal up to this (then drops them).
IMAG_ATOL = 1e-3
# torch-fidelity's default seed for the IS shuffle and the KID subsets.
DEFAULT_SEED = 2020


def _as_features(features: np.ndarray, name: str = "features") -> np.ndarray:
  """float64 [N, D] view of features, with a ValueError naming `name` otherwise."""
  array = np.asarray(features)
  if array.ndim != 2:
    raise ValueError(f"{name} must be a 2-D array [N, D], got shape {array.shape}.")
  if not np.issubdtype(array.dtype, np.number):
    raise ValueError(f"{name} must be numeric, got dtype {array.dtype}.")
  array = array.astype(np.float64)
  if not np.all(np.isfinite(array)):
    raise ValueError(f"{name} contains NaN or inf.")
  return array


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance of features, as FID uses them.

  Args:
    features: [N, D] (any float dtype), N >= 2.

  Returns:
    (mu float64 [D], sigma float64 [D, D]) with the unbiased (N - 1) covariance, as pytorch-fid's
    `np.cov(act, rowvar=False)`.

  References: pytorch-fid `calculate_activation_statistics`.
  """
  array = _as_features(features)
  if array.shape[0] < 2:
    raise ValueError(f"features needs at least 2 rows for a covariance, got {array.shape[0]}.")
  mu = array.mean(axis=0)
  centred = array - mu
  sigma = centred.T @ centred / (array.shape[0] - 1)
  return mu, sigma


def _check_statistics(mu: np.ndarray, sigma: np.ndarray, which: str) -> tuple[np.ndarray, np.ndarray]:
  """float64 copies of (mu [D], sigma [D, D]) with shape checks naming mu{which}/sigma{which}."""
  mu = np.atleast_1d(np.asarray(mu, np.float64))
  sigma = np.atleast_2d(np.asarray(sigma, np.float64))
  if mu.ndim != 1:
    raise ValueError(f"mu{which} must be a vector [D], got shape {mu.shape}.")
  if sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"sigma{which} must be [D, D] = {(mu.shape[0],) * 2} to match mu{which}, "
                     f"got shape {sigma.shape}.")
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise ValueError(f"mu{which} / sigma{which} contain NaN or inf.")
  return mu, sigma


def _rank_deficit(sigma: np.ndarray) -> int:
  """D minus the numerical rank of a symmetric PSD matrix (eigenvalues below D * eps * max)."""
  eigenvalues = np.linalg.eigvalsh((sigma + sigma.T) / 2)
  top = max(float(np.abs(eigenvalues).max(initial=0.0)), np.finfo(np.float64).tiny)
  return int(np.sum(eigenvalues <= sigma.shape[0] * np.finfo(np.float64).eps * top))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = FID_EPS) -> float:
  """Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2), in float64.

  d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)), the square root
  by `scipy.linalg.sqrtm` (Schur method). As pytorch-fid: when the root is not finite, eps * I is
  added to both covariances and the root recomputed; imaginary parts from round-off are dropped
  when the diagonal's are below 1e-3, otherwise a ValueError is raised. A warning names a
  singular covariance (fewer samples than dimensions, or dead features): FID is then unreliable.

  Args:
    mu1, mu2: [D] means; sigma1, sigma2: [D, D] covariances (see `feature_statistics`).
    eps: the diagonal offset of the fallback.

  Returns:
    The distance as a Python float (the squared Frechet distance, as FID reports it).

  References: Heusel et al. 2017, arXiv:1706.08500, Sec. 3; pytorch-fid
  `calculate_frechet_distance`.
  """
  mu1, sigma1 = _check_statistics(mu1, sigma1, "1")
  mu2, sigma2 = _check_statistics(mu2, sigma2, "2")
  if mu1.shape != mu2.shape:
    raise ValueError(f"mu1 and mu2 must have the same dimension, got {mu1.shape} and {mu2.shape}.")
  for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
    deficit = _rank_deficit(sigma)
    if deficit:
      warnings.warn(f"{name} is singular ({deficit} of {sigma.shape[0]} eigenvalues ~0: fewer "
                    "samples than feature dimensions, or constant features); the Frechet "
                    "distance is unreliable.", RuntimeWarning, stacklevel=2)
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.all(np.isfinite(covmean)):
    warnings.warn(f"sqrtm(sigma1 @ sigma2) is not finite; adding {eps} * I to both covariances.",
                  RuntimeWarning, stacklevel=2)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    largest = float(np.max(np.abs(np.diagonal(covmean).imag)))
    if largest > IMAG_ATOL:
      raise ValueError(f"sqrtm(sigma1 @ sigma2) has an imaginary diagonal part of {largest:.3g} "
                       f"> {IMAG_ATOL}: the covariances are not positive semi-definite.")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _softmax_stats(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(p, log p) float64 [N, C] of a softmax over the last axis."""
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  return np.exp(log_p), log_p


def inception_score(logits: np.ndarray, splits: int = 10, shuffle: bool = True,
                    seed: int = DEFAULT_SEED) -> tuple[float, float]:
  """Inception Score from classifier logits: (mean, std) over `splits` disjoint splits.

  Per split s: exp(mean_x KL(p(y|x) || p_s(y))) with p_s the split's mean prediction; the
  splits are rows [i N / splits, (i + 1) N / splits) after a permutation by
  `np.random.RandomState(seed)` when shuffle (torch-fidelity's default; the original code does
  not shuffle). std is the population standard deviation (ddof 0).

  Args:
    logits: [N, C] pre-softmax scores (for the FID Inception net: the 1008 logits without the
      bias, torch-fidelity's 'logits_unbiased', as the original TF code computes them).
    splits: number of splits (10 in the literature).
    shuffle, seed: the permutation.

  Returns:
    (mean, std) as Python floats.

  References: Salimans et al. 2016, arXiv:1606.03498, Sec. 4; torch-fidelity `metric_isc`.
  """
  logits = _as_features(logits, "logits")
  n = logits.shape[0]
  if not 1 <= splits <= n:
    raise ValueError(f"splits must lie in [1, N={n}], got {splits}.")
  if shuffle:
    logits = logits[np.random.RandomState(seed).permutation(n)]
  p, log_p = _softmax_stats(logits)
  scores = []
  for i in range(splits):
    rows = slice(i * n // splits, (i + 1) * n // splits)
    p_split, log_p_split = p[rows], log_p[rows]
    log_marginal = np.log(p_split.mean(axis=0, keepdims=True))
    kl = (p_split * (log_p_split - log_marginal)).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def _polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int, gamma: float,
                       coef0: float) -> np.ndarray:
  """(gamma x y^T + coef0)^degree, [n, m]."""
  return (x @ y.T * gamma + coef0) ** degree


def _unbiased_mmd2(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
  """Unbiased MMD^2 of two m-sample sets from their kernel matrices (diagonals of K_xx, K_yy out)."""
  m = k_xx.shape[0]
  within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
  return float(within - 2.0 * k_xy.sum() / (m * m))


def kernel_distance(features1: np.ndarray, features2: np.ndarray, num_subsets: int = 100,
                    subset_size: int = 1000, degree: int = 3, gamma: Optional[float] = None,
                    coef0: float = 1.0, seed: int = DEFAULT_SEED) -> tuple[float, float]:
  """Kernel Inception Distance: (mean, std) of unbiased MMD^2 over random subsets.

  Subset i draws `subset_size` rows of features1, then of features2, without replacement, from
  one `np.random.RandomState(seed)` (torch-fidelity's order); the kernel is
  k(x, y) = (gamma x.y + coef0)^degree with gamma = 1 / D by default. Computed in float64.

  Args:
    features1, features2: [N1, D], [N2, D] (generated and real; the metric is symmetric).
    num_subsets, subset_size: 100 and 1000 as torch-fidelity (subset_size <= N1, N2).
    degree, gamma, coef0: the polynomial kernel.
    seed: the subset draws.

  Returns:
    (mean, std) as Python floats (std with ddof 0). Slightly negative means are valid.

  References: Binkowski et al. 2018, arXiv:1801.01401, Sec. 4 and App. A; torch-fidelity
  `metric_kid`.
  """
  x = _as_features(features1, "features1")
  y = _as_features(features2, "features2")
  if x.shape[1] != y.shape[1]:
    raise ValueError(f"features1 and features2 must have the same D, got {x.shape[1]} and "
                     f"{y.shape[1]}.")
  if not 2 <= subset_size <= min(len(x), len(y)):
    raise ValueError(f"subset_size must lie in [2, min(N1, N2) = {min(len(x), len(y))}], got "
                     f"{subset_size}.")
  if num_subsets < 1:
    raise ValueError(f"num_subsets must be >= 1, got {num_subsets}.")
  gamma = 1.0 / x.shape[1] if gamma is None else gamma
  rng = np.random.RandomState(seed)
  values = []
  for _ in range(num_subsets):
    xs = x[rng.choice(len(x), subset_size, replace=False)]
    ys = y[rng.choice(len(y), subset_size, replace=False)]
    kernel = lambda a, b: _polynomial_kernel(a, b, degree, gamma, coef0)
    values.append(_unbiased_mmd2(kernel(xs, xs), kernel(xs, ys), kernel(ys, ys)))
  return float(np.mean(values)), float(np.std(values))


def _pairwise_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Euclidean distances [n, m] in float64, by |x|^2 + |y|^2 - 2 x.y (clipped at 0)."""
  squared = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
  return np.sqrt(np.maximum(squared, 0.0))


def _kth_neighbour_radii(x: np.ndarray, k: int, chunk: int) -> np.ndarray:
  """[N] distance of each row to its k-th nearest other row (the row itself counts as the 0th)."""
  return np.concatenate([np.partition(_pairwise_distances(x[s:s + chunk], x), k, axis=1)[:, k]
                         for s in range(0, len(x), chunk)])


def _check_pair(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  real, fake = _as_features(real, "real"), _as_features(fake, "fake")
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"real and fake must have the same D, got {real.shape[1]} and "
                     f"{fake.shape[1]}.")
  if not 1 <= k < min(len(real), len(fake)):
    raise ValueError(f"k must lie in [1, min(N_real, N_fake) - 1 = "
                     f"{min(len(real), len(fake)) - 1}], got {k}.")
  return real, fake


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3,
                     chunk: int = 1024) -> tuple[float, float]:
  """Improved precision and recall: (precision, recall).

  Each set's manifold is the union of balls around its points reaching their k-th nearest
  neighbour. Precision: the fraction of fake points inside the real manifold (distance <= a
  real point's radius); recall: the fraction of real points inside the fake manifold.

  Args:
    real, fake: [N_real, D], [N_fake, D] features.
    k: the neighbourhood (3 in the paper and torch-fidelity).
    chunk: rows per block of the distance matrices (memory: chunk x N float64).

  Returns:
    (precision, recall) as Python floats.

  References: Kynkaanniemi et al. 2019, arXiv:1904.06991, Sec. 3 (Eq. 1-2); torch-fidelity
  `metric_prc`.
  """
  real, fake = _check_pair(real, fake, k)
  real_radii = _kth_neighbour_radii(real, k, chunk)
  fake_radii = _kth_neighbour_radii(fake, k, chunk)
  in_real = [np.any(_pairwise_distances(fake[s:s + chunk], real) <= real_radii, axis=1)
             for s in range(0, len(fake), chunk)]
  in_fake = [np.any(_pairwise_distances(real[s:s + chunk], fake) <= fake_radii, axis=1)
             for s in range(0, len(real), chunk)]
  return float(np.concatenate(in_real).mean()), float(np.concatenate(in_fake).mean())


def density_coverage(real: np.ndarray, fake: np.ndarray, k: int = 5,
                     chunk: int = 1024) -> tuple[float, float]:
  """Density and coverage: (density, coverage).

  With r_i the distance of real point i to its k-th nearest real neighbour: density is
  (1 / k) mean over fake points of the number of real balls B(real_i, r_i) containing them
  (strictly); coverage is the fraction of real points whose ball contains some fake point.

  Args:
    real, fake: [N_real, D], [N_fake, D] features.
    k: the neighbourhood (5 in the paper).
    chunk: rows per block of the distance matrices.

  Returns:
    (density, coverage) as Python floats.

  References: Naeem et al. 2020, arXiv:2002.09797, Sec. 4 (Eq. 4-5); the `prdc` package.
  """
  real, fake = _check_pair(real, fake, k)
  real_radii = _kth_neighbour_radii(real, k, chunk)
  counts = np.concatenate([np.sum(_pairwise_distances(fake[s:s + chunk], real) < real_radii,
                                  axis=1) for s in range(0, len(fake), chunk)])
  covered = np.concatenate([
      _pairwise_distances(real[s:s + chunk], fake).min(axis=1) < real_radii[s:s + chunk]
      for s in range(0, len(real), chunk)])
  return float(counts.mean() / k), float(covered.mean())


ALL_METRICS = ("fd", "is", "kid", "pr", "dc")


def all_metrics(fake: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray, *,
                fake_logits: Optional[np.ndarray] = None, ref: Optional[np.ndarray] = None,
                which: tuple[str, ...] = ALL_METRICS, kid_subsets: int = 100,
                kid_subset_size: int = 1000, pr_k: int = 3, dc_k: int = 5) -> dict[str, float]:
  """The metrics the field reports, from features, as one flat dict of floats.

  Args:
    fake: generated features [N, D]; fake_logits: their logits [N, K] (for IS).
    ref_mu, ref_sigma: reference statistics; ref: reference features [M, D] (KID, P/R, D/C
      need them and are skipped without them).
    which: a subset of ALL_METRICS: 'fd' (Frechet distance: FID on Inception features), 'is',
      'kid', 'pr' (precision/recall), 'dc' (density/coverage).
    kid_subsets, kid_subset_size: KID's subsets (the size is capped at min(N, M)).
    pr_k, dc_k: neighbourhood sizes.

  Returns:
    {'frechet_distance', 'inception_score_mean', 'inception_score_std', 'kid_mean', 'kid_std',
     'precision', 'recall', 'density', 'coverage'}, those computable from what was given.
  """
  _checks.check_keys("metrics", which, ALL_METRICS)
  out: dict[str, float] = {}
  if "fd" in which:
    mu, sigma = feature_statistics(fake)
    out["frechet_distance"] = frechet_distance(mu, sigma, ref_mu, ref_sigma)
  if "is" in which and fake_logits is not None:
    out["inception_score_mean"], out["inception_score_std"] = inception_score(
        fake_logits, splits=min(10, len(fake_logits)))
  if ref is not None:
    if "kid" in which:
      size = min(kid_subset_size, len(fake), len(ref))
      out["kid_mean"], out["kid_std"] = kernel_distance(fake, ref, num_subsets=kid_subsets,
                                                        subset_size=size)
    if "pr" in which:
      out["precision"], out["recall"] = precision_recall(ref, fake, k=pr_k)
    if "dc" in which:
      out["density"], out["coverage"] = density_coverage(ref, fake, k=dc_k)
  return out
