"""Log-likelihood by the probability-flow ODE, and the VLB averaged over a dataset.

The probability-flow ODE is integrated in the VP variable y = x / sqrt(1 + sigma^2) (x the
sigma-space state, see `samplers.ode`) over s = log sigma, where it stays bounded:

  dy/ds = g(y, s) = c^2 y - c D(y / c; sigma),   c = 1 / sqrt(1 + sigma^2),

and along it d log p_y / ds = -div g. Heun's method from sigma_min (the data end) to sigma_max,
in one `lax.scan`, gives

  log p_{sigma_min}(x) = log N(y(sigma_max); 0, I) + int div g ds + D log c(sigma_min),

(the last term is the Jacobian of x -> y at sigma_min). The divergence is exact (D
Jacobian-vector products, for small D) or Hutchinson's estimate z^T (dg/dy) z with one probe z
per example held fixed along the path (one JVP per evaluation).

References:
  Song et al. 2021, "Score-Based Generative Modeling through SDEs", sec. 4.3 and appendix D.2.
  Grathwohl et al. 2019, "FFJORD", sec. 3.1 (Hutchinson's estimator).
  Karras et al. 2022 (sigma-space form of the ODE).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffusion_jax import _checks
from diffusion_jax import forward
from diffusion_jax import reverse
from diffusion_jax import rng as rng_lib
from diffusion_jax.samplers import base
from diffusion_jax.samplers import ode
from diffusion_jax.schedules import Schedule

TRACES = ("hutchinson", "exact")
PROBES = ("rademacher", "gaussian")


class OdeLikelihood(NamedTuple):
  """Per-example results, each [B]: log p (nats) = prior_log_p + delta_log_p (delta_log_p holds
  the integrated divergence and the Jacobian of x -> y at sigma_min)."""
  log_p: jax.Array
  prior_log_p: jax.Array
  delta_log_p: jax.Array


def _probe(keys: jax.Array, shape, kind: str) -> jax.Array:
  if kind == "gaussian":
    return rng_lib.normal(keys, shape)
  return jax.vmap(lambda k: jax.random.rademacher(k, tuple(shape), jnp.float32))(keys)


def ode_log_likelihood(model_fn: base.ModelFn, schedule: Schedule, x: jax.Array,
                       rng: jax.Array | None = None, *, num_steps: int = 100,
                       trace: str = "hutchinson", probe: str = "rademacher",
                       prediction: str = "eps", variance: str = "fixed_small",
                       sigma_min: jax.Array | None = None,
                       sigma_max: jax.Array | None = None) -> OdeLikelihood:
  """log p_{sigma_min}(x) under the probability-flow ODE, in nats, in one `lax.scan`.

  Args:
    model_fn: `(x_vp [B, ...], t [B] float) -> output` (fractional timesteps, see `ode`).
    schedule: the training schedule.
    x: [B, ...] data (the sigma-space state at sigma_min, e.g. images in [-1, 1], optionally
      dequantised by the caller).
    rng: a key or per-example keys [B] for the Hutchinson probes (unused for trace='exact').
    num_steps: Heun steps, uniform in log sigma (2 evaluations each).
    trace: 'hutchinson' or 'exact' (D JVPs per evaluation; for small D).
    probe: Hutchinson probe distribution, 'rademacher' or 'gaussian'.
    prediction, variance: the model's output type (learned-variance channels split off).
    sigma_min, sigma_max: the integration range (default: the training table's ends).

  Returns:
    `OdeLikelihood(log_p, prior_log_p, delta_log_p)`, each [B]. The N(0, I) prior stands for the
    true law at sigma_max (mean E[x0] / sqrt(1 + sigma_max^2)), an error of order
    |E[x0]| |y| / sigma_max in log p (about 5e-3 for mean 0.5 at sigma_max = 157).

  References: Song et al. 2021, eq. 39 and appendix D.2; Grathwohl et al. 2019.
  """
  forward.check_prediction(prediction)
  reverse.check_variance(variance)
  _checks.check_choice("trace", trace, TRACES)
  _checks.check_choice("probe", probe, PROBES)
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  x = jnp.asarray(x, jnp.float32)
  batch, dims = x.shape[0], int(np.prod(x.shape[1:]))
  table = ode.training_sigmas(schedule)
  lo = table[0] if sigma_min is None else jnp.asarray(sigma_min, jnp.float32)
  hi = table[-1] if sigma_max is None else jnp.asarray(sigma_max, jnp.float32)
  log_sigmas = jnp.linspace(jnp.log(lo), jnp.log(hi), num_steps + 1)
  if trace == "hutchinson":
    if rng is None:
      raise ValueError("trace='hutchinson' needs rng (a key or per-example keys).")
    z = _probe(rng_lib.example_keys(rng, batch), x.shape[1:], probe)

  def flow(y, log_sigma):
    sigma = jnp.exp(log_sigma)
    c = 1.0 / jnp.sqrt(1.0 + sigma ** 2)
    t = ode.sigma_to_t(schedule, sigma)
    x0 = ode.denoise(model_fn, y / c, sigma, t, prediction=prediction, variance=variance)
    return c ** 2 * y - c * x0

  def flow_and_div(x, log_sigma):
    f = lambda y: flow(y, log_sigma)
    if trace == "hutchinson":
      value, jz = jax.jvp(f, (x,), (z,))
      return value, jnp.sum((z * jz).reshape(batch, -1), axis=1)
    eye = jnp.eye(dims, dtype=x.dtype).reshape((dims, 1) + x.shape[1:])
    value = f(x)
    columns = jax.vmap(lambda e: jax.jvp(f, (x,), (jnp.broadcast_to(e, x.shape),))[1])(eye)
    diag = jnp.einsum("kbk->b", columns.reshape(dims, batch, dims))
    return value, diag

  def step(carry, i):
    x, delta = carry
    s, s_next = log_sigmas[i], log_sigmas[i + 1]
    f, div = flow_and_div(x, s)
    x_euler = x + (s_next - s) * f
    f_next, div_next = flow_and_div(x_euler, s_next)
    x_next = x + (s_next - s) * 0.5 * (f + f_next)
    return (x_next, delta + (s_next - s) * 0.5 * (div + div_next)), None

  c_min = 1.0 / jnp.sqrt(1.0 + jnp.exp(log_sigmas[0]) ** 2)
  (y_end, delta), _ = lax.scan(step, (c_min * x, jnp.zeros((batch,))), jnp.arange(num_steps))
  prior = (-0.5 * jnp.sum(y_end.reshape(batch, -1) ** 2, axis=1)
           - 0.5 * dims * math.log(2.0 * math.pi))
  delta = delta + dims * jnp.log(c_min)
  return OdeLikelihood(log_p=prior + delta, prior_log_p=prior, delta_log_p=delta)


def nats_to_bits_per_dim(log_p: jax.Array, num_dims: int, data_scale: float = 127.5) -> jax.Array:
  """-log2 p per dimension on the 8-bit scale, for data mapped to [-1, 1] by u / 127.5 - 1.

  References: Song et al. 2021, appendix D.2 (bits/dim of a dequantised density).
  """
  return (-log_p / num_dims + math.log(data_scale)) / math.log(2.0)


def mean_over_batches(fn: Callable[[Any], jax.Array], batches: Iterable[Any]) -> tuple[float, int]:
  """The mean of fn(batch) over every real example of every batch (float64 accumulation).

  A dataset loop for `losses.bits_per_dim(...).total` or `ode_log_likelihood` (the caller jits or
  pmaps `fn`). A batch may be a dict with a boolean 'mask' shaped like fn's output (padding
  examples are False, as `data.make_eval_iterator` yields); other batches count every value.

  Returns:
    (mean, number of examples counted).
  """
  total, count = 0.0, 0
  for batch in batches:
    values = np.asarray(jax.device_get(fn(batch)), np.float64)
    if isinstance(batch, dict) and "mask" in batch:
      values = values[np.asarray(batch["mask"], bool).reshape(values.shape)]
    total += float(values.sum())
    count += values.size
  if count == 0:
    raise ValueError("batches held no examples.")
  return total / count, count
