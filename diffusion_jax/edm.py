"""EDM's design space: network preconditioning, the training noise distribution and loss weight.

A raw network F(u, c_noise) becomes the denoiser D(x; sigma) = c_skip x + c_out F(c_in x, c_noise),
with the coefficients of one of the paper's parameterisations (table 1):

  'edm': c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
         c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4          (sd = sigma_data)
  've':  c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma / 2)
  'vp':  c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1), c_noise = (M - 1) t(sigma),
         t(sigma) the continuous VP time of sigma (beta_d = 19.9, beta_min = 0.1, M = 1000)

Training draws ln(sigma) ~ N(P_mean, P_std^2) ('edm'; -1.2, 1.2) and weights the squared error by
lambda(sigma) = 1 / c_out^2, which for 'edm' is (sigma^2 + sd^2) / (sigma sd)^2 and for 've'/'vp'
1 / sigma^2. A trained discrete VP model of this library (eps prediction) is sampled in sigma
space through `diffusion_jax.samplers.ode.denoise` (table 1's iDDPM column).

References: Karras, Aittala, Aila & Laine 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", table 1, eqs. 2, 7-8 and appendix B.6.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax import _checks
from diffusion_jax import rng as rng_lib

RawFn = Callable[[jax.Array, jax.Array], jax.Array]   # (c_in x [B, ...], c_noise [B]) -> F [B, ...]
PRECONDITIONINGS = ("edm", "ve", "vp")
SIGMA_DATA = 0.5
P_MEAN, P_STD = -1.2, 1.2
VP_BETA_D, VP_BETA_MIN, VP_M = 19.9, 0.1, 1000


class Coefficients(NamedTuple):
  """c_skip, c_out, c_in, c_noise, each of sigma's shape."""
  c_skip: jax.Array
  c_out: jax.Array
  c_in: jax.Array
  c_noise: jax.Array


def _check(precond: str) -> None:
  _checks.check_choice("precond", precond, PRECONDITIONINGS)


def vp_time(sigma: jax.Array) -> jax.Array:
  """The continuous VP time t of sigma: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
  log1p_s2 = jnp.log1p(jnp.square(sigma))
  return (jnp.sqrt(VP_BETA_MIN**2 + 2.0 * VP_BETA_D * log1p_s2) - VP_BETA_MIN) / VP_BETA_D


def coefficients(sigma: jax.Array, *, precond: str = "edm",
                 sigma_data: float = SIGMA_DATA) -> Coefficients:
  """The preconditioning coefficients at noise level sigma (any shape, > 0)."""
  _check(precond)
  sigma = jnp.asarray(sigma, jnp.float32)
  one = jnp.ones_like(sigma)
  if precond == "edm":
    norm = jnp.sqrt(jnp.square(sigma) + sigma_data**2)
    return Coefficients(sigma_data**2 / jnp.square(norm), sigma * sigma_data / norm, 1.0 / norm,
                        jnp.log(sigma) / 4.0)
  if precond == "ve":
    return Coefficients(one, sigma, one, jnp.log(0.5 * sigma))
  return Coefficients(one, -sigma, 1.0 / jnp.sqrt(jnp.square(sigma) + 1.0),
                      (VP_M - 1) * vp_time(sigma))


def denoiser(raw_fn: RawFn, x: jax.Array, sigma: jax.Array, *, precond: str = "edm",
             sigma_data: float = SIGMA_DATA) -> jax.Array:
  """D(x; sigma) [B, ...] = c_skip x + c_out F(c_in x, c_noise) for x [B, ...], sigma [B]."""
  c = coefficients(sigma, precond=precond, sigma_data=sigma_data)
  bcast = lambda v: v.reshape((-1,) + (1,) * (x.ndim - 1))
  raw = jnp.asarray(raw_fn(bcast(c.c_in) * x, c.c_noise), jnp.float32)
  return bcast(c.c_skip) * x + bcast(c.c_out) * raw


def loss_weight(sigma: jax.Array, *, precond: str = "edm",
                sigma_data: float = SIGMA_DATA) -> jax.Array:
  """lambda(sigma) = 1 / c_out(sigma)^2: the squared error of D weighted as that of F."""
  return 1.0 / jnp.square(coefficients(sigma, precond=precond, sigma_data=sigma_data).c_out)


def training_sigmas(rng: jax.Array, batch_size: int, *, p_mean: float = P_MEAN,
                    p_std: float = P_STD) -> jax.Array:
  """Noise levels [B] with ln(sigma) ~ N(p_mean, p_std^2) (EDM's training distribution)."""
  return jnp.exp(p_mean + p_std * jax.random.normal(rng, (batch_size,)))


def training_loss(raw_fn: RawFn, x0: jax.Array, rng: jax.Array | None, *, precond: str = "edm",
                  sigma_data: float = SIGMA_DATA, p_mean: float = P_MEAN,
                  p_std: float = P_STD, sigma: jax.Array | None = None,
                  noise: jax.Array | None = None) -> jax.Array:
  """Per-example loss [B]: lambda(sigma) * mean over dimensions of (D(x0 + sigma n; sigma) - x0)^2.

  rng: one key, or per-example keys [B] (example b's sigma and noise from its own key); may be
    None when both `sigma` and `noise` are given.
  sigma: [B] noise levels; default drawn log-normally (`training_sigmas`).
  noise: [B, ...] standard normal noise n; default drawn from rng.
  """
  batch = x0.shape[0]
  if sigma is None or noise is None:
    if rng is None:
      raise ValueError("rng may be None only when both sigma and noise are given.")
    if rng_lib.is_single_key(rng):
      key_sigma, key_noise = jax.random.split(rng)
      draw_sigma = lambda: training_sigmas(key_sigma, batch, p_mean=p_mean, p_std=p_std)
      draw_noise = lambda: jax.random.normal(key_noise, x0.shape)
    else:
      draw_sigma = lambda: jnp.exp(p_mean + p_std * jax.vmap(
          lambda k: jax.random.normal(k, ()))(rng_lib.fold_in_all(rng, 0)))
      draw_noise = lambda: rng_lib.normal(rng_lib.fold_in_all(rng, 1), x0.shape[1:])
    sigma = draw_sigma() if sigma is None else sigma
    noise = draw_noise() if noise is None else noise
  noisy = x0 + sigma.reshape((-1,) + (1,) * (x0.ndim - 1)) * noise
  denoised = denoiser(raw_fn, noisy, sigma, precond=precond, sigma_data=sigma_data)
  per_dim = jnp.square(denoised - x0)
  return loss_weight(sigma, precond=precond, sigma_data=sigma_data) * jnp.mean(
      per_dim, axis=tuple(range(1, x0.ndim)))


def vp_sigma(t: jax.Array) -> jax.Array:
  """sigma(t) of the continuous VP process (inverse of `vp_time`)."""
  return jnp.sqrt(jnp.expm1(0.5 * VP_BETA_D * jnp.square(t) + VP_BETA_MIN * t))

