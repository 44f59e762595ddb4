"""Euler and Heun on the probability-flow ODE in sigma space (EDM style) for VP models.

A VP state x_vp at alpha_bar is x = x_vp / sqrt(alpha_bar) in sigma space, with
sigma = sqrt((1 - alpha_bar) / alpha_bar); there the probability-flow ODE is
dx/dsigma = (x - D(x; sigma)) / sigma, D the denoiser (predicted x0, thresholded as every
sampler's x0 is, `samplers.thresholding`). The network is called on x / sqrt(1 + sigma^2) at the
fractional training timestep t(sigma) found by interpolating log sigma over the training table
(as diffusers' `EulerDiscreteScheduler`), or at the nearest integer timestep.

The start. The default Karras grid runs from sigma_max = min(80, the largest training sigma):
EDM's 80 (Karras et al. 2022, sec. 5 and table 1, used for their VP models too), or the
model's own largest sigma where that is smaller. A VP schedule whose last alpha_bar is ~0 has
an extreme last sigma (5,073 for the cosine schedule at T=250), where an eps-model's x0 is its
error divided by sqrt(alpha_bar) ~ 2e-4; at 80 the data (std <= 1) is already negligible against
the noise. The initial state is sqrt(1 + sigma_max^2) x_vp, x_vp standard normal: the VP prior
N(0, I) expressed at that sigma (EDM draws N(0, sigma_max^2 I); the two differ by a factor
1 + 1 / (2 sigma_max^2)). The 'linspace' grid is diffusers' and starts from the table's last
sigma, for side-by-side checks.

References:
  Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
  eq. 5 (Karras grid, rho = 7), algorithm 1 (Heun, S_churn = 0), table 1 (VP in sigma form,
  sigma_max = 80).
  diffusers `EulerDiscreteScheduler` (sigma interpolation, `use_karras_sigmas`).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from diffusion_jax import _checks
from diffusion_jax.samplers import base
from diffusion_jax.samplers import driver
from diffusion_jax.samplers import inpainting
from diffusion_jax.samplers import thresholding as thresholding_lib
from diffusion_jax.schedules import Schedule

EDM_SIGMA_MAX = 80.0
GRIDS = ("karras", "linspace")
METHODS = ("euler", "heun")
TIMESTEP_MODES = ("interpolate", "nearest")


def training_sigmas(schedule: Schedule) -> jax.Array:
  """sigma_t = sqrt((1 - abar_t) / abar_t) of the training schedule, [T] increasing."""
  return schedule.sqrt_recipm1_alphas_cumprod


def interp(x: jax.Array, xp: jax.Array, fp: jax.Array) -> jax.Array:
  """Piecewise-linear interpolation of (xp [T] increasing, fp [T]) at x [...], clamped at the
  ends, like `jnp.interp`; the segment is found by comparing against all knots (no bisection
  loop, so a sampler's jaxpr holds no scan besides its own)."""
  x = jnp.asarray(x, jnp.float32)
  below = jnp.sum(xp <= x[..., None], axis=-1)
  lo = jnp.clip(below - 1, 0, xp.shape[0] - 2)
  x0, x1, f0, f1 = xp[lo], xp[lo + 1], fp[lo], fp[lo + 1]
  w = jnp.clip((x - x0) / (x1 - x0), 0.0, 1.0)
  return f0 + w * (f1 - f0)


def sigma_to_t(schedule: Schedule, sigma: jax.Array) -> jax.Array:
  """Fractional training timestep [..] of sigma by linear interpolation of log sigma (clamped to
  [0, T-1]); the inverse of `t_to_sigma`."""
  log_sigmas = jnp.log(training_sigmas(schedule))
  steps = jnp.arange(schedule.num_timesteps, dtype=jnp.float32)
  return interp(jnp.log(jnp.maximum(sigma, 1e-10)), log_sigmas, steps)


def t_to_sigma(schedule: Schedule, t: jax.Array) -> jax.Array:
  """sigma at fractional timesteps t by linear interpolation of log sigma."""
  log_sigmas = jnp.log(training_sigmas(schedule))
  steps = jnp.arange(schedule.num_timesteps, dtype=jnp.float32)
  return jnp.exp(interp(t, steps, log_sigmas))


def karras_sigmas(sigma_min: jax.Array, sigma_max: jax.Array, num_steps: int,
                  rho: float = 7.0) -> jax.Array:
  """(sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, [N] decreasing.

  References: Karras et al. 2022, eq. 5.
  """
  ramp = jnp.linspace(0.0, 1.0, num_steps) if num_steps > 1 else jnp.zeros((1,))
  max_inv, min_inv = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
  return (max_inv + ramp * (min_inv - max_inv)) ** rho


def sigma_grid(schedule: Schedule, num_steps: int, *, grid: str = "karras", rho: float = 7.0,
               sigma_min: jax.Array | None = None, sigma_max: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
  """The sampling grid: sigmas [N + 1] (decreasing, last 0) and the network timesteps [N].

  Args:
    schedule: the training schedule (T entries); may be traced.
    num_steps: N >= 1 (static).
    grid: 'karras' (eq. 5 from sigma_max down to sigma_min, timesteps by log-sigma
      interpolation) or 'linspace' (diffusers' default: timesteps linspace(T-1, 0, N), sigma
      interpolated linearly in t, from the table's last sigma; sigma_min/max are ignored).
    rho: Karras exponent.
    sigma_min, sigma_max: the Karras range (default: the table's smallest sigma, and
      min(EDM_SIGMA_MAX, the table's largest sigma); may be traced).

  Returns:
    (sigmas float32 [N + 1], timesteps float32 [N]).

  References: Karras et al. 2022, eq. 5; diffusers `EulerDiscreteScheduler.set_timesteps`.
  """
  _checks.check_choice("grid", grid, GRIDS)
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  table = training_sigmas(schedule)
  if grid == "karras":
    lo = table[0] if sigma_min is None else sigma_min
    hi = jnp.minimum(table[-1], EDM_SIGMA_MAX) if sigma_max is None else sigma_max
    sigmas = karras_sigmas(lo, hi, num_steps, rho)
    timesteps = sigma_to_t(schedule, sigmas)
  else:
    timesteps = jnp.linspace(schedule.num_timesteps - 1.0, 0.0, num_steps)
    sigmas = interp(timesteps, jnp.arange(schedule.num_timesteps, dtype=jnp.float32), table)
  return jnp.append(sigmas, 0.0).astype(jnp.float32), timesteps.astype(jnp.float32)


def denoise(model_fn: base.ModelFn, x: jax.Array, sigma: jax.Array, t: jax.Array, *,
            prediction: str = "eps", variance: str = "fixed_small") -> jax.Array:
  """D(x; sigma) [B, ...]: the network's x0 for a sigma-space state x.

  The network sees x_vp = x / sqrt(1 + sigma^2) at timestep t [B] (or a scalar); an eps output
  gives x - sigma eps, a v output sqrt(abar) x_vp - sqrt(1 - abar) v, an x0 output itself.

  References: Karras et al. 2022, table 1 (VP preconditioning); Salimans & Ho 2022 (v).
  """
  scale = 1.0 / jnp.sqrt(1.0 + sigma ** 2)   # sqrt(abar)
  x_vp = x * scale
  output = jnp.asarray(model_fn(x_vp, jnp.broadcast_to(t, (x.shape[0],))), jnp.float32)
  pred = base.prediction_part(output, x, variance)
  if prediction == "eps":
    return x - sigma * pred
  if prediction == "v":
    return scale * x_vp - sigma * scale * pred
  return pred


def sample(model_fn: base.ModelFn, schedule: Schedule, shape: Sequence[int], rng: jax.Array, *,
           num_steps: int, method: str = "euler", grid: str = "karras", rho: float = 7.0,
           timestep_mode: str = "interpolate", prediction: str = "eps",
           variance: str = "fixed_small", thresholding: str = thresholding_lib.DEFAULT,
           dynamic_percentile: float = thresholding_lib.DEFAULT_PERCENTILE,
           clip_denoised: bool | None = None, sigma_min: jax.Array | None = None,
           sigma_max: jax.Array | None = None, s_churn: jax.Array = 0.0,
           s_tmin: jax.Array = 0.0, s_tmax: jax.Array = float("inf"), s_noise: jax.Array = 1.0,
           x_init: jax.Array | None = None, inpaint: inpainting.Inpaint | None = None,
           trajectory_stride: int = 0):
  """Euler (N evaluations) or Heun (2N - 1) from sigma_max to 0 in N steps through the driver;
  with `s_churn` > 0, EDM's stochastic sampler (algorithm 2) on the same grid.

  Args:
    model_fn: `(x_vp [B, ...], t [B] float) -> output`; t is fractional unless
      timestep_mode='nearest'.
    schedule: the training schedule (T entries).
    shape: (B, ...).
    rng: a key or per-example keys [B]; the initial VP noise x_vp comes from fold_in(key_b, N)
      and the start is x = sqrt(1 + sigma_max^2) x_vp, the VP prior in sigma space (diffusers'
      `init_noise_sigma` is sigma_max itself for its 'linspace' spacing).
    num_steps: N (static).
    method: 'euler' or 'heun' (Heun's last step, to sigma = 0, is an Euler step).
    grid, rho, sigma_min, sigma_max: see `sigma_grid` (default: Karras, rho 7, from
      min(80, the largest training sigma)).
    timestep_mode: 'interpolate' (fractional float t) or 'nearest' (rounded int32 t, for
      integer-only networks; the ODE still uses the grid's sigma).
    prediction: 'eps', 'x0' or 'v'.
    variance: the model's variance type (learned-variance channels are split off).
    thresholding, dynamic_percentile, clip_denoised: the policy for D(x; sigma), as
      `ancestral.sample`.
    s_churn, s_tmin, s_tmax, s_noise: EDM's stochasticity (per call, may be traced): at a step
      whose sigma lies in [s_tmin, s_tmax] the state is first noised up to
      sigma_hat = sigma (1 + min(s_churn / N, sqrt(2) - 1)) with fresh noise of scale s_noise,
      and the step runs from sigma_hat. s_churn = 0 (the default) is algorithm 1 exactly. EDM's
      ImageNet-64 setting: s_churn 40, s_tmin 0.05, s_tmax 50, s_noise 1.003.
    x_init: optional initial VP state [B, ...] (standard normal scale).
    inpaint, trajectory_stride: see `driver.run_reverse`; the state (and the trajectory) is in
      sigma space, x = x0 + sigma eps.

  Returns:
    Samples [B, ...] float32 (sigma = 0, i.e. data space), or (samples, trajectory) when
    `trajectory_stride` > 0.

  References: Karras et al. 2022, algorithms 1 and 2.
  """
  _checks.check_choice("method", method, METHODS)
  _checks.check_choice("timestep_mode", timestep_mode, TIMESTEP_MODES)
  thresholding = base.resolve_thresholding(thresholding, clip_denoised)
  sigmas, timesteps = sigma_grid(schedule, num_steps, grid=grid, rho=rho, sigma_min=sigma_min,
                                 sigma_max=sigma_max)
  if timestep_mode == "nearest":
    timesteps = jnp.round(timesteps).astype(jnp.int32)
  _, keys, x = base.start(rng, shape, num_steps, x_init, prediction=prediction,
                          variance=variance, thresholding=thresholding,
                          percentile=dynamic_percentile)
  x = x * jnp.sqrt(1.0 + sigmas[0] ** 2)
  next_timesteps = jnp.concatenate([timesteps[1:], timesteps[-1:]])   # last entry unused

  def denoised(x, sigma, t):
    d = denoise(model_fn, x, sigma, t, prediction=prediction, variance=variance)
    return thresholding_lib.threshold_x0(d, thresholding, dynamic_percentile)

  def churn(x, i, noise):
    """(x_hat, sigma_hat, t_hat): the state noised up from sigmas[i] (EDM algorithm 2, 5-7)."""
    sigma = sigmas[i]
    gamma = jnp.where((sigma >= s_tmin) & (sigma <= s_tmax),
                      jnp.minimum(s_churn / num_steps, jnp.sqrt(2.0) - 1.0), 0.0)
    sigma_hat = sigma * (1.0 + gamma)
    # sqrt(sigma_hat^2 - sigma^2) written as sigma sqrt(gamma (2 + gamma)): exactly 0 without
    # churn (a fused multiply-add of the difference of squares leaves sigma^2's rounding error,
    # whose square root is noise of scale ~1e-2 at sigma = 80).
    x_hat = x + sigma * jnp.sqrt(gamma * (2.0 + gamma)) * s_noise * noise
    t_hat = sigma_to_t(schedule, sigma_hat)
    if timestep_mode == "nearest":
      t_hat = jnp.round(t_hat).astype(jnp.int32)
    # Without churn the grid's own timestep is used, so s_churn = 0 is algorithm 1 bit for bit.
    return x_hat, sigma_hat, jnp.where(gamma > 0, t_hat, timesteps[i])

  def step(x, carry, i, noise):
    x, sigma, t = churn(x, i, noise)
    sigma_next = sigmas[i + 1]
    x0 = denoised(x, sigma, t)
    slope = (x - x0) / sigma
    # The step to sigma = 0 lands on D itself (x + (0 - sigma) (x - D) / sigma, without rounding).
    x_euler = jnp.where(sigma_next > 0, x + (sigma_next - sigma) * slope, x0)
    if method == "euler":
      return x_euler, carry

    def correct(x_euler):
      slope_next = (x_euler - denoised(x_euler, sigma_next, next_timesteps[i])) / sigma_next
      return x + (sigma_next - sigma) * 0.5 * (slope + slope_next)

    return lax.cond(sigma_next > 0, correct, lambda x_euler: x_euler, x_euler), carry

  levels = driver.Levels(scale=jnp.ones_like(sigmas), sigma=sigmas)
  return driver.run_reverse(step, x, keys, levels, inpaint=inpaint,
                            trajectory_stride=trajectory_stride)
