"""The negative ELBO of masked diffusion as a weighted cross-entropy on the masked tokens.

Continuous time (MDLM eq. 10, MD4 eq. 5), in nats per sequence:

  -log p(x) <= int_0^1 -alpha'(t) / (1 - alpha(t)) E_{z_t ~ q(.|x)} sum_{l: z_t^l = mask}
               -log x_theta(z_t, t)[l, x^l] dt,

estimated with one time per example. With T steps on the grid t_i = i / T the bound is a sum of
T KL terms; each is the same masked cross-entropy at t_i with weight
(alpha(t_{i-1}) - alpha(t_i)) / (1 - alpha(t_i)) (the probability that a masked token is revealed
in that step), so a uniform step i gives the one-sample estimate with weight T times that. As
T grows the weight tends to the continuous one. Both bounds have no reconstruction or prior term:
alpha(0) = 1 and alpha(1) = 0 exactly for every schedule here.

`model_fn(z_t [B, L] int32, t [B] float32) -> logits [B, L, K]` is the network (K = mask_id + 1
or mask_id); the SUBS parameterisation is applied here, not in the network.

References: Sahoo et al. 2024 (MDLM), eq. 8-10; Shi et al. 2024 (MD4), eq. 4-6 and app. E;
Kingma et al. 2021 (VDM), appendix on low-discrepancy (antithetic) time sampling.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax import rng as rng_lib
from diffusion_jax.masked import forward
from diffusion_jax.masked.schedule import MaskSchedule
from diffusion_jax.vdm import loss as vdm_loss

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def antithetic_times(rng: jax.Array, batch_size: int, *, t_min: float = 0.0) -> jax.Array:
  """Times [B] in (t_min, 1], marginally uniform, evenly spread over the batch.

  t = 1 - (1 - t_min) u with u = (u0 + b / B) mod 1 (VDM's low-discrepancy sampler): t never
  equals 0, where the ELBO weight is infinite. t_min > 0 (MDLM uses 1e-3 for training) lowers
  the variance but then the estimate leaves out the interval [0, t_min] (no longer a bound).
  """
  if not 0.0 <= t_min < 1.0:
    raise ValueError(f"t_min must be in [0, 1), got {t_min}.")
  u = vdm_loss.antithetic_times(rng, batch_size)
  return 1.0 - (1.0 - t_min) * u


def _check_num_steps(num_steps: int | None) -> None:
  if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int)
                                or num_steps < 1):
    raise ValueError(f"num_steps must be a positive integer or None, got {num_steps!r}.")


def _step_weight(schedule: MaskSchedule, step: jax.Array, num_steps: int) -> jax.Array:
  """T (alpha(t_{i-1}) - alpha(t_i)) / (1 - alpha(t_i)) for steps i [B] in 1..T."""
  m_t = schedule.mask_prob(step / num_steps)
  m_s = schedule.mask_prob((step - 1) / num_steps)
  return num_steps * (m_t - m_s) / m_t


def times_and_weights(schedule: MaskSchedule, t: jax.Array, *,
                      num_steps: int | None = None) -> tuple[jax.Array, jax.Array]:
  """(times [B], ELBO weights [B]) for times t [B] in (0, 1].

  num_steps: None for continuous time (weight -alpha'(t) / (1 - alpha(t)), t unchanged); T for
    the T-step bound: t moves up to the grid, t_i = ceil(t T) / T, and the weight is
    T (alpha(t_{i-1}) - alpha(t_i)) / (1 - alpha(t_i)).
  """
  _check_num_steps(num_steps)
  t = jnp.asarray(t, jnp.float32)
  if num_steps is None:
    return t, schedule.elbo_weight(t)
  step = jnp.clip(jnp.ceil(t * num_steps), 1, num_steps)
  return step / num_steps, _step_weight(schedule, step, num_steps)


def masked_cross_entropy(log_probs: jax.Array, x: jax.Array, z_t: jax.Array, *,
                         mask_id: int) -> jax.Array:
  """sum over masked positions of -log_probs[x] -> [B] (nats).

  log_probs: [B, L, K]; x: [B, L] clean tokens (< mask_id); z_t: [B, L] with mask_id where
  masked.
  """
  picked = jnp.take_along_axis(log_probs, x[..., None].astype(jnp.int32), axis=-1)[..., 0]
  masked = z_t == mask_id
  nll = jnp.where(masked, -picked, 0.0)
  return jnp.sum(nll.reshape(nll.shape[0], -1), axis=-1)


def loss_at(model_fn: ModelFn, schedule: MaskSchedule, x: jax.Array, z_t: jax.Array,
            t: jax.Array, *, mask_id: int, num_steps: int | None = None) -> jax.Array:
  """The ELBO integrand (weight x masked cross-entropy) [B] at given times and masked inputs.

  Args:
    x: [B, L] clean tokens; z_t: [B, L] a draw of q(z_t | x) at the times t; t: [B] in (0, 1],
      on the grid {1/T, ..., 1} when num_steps = T is set (see `times_and_weights`).
  """
  _check_num_steps(num_steps)
  t = jnp.asarray(t, jnp.float32)
  if num_steps is None:
    weight = schedule.elbo_weight(t)
  else:  # t is a grid point i / T: round, since float32 i / T * T may exceed i by an ulp
    weight = _step_weight(schedule, jnp.clip(jnp.round(t * num_steps), 1, num_steps), num_steps)
  log_probs = forward.subs_log_probs(model_fn(z_t, t), z_t, mask_id=mask_id)
  return weight * masked_cross_entropy(log_probs, x, z_t, mask_id=mask_id)


def nelbo(model_fn: ModelFn, schedule: MaskSchedule, x: jax.Array, rng: jax.Array, *,
          mask_id: int, num_steps: int | None = None, t: jax.Array | None = None,
          antithetic: bool = True, t_min: float = 0.0) -> jax.Array:
  """One-sample estimate [B] of the negative ELBO (nats per sequence) of clean tokens x [B, L].

  Args:
    model_fn: (z_t [B, L], t [B]) -> logits [B, L, K].
    x: [B, L] int tokens in [0, mask_id).
    rng: one key, or per-example keys [B] (then example b's time and mask depend only on its
      key, so the result does not depend on the batch split; antithetic must be False). Example
      b's key k_b (`rng.example_keys`) draws its mask from fold_in(k_b, 1) and, without
      antithetic times, its time from fold_in(k_b, 0); antithetic times use fold_in(rng, 0).
    num_steps: None (continuous time) or T (the T-step bound).
    t: [B] times to use instead of sampling them.
    antithetic: spread the batch's times evenly (else i.i.d. uniform).
    t_min: see `antithetic_times`.

  Divide by L ln 2 for bits per token.
  """
  batch = x.shape[0]
  keys = rng_lib.example_keys(rng, batch)
  if t is None:
    if antithetic:
      if not rng_lib.is_single_key(rng):
        raise ValueError("antithetic=True needs one key (antithetic times couple the batch); "
                         "with per-example keys [B] pass antithetic=False.")
      t = antithetic_times(jax.random.fold_in(rng, 0), batch, t_min=t_min)
    else:
      u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0), ()))(keys)
      t = 1.0 - (1.0 - t_min) * u
  t, _ = times_and_weights(schedule, t, num_steps=num_steps)
  z_t = forward.q_sample(schedule, x, t, rng_lib.fold_in_all(keys, 1), mask_id=mask_id)
  return loss_at(model_fn, schedule, x, z_t, t, mask_id=mask_id, num_steps=num_steps)
