"""DDIM: the non-Markovian sampler with stochasticity eta (0 = deterministic, 1 = ancestral).

Run over a respaced schedule (`respacing.respace`) for fewer steps: entry i of the schedule goes
from alpha_bar_i to alpha_bar_{i-1} (1 after entry 0). `eta` is an ordinary value, traced when the
caller passes it to a jitted sampler.

References: Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models", eqs. 12 and 16.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from diffusion_jax import forward
from diffusion_jax.samplers import base
from diffusion_jax.samplers import driver
from diffusion_jax.samplers import inpainting
from diffusion_jax.samplers import thresholding as thresholding_lib
from diffusion_jax.schedules import Schedule


def ddim_step(schedule: Schedule, model_output: jax.Array, x: jax.Array, t: jax.Array,
              eta: float | jax.Array, noise: jax.Array, *, prediction: str = "eps",
              variance: str = "fixed_small", thresholding: str = "none",
              percentile: float = thresholding_lib.DEFAULT_PERCENTILE
              ) -> tuple[jax.Array, jax.Array]:
  """One DDIM update x_t -> x_{t-1}.

  x_{t-1} = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z, s = eta sqrt((1 - a')/(1 - a))
  sqrt(1 - a/a'), with a = alpha_bar_t, a' = alpha_bar_{t-1} (1 at t = 0). With thresholding,
  eps is re-derived from the thresholded x0 as in the improved-DDPM code (diffusers'
  `use_clipped_model_output=True`); without, it is the model's own eps.

  Args:
    schedule: the (respaced) schedule.
    model_output: [B, ..., C] (or [B, ..., 2C]; learned-variance channels are ignored).
    x: x_t [B, ..., C].
    t: int32 [B] schedule index.
    eta: stochasticity, scalar (may be traced).
    noise: [B, ..., C] standard normal z.
    prediction: 'eps', 'x0' or 'v'.
    variance: the model's variance type (only used to split off learned channels).
    thresholding, percentile: the x0 policy (`thresholding.threshold_x0`; 'none' is the
      published algorithm).

  Returns:
    (x_{t-1} [B, ..., C], x0 [B, ..., C]).

  References: Song et al. 2021, eqs. 12 and 16.
  """
  pred = base.prediction_part(jnp.asarray(model_output, jnp.float32), x, variance)
  x0 = forward.predict_x0(schedule, pred, x, t, prediction)
  a = forward.extract(schedule.alphas_cumprod, t, x.ndim)
  a_prev = forward.extract(schedule.alphas_cumprod_prev, t, x.ndim)
  if thresholding == "none":
    eps = forward.predict_eps(schedule, pred, x, t, prediction)
  else:
    x0 = thresholding_lib.threshold_x0(x0, thresholding, percentile)
    eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
  sigma = eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev))
  direction = jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma ** 2, 0.0)) * eps
  return jnp.sqrt(a_prev) * x0 + direction + sigma * noise, x0


def sample(model_fn: base.ModelFn, schedule: Schedule, shape: Sequence[int], rng: jax.Array, *,
           eta: float | jax.Array = 0.0, timesteps: jax.Array | None = None,
           prediction: str = "eps", variance: str = "fixed_small",
           thresholding: str = thresholding_lib.DEFAULT,
           dynamic_percentile: float = thresholding_lib.DEFAULT_PERCENTILE,
           clip_denoised: bool | None = None, x_init: jax.Array | None = None,
           inpaint: inpainting.Inpaint | None = None, trajectory_stride: int = 0):
  """DDIM sampling over every entry of `schedule` (N = schedule length) through the driver.

  Args:
    model_fn: `(x_t [B, ...], t [B]) -> output`.
    schedule: the (respaced) schedule, N entries.
    shape: (B, ...).
    rng: a key or per-example keys [B] (streams as in `samplers.base`).
    eta: 0 (deterministic) .. 1 (ancestral with the posterior variance); may be traced.
    timesteps: int [N] network timestep per entry (respacing; may be traced) or None.
    prediction, variance: as `ddim_step`.
    thresholding, dynamic_percentile, clip_denoised: the x0 policy, as `ancestral.sample`.
    x_init: optional x at the first step [B, ...] (default: noise from fold_in(key_b, N)).
    inpaint, trajectory_stride: see `driver.run_reverse`.

  Returns:
    Samples [B, ...] float32, or (samples, trajectory) when `trajectory_stride` > 0.

  References: Song et al. 2021, algorithm in sec. 4.2.
  """
  thresholding = base.resolve_thresholding(thresholding, clip_denoised)
  num_steps = schedule.num_timesteps
  shape, keys, x = base.start(rng, shape, num_steps, x_init, prediction=prediction,
                              variance=variance, timesteps=timesteps, thresholding=thresholding,
                              percentile=dynamic_percentile)

  def step(x, carry, i, noise):
    t = jnp.full((shape[0],), num_steps - 1 - i, jnp.int32)
    output = base.call_model(model_fn, x, t, timesteps)
    x, _ = ddim_step(schedule, output, x, t, eta, noise, prediction=prediction,
                     variance=variance, thresholding=thresholding, percentile=dynamic_percentile)
    return x, carry

  return driver.run_reverse(step, x, keys, driver.vp_levels(schedule), inpaint=inpaint,
                            trajectory_stride=trajectory_stride)
