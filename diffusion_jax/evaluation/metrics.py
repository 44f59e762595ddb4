"""Sample-quality metrics computed from features, in float64 NumPy, as the published evaluators do.

Every function takes features that a network (the FID Inception net, the digits classifier)
already produced; none knows which network that was.

- `feature_statistics(features [N, D]) -> (mu [D], sigma [D, D])`: mean and unbiased covariance.
- `frechet_distance(mu1, sigma1, mu2, sigma2)`: ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)),
  with scipy's matrix square root and pytorch-fid's eps-offset fallback.

References: Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
Nash Equilibrium", arXiv:1706.08500, Sec. 3 (FID); Dowson & Landau 1982 (the Frechet distance of
Gaussians); pytorch-fid `fid_score.calculate_frechet_distance` (the numerical recipe).
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg

# pytorch-fid adds eps * I to both covariances when sqrtm(S1 S2) is not finite.
FID_EPS = 1e-6
# pytorch-fid tolerates imaginary parts of the square root's diagonal up to this (then drops them).
IMAG_ATOL = 1e-3


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
