"""The ancestral (DDPM) sampler: one step x_t -> x_{t-1} ~ p(x_{t-1} | x_t), run by the driver.

Over the training schedule (T steps) or a respaced one (`respacing.respace`, N steps); the
network is called at `timesteps[i]` of a respaced schedule.

References: Ho et al. 2020, algorithm 2; Nichol & Dhariwal 2021, sec. 3.1 (learned variances)
and sec. 4 (respacing).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from diffusion_jax import forward
from diffusion_jax import reverse
from diffusion_jax.samplers import base
from diffusion_jax.samplers import driver
from diffusion_jax.samplers import inpainting
from diffusion_jax.samplers import thresholding as thresholding_lib
from diffusion_jax.schedules import Schedule

ModelFn = base.ModelFn


def ancestral_step(schedule: Schedule, model_output: jax.Array, x: jax.Array, t: jax.Array,
                   noise: jax.Array, *, prediction: str = "eps", variance: str = "fixed_small",
                   thresholding: str = "none",
                   percentile: float = thresholding_lib.DEFAULT_PERCENTILE
                   ) -> tuple[jax.Array, jax.Array]:
  """One ancestral step: mean of q(x_{t-1} | x_t, x0) at the (thresholded) predicted x0, plus
  the model's standard deviation times `noise` (none at t = 0).

  Args:
    schedule: the (respaced) schedule.
    model_output: [B, ..., C] (or [B, ..., 2C] with a learned variance).
    x: x_t [B, ..., C].
    t: int32 [B] schedule index.
    noise: [B, ..., C] standard normal.
    prediction, variance: the model's parameterisation.
    thresholding, percentile: the x0 policy (`thresholding.threshold_x0`).

  Returns:
    (x_{t-1} [B, ..., C], x0 [B, ..., C]).

  References: Ho et al. 2020, algorithm 2 and eq. 7.
  """
  moments = reverse.p_mean_variance(schedule, model_output, x, t, prediction=prediction,
                                    variance=variance, clip_denoised=False)
  x0 = thresholding_lib.threshold_x0(moments.pred_x0, thresholding, percentile)
  mean, _, _ = forward.q_posterior_mean_variance(schedule, x0, x, t)
  nonzero = forward.extract((jnp.arange(schedule.num_timesteps) > 0).astype(x.dtype), t, x.ndim)
  return mean + nonzero * jnp.exp(0.5 * moments.log_variance) * noise, x0


def sample(model_fn: ModelFn, schedule: Schedule, shape: Sequence[int], rng: jax.Array, *,
           prediction: str = "eps", variance: str = "fixed_small",
           thresholding: str = thresholding_lib.DEFAULT,
           dynamic_percentile: float = thresholding_lib.DEFAULT_PERCENTILE,
           clip_denoised: bool | None = None, x_init: jax.Array | None = None,
           trajectory_stride: int = 0, timesteps: jax.Array | None = None,
           inpaint: inpainting.Inpaint | None = None):
  """Draws samples by running the reverse process over every schedule entry, N-1 down to 0.

  Args:
    model_fn: `(x_t [B, ...], t int32 [B]) -> output` ([B, ...], or [B, ..., 2C] with a learned
      variance).
    schedule: the diffusion schedule (N = `schedule.num_timesteps` steps), or a respaced one
      (`respacing.respace`) with `timesteps`.
    shape: the sample shape (B, ...), e.g. (B, H, W, C).
    rng: a key or per-example keys [B] (noise streams as in `samplers.base`), so a sample does
      not depend on how the batch is split over devices.
    prediction: 'eps', 'x0' or 'v'.
    variance: 'fixed_small', 'fixed_large', 'learned' or 'learned_range'.
    thresholding: the x0 policy, 'clip' (default, pixel data), 'dynamic' or 'none' (latents).
    dynamic_percentile: the quantile of |x0| of 'dynamic' thresholding.
    clip_denoised: the older name: True is thresholding='clip', False 'none'.
    x_init: optional x at the first step [B, ...] to start from instead of drawing it.
    trajectory_stride: if > 0, also return x every `stride` steps (N must be a multiple).
    timesteps: int [N] network timestep of each schedule entry (respacing; may be traced), or
      None for the entry index itself.
    inpaint: known pixels, kept through the driver (`driver.run_reverse`).

  Returns:
    Samples x_0 [B, ...] (float32), or (samples, trajectory [N // stride, B, ...]) when
    `trajectory_stride` > 0 (see `driver.run_reverse`).

  References: Ho et al. 2020, algorithm 2.
  """
  thresholding = base.resolve_thresholding(thresholding, clip_denoised)
  num_steps = schedule.num_timesteps
  shape, keys, x = base.start(rng, shape, num_steps, x_init, prediction=prediction,
                              variance=variance, timesteps=timesteps, thresholding=thresholding,
                              percentile=dynamic_percentile)

  def step(x, carry, i, noise):
    t = jnp.full((shape[0],), num_steps - 1 - i, jnp.int32)
    output = base.call_model(model_fn, x, t, timesteps)
    x, _ = ancestral_step(schedule, output, x, t, noise, prediction=prediction,
                          variance=variance, thresholding=thresholding,
                          percentile=dynamic_percentile)
    return x, carry

  return driver.run_reverse(step, x, keys, driver.vp_levels(schedule), inpaint=inpaint,
                            trajectory_stride=trajectory_stride)
