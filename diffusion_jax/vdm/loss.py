"""The VDM variational bound in continuous (or discrete) time: diffusion loss, prior and
reconstruction terms, bits per dimension, and the variance-minimising schedule gradients.

`eps_fn(z_t [B, ...], t [B] float in [0, 1]) -> eps_hat [B, ...]` is the noise prediction (a Flax
`apply` closed over params; condition on t or on gamma(t) inside it). `gamma_fn` is a schedule of
`diffusion_jax.vdm.gamma`. Every term is per example [B], in nats (summed over dimensions).

  diffusion (T = None): 0.5 E_t,eps[ gamma'(t) ||eps - eps_hat(z_t, t)||^2 ],   t ~ U(0, 1)
  diffusion (T steps):  0.5 T E[ expm1(gamma(t) - gamma(t - 1/T)) ||eps - eps_hat||^2 ],
                        t uniform on {1/T, ..., 1}
  prior:                KL(q(z_1 | x) || N(0, I))
  reconstruction:       -log p(x | z_0): 8-bit data (a softmax over the 256 levels, VDM's
                        decoder) or continuous data (Gaussian N(z_0 / alpha_0, sigma_0^2/alpha_0^2))

References: Kingma et al. 2021, "Variational Diffusion Models", eqs. 13, 15, 17 and appendix B-C
(low-discrepancy sampler, variance minimisation).
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax import _checks
from diffusion_jax import rng as rng_lib
from diffusion_jax.vdm import gamma as gamma_lib

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]
DECODERS = ("8bit", "gaussian")
NUM_LEVELS = 256


class VLBTerms(NamedTuple):
  """Per-example terms of the bound [B], in nats; `bpd` is their sum per dimension in bits."""
  diffusion: jax.Array
  prior: jax.Array
  reconstruction: jax.Array
  bpd: jax.Array


def _sum_flat(x: jax.Array) -> jax.Array:
  return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def _per_example(v: jax.Array, x: jax.Array) -> jax.Array:
  """[B] -> [B, 1, ..., 1] to broadcast against x [B, ...]."""
  return v.reshape((-1,) + (1,) * (x.ndim - 1))


def antithetic_times(rng: jax.Array, batch_size: int) -> jax.Array:
  """Low-discrepancy times [B] in [0, 1): (u + b / B) mod 1 for one u ~ U(0, 1).

  Each time is marginally uniform; together they cover [0, 1) evenly, which lowers the variance
  of the batch-mean loss.
  """
  u = jax.random.uniform(rng, ())
  return jnp.mod(u + jnp.arange(batch_size, dtype=jnp.float32) / batch_size, 1.0)


def diffusion_loss(eps_fn: EpsFn, gamma_fn: gamma_lib.GammaFn, x: jax.Array, t: jax.Array,
                   eps: jax.Array, *, num_steps: int | None = None) -> jax.Array:
  """The diffusion term [B] at given times t [B] and noise eps [B, ...] (a one-sample estimate).

  num_steps: None for continuous time (t in [0, 1)); T for the T-step bound, where t is first
    moved up to the grid {1/T, ..., 1} (ceil(t T) / T).
  """
  t = jnp.asarray(t, jnp.float32)
  if num_steps is None:
    g_t, dg_t = gamma_lib.gamma_and_derivative(gamma_fn, t)
    weight = 0.5 * dg_t
  else:
    if num_steps < 1:
      raise ValueError(f"num_steps must be a positive integer or None, got {num_steps}.")
    t = jnp.maximum(jnp.ceil(t * num_steps), 1.0) / num_steps
    g_t, g_s = gamma_fn(t), gamma_fn(t - 1.0 / num_steps)
    weight = 0.5 * num_steps * jnp.expm1(g_t - g_s)
  alpha, sigma = gamma_lib.alpha_sigma(_per_example(g_t, x))
  z_t = alpha * x + sigma * eps
  eps_hat = jnp.asarray(eps_fn(z_t, t), jnp.float32)
  return weight * _sum_flat(jnp.square(eps - eps_hat))


def prior_loss(gamma_1: jax.Array, x: jax.Array) -> jax.Array:
  """KL(N(alpha_1 x, sigma_1^2 I) || N(0, I)) [B] at gamma_1 = gamma(1) (a scalar)."""
  var_1 = jax.nn.sigmoid(gamma_1)
  mean_sq = jax.nn.sigmoid(-gamma_1) * jnp.square(x)
  # -log sigma_1^2 = -log sigmoid(gamma_1) = softplus(-gamma_1), exact for large |gamma_1|.
  return 0.5 * _sum_flat(var_1 + mean_sq + jax.nn.softplus(-gamma_1) - 1.0)


def levels_to_data(levels: jax.Array) -> jax.Array:
  """8-bit integer levels 0..255 -> bin centres in (-1, 1): 2 (k + 0.5) / 256 - 1."""
  return 2.0 * (jnp.asarray(levels, jnp.float32) + 0.5) / NUM_LEVELS - 1.0


def data_to_levels(x: jax.Array) -> jax.Array:
  """Inverse of `levels_to_data` (rounded): x in (-1, 1) -> int32 levels 0..255."""
  return jnp.clip(jnp.round((x + 1.0) * NUM_LEVELS / 2.0 - 0.5), 0, NUM_LEVELS - 1).astype(
      jnp.int32)


def reconstruction_loss(gamma_0: jax.Array, x: jax.Array, eps: jax.Array, *,
                        decoder: str = "8bit") -> jax.Array:
  """-log p(x | z_0) [B] with z_0 = alpha_0 x + sigma_0 eps, gamma_0 = gamma(0) (a scalar).

  decoder: '8bit' (x on the bin centres of `levels_to_data`; a categorical over the 256 levels
    with logits -0.5 (z_0 / alpha_0 - level)^2 / exp(gamma_0), as VDM) or 'gaussian' (continuous
    x; density N(x; z_0 / alpha_0, exp(gamma_0))).
  """
  _checks.check_choice("decoder", decoder, DECODERS)
  # z_0 / alpha_0 = x + (sigma_0 / alpha_0) eps, and sigma_0 / alpha_0 = exp(gamma_0 / 2).
  z_rescaled = x + jnp.exp(0.5 * gamma_0) * eps
  if decoder == "gaussian":
    return 0.5 * _sum_flat(jnp.square(x - z_rescaled) * jnp.exp(-gamma_0) + gamma_0
                           + math.log(2.0 * math.pi))
  grid = levels_to_data(jnp.arange(NUM_LEVELS))
  logits = -0.5 * jnp.square(z_rescaled[..., None] - grid) * jnp.exp(-gamma_0)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_probs, data_to_levels(x)[..., None], axis=-1)[..., 0]
  return -_sum_flat(picked)


def vlb_terms(eps_fn: EpsFn, gamma_fn: gamma_lib.GammaFn, x: jax.Array, rng: jax.Array, *,
              num_steps: int | None = None, decoder: str = "8bit",
              antithetic: bool = True) -> VLBTerms:
  """One-sample estimate of every term of the bound for x [B, ...].

  rng: one key (times, diffusion noise and decoder noise each drawn for the whole batch), or
    per-example keys [B] (example b's noises from its own key, as the trainer and the
    evaluation pass them; the antithetic offset then comes from the first key).
  antithetic: low-discrepancy times (`antithetic_times`) instead of independent U(0, 1) times.

  Returns VLBTerms of [B] arrays; `bpd` = (diffusion + prior + reconstruction) / (D ln 2) with D
  the number of dimensions of one example.
  """
  batch = x.shape[0]
  if rng_lib.is_single_key(rng):
    key_t, key_eps, key_0 = jax.random.split(rng, 3)
    eps, eps_0 = jax.random.normal(key_eps, x.shape), jax.random.normal(key_0, x.shape)
    t = (antithetic_times(key_t, batch) if antithetic
         else jax.random.uniform(key_t, (batch,)))
  else:
    eps = rng_lib.normal(rng_lib.fold_in_all(rng, 1), x.shape[1:])
    eps_0 = rng_lib.normal(rng_lib.fold_in_all(rng, 2), x.shape[1:])
    t = (antithetic_times(jax.random.fold_in(rng[0], 3), batch) if antithetic
         else jax.vmap(jax.random.uniform)(rng_lib.fold_in_all(rng, 3)))
  diffusion = diffusion_loss(eps_fn, gamma_fn, x, t, eps, num_steps=num_steps)
  ends = gamma_fn(jnp.array([0.0, 1.0], jnp.float32))
  prior = prior_loss(ends[1], x)
  recon = reconstruction_loss(ends[0], x, eps_0, decoder=decoder)
  dims = math.prod(x.shape[1:])
  return VLBTerms(diffusion, prior, recon, (diffusion + prior + recon) / (dims * math.log(2.0)))


def variance_minimising_grads(per_example_loss: Callable[[Any], jax.Array], params: Any,
                              is_shape_param: Callable[[tuple], bool]) -> tuple[jax.Array, Any]:
  """(mean loss, grads) where the schedule-shape parameters get the gradient of the mean
  *squared* loss and every other parameter the gradient of the mean loss.

  The expected continuous-time loss depends on the schedule only through its end points, so the
  shape parameters are free to lower the estimator's variance E[L^2] - E[L]^2, whose gradient
  w.r.t. them is that of E[L^2] (VDM, sec. 5.2).

  per_example_loss: params -> [B] losses; is_shape_param: key path (tuple of names) -> bool,
  e.g. `lambda path: 'shape' in path` for `LearnedGamma`'s parameters.
  """
  loss, grads_mean = jax.value_and_grad(lambda p: jnp.mean(per_example_loss(p)))(params)
  grads_sq = jax.grad(lambda p: jnp.mean(jnp.square(per_example_loss(p))))(params)
  pick = lambda path, g_mean, g_sq: g_sq if is_shape_param(
      tuple(getattr(k, "key", getattr(k, "name", k)) for k in path)) else g_mean
  return loss, jax.tree_util.tree_map_with_path(pick, grads_mean, grads_sq)
