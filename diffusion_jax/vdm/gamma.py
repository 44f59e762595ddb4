"""Noise schedules in continuous time as the negative log-SNR `gamma(t)`, t in [0, 1] (VDM).

alpha_t^2 = sigmoid(-gamma(t)), sigma_t^2 = sigmoid(gamma(t)), SNR(t) = exp(-gamma(t)); gamma
increases with t from gamma_min (almost clean data) to gamma_max (almost pure noise). A schedule
is any function `gamma_fn(t [B]) -> gamma [B]`, elementwise and differentiable, so that
`jax.jvp` gives gamma'(t). Fixed schedules are closures; the learned one is a Flax module whose
`apply` is such a function.

References: Kingma, Salimans, Poole & Ho 2021, "Variational Diffusion Models", sec. 3-5 and
appendix (the monotonic network with learned end points).
"""
from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax import _checks

GammaFn = Callable[[jax.Array], jax.Array]

# VDM's initial end points for CIFAR-10 (REFERENCE.md): log-SNR from 13.3 down to -5.
GAMMA_MIN = -13.3
GAMMA_MAX = 5.0
SHAPES = ("linear", "cosine")


def alpha_sigma(gamma: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(alpha, sigma) of the VP process at negative log-SNR `gamma` (any shape)."""
  return jnp.sqrt(jax.nn.sigmoid(-gamma)), jnp.sqrt(jax.nn.sigmoid(gamma))


def _cosine_shape(t: jax.Array, gamma_min: float, gamma_max: float) -> jax.Array:
  """The cosine schedule's log-SNR, -2 log tan(pi u / 2), on the u-interval whose log-SNR runs
  from -gamma_min to -gamma_max, rescaled to [0, 1] (so only its shape is kept)."""
  u_lo = 2.0 / math.pi * math.atan(math.exp(gamma_min / 2.0))
  u_hi = 2.0 / math.pi * math.atan(math.exp(gamma_max / 2.0))
  u = u_lo + (u_hi - u_lo) * t
  g = 2.0 * jnp.log(jnp.tan(0.5 * math.pi * u))
  return (g - gamma_min) / (gamma_max - gamma_min)


def fixed_gamma(shape: str = "linear", gamma_min: float = GAMMA_MIN,
                gamma_max: float = GAMMA_MAX) -> GammaFn:
  """A fixed schedule from gamma_min at t=0 to gamma_max at t=1.

  shape: 'linear' (gamma linear in t, VDM's fixed baseline) or 'cosine' (the cosine schedule's
    log-SNR curve between the same end points).
  """
  _checks.check_choice("shape", shape, SHAPES)
  if not gamma_min < gamma_max:
    raise ValueError(f"gamma_min={gamma_min} must be below gamma_max={gamma_max}.")
  if shape == "linear":
    return lambda t: gamma_min + (gamma_max - gamma_min) * jnp.asarray(t, jnp.float32)
  return lambda t: gamma_min + (gamma_max - gamma_min) * _cosine_shape(
      jnp.asarray(t, jnp.float32), gamma_min, gamma_max)


class LearnedGamma(nn.Module):
  """A learned monotonic schedule with learned end points.

  gamma(t) = gamma_min + softplus(r) * (h(t) - h(0)) / (h(1) - h(0)), with
  h(u) = a u + mean_j c_j sigmoid(w_j (2u - 1) + b_j) and a, c_j, w_j > 0 (softplus of free
  parameters): h is increasing, so gamma is monotonic by construction and meets its end points
  gamma_min and gamma_max = gamma_min + softplus(r) exactly. Initialised close to linear.

  Call: `LearnedGamma().apply(params, t [B]) -> gamma [B]`. The end points' parameters are
  `gamma_min` and `gamma_range`; the rest (`shape/...`) only shape the curve between them (the
  continuous diffusion loss does not depend on them in expectation, only its variance does).
  """
  gamma_min_init: float = GAMMA_MIN
  gamma_max_init: float = GAMMA_MAX
  num_features: int = 1024

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    t = jnp.asarray(t, jnp.float32)
    gamma_min = self.param("gamma_min", nn.initializers.constant(self.gamma_min_init), ())
    span = self.gamma_max_init - self.gamma_min_init
    raw_range = self.param("gamma_range", nn.initializers.constant(math.log(math.expm1(span))),
                           ())
    shape = _MonotoneShape(self.num_features, name="shape")
    h_t, h_0, h_1 = shape(t), shape(jnp.zeros_like(t)), shape(jnp.ones_like(t))
    return gamma_min + jax.nn.softplus(raw_range) * (h_t - h_0) / (h_1 - h_0)


class _MonotoneShape(nn.Module):
  """h(u) [B] for u [B]: increasing in u (positive weights through softplus)."""
  num_features: int

  @nn.compact
  def __call__(self, u: jax.Array) -> jax.Array:
    slope = jax.nn.softplus(self.param("slope", nn.initializers.constant(math.log(math.e - 1.0)),
                                       ()))   # softplus^-1(1): slope 1 at initialisation
    w = jax.nn.softplus(self.param("w", nn.initializers.normal(1.0), (self.num_features,)))
    b = self.param("b", nn.initializers.normal(1.0), (self.num_features,))
    c = jax.nn.softplus(self.param("c", nn.initializers.constant(-3.0), (self.num_features,)))
    bumps = jax.nn.sigmoid((2.0 * u[:, None] - 1.0) * w + b) @ c / self.num_features
    return slope * u + bumps


def gamma_and_derivative(gamma_fn: GammaFn, t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(gamma(t), gamma'(t)), both [B], by one forward-mode pass."""
  t = jnp.asarray(t, jnp.float32)
  return jax.jvp(gamma_fn, (t,), (jnp.ones_like(t),))
