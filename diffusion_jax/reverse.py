"""The reverse process p(x_{t-1} | x_t): its mean and variance from a model output, and one step.

Shapes: `xt` [B, ...]; `t` int32 [B] (or a scalar); `model_output` [B, ...] with the same
shape as `xt`, or with twice the channels (last axis) for the learned variances.

References:
  Ho et al. 2020, eqs. 1, 11 and algorithm 2.
  Nichol & Dhariwal 2021, sec. 3.1, eq. 15 (learned range).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax import _checks
from diffusion_jax import forward
from diffusion_jax import rng as rng_lib
from diffusion_jax.schedules import Schedule

VARIANCES = ("fixed_small", "fixed_large", "learned", "learned_range")
LEARNED_VARIANCES = ("learned", "learned_range")


class PMeanVariance(NamedTuple):
  """Moments of p(x_{t-1} | x_t); each field [B, ...] like x_t."""
  mean: jax.Array
  variance: jax.Array
  log_variance: jax.Array
  pred_x0: jax.Array


def check_variance(variance: str) -> None:
  """Raises a ValueError for a variance name outside `VARIANCES`."""
  _checks.check_choice("variance", variance, VARIANCES)


def resolve_variance(variance: str | None, loss_type: str | None = None) -> str:
  """The variance type in use: `variance` if given, else 'learned_range' when the loss is
  'hybrid' (which trains the variance) and 'fixed_small' otherwise.

  The one place that fills in an unset variance: the training loss, the trainer's sample grids,
  `experiments.sample` and `experiments.evaluate_bpd` all call it.
  """
  if variance is None:
    variance = "learned_range" if loss_type == "hybrid" else "fixed_small"
  check_variance(variance)
  return variance


def split_output(model_output: jax.Array, xt: jax.Array, variance: str):
  """Splits a model output into (prediction [B, ..., C], variance part or None).

  A learned-variance model outputs 2C channels: the prediction, then the variance values.
  """
  check_variance(variance)
  channels = xt.shape[-1]
  if variance in LEARNED_VARIANCES:
    if model_output.shape[:-1] != xt.shape[:-1] or model_output.shape[-1] != 2 * channels:
      raise ValueError(f"variance={variance!r} needs a model output of shape "
                       f"{xt.shape[:-1] + (2 * channels,)} (prediction and variance channels), got "
                       f"{model_output.shape}.")
    return model_output[..., :channels], model_output[..., channels:]
  if model_output.shape != xt.shape:
    raise ValueError(f"variance={variance!r} needs a model output shaped like x_t {xt.shape}, got "
                     f"{model_output.shape} (a learned-variance model wants variance="
                     f"'learned_range' or 'learned').")
  return model_output, None


def model_log_variance(schedule: Schedule, variance: str, variance_output, t: jax.Array,
                       xt: jax.Array) -> jax.Array:
  """log sigma_t^2 [B, ...] of the reverse step for each variance type.

  'fixed_small': the posterior variance beta~_t (clipped at t = 0); 'fixed_large': beta_t, with
  beta~_1 at t = 0 as in the improved-DDPM code; 'learned': the output is log sigma^2;
  'learned_range': log sigma^2 = frac log beta_t + (1 - frac) log beta~_t, frac = (v + 1) / 2.
  """
  check_variance(variance)
  if variance == "fixed_small":
    log_var = forward.extract(schedule.posterior_log_variance_clipped, t, xt.ndim)
  elif variance == "fixed_large":
    # posterior_log_variance_clipped[0] is log beta~_1 (log beta_0 when T = 1), computed in float64.
    log_betas = jnp.concatenate([schedule.posterior_log_variance_clipped[:1],
                                 jnp.log(schedule.betas[1:])])
    log_var = forward.extract(log_betas, t, xt.ndim)
  elif variance == "learned":
    log_var = variance_output
  else:
    min_log = forward.extract(schedule.posterior_log_variance_clipped, t, xt.ndim)
    max_log = forward.extract(jnp.log(schedule.betas), t, xt.ndim)
    frac = (variance_output + 1.0) / 2.0
    log_var = frac * max_log + (1.0 - frac) * min_log
  return jnp.broadcast_to(log_var, xt.shape)


def p_mean_variance(schedule: Schedule, model_output: jax.Array, xt: jax.Array, t: jax.Array, *,
                    prediction: str = "eps", variance: str = "fixed_small",
                    clip_denoised: bool = True) -> PMeanVariance:
  """Mean and variance of p(x_{t-1} | x_t) from a model output.

  Args:
    schedule: the diffusion schedule.
    model_output: [B, ..., C] (or [B, ..., 2C] for learned variances).
    xt: [B, ..., C].
    t: int32 [B] in [0, T): ValueError outside when concrete; under jit an out-of-range t
      gives NaN (see `diffusion_jax.forward`).
    prediction: what the model predicts: 'eps', 'x0' or 'v'.
    variance: 'fixed_small', 'fixed_large', 'learned' or 'learned_range'.
    clip_denoised: clip the predicted x0 to [-1, 1] before forming the mean.

  Returns:
    `PMeanVariance(mean, variance, log_variance, pred_x0)`, each [B, ..., C].

  References: Ho et al. 2020, eqs. 6-7 and 11; Nichol & Dhariwal 2021, eq. 15.
  """
  forward.check_prediction(prediction)
  model_output = jnp.asarray(model_output, jnp.float32)
  pred, variance_output = split_output(model_output, xt, variance)
  log_var = model_log_variance(schedule, variance, variance_output, t, xt)
  pred_x0 = forward.predict_x0(schedule, pred, xt, t, prediction)
  if clip_denoised:
    pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
  mean, _, _ = forward.q_posterior_mean_variance(schedule, pred_x0, xt, t)
  return PMeanVariance(mean=mean, variance=jnp.exp(log_var), log_variance=log_var, pred_x0=pred_x0)


def p_sample(schedule: Schedule, model_output: jax.Array, xt: jax.Array, t: jax.Array,
             rng: jax.Array | None, *, prediction: str = "eps", variance: str = "fixed_small",
             clip_denoised: bool = True, noise: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array]:
  """One ancestral step x_t -> x_{t-1} = mean + sigma_t * z (no noise where t = 0).

  Args:
    schedule, model_output, xt, t, prediction, variance, clip_denoised: as `p_mean_variance`.
    rng: a key or per-example keys [B] (see `diffusion_jax.rng`); example b's noise is drawn
      from its own key, so the result does not depend on how the batch is split.
    noise: optional [B, ...] standard normal z to use instead of drawing from `rng`.

  Returns:
    (x_{t-1} [B, ...], pred_x0 [B, ...]).

  References: Ho et al. 2020, algorithm 2.
  """
  if noise is None:
    if rng is None:
      raise ValueError("p_sample needs rng (a key or per-example keys) or noise.")
    noise = rng_lib.normal(rng_lib.example_keys(rng, xt.shape[0]), xt.shape[1:], xt.dtype)
  if noise.shape != xt.shape:
    raise ValueError(f"noise and xt must have the same shape, got {noise.shape} and {xt.shape}.")
  moments = p_mean_variance(schedule, model_output, xt, t, prediction=prediction,
                            variance=variance, clip_denoised=clip_denoised)
  nonzero = forward.extract((jnp.arange(schedule.num_timesteps) > 0).astype(xt.dtype), t, xt.ndim)
  x_prev = moments.mean + nonzero * jnp.exp(0.5 * moments.log_variance) * noise
  return x_prev, moments.pred_x0
