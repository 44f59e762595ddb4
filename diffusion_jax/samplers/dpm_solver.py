"""DPM-Solver++(2M): the second-order multistep solver of the diffusion ODE in x0 form.

Runs over a respaced schedule (`respacing.respace`), N entries, one network evaluation per
step. With lambda = log(alpha / sigma) (alpha = sqrt(abar), sigma = sqrt(1 - abar)) and
h = lambda_next - lambda_now, each step is

  x_next = (sigma_next / sigma_now) x - alpha_next (exp(-h) - 1) D,
  D = x0_now                                     (first order: first and last steps),
  D = x0_now + (x0_now - x0_before) / (2 r),     r = h_before / h (second order, midpoint).

The last step lands on alpha_bar = 1 (sigma = 0) and is first order, as diffusers'
`DPMSolverMultistepScheduler` does with `final_sigmas_type='zero'` (its `lower_order_final`
setting then makes no difference for order 2). Thresholding acts on the data prediction x0_now,
where the DPM-Solver++ authors put it for pixel-space models.

References: Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", algorithm 2 and sec. 3.3 (thresholding); diffusers
`DPMSolverMultistepScheduler` (solver_order=2, algorithm_type='dpmsolver++',
solver_type='midpoint').
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from diffusion_jax import forward
from diffusion_jax.samplers import base
from diffusion_jax.samplers import driver
from diffusion_jax.samplers import inpainting
from diffusion_jax.samplers import thresholding as thresholding_lib
from diffusion_jax.schedules import Schedule


class SolverMemory(NamedTuple):
  """What the multistep method remembers between steps: the previous x0 [B, ...] and step size
  h (scalar)."""
  x0_before: jax.Array
  h_before: jax.Array


def _alpha_sigma(schedule: Schedule, t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array,
                                                            jax.Array]:
  """(alpha_now, sigma_now, alpha_next, sigma_next) at schedule index t (a scalar); the entry
  after index 0 is the clean end (alpha 1, sigma 0)."""
  alphas = jnp.concatenate([jnp.ones((1,)), schedule.sqrt_alphas_cumprod])
  sigmas = jnp.concatenate([jnp.zeros((1,)), schedule.sqrt_one_minus_alphas_cumprod])
  return alphas[t + 1], sigmas[t + 1], alphas[t], sigmas[t]


def dpm_solver_step(schedule: Schedule, model_output: jax.Array, x: jax.Array,
                    memory: SolverMemory, t: jax.Array, second_order: jax.Array, *,
                    prediction: str = "eps", variance: str = "fixed_small",
                    thresholding: str = "none",
                    percentile: float = thresholding_lib.DEFAULT_PERCENTILE
                    ) -> tuple[jax.Array, SolverMemory, jax.Array]:
  """One DPM-Solver++(2M) step from schedule index t to the next lower level.

  Args:
    schedule: the (respaced) schedule.
    model_output: [B, ..., C] network output at (x, t) (learned-variance channels ignored).
    x: the state [B, ..., C] at index t.
    memory: `SolverMemory` (unused when `second_order` is false).
    t: int32 scalar schedule index (N-1 .. 0).
    second_order: bool scalar (may be traced), false on the first and last steps.
    prediction: 'eps', 'x0' or 'v'.
    variance: the model's variance type (only used to split off learned channels).
    thresholding, percentile: the policy for the data prediction (`thresholding.threshold_x0`;
      'none' is the published algorithm without thresholding).

  Returns:
    (x_next [B, ..., C], the next `SolverMemory`, x0 [B, ..., C]).

  References: Lu et al. 2022, algorithm 2.
  """
  pred = base.prediction_part(jnp.asarray(model_output, jnp.float32), x, variance)
  x0 = forward.predict_x0(schedule, pred, x, t, prediction)
  x0 = thresholding_lib.threshold_x0(x0, thresholding, percentile)
  alpha, sigma, alpha_next, sigma_next = _alpha_sigma(schedule, t)
  h = (jnp.log(alpha_next) - jnp.log(sigma_next)) - (jnp.log(alpha) - jnp.log(sigma))
  ratio = jnp.where(second_order, memory.h_before / h, 1.0)
  correction = jnp.where(second_order, 0.5 / ratio, 0.0)
  d = x0 + correction * (x0 - memory.x0_before)
  x_next = (sigma_next / sigma) * x - alpha_next * jnp.expm1(-h) * d
  return x_next, SolverMemory(x0_before=x0, h_before=h), x0


def sample(model_fn: base.ModelFn, schedule: Schedule, shape: Sequence[int], rng: jax.Array, *,
           timesteps: jax.Array | None = None, prediction: str = "eps",
           variance: str = "fixed_small", thresholding: str = thresholding_lib.DEFAULT,
           dynamic_percentile: float = thresholding_lib.DEFAULT_PERCENTILE,
           clip_denoised: bool | None = None, x_init: jax.Array | None = None,
           inpaint: inpainting.Inpaint | None = None, trajectory_stride: int = 0):
  """DPM-Solver++(2M) over every entry of `schedule` (N network evaluations) through the driver.

  Args:
    model_fn: `(x_t [B, ...], t [B]) -> output`.
    schedule: the (respaced) schedule, N >= 1 entries (the authors' grid: `'linspaceN'`,
      uniform in time, see `samplers.grids`).
    shape: (B, ...).
    rng: a key or per-example keys [B]; only the initial noise (fold_in(key_b, N)) and the
      inpainting re-noising are random.
    timesteps: int [N] network timestep per entry (respacing; may be traced) or None.
    prediction: 'eps', 'x0' or 'v'.
    variance: the model's variance type (learned-variance channels are split off).
    thresholding, dynamic_percentile, clip_denoised: the x0 policy, as `ancestral.sample`.
    x_init: optional x at the first step [B, ...].
    inpaint, trajectory_stride: see `driver.run_reverse`.

  Returns:
    Samples [B, ...] float32, or (samples, trajectory) when `trajectory_stride` > 0.

  References: Lu et al. 2022, algorithm 2.
  """
  thresholding = base.resolve_thresholding(thresholding, clip_denoised)
  num_steps = schedule.num_timesteps
  shape, keys, x = base.start(rng, shape, num_steps, x_init, prediction=prediction,
                              variance=variance, timesteps=timesteps, thresholding=thresholding,
                              percentile=dynamic_percentile)

  def step(x, memory, i, noise):
    del noise
    t = num_steps - 1 - i
    output = base.call_model(model_fn, x, t, timesteps)
    second_order = jnp.logical_and(i > 0, t > 0)
    x, memory, _ = dpm_solver_step(schedule, output, x, memory, t, second_order,
                                   prediction=prediction, variance=variance,
                                   thresholding=thresholding, percentile=dynamic_percentile)
    return x, memory

  memory = SolverMemory(x0_before=jnp.zeros_like(x), h_before=jnp.ones(()))
  return driver.run_reverse(step, x, keys, driver.vp_levels(schedule), carry=memory,
                            inpaint=inpaint, trajectory_stride=trajectory_stride)
