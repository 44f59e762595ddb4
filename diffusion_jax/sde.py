"""VE and VP SDEs in continuous time, t in [0, 1]: drift, diffusion, marginals, prior.

  VP: dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw,  beta(t) = beta_min + t (beta_max - beta_min);
      x_t | x_0 ~ N(m(t) x_0, (1 - m(t)^2) I),  log m(t) = -t^2 (beta_max - beta_min) / 4
      - t beta_min / 2;  prior N(0, I).
  VE: dx = sqrt(d sigma(t)^2 / dt) dw,  sigma(t) = sigma_min (sigma_max / sigma_min)^t;
      x_t | x_0 ~ N(x_0, sigma(t)^2 I) (the sigma_min^2 offset neglected, as the authors do);
      prior N(0, sigma_max^2 I).

The VP SDE is the limit of this library's linear DDPM schedule: `schedules.linear_betas(N)`
(rescaled to N steps) is linspace(beta_min / N, beta_max / N, N) with the defaults 0.1 and 20
(`vp_schedule`), i.e. beta_i = beta(t_i) / N on t_i = i / (N - 1), and its alpha_bar_i tends to
m((i + 1) / N)^2 as N grows (tests/test_samplers_pc.py). A trained discrete model is wrapped by
its score, -eps(x, t) / sqrt(1 - alpha_bar_t) (`score_from_eps`); the predictor-corrector
sampler (`samplers.pc`) uses it on the model's own levels.

References: Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential
Equations", sec. 3.4 and appendix B (VE, VP); the official `sde_lib.py`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import schedules


class VPSDE(NamedTuple):
  """Variance-preserving SDE with a linear beta(t) (DDPM's continuous limit)."""
  beta_min: float = 0.1
  beta_max: float = 20.0


class VESDE(NamedTuple):
  """Variance-exploding SDE with a geometric sigma(t) (SMLD / NCSN's continuous limit)."""
  sigma_min: float = 0.01
  sigma_max: float = 50.0


SDE = Union[VPSDE, VESDE]


def _check(sde: SDE) -> None:
  if isinstance(sde, VPSDE):
    if not 0.0 <= sde.beta_min < sde.beta_max:
      raise ValueError(f"VPSDE needs 0 <= beta_min < beta_max, got {sde}.")
  elif isinstance(sde, VESDE):
    if not 0.0 < sde.sigma_min < sde.sigma_max:
      raise ValueError(f"VESDE needs 0 < sigma_min < sigma_max, got {sde}.")
  else:
    raise ValueError(f"sde must be a VPSDE or a VESDE, got {type(sde).__name__}.")


def beta(sde: VPSDE, t: jax.Array) -> jax.Array:
  """beta(t) of the VP SDE, [...] like t."""
  return sde.beta_min + t * (sde.beta_max - sde.beta_min)


def ve_sigma(sde: VESDE, t: jax.Array) -> jax.Array:
  """sigma(t) = sigma_min (sigma_max / sigma_min)^t of the VE SDE."""
  return sde.sigma_min * (sde.sigma_max / sde.sigma_min) ** t


def drift(sde: SDE, x: jax.Array, t: jax.Array) -> jax.Array:
  """f(x, t) [B, ...] for x [B, ...] and t [B]."""
  _check(sde)
  if isinstance(sde, VESDE):
    return jnp.zeros_like(x)
  return -0.5 * _expand(beta(sde, t), x) * x


def diffusion(sde: SDE, t: jax.Array) -> jax.Array:
  """g(t) [B] for t [B]: sqrt(beta(t)) (VP), sigma(t) sqrt(2 log(sigma_max / sigma_min)) (VE)."""
  _check(sde)
  if isinstance(sde, VPSDE):
    return jnp.sqrt(beta(sde, t))
  return ve_sigma(sde, t) * np.sqrt(2.0 * np.log(sde.sigma_max / sde.sigma_min))


def marginal(sde: SDE, t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean coefficient m(t), std s(t)) [B] of x_t | x_0 ~ N(m x_0, s^2 I)."""
  _check(sde)
  if isinstance(sde, VESDE):
    return jnp.ones_like(t), ve_sigma(sde, t)
  log_mean = -0.25 * t ** 2 * (sde.beta_max - sde.beta_min) - 0.5 * t * sde.beta_min
  # 1 - m^2 as -expm1(2 log m): no cancellation at small t.
  return jnp.exp(log_mean), jnp.sqrt(-jnp.expm1(2.0 * log_mean))


def prior_std(sde: SDE) -> float:
  """Standard deviation of the prior p_1: 1 (VP) or sigma_max (VE)."""
  _check(sde)
  return 1.0 if isinstance(sde, VPSDE) else float(sde.sigma_max)


def prior_sample(sde: SDE, rng: jax.Array, shape: Sequence[int]) -> jax.Array:
  """x_1 ~ N(0, prior_std^2 I), float32 [shape]."""
  return prior_std(sde) * jax.random.normal(rng, tuple(shape), jnp.float32)


def reverse_drift(sde: SDE, x: jax.Array, t: jax.Array, score: jax.Array) -> jax.Array:
  """f(x, t) - g(t)^2 score [B, ...]: the reverse SDE's drift (time running backwards).

  References: Song et al. 2021, eq. 6 (Anderson 1982).
  """
  return drift(sde, x, t) - _expand(diffusion(sde, t) ** 2, x) * score


def score_from_eps(eps: jax.Array, std: jax.Array) -> jax.Array:
  """The score -eps / std of x = m x0 + std eps, for an eps-prediction [B, ...] and std [B]."""
  return -eps / _expand(std, eps)


def vp_schedule(sde: VPSDE, num_steps: int) -> schedules.Schedule:
  """The N-step discretisation beta_i = beta(i / (N - 1)) / N, i = 0 .. N-1 (the authors'
  `discrete_betas`; `schedules.linear_betas(N)` for the defaults).

  References: Song et al. 2021, appendix B (VP SDE as the limit of DDPM); `sde_lib.VPSDE`.
  """
  _check(sde)
  if num_steps < 2:
    raise ValueError(f"num_steps must be >= 2, got {num_steps}.")
  betas = np.linspace(sde.beta_min / num_steps, sde.beta_max / num_steps, num_steps,
                      dtype=np.float64)
  if betas[-1] >= 1.0:
    raise ValueError(f"beta_max / num_steps = {betas[-1]:g} >= 1: use more than {num_steps} steps.")
  return schedules.from_betas(betas)


def _expand(v: jax.Array, x: jax.Array) -> jax.Array:
  """v [B] (or a scalar) broadcast against x [B, ...]."""
  v = jnp.asarray(v, jnp.float32)
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim)) if v.ndim else v
