"""What a sampler does to its x0 (data) prediction: nothing, clip to [-1, 1], or Imagen's dynamic
thresholding.

Every sampler takes `thresholding=` ('clip' by default, for pixel data in [-1, 1]; 'none' for
latent models or data on another scale) and applies it where its authors do: to the x0 that
forms the DDPM posterior mean, to DDIM's x0 (re-deriving eps from it), to DPM-Solver++'s data
prediction, and to the denoiser D(x; sigma) of the sigma-space ODE samplers.

References:
  Ho et al. 2020 (official code: `clip_denoised` in `p_mean_variance`).
  Saharia et al. 2022, "Imagen", sec. 2.3 (dynamic thresholding).
  Lu et al. 2022, "DPM-Solver++", sec. 3.3 and appendix (thresholding the data prediction of
  pixel-space models; ratio 0.995, max value 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax import _checks

THRESHOLDINGS = ("clip", "dynamic", "none")
DEFAULT = "clip"
DEFAULT_PERCENTILE = 0.995


def check_thresholding(thresholding: str, percentile: float = DEFAULT_PERCENTILE) -> None:
  """Raises a ValueError for an unknown mode or a percentile outside (0, 1]."""
  _checks.check_choice("thresholding", thresholding, THRESHOLDINGS)
  if not 0.0 < percentile <= 1.0:
    raise ValueError(f"dynamic_percentile must be in (0, 1], got {percentile}.")


def threshold_x0(x0: jax.Array, thresholding: str = DEFAULT,
                 percentile: float = DEFAULT_PERCENTILE) -> jax.Array:
  """x0 [B, ...] after the thresholding policy.

  'clip': clip to [-1, 1]. 'dynamic': per example, s = max(1, the `percentile` quantile of
  |x0|), then x0 -> clip(x0, -s, s) / s (pixels saturated at +-s are pushed inwards rather than
  flattened). 'none': unchanged.

  References: Saharia et al. 2022, sec. 2.3; Lu et al. 2022 (DPM-Solver++), appendix.
  """
  check_thresholding(thresholding, percentile)
  if thresholding == "none":
    return x0
  if thresholding == "clip":
    return jnp.clip(x0, -1.0, 1.0)
  flat = jnp.abs(x0).reshape(x0.shape[0], -1)
  s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), 1.0)
  s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
  return jnp.clip(x0, -s, s) / s
