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
from jax import lax

from diffusion_jax import forward
from diffusion_jax.samplers import base
from diffusion_jax.samplers import guidance
from diffusion_jax.schedules import Schedule


def ddim_step(schedule: Schedule, model_output: jax.Array, x: jax.Array, t: jax.Array,
              eta: float | jax.Array, noise: jax.Array, *, prediction: str = "eps",
              variance: str = "fixed_small", clip_denoised: bool = False
              ) -> tuple[jax.Array, jax.Array]:
  """One DDIM update x_t -> x_{t-1}.

  x_{t-1} = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z, s = eta sqrt((1 - a')/(1 - a))
  sqrt(1 - a/a'), with a = alpha_bar_t, a' = alpha_bar_{t-1} (1 at t = 0). With clipping, eps
  is re-derived from the clipped x0 as in the improved-DDPM code (diffusers'
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
    clip_denoised: clip x0 to [-1, 1].

  Returns:
    (x_{t-1} [B, ..., C], x0 [B, ..., C]).

  References: Song et al. 2021, eqs. 12 and 16.
  """
  pred = base.prediction_part(jnp.asarray(model_output, jnp.float32), x, variance)
  x0 = forward.predict_x0(schedule, pred, x, t, prediction)
  if clip_denoised:
    x0 = jnp.clip(x0, -1.0, 1.0)
  a = forward.extract(schedule.alphas_cumprod, t, x.ndim)
  a_prev = forward.extract(schedule.alphas_cumprod_prev, t, x.ndim)
  if clip_denoised:
    eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
  else:
    eps = forward.predict_eps(schedule, pred, x, t, prediction)
  sigma = eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev))
  direction = jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma ** 2, 0.0)) * eps
  return jnp.sqrt(a_prev) * x0 + direction + sigma * noise, x0


def sample(model_fn: base.ModelFn, schedule: Schedule, shape: Sequence[int], rng: jax.Array, *,
           eta: float | jax.Array = 0.0, timesteps: jax.Array | None = None,
           prediction: str = "eps", variance: str = "fixed_small", clip_denoised: bool = False,
           x_init: jax.Array | None = None, inpaint: guidance.Inpaint | None = None) -> jax.Array:
  """DDIM sampling over every entry of `schedule` in one `lax.scan` (N = schedule length).

  Args:
    model_fn: `(x_t [B, ...], t [B]) -> output`.
    schedule: the (respaced) schedule, N entries.
    shape: (B, ...).
    rng: a key or per-example keys [B] (streams as in `samplers.base`).
    eta: 0 (deterministic) .. 1 (ancestral with the posterior variance); may be traced.
    timesteps: int [N] network timestep per entry (respacing; may be traced) or None.
    prediction, variance, clip_denoised: as `ddim_step`.
    x_init: optional x at the first step [B, ...] (default: noise from fold_in(key_b, N)).
    inpaint: known pixels re-noised with q_sample before every step.

  Returns:
    Samples [B, ...] float32.

  References: Song et al. 2021, algorithm in sec. 4.2.
  """
  num_steps = schedule.num_timesteps
  shape, keys, x = base.start(rng, shape, num_steps, x_init, prediction=prediction,
                              variance=variance, timesteps=timesteps)

  def step(x, i):
    t = jnp.full((shape[0],), num_steps - 1 - i, jnp.int32)
    x = guidance.renoise_known(inpaint, schedule, x, t, keys)
    output = base.call_model(model_fn, x, t, timesteps)
    x_prev, _ = ddim_step(schedule, output, x, t, eta, base.step_noise(keys, t[0], shape),
                          prediction=prediction, variance=variance, clip_denoised=clip_denoised)
    return x_prev, None

  x, _ = lax.scan(step, x, jnp.arange(num_steps))
  return guidance.replace_known(inpaint, x, 1.0, 0.0, jnp.zeros_like(x))
