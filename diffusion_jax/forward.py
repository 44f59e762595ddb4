"""The forward process q and the conversions between the eps, x0 and v parameterizations.

Shapes: data `x0`, `xt`, `noise` are [B, ...] (e.g. [B, H, W, C]); timesteps `t` are int32 [B]
(or a scalar, shared by the batch) indexing the schedule's [T] arrays.

Timesteps out of range: every function here (and in `reverse`, `losses`) reads the schedule
through `extract`. A concrete `t` (a Python int, NumPy or a committed JAX array) outside
[0, T) or of a non-integer dtype raises a ValueError. Under `jit`/`vmap`/`grad` the value of `t`
is unknown when the function runs, so nothing can be raised: an out-of-range traced `t`
(negative ones included, which NumPy indexing would wrap to T - 1) gives NaN, so the error shows
in the output instead of silently using another timestep.

References:
  Ho et al. 2020, eqs. 4, 6, 7, 11.
  Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models", sec. 4 (v).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import _checks
from diffusion_jax.schedules import Schedule

PREDICTIONS = ("eps", "x0", "v")


def check_prediction(prediction: str) -> None:
  """Raises a ValueError for a prediction name outside `PREDICTIONS`."""
  _checks.check_choice("prediction", prediction, PREDICTIONS)


def check_timesteps(t, num_timesteps: int) -> None:
  """Raises a ValueError when a concrete `t` is not an integer in [0, num_timesteps); does
  nothing for a traced `t` (see the module docstring for what happens then)."""
  if isinstance(t, jax.core.Tracer):
    return
  arr = np.asarray(t)
  if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
    raise ValueError(f"t must hold integer timesteps in [0, {num_timesteps - 1}], got dtype "
                     f"{arr.dtype}.")
  if arr.size and (arr.min() < 0 or arr.max() >= num_timesteps):
    raise ValueError(f"t must lie in [0, {num_timesteps - 1}] (the schedule has T = "
                     f"{num_timesteps} steps), got values in [{arr.min()}, {arr.max()}].")


def extract(values: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """values[t] reshaped to broadcast against data of rank `ndim`.

  Args:
    values: [T] per-timestep constants (floating).
    t: int [B] or scalar, in [0, T): checked when concrete (ValueError); a traced `t` out of
      range gives NaN.
    ndim: rank of the data, e.g. 4 for [B, H, W, C].

  Returns:
    [B, 1, ..., 1] (rank `ndim`) or a scalar.
  """
  num = values.shape[0]
  check_timesteps(t, num)
  t = jnp.asarray(t)
  inside = (t >= 0) & (t < num)
  picked = jnp.where(inside, jnp.take(values, jnp.clip(t, 0, num - 1), axis=0), jnp.nan)
  if picked.ndim == 0:
    return picked
  return picked.reshape(picked.shape + (1,) * (ndim - picked.ndim))


def _check_same_shape(a_name: str, a: jax.Array, b_name: str, b: jax.Array) -> None:
  if jnp.shape(a) != jnp.shape(b):
    raise ValueError(f"{a_name} and {b_name} must have the same shape, got {jnp.shape(a)} and "
                     f"{jnp.shape(b)}.")


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """Draws x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I) with the given noise.

  Args:
    schedule: the diffusion schedule.
    x0: [B, ...] clean data.
    t: int [B] timesteps in [0, T): ValueError outside when concrete, NaN under jit (see the
      module docstring).
    noise: [B, ...] standard normal, same shape as x0.

  Returns:
    x_t [B, ...].

  References: Ho et al. 2020, eq. 4.
  """
  _check_same_shape("x0", x0, "noise", noise)
  return (extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
          + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def q_mean_variance(schedule: Schedule, x0: jax.Array, t: jax.Array):
  """Mean, variance and log variance of q(x_t | x_0), each broadcast to x0's shape [B, ...].

  References: Ho et al. 2020, eq. 4.
  """
  mean = extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
  # 1 - abar from the float64-computed sqrt, not by subtraction in float32 (which loses ~4 digits
  # at small t, where abar is close to 1).
  variance = jnp.broadcast_to(
      extract(jnp.square(schedule.sqrt_one_minus_alphas_cumprod), t, x0.ndim), x0.shape)
  log_variance = jnp.broadcast_to(
      extract(schedule.log_one_minus_alphas_cumprod, t, x0.ndim), x0.shape)
  return mean, variance, log_variance


def q_posterior_mean_variance(schedule: Schedule, x0: jax.Array, xt: jax.Array, t: jax.Array):
  """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0), each [B, ...].

  At t = 0 the variance is 0 (x_{-1} is x_0 itself); the log variance there is clipped to the
  t = 1 value as in the DDPM code.

  References: Ho et al. 2020, eqs. 6-7.
  """
  _check_same_shape("x0", x0, "xt", xt)
  mean = (extract(schedule.posterior_mean_coef1, t, xt.ndim) * x0
          + extract(schedule.posterior_mean_coef2, t, xt.ndim) * xt)
  variance = jnp.broadcast_to(extract(schedule.posterior_variance, t, xt.ndim), xt.shape)
  log_variance = jnp.broadcast_to(
      extract(schedule.posterior_log_variance_clipped, t, xt.ndim), xt.shape)
  return mean, variance, log_variance


# --- eps / x0 / v conversions (all given x_t and t) -----------------------------------------------

def x0_from_eps(schedule: Schedule, xt: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  """x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar).  References: Ho et al. 2020, eq. 4."""
  return (extract(schedule.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt
          - extract(schedule.sqrt_recipm1_alphas_cumprod, t, xt.ndim) * eps)


def eps_from_x0(schedule: Schedule, xt: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
  """eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar).  References: Ho et al. 2020, eq. 4."""
  return ((extract(schedule.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt - x0)
          / extract(schedule.sqrt_recipm1_alphas_cumprod, t, xt.ndim))


def x0_from_v(schedule: Schedule, xt: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
  """x0 = sqrt(abar) x_t - sqrt(1 - abar) v.  References: Salimans & Ho 2022, sec. 4."""
  return (extract(schedule.sqrt_alphas_cumprod, t, xt.ndim) * xt
          - extract(schedule.sqrt_one_minus_alphas_cumprod, t, xt.ndim) * v)


def eps_from_v(schedule: Schedule, xt: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
  """eps = sqrt(1 - abar) x_t + sqrt(abar) v.  References: Salimans & Ho 2022, sec. 4."""
  return (extract(schedule.sqrt_one_minus_alphas_cumprod, t, xt.ndim) * xt
          + extract(schedule.sqrt_alphas_cumprod, t, xt.ndim) * v)


def v_from_eps_x0(schedule: Schedule, t: jax.Array, eps: jax.Array, x0: jax.Array) -> jax.Array:
  """v = sqrt(abar) eps - sqrt(1 - abar) x0 (the v-prediction target).

  References: Salimans & Ho 2022, sec. 4.
  """
  _check_same_shape("eps", eps, "x0", x0)
  return (extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * eps
          - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)


def predict_x0(schedule: Schedule, output: jax.Array, xt: jax.Array, t: jax.Array,
               prediction: str) -> jax.Array:
  """x0 implied by a model `output` [B, ...] that predicts `prediction` ('eps', 'x0' or 'v')."""
  check_prediction(prediction)
  if prediction == "eps":
    return x0_from_eps(schedule, xt, t, output)
  if prediction == "v":
    return x0_from_v(schedule, xt, t, output)
  return output


def predict_eps(schedule: Schedule, output: jax.Array, xt: jax.Array, t: jax.Array,
                prediction: str) -> jax.Array:
  """eps implied by a model `output` [B, ...] that predicts `prediction` ('eps', 'x0' or 'v')."""
  check_prediction(prediction)
  if prediction == "x0":
    return eps_from_x0(schedule, xt, t, output)
  if prediction == "v":
    return eps_from_v(schedule, xt, t, output)
  return output


def prediction_target(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array,
                      prediction: str) -> jax.Array:
  """The regression target [B, ...] for a model predicting `prediction` at (x0, t, noise)."""
  check_prediction(prediction)
  if prediction == "eps":
    return noise
  if prediction == "v":
    return v_from_eps_x0(schedule, t, noise, x0)
  return x0
