"""Mask schedules of absorbing-state (masked) diffusion in continuous time, t in [0, 1].

A token of x is still visible at time t with probability alpha(t) and replaced by the mask
token otherwise; alpha decreases from alpha(0) = 1 (clean data) to alpha(1) = 0 (all masked).
Every schedule here is written through the masking probability m(t) = 1 - alpha(t), computed
directly (not as 1 - alpha) so that it stays accurate near t = 0, where the ELBO weight
-alpha'(t) / (1 - alpha(t)) = m'(t) / m(t) behaves like 1 / t:

  linear      m(t) = t                 (MDLM's log-linear schedule: alpha = 1 - t)
  cosine      m(t) = sin(pi t / 2)     (alpha = 1 - cos(pi / 2 (1 - t)), MD4's cosine)
  polynomial  m(t) = t^k, k > 0        (MD4's poly-k)

References: Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language Models" (MDLM),
sec. 3; Shi et al. 2024, "Simplified and Generalized Masked Diffusion for Discrete Data" (MD4),
sec. 2 and table 4.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax import _checks

ArrayFn = Callable[[jax.Array], jax.Array]

NAMES = ("linear", "cosine", "polynomial")


class MaskSchedule(NamedTuple):
  """The masking probability and its derivative as elementwise functions of t (any shape).

  mask_prob(t) = 1 - alpha(t), increasing from 0 at t = 0 to 1 at t = 1;
  mask_prob_derivative(t) = d mask_prob / dt = -alpha'(t) >= 0.
  """
  mask_prob: ArrayFn
  mask_prob_derivative: ArrayFn

  def alpha(self, t: jax.Array) -> jax.Array:
    """alpha(t): probability that a token is still visible at time t."""
    return 1.0 - self.mask_prob(t)

  def alpha_derivative(self, t: jax.Array) -> jax.Array:
    """alpha'(t) <= 0."""
    return -self.mask_prob_derivative(t)

  def elbo_weight(self, t: jax.Array) -> jax.Array:
    """-alpha'(t) / (1 - alpha(t)), the continuous-time ELBO's weight (finite for t > 0)."""
    return self.mask_prob_derivative(t) / self.mask_prob(t)


def _as_float(t: jax.Array) -> jax.Array:
  t = jnp.asarray(t)
  return t if jnp.issubdtype(t.dtype, jnp.floating) else t.astype(jnp.float32)


def linear() -> MaskSchedule:
  """alpha(t) = 1 - t."""
  return MaskSchedule(lambda t: _as_float(t), lambda t: jnp.ones_like(_as_float(t)))


def cosine() -> MaskSchedule:
  """alpha(t) = 1 - cos(pi / 2 (1 - t)), i.e. mask probability sin(pi t / 2)."""
  half_pi = 0.5 * math.pi
  return MaskSchedule(lambda t: jnp.sin(half_pi * _as_float(t)),
                      lambda t: half_pi * jnp.cos(half_pi * _as_float(t)))


def polynomial(exponent: float = 2.0) -> MaskSchedule:
  """alpha(t) = 1 - t^k with k = `exponent` > 0."""
  if not exponent > 0:
    raise ValueError(f"exponent must be > 0, got {exponent}.")
  k = float(exponent)
  return MaskSchedule(lambda t: _as_float(t) ** k,
                      lambda t: k * _as_float(t) ** (k - 1.0))


def get_mask_schedule(name: str, **kwargs) -> MaskSchedule:
  """A mask schedule by name: 'linear', 'cosine' or 'polynomial' (kwarg `exponent`)."""
  _checks.check_choice("mask schedule", name, NAMES)
  if name == "polynomial":
    _checks.check_keys("mask schedule 'polynomial'", kwargs, ("exponent",))
    return polynomial(**kwargs)
  _checks.check_keys(f"mask schedule {name!r}", kwargs, ())
  return {"linear": linear, "cosine": cosine}[name]()
