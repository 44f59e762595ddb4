"""The T-step ancestral (DDPM) sampler, fused in one `lax.scan`.

The step function and the loop are pure; the caller wraps them in `jit` / `pmap`. The loop body
is traced once whatever T is, so compile time and memory do not grow with T.

References: Ho et al. 2020, algorithm 2; Nichol & Dhariwal 2021, sec. 3.1 (learned variances).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from diffusion_jax import reverse
from diffusion_jax.samplers import base
from diffusion_jax.samplers import guidance
from diffusion_jax.schedules import Schedule

ModelFn = base.ModelFn


def sample(model_fn: ModelFn, schedule: Schedule, shape: Sequence[int], rng: jax.Array, *,
           prediction: str = "eps", variance: str = "fixed_small", clip_denoised: bool = True,
           x_init: jax.Array | None = None, trajectory_stride: int = 0,
           timesteps: jax.Array | None = None, inpaint: guidance.Inpaint | None = None):
  """Draws samples by running the reverse process from t = T-1 down to 0 in one `lax.scan`.

  Args:
    model_fn: `(x_t [B, ...], t int32 [B]) -> output` ([B, ...], or [B, ..., 2C] with a learned
      variance).
    schedule: the diffusion schedule (T = `schedule.num_timesteps` steps), or a respaced one
      (`respacing.respace`) with `timesteps`.
    shape: the sample shape (B, ...), e.g. (B, H, W, C).
    rng: a key or per-example keys [B]. Example b's initial noise comes from
      fold_in(key_b, T) and its step-t noise from fold_in(key_b, t), so a sample does not depend
      on how the batch is split over devices.
    prediction: 'eps', 'x0' or 'v'.
    variance: 'fixed_small', 'fixed_large', 'learned' or 'learned_range'.
    clip_denoised: clip the predicted x0 to [-1, 1] at every step.
    x_init: optional x_{T-1} [B, ...] to start from instead of drawing it.
    trajectory_stride: if > 0, also return x_t every `stride` steps (T must be a multiple).
    timesteps: int [T] network timestep of each schedule entry (respacing; may be traced), or
      None for t itself.
    inpaint: known pixels, re-noised to the level of x_t and put in place before every step
      (noise from fold_in(key_b, T + 1 + t)); the result carries the clean known pixels.

  Returns:
    Samples x_0 [B, ...] (float32), or (samples, trajectory [T // stride, B, ...]) when
    `trajectory_stride` > 0; trajectory[k] is x after (k + 1) * stride reverse steps.

  References: Ho et al. 2020, algorithm 2.
  """
  num_steps = schedule.num_timesteps
  if trajectory_stride < 0 or (trajectory_stride and num_steps % trajectory_stride):
    raise ValueError(f"trajectory_stride must be 0 or a positive divisor of T={num_steps}, got "
                     f"{trajectory_stride}.")
  shape, keys, x = base.start(rng, shape, num_steps, x_init, prediction=prediction,
                              variance=variance, timesteps=timesteps)

  def step(x, i):
    t = jnp.full((shape[0],), num_steps - 1 - i, jnp.int32)
    x = guidance.renoise_known(inpaint, schedule, x, t, keys)
    noise = base.step_noise(keys, t[0], shape)
    output = base.call_model(model_fn, x, t, timesteps)
    x_prev, _ = reverse.p_sample(schedule, output, x, t, None, prediction=prediction,
                                 variance=variance, clip_denoised=clip_denoised, noise=noise)
    return x_prev, None

  def finish(x):
    return guidance.replace_known(inpaint, x, 1.0, 0.0, jnp.zeros_like(x))

  if not trajectory_stride:
    x, _ = lax.scan(step, x, jnp.arange(num_steps))
    return finish(x)

  def chunk(x, k):
    x, _ = lax.scan(step, x, k * trajectory_stride + jnp.arange(trajectory_stride))
    return x, x

  x, trajectory = lax.scan(chunk, x, jnp.arange(num_steps // trajectory_stride))
  return finish(x), trajectory
