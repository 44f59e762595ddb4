"""Inpainting by replacement: known pixels, noised to the level of the sampler's state, are put in
place after every step (and the clean ones at the end), for every sampler through the driver.

A state at level (scale, sigma) is x = scale * x0 + sigma * eps: (sqrt(abar), sqrt(1 - abar)) for
the VP samplers, (1, sigma) for the sigma-space ODE samplers.

References: Song et al. 2021, "Score-Based Generative Modeling through SDEs", appendix I.2
(imputation by replacement); Lugmayr et al. 2022 (RePaint), the known-region step without
resampling.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Inpaint(NamedTuple):
  """Known pixels for inpainting: `mask` [B, ...] (1 = known, 0 = to generate, broadcastable to
  the data) and `known` [B, ...] clean values, used where mask is 1."""
  mask: jax.Array
  known: jax.Array


def replace_known(inpaint: Inpaint | None, x: jax.Array, scale: jax.Array, sigma: jax.Array,
                  noise: jax.Array) -> jax.Array:
  """Puts `scale * known + sigma * noise` (the known pixels noised to x's level) where mask is 1.

  Args:
    inpaint: the known pixels, or None (then x is returned as it is).
    x: [B, ...] the sampler's current state.
    scale, sigma: how the state relates to clean data, x = scale * x0 + sigma * eps; scalars
      or broadcastable to x.
    noise: [B, ...] standard normal.

  Returns:
    [B, ...].

  References: Song et al. 2021, appendix I.2.
  """
  if inpaint is None:
    return x
  noised = scale * inpaint.known + sigma * noise
  return jnp.where(jnp.asarray(inpaint.mask) > 0.5, noised.astype(x.dtype), x)
