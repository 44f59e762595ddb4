"""Reference statistics: the real-data side of FID, read and written in the published layouts.

- pytorch-fid / clean-fid `.npz`: `mu` [D] and `sigma` [D, D] (float64).
- ADM (guided-diffusion `evaluations/`) reference batches: `arr_0` (uint8 images [N, H, W, 3])
  with precomputed `mu`, `sigma` (pool features) and `mu_s`, `sigma_s` (spatial features).

`Reference(mu, sigma, features=None, images=None)` carries what a file or a dataset gave:
statistics always, features when the real images were run through the feature net here (KID and
precision/recall need them), images when the file held them (ADM) and features are still to
be computed.

References: pytorch-fid `fid_score.py` (`save_fid_stats`, `.npz` with mu/sigma);
Dhariwal & Nichol 2021, arXiv:2105.05233, guided-diffusion `evaluations/evaluator.py`
(reference batches).
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import numpy as np

from diffusion_jax.evaluation import metrics


class Reference(NamedTuple):
  """mu float64 [D], sigma float64 [D, D]; features [N, D] and images uint8 [N, H, W, C] if known."""
  mu: np.ndarray
  sigma: np.ndarray
  features: Optional[np.ndarray] = None
  images: Optional[np.ndarray] = None


def from_features(features: np.ndarray) -> Reference:
  """A Reference (statistics and the features themselves) from real features [N, D]."""
  mu, sigma = metrics.feature_statistics(features)
  return Reference(mu, sigma, np.asarray(features))


def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
  """Writes `mu`, `sigma` to an .npz in pytorch-fid's layout (readable by pytorch-fid itself)."""
  mu = np.asarray(mu, np.float64)
  sigma = np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
    raise ValueError(f"mu must be [D] and sigma [D, D], got {mu.shape} and {sigma.shape}.")
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp.npz"
  np.savez(tmp, mu=mu, sigma=sigma)
  os.replace(tmp, path)


def load_reference(path: str) -> Reference:
  """Reads reference statistics: pytorch-fid/clean-fid (`mu`, `sigma`) or an ADM reference batch.

  An ADM batch gives its stored `mu`/`sigma` (computed by ADM's TF Inception) and its `arr_0`
  images; a file with only `arr_0` gives the images with NaN statistics, to be computed by
  the caller (`Reference.images`). Anything else raises a ValueError naming the keys found.
  """
  if not os.path.exists(path):
    raise ValueError(f"reference statistics file {path!r} does not exist.")
  with np.load(path) as data:
    keys = set(data.files)
    images = data["arr_0"] if "arr_0" in keys else None
    if {"mu", "sigma"} <= keys:
      mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    elif images is not None:
      mu, sigma = np.full((0,), np.nan), np.full((0, 0), np.nan)
    else:
      raise ValueError(f"{path!r} holds {sorted(keys)}; expected 'mu' and 'sigma' (pytorch-fid / "
                       "clean-fid layout) or 'arr_0' images (ADM reference batch).")
  if images is not None and (images.dtype != np.uint8 or images.ndim != 4):
    raise ValueError(f"{path!r}: arr_0 must be uint8 [N, H, W, C], got {images.dtype} "
                     f"{images.shape}.")
  if mu.size and (mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2):
    raise ValueError(f"{path!r}: mu must be [D] and sigma [D, D], got {mu.shape}, {sigma.shape}.")
  return Reference(mu, sigma, None, images)
