"""Predictor-corrector sampling of the reverse VP or VE SDE (score_sde), run by the driver.

The SDE is discretised on the noise levels of the (respaced) schedule the model was trained on,
N entries k = N-1 .. 0 (step j = N-1-k of the driver), so a trained discrete model is wrapped
exactly: its score at entry k is -eps / sigma_k (`sde.score_from_eps`). The state is

  'vp': x = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps (the model's own variable), or
  've': x = x0 + sigma_k eps, sigma_k^2 = 1 / abar_k - 1 (the same levels as a VE SDE; the
        network sees x / sqrt(1 + sigma_k^2), as in `samplers.ode`),

and the forward step from entry k-1 to k is x_k = a_k x_{k-1} + G_k z with
a_k = sqrt(1 - beta_k), G_k^2 = beta_k (VP) or a_k = 1, G_k^2 = sigma_k^2 - sigma_{k-1}^2
= beta_k / abar_k (VE). Each step runs `corrector_steps` Langevin corrector steps at entry k,
then one predictor step to entry k-1; the last step, from entry 0 to the data, is the
denoiser's x0 (Tweedie's formula, x0 = (x + sigma_0^2 s) / scale_0, at the policy's x0), as the
authors end their samples (appendix G; DDPM's own last step is that same x0):

  reverse_diffusion: x' = (2 - a) x + G^2 s + G z                     (score_sde eq. 46-47)
  ancestral:         x' = (x + G^2 s) / a + std z, std^2 = the posterior variance
                     (variance='fixed_small'; VE: sigma_{k-1}^2 G^2 / sigma_k^2) or G^2
                     ('fixed_large'). For VP this is DDPM's ancestral step: with the same noise
                     it equals `ancestral.sample` step for step.
  euler_maruyama:    x' = x + (B / 2) x + B s + sqrt(B) z, B = -log(1 - beta_k) (VP; 0 drift
                     and B = G^2 for VE): Euler-Maruyama in tau = -log abar (sigma^2 for VE),
                     the time in which the SDE's coefficients are constant; EM in t when beta(t)
                     is constant over each step (a discrete schedule's piecewise-constant SDE).
  langevin corrector: x <- x + e s + sqrt(2 e) z, e = 2 alpha (snr |z| / |s|)^2 with
                     alpha = 1 - beta_k (VP) or 1 (VE), |z| and |s| averaged over the batch
                     (the authors' choice, `langevin_norms='batch'`) or each example's own
                     ('example').

reverse_diffusion differs from DDPM's ancestral step by O(beta^2) per step: 2 - sqrt(1 - beta)
against 1 / sqrt(1 - beta) (score_sde appendix F says the same); they agree only as beta -> 0.

The corrector's norms. With the authors' batch averages every example of a level takes the same
step, but a sample then depends on its batch-mates (and on the batch split over devices): the
one exception to "a sample is a function of its key alone" (`samplers.base`), unless
corrector='none'. `langevin_norms='example'` restores that property, at a cost: the step then
grows where |s| is small (near the mode), which biases the law: on the 16-D Gaussian of
tests/test_samplers_pc.py with the exact score, 50 corrector steps at one level inflated the
variances by 16-49% against 1-7% with batch norms (measured once, not a test); in the hundreds
of dimensions of images |s| concentrates and the two come closer.

The score is formed from the x0 policy's (`thresholding`) x0, like every sampler's.

Noise streams (per example key k_b, N steps, C corrector steps; see `samplers.base`): initial
noise fold_in(k_b, N); the predictor of entry k fold_in(k_b, k); corrector step c at entry k
fold_in(k_b, 2N + 1 + k C + c) (after the inpainting streams N + 1 .. 2N).

Network evaluations: (1 + C) per step, (1 + C) N in all (`grids.network_evaluations`).

References:
  Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential
  Equations", algorithms 2-4 (PC sampling), appendix E (reverse diffusion) and F (ancestral),
  appendix G (the corrector's SNR step size); the official `sampling.py`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from diffusion_jax import _checks
from diffusion_jax import forward
from diffusion_jax import sde as sde_lib
from diffusion_jax.samplers import base
from diffusion_jax.samplers import driver
from diffusion_jax.samplers import inpainting
from diffusion_jax.samplers import thresholding as thresholding_lib
from diffusion_jax.schedules import Schedule

SDES = ("vp", "ve")
PREDICTORS = ("reverse_diffusion", "euler_maruyama", "ancestral")
CORRECTORS = ("langevin", "none")
LANGEVIN_NORMS = ("batch", "example")
DEFAULT_SNR = 0.16      # the authors' CIFAR-10 setting


class Discretization(NamedTuple):
  """Per schedule entry k (each [N], float32): the state's level x = scale x0 + sigma eps, the
  forward step into entry k (x_k = a x_{k-1} + G z), its posterior variance, Euler-Maruyama's
  integrated diffusion B and drift factor (B / 2 for VP, 0 for VE), the corrector's alpha."""
  scale: jax.Array
  sigma: jax.Array
  a: jax.Array
  g2: jax.Array
  posterior_variance: jax.Array
  em_b: jax.Array
  em_drift: jax.Array
  alpha: jax.Array


def check_terminal_level(schedule: Schedule, sde: str, predictor: str) -> None:
  """Raises a ValueError for a zero-terminal-SNR schedule (alpha_bar = 0 at its last entry,
  checked when the schedule is concrete) unless the method stays finite there: the VE state has
  sigma = inf, the ancestral predictor divides by sqrt(1 - beta) = 0 and Euler-Maruyama's
  -log(1 - beta) is infinite; VP reverse diffusion is finite (x' = x + s + z at beta = 1)."""
  last = schedule.alphas_cumprod[-1]
  if isinstance(last, jax.core.Tracer) or (sde == "vp" and predictor == "reverse_diffusion"):
    return
  if float(last) <= 0.0:
    raise ValueError(f"sde={sde!r} with predictor={predictor!r} needs alpha_bar > 0 at every "
                     "schedule entry; this schedule has zero terminal SNR: use sde='vp' with "
                     "predictor='reverse_diffusion'.")


def discretize(schedule: Schedule, sde: str) -> Discretization:
  """The VP or VE SDE on the levels of `schedule` (see the module doc)."""
  _checks.check_choice("sde", sde, SDES)
  betas = schedule.betas
  if sde == "vp":
    return Discretization(
        scale=schedule.sqrt_alphas_cumprod, sigma=schedule.sqrt_one_minus_alphas_cumprod,
        a=jnp.sqrt(schedule.alphas), g2=betas, posterior_variance=schedule.posterior_variance,
        em_b=-jnp.log1p(-betas), em_drift=-0.5 * jnp.log1p(-betas),
        alpha=schedule.alphas)
  sigma = schedule.sqrt_recipm1_alphas_cumprod
  g2 = betas / schedule.alphas_cumprod                  # sigma_k^2 - sigma_{k-1}^2, no cancellation
  sigma_prev2 = jnp.append(0.0, sigma[:-1] ** 2)
  ones = jnp.ones_like(sigma)
  return Discretization(scale=ones, sigma=sigma, a=ones, g2=g2,
                        posterior_variance=sigma_prev2 * g2 / sigma ** 2, em_b=g2,
                        em_drift=jnp.zeros_like(sigma), alpha=ones)


def levels(disc: Discretization) -> driver.Levels:
  """The driver's levels: entry N-1 first, then ... entry 0, then the data (1, 0)."""
  return driver.Levels(scale=jnp.append(disc.scale[::-1], 1.0),
                       sigma=jnp.append(disc.sigma[::-1], 0.0))


def predictor_step(predictor: str, disc: Discretization, x: jax.Array, score: jax.Array,
                   x0: jax.Array, k: jax.Array, noise: jax.Array,
                   variance: str = "fixed_small") -> jax.Array:
  """One predictor step from entry k to k-1; from k = 0, the denoised x0 itself.

  Args:
    predictor: one of `PREDICTORS`.
    disc: the discretisation.
    x, score, x0, noise: [B, ...] (x0 the policy's, from which the score was formed).
    k: int32 scalar entry.
    variance: the ancestral predictor's noise, 'fixed_large' (G^2) or else the posterior's.

  Returns:
    x at entry k-1 [B, ...].
  """
  a, g2 = disc.a[k], disc.g2[k]
  last = k == 0
  if predictor == "reverse_diffusion":
    mean, std = (2.0 - a) * x + g2 * score, jnp.sqrt(g2)
  elif predictor == "ancestral":
    mean = (x + g2 * score) / a
    std = jnp.sqrt(g2 if variance == "fixed_large" else disc.posterior_variance[k])
  else:
    b = disc.em_b[k]
    mean, std = x + disc.em_drift[k] * x + b * score, jnp.sqrt(b)
  return jnp.where(last, x0, mean + std * noise)


def langevin_step(disc: Discretization, x: jax.Array, score: jax.Array, k: jax.Array,
                  noise: jax.Array, snr: jax.Array, norms: str = "batch") -> jax.Array:
  """One Langevin corrector step at entry k with the step size that sets the signal-to-noise
  ratio |e s| / |sqrt(2 e) z| to snr sqrt(alpha), the norms averaged over the batch
  (norms='batch') or per example ('example').

  References: Song et al. 2021, algorithm 5 (VE) and 6 (VP); the official `sampling.py`
  (batch-averaged norms).
  """
  axes = tuple(range(1, x.ndim))
  score_norm = jnp.sqrt(jnp.sum(score ** 2, axis=axes, keepdims=True))
  noise_norm = jnp.sqrt(jnp.sum(noise ** 2, axis=axes, keepdims=True))
  if norms == "batch":
    score_norm, noise_norm = jnp.mean(score_norm), jnp.mean(noise_norm)
  step = 2.0 * disc.alpha[k] * (snr * noise_norm / jnp.maximum(score_norm, 1e-20)) ** 2
  return x + step * score + jnp.sqrt(2.0 * step) * noise


def sample(model_fn: base.ModelFn, schedule: Schedule, shape: Sequence[int], rng: jax.Array, *,
           sde: str = "vp", predictor: str = "reverse_diffusion", corrector: str = "langevin",
           corrector_steps: int = 1, snr: float | jax.Array = DEFAULT_SNR,
           langevin_norms: str = "batch",
           prediction: str = "eps", variance: str = "fixed_small",
           thresholding: str = thresholding_lib.DEFAULT,
           dynamic_percentile: float = thresholding_lib.DEFAULT_PERCENTILE,
           clip_denoised: bool | None = None, timesteps: jax.Array | None = None,
           x_init: jax.Array | None = None, inpaint: inpainting.Inpaint | None = None,
           trajectory_stride: int = 0):
  """Predictor-corrector sampling over every entry of `schedule` (N steps) through the driver.

  Args:
    model_fn: `(x_t [B, ...], t [B]) -> output` (the VP input at the entry's timestep).
    schedule: the (respaced) schedule, N entries (`plan('pc', schedule, N)`).
    shape: (B, ...).
    rng: a key or per-example keys [B] (streams in the module doc).
    sde: 'vp' or 've' (static).
    predictor: 'reverse_diffusion', 'euler_maruyama' or 'ancestral' (static).
    corrector: 'langevin' or 'none' (static).
    corrector_steps: Langevin steps per step, >= 1 (static; unused with corrector='none').
    snr: the corrector's signal-to-noise ratio (per call, may be traced).
    langevin_norms: 'batch' (the authors') or 'example' (static; see the module doc).
    prediction: 'eps', 'x0' or 'v'.
    variance: learned-variance channels are split off; 'fixed_large' gives the ancestral
      predictor the variance G^2, any other its posterior variance.
    thresholding, dynamic_percentile, clip_denoised: the x0 policy, as `ancestral.sample`;
      the score is formed from the policy's x0.
    timesteps: int [N] network timestep per entry (respacing; may be traced) or None.
    x_init: optional VP noise [B, ...] to start from (default: from fold_in(key_b, N)); the VE
      start is sqrt(1 + sigma_max^2) times it, the VP prior at that level (as `samplers.ode`).
    inpaint, trajectory_stride: see `driver.run_reverse`; the state (and the trajectory) is in
      the SDE's variable.

  Returns:
    Samples [B, ...] float32, or (samples, trajectory) when `trajectory_stride` > 0.

  References: Song et al. 2021, algorithm 1 and appendix G; the official `sampling.py`.
  """
  _checks.check_choice("sde", sde, SDES)
  _checks.check_choice("predictor", predictor, PREDICTORS)
  _checks.check_choice("corrector", corrector, CORRECTORS)
  _checks.check_choice("langevin_norms", langevin_norms, LANGEVIN_NORMS)
  if int(corrector_steps) < 1:
    raise ValueError(f"corrector_steps must be >= 1, got {corrector_steps}.")
  num_corrector = int(corrector_steps) if corrector == "langevin" else 0
  check_terminal_level(schedule, sde, predictor)
  thresholding = base.resolve_thresholding(thresholding, clip_denoised)
  num_steps = schedule.num_timesteps
  shape, keys, x = base.start(rng, shape, num_steps, x_init, prediction=prediction,
                              variance=variance, timesteps=timesteps, thresholding=thresholding,
                              percentile=dynamic_percentile)
  disc = discretize(schedule, sde)
  x = x * jnp.sqrt(disc.scale[-1] ** 2 + disc.sigma[-1] ** 2)     # 1 for VP

  def score(x, k):
    """(-eps / sigma, x0) at entry k, eps re-derived from the policy's x0: [B, ...] each."""
    vp_scale = 1.0 / jnp.sqrt(disc.scale[k] ** 2 + disc.sigma[k] ** 2)   # x -> the VP input
    t = jnp.full((shape[0],), k, jnp.int32)
    x_vp = x * vp_scale
    pred = base.prediction_part(base.call_model(model_fn, x_vp, t, timesteps), x, variance)
    x0 = forward.predict_x0(schedule, pred, x_vp, t, prediction)
    x0 = thresholding_lib.threshold_x0(x0, thresholding, dynamic_percentile)
    eps = (x - disc.scale[k] * x0) / disc.sigma[k]
    return sde_lib.score_from_eps(eps, disc.sigma[k]), x0

  def step(x, carry, i, noise):
    k = num_steps - 1 - i
    for c in range(num_corrector):
      z = base.step_noise(keys, 2 * num_steps + 1 + k * num_corrector + c, shape)
      x = langevin_step(disc, x, score(x, k)[0], k, z, snr, langevin_norms)
    return predictor_step(predictor, disc, x, *score(x, k), k, noise, variance), carry

  return driver.run_reverse(step, x, keys, levels(disc), inpaint=inpaint,
                            trajectory_stride=trajectory_stride)
