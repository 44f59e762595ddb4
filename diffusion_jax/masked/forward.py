"""The forward masking process q(z_t | x) and the SUBS parameterisation of the denoiser.

Tokens are int32 in [0, mask_id]; `mask_id` is the absorbing mask token (by convention the
last id, equal to the data vocabulary size V, so a network's output has V + 1 logits).

References: Austin et al. 2021, "Structured Denoising Diffusion Models in Discrete State-Spaces"
(D3PM, absorbing state); Sahoo et al. 2024 (MDLM), sec. 3.2 (SUBS: zero masking probabilities,
carry-over unmasking); Shi et al. 2024 (MD4), eq. 1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax import rng as rng_lib
from diffusion_jax.masked.schedule import MaskSchedule


def _per_example(values: jax.Array, like: jax.Array) -> jax.Array:
  """[B] -> [B, 1, ..., 1] broadcastable against `like` [B, ...]."""
  return jnp.reshape(values, values.shape + (1,) * (like.ndim - values.ndim))


def q_sample(schedule: MaskSchedule, x: jax.Array, t: jax.Array, rng: jax.Array, *,
             mask_id: int) -> jax.Array:
  """z_t ~ q(z_t | x): each token independently replaced by `mask_id` with prob 1 - alpha(t).

  Args:
    schedule: the mask schedule.
    x: [B, L] int tokens (any trailing shape [B, ...] works).
    t: [B] times in [0, 1].
    rng: a key, or per-example keys [B] (example b's mask depends only on its own key).
    mask_id: the mask token.

  Returns:
    z_t: [B, L] int32.
  """
  keys = rng_lib.example_keys(rng, x.shape[0])
  u = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:]))(keys)
  masked = u < _per_example(schedule.mask_prob(t), x)
  return jnp.where(masked, mask_id, x).astype(jnp.int32)


def subs_log_probs(logits: jax.Array, z_t: jax.Array, *, mask_id: int) -> jax.Array:
  """SUBS: log x_theta(z_t) with the mask never predicted and visible tokens carried over.

  Args:
    logits: [B, L, K] network output over K = mask_id + 1 tokens (the mask's logit is ignored),
      or K = mask_id (no mask column).
    z_t: [B, L] int tokens, `mask_id` where masked.
    mask_id: the mask token.

  Returns:
    log-probabilities [B, L, K] float32: at a masked position log_softmax of the logits with the
    mask's logit set to -inf; at a visible position 0 for z_t's token and -inf elsewhere.
  """
  num_classes = logits.shape[-1]
  if num_classes not in (mask_id, mask_id + 1):
    raise ValueError(f"logits have {num_classes} classes; with mask_id={mask_id} allowed: "
                     f"{mask_id} (data tokens only) or {mask_id + 1} (with the mask token).")
  logits = jnp.asarray(logits, jnp.float32)
  ids = jnp.arange(num_classes)
  logits = jnp.where(ids == mask_id, -jnp.inf, logits)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  carried = jnp.where(ids == z_t[..., None], 0.0, -jnp.inf)
  return jnp.where((z_t == mask_id)[..., None], log_probs, carried)
