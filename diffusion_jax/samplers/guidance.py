"""Conditioning: classifier-free guidance as a `model_fn` wrapper, inpainting by replacement.

Guidance turns a class-conditional network `(x, t, y) -> output` into the unconditional-looking
`model_fn(x, t)` every sampler takes; the scale is an ordinary (traceable) value, so a jitted
sampler that receives it as an argument does not recompile when it changes.

References:
  Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", eq. 6.
  Peebles & Xie 2023 (DiT), official `forward_with_cfg` (guidance on the first 3 channels).
  Song et al. 2021, "Score-Based Generative Modeling through SDEs", appendix I.2 (imputation by
  replacement); Lugmayr et al. 2022 (RePaint) for the same known-region step without resampling.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax import forward
from diffusion_jax.samplers import base
from diffusion_jax.schedules import Schedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
CondModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def classifier_free_guidance(model_fn: CondModelFn, labels: jax.Array, scale: float | jax.Array,
                             *, null_label: int, guide_channels: int | None = None) -> ModelFn:
  """`model_fn(x, t)` = uncond + scale * (cond - uncond), both halves from one batched call.

  Args:
    model_fn: `(x [2B, ...], t [2B], y int32 [2B]) -> output [2B, ..., C_out]`.
    labels: int32 [B], the classes to sample.
    scale: the guidance scale w (1 = conditional, 0 = unconditional); may be traced.
    null_label: the label of the null (unconditional) class, e.g. `num_classes`.
    guide_channels: guide only the first k output channels (the DiT quirk, k = 3 on 4-channel
      latents); None guides every channel of x (the prediction), never the learned-variance
      channels. Unguided channels come from the conditional half.

  Returns:
    `(x [B, ...], t [B]) -> output [B, ..., C_out]`.

  References: Ho & Salimans 2022, eq. 6; DiT `forward_with_cfg`.
  """
  if guide_channels is not None and guide_channels < 1:
    raise ValueError(f"guide_channels must be None or >= 1, got {guide_channels}.")
  labels = jnp.asarray(labels, jnp.int32)

  def guided(x: jax.Array, t: jax.Array) -> jax.Array:
    batch = x.shape[0]
    if labels.shape != (batch,):
      raise ValueError(f"labels must have shape ({batch},), got {labels.shape}.")
    t = jnp.broadcast_to(jnp.asarray(t), (batch,))
    y = jnp.concatenate([labels, jnp.full_like(labels, null_label)])
    out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), y)
    cond, uncond = out[:batch], out[batch:]
    k = x.shape[-1] if guide_channels is None else guide_channels
    if k > out.shape[-1]:
      raise ValueError(f"guide_channels={k} exceeds the model's {out.shape[-1]} output channels.")
    mixed = uncond[..., :k] + scale * (cond[..., :k] - uncond[..., :k])
    return jnp.concatenate([mixed.astype(out.dtype), cond[..., k:]], axis=-1)

  return guided


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
    scale, sigma: how the state relates to clean data, x = scale * x0 + sigma * eps
      (sqrt(abar), sqrt(1 - abar) for VP states); scalars or broadcastable to x.
    noise: [B, ...] standard normal.

  Returns:
    [B, ...].

  References: Song et al. 2021, appendix I.2.
  """
  if inpaint is None:
    return x
  noised = scale * inpaint.known + sigma * noise
  return jnp.where(jnp.asarray(inpaint.mask) > 0.5, noised.astype(x.dtype), x)


def renoise_known(inpaint: Inpaint | None, schedule: Schedule, x: jax.Array, t: jax.Array,
                  keys: jax.Array) -> jax.Array:
  """`replace_known` for a VP state x_t [B, ...] at int32 timesteps t [B] of `schedule`, with the
  noise stream of `base.inpaint_noise` (so every VP sampler re-noises known pixels alike)."""
  if inpaint is None:
    return x
  return replace_known(
      inpaint, x, forward.extract(schedule.sqrt_alphas_cumprod, t, x.ndim),
      forward.extract(schedule.sqrt_one_minus_alphas_cumprod, t, x.ndim),
      base.inpaint_noise(keys, t[0], schedule.num_timesteps, x.shape))
