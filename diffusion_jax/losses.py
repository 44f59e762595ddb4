"""Training losses, the variational bound's pieces, and bits per dimension.

`model_fn(x_t, t) -> output` is any function of noisy data [B, ...] and int32 timesteps [B]
(a Flax `apply` closed over params, labels and dropout keys); its output is [B, ...] or, for the
learned variances, [B, ..., 2C]. Every loss returns one value per example [B]; callers average.
VLB terms are in bits per dimension (nats / (D ln 2)), as in the improved-DDPM code.

References:
  Ho et al. 2020, eqs. 5, 12-14 (L_simple) and sec. 3.3 (decoder).
  Nichol & Dhariwal 2021, sec. 3.1 (L_hybrid = L_simple + 0.001 L_vlb) and appendix.
  Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy", sec. 3.4.
  Choi et al. 2022, "Perception Prioritized Training of Diffusion Models", eq. 8 (P2).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.special import log_ndtr

from diffusion_jax import _checks
from diffusion_jax import forward
from diffusion_jax import reverse
from diffusion_jax import rng as rng_lib
from diffusion_jax.schedules import Schedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]

LOSS_TYPES = ("mse", "l1", "kl", "hybrid")
WEIGHTINGS = ("none", "min_snr", "p2")


def mean_flat(x: jax.Array) -> jax.Array:
  """Mean over every axis but the first: [B, ...] -> [B]."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# --- VLB pieces ------------------------------------------------------------------------------------

def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _log_ndtr_diff(upper: jax.Array, lower: jax.Array) -> jax.Array:
  """log(Phi(upper) - Phi(lower)) for upper >= lower, computed in the lower tail for accuracy."""
  # Phi(u) - Phi(l) = Phi(-l) - Phi(-u); use whichever pair lies further in the left tail.
  flip = (upper + lower) > 0
  a = jnp.where(flip, -lower, upper)   # the larger argument of the pair we evaluate
  b = jnp.where(flip, -upper, lower)
  log_a, log_b = log_ndtr(a), log_ndtr(b)
  return log_a + jnp.log1p(-jnp.exp(jnp.minimum(log_b - log_a, 0.0)))


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array,
                                        log_scales: jax.Array) -> jax.Array:
  """log p(x) elementwise under a Gaussian discretised to 256 bins on [-1, 1].

  Bin k (k = 0..255) is centred at x = 2k/255 - 1 with width 2/255; the first and last bins
  extend to -inf and +inf, so the 256 probabilities sum to exactly 1.

  Args:
    x: [...] data on the 256-level grid in [-1, 1].
    means: [...] Gaussian means.
    log_scales: [...] log standard deviations (not variances).

  Returns:
    [...] log-likelihoods in nats.

  References: Ho et al. 2020, eq. 13.
  """
  inv_std = jnp.exp(-log_scales)
  centered = x - means
  upper = (centered + 1.0 / 255.0) * inv_std
  lower = (centered - 1.0 / 255.0) * inv_std
  log_cdf_upper = log_ndtr(upper)             # x at the bottom edge: P(X < x + 1/255)
  log_one_minus_cdf_lower = log_ndtr(-lower)  # x at the top edge: P(X > x - 1/255)
  log_mid = _log_ndtr_diff(upper, lower)
  return jnp.where(x < -0.999, log_cdf_upper,
                   jnp.where(x > 0.999, log_one_minus_cdf_lower, log_mid))


def vb_term(schedule: Schedule, model_output: jax.Array, x0: jax.Array, xt: jax.Array,
            t: jax.Array, *, prediction: str = "eps", variance: str = "fixed_small",
            clip_denoised: bool = False) -> jax.Array:
  """The VLB term at t per example, in bits/dim [B].

  t > 0: L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)); t = 0: the decoder's
  -log p(x0 | x_1) under the discretised Gaussian (the DDPM code's index t = 0 is the paper's t = 1).

  Args:
    schedule: the diffusion schedule.
    model_output: [B, ...] (or [B, ..., 2C] for learned variances) at (xt, t).
    x0: [B, ...] data in [-1, 1] on the 256-level grid; xt: [B, ...]; t: int32 [B].
    prediction, variance, clip_denoised: as in `reverse.p_mean_variance`.

  References: Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021, sec. 3.1.
  """
  true_mean, _, true_log_var = forward.q_posterior_mean_variance(schedule, x0, xt, t)
  moments = reverse.p_mean_variance(schedule, model_output, xt, t, prediction=prediction,
                                    variance=variance, clip_denoised=clip_denoised)
  kl = mean_flat(normal_kl(true_mean, true_log_var, moments.mean, moments.log_variance))
  nll = -mean_flat(discretized_gaussian_log_likelihood(x0, moments.mean,
                                                       0.5 * moments.log_variance))
  return jnp.where(jnp.asarray(t) == 0, nll, kl) / math.log(2.0)


def prior_bpd(schedule: Schedule, x0: jax.Array) -> jax.Array:
  """KL(q(x_{T-1} | x0) || N(0, I)) per example, in bits/dim [B] (not trainable).

  References: Ho et al. 2020, eq. 5 (L_T).
  """
  t_last = jnp.full((x0.shape[0],), schedule.num_timesteps - 1, jnp.int32)
  mean, _, log_var = forward.q_mean_variance(schedule, x0, t_last)
  return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / math.log(2.0)


# --- Training losses ------------------------------------------------------------------------------

def snr_weight(schedule: Schedule, t: jax.Array, *, prediction: str, weighting: str,
               min_snr_gamma: float = 5.0, p2_gamma: float = 1.0, p2_k: float = 1.0
               ) -> jax.Array:
  """Per-example loss weights [B] for a weighting of the regression loss.

  'none': 1. 'min_snr': min(SNR, gamma) expressed for the prediction target: divided by SNR for
  eps, by SNR + 1 for v, as is for x0 (Hang et al. 2023, eq. 8 and sec. 3.4). 'p2':
  1 / (k + SNR)^gamma (Choi et al. 2022, eq. 8; defined for the eps loss and applied as is to the
  chosen target).
  """
  _checks.check_choice("weighting", weighting, WEIGHTINGS)
  snr = forward.extract(schedule.snr, t, 1)
  if weighting == "none":
    return jnp.ones_like(snr)
  if weighting == "p2":
    return 1.0 / (p2_k + snr) ** p2_gamma
  clipped = jnp.minimum(snr, min_snr_gamma)
  if prediction == "eps":
    # min(SNR, gamma) / SNR written as min(1, gamma / SNR): 1 (not 0/0) at zero terminal SNR.
    return jnp.minimum(1.0, min_snr_gamma / snr)
  if prediction == "v":
    return clipped / (snr + 1.0)
  return clipped


def training_loss(model_fn: ModelFn, schedule: Schedule, x0: jax.Array, rng: jax.Array, *,
                  prediction: str = "eps", loss_type: str = "mse", weighting: str = "none",
                  variance: str | None = None, min_snr_gamma: float = 5.0,
                  p2_gamma: float = 1.0, p2_k: float = 1.0, vlb_weight: float = 0.001,
                  t: jax.Array | None = None, noise: jax.Array | None = None) -> jax.Array:
  """The per-example diffusion training loss [B] at uniformly drawn timesteps.

  Draws t ~ Uniform{0..T-1} and eps ~ N(0, I) per example from its own key, forms
  x_t = q_sample(x0, t, eps) and evaluates the model there.

  Args:
    model_fn: `(x_t [B, ...], t int32 [B]) -> output`.
    schedule: the diffusion schedule.
    x0: [B, ...] data in [-1, 1].
    rng: a key or per-example keys [B] (see `diffusion_jax.rng`).
    prediction: the model's target, 'eps', 'x0' or 'v'.
    loss_type: 'mse' / 'l1' (regression on the target, mean over dims), 'kl' (the VLB term
      L_t in bits/dim, for fixed or learned variances), 'hybrid' (mse + vlb_weight * T * L_t with
      the mean's gradient stopped inside L_t; needs a learned variance).
    weighting: 'none', 'min_snr' or 'p2' (regression losses only).
    variance: the variance type ('fixed_small', 'fixed_large', 'learned', 'learned_range');
      defaults to 'learned_range' for 'hybrid' and 'fixed_small' otherwise. A model with learned
      variance (2C output channels) trained with 'mse' regresses its first C channels.
    min_snr_gamma, p2_gamma, p2_k: weighting parameters.
    vlb_weight: lambda of L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal 2021).
    t, noise: optional fixed timesteps [B] and noise [B, ...] instead of drawing them.

  Returns:
    Loss per example [B] (float32).

  References: Ho et al. 2020, eq. 14; Nichol & Dhariwal 2021, sec. 3.1; Hang et al. 2023;
  Choi et al. 2022.
  """
  forward.check_prediction(prediction)
  _checks.check_choice("loss_type", loss_type, LOSS_TYPES)
  _checks.check_choice("weighting", weighting, WEIGHTINGS)
  variance = reverse.resolve_variance(variance, loss_type)
  if loss_type == "hybrid" and variance not in reverse.LEARNED_VARIANCES:
    raise ValueError(f"loss_type='hybrid' trains the variance: it needs variance in "
                     f"{list(reverse.LEARNED_VARIANCES)}, got {variance!r}.")
  if loss_type in ("kl", "hybrid") and weighting != "none":
    raise ValueError(f"weighting={weighting!r} applies to the regression losses ('mse', 'l1'), "
                     f"not to loss_type={loss_type!r}.")

  batch = x0.shape[0]
  keys = rng_lib.example_keys(rng, batch) if (t is None or noise is None) else None
  if t is None:
    t = rng_lib.randint(rng_lib.fold_in_all(keys, 0), 0, schedule.num_timesteps)
  if noise is None:
    noise = rng_lib.normal(rng_lib.fold_in_all(keys, 1), x0.shape[1:], x0.dtype)
  xt = forward.q_sample(schedule, x0, t, noise)
  output = jnp.asarray(model_fn(xt, t), jnp.float32)
  pred, variance_output = reverse.split_output(output, xt, variance)

  if loss_type == "kl":
    return vb_term(schedule, output, x0, xt, t, prediction=prediction, variance=variance)

  target = forward.prediction_target(schedule, x0, t, noise, prediction)
  if loss_type == "l1":
    loss = mean_flat(jnp.abs(target - pred))
  else:
    loss = mean_flat((target - pred) ** 2)
  loss = loss * snr_weight(schedule, t, prediction=prediction, weighting=weighting,
                           min_snr_gamma=min_snr_gamma, p2_gamma=p2_gamma, p2_k=p2_k)
  if loss_type == "hybrid":
    frozen = jnp.concatenate([lax.stop_gradient(pred), variance_output], axis=-1)
    vb = vb_term(schedule, frozen, x0, xt, t, prediction=prediction, variance=variance)
    loss = loss + vlb_weight * schedule.num_timesteps * vb
  return loss


class BitsPerDim(NamedTuple):
  """The full variational bound per example, in bits/dim: total = prior + sum over t of terms."""
  total: jax.Array   # [B]
  prior: jax.Array   # [B]
  terms: jax.Array   # [B, T]; terms[:, 0] is the decoder NLL


def bits_per_dim(model_fn: ModelFn, schedule: Schedule, x0: jax.Array, rng: jax.Array, *,
                 prediction: str = "eps", variance: str = "fixed_small",
                 clip_denoised: bool = True) -> BitsPerDim:
  """The negative VLB of x0 in bits/dim: prior + all T terms + decoder, in one `lax.scan` over t.

  An upper bound on -log2 p(x0) / D for the discretised data.

  Args:
    model_fn: `(x_t [B, ...], t int32 [B]) -> output`.
    schedule: the diffusion schedule.
    x0: [B, ...] data on the 256-level grid in [-1, 1].
    rng: a key or per-example keys [B]; step t draws eps from fold_in(example key, t).
    prediction, variance, clip_denoised: as in `reverse.p_mean_variance`.

  Returns:
    `BitsPerDim(total [B], prior [B], terms [B, T])`.

  References: Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021, sec. 3.1 (calc_bpd_loop).
  """
  forward.check_prediction(prediction)
  reverse.check_variance(variance)
  batch = x0.shape[0]
  keys = rng_lib.example_keys(rng, batch)

  def term_at(_, step):
    t = jnp.full((batch,), step, jnp.int32)
    noise = rng_lib.normal(rng_lib.fold_in_all(keys, step), x0.shape[1:], x0.dtype)
    xt = forward.q_sample(schedule, x0, t, noise)
    output = jnp.asarray(model_fn(xt, t), jnp.float32)
    return None, vb_term(schedule, output, x0, xt, t, prediction=prediction, variance=variance,
                         clip_denoised=clip_denoised)

  _, terms = lax.scan(term_at, None, jnp.arange(schedule.num_timesteps))
  terms = terms.T
  prior = prior_bpd(schedule, x0)
  return BitsPerDim(total=prior + jnp.sum(terms, axis=1), prior=prior, terms=terms)
