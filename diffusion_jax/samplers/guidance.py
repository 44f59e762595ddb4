"""Classifier-free guidance as a `model_fn` wrapper (inpainting lives in `samplers.inpainting`).

Guidance turns a class-conditional network `(x, t, y) -> output` into the unconditional-looking
`model_fn(x, t)` every sampler takes, so every sampler of the driver is guided the same way; the
scale is an ordinary (traceable) value, so a jitted sampler that receives it as an argument does
not recompile when it changes.

References:
  Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", eq. 6.
  Peebles & Xie 2023 (DiT), official `forward_with_cfg` (guidance on the first 3 channels).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


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
