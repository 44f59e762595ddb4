"""What every sampler shares: per-example noise streams, the timestep map, the variance split.

Noise streams (per example key k_b, N = number of steps of the sampler): the initial noise is
drawn from fold_in(k_b, N), the noise of step index t (counting down N-1 .. 0; step number
i = N-1-t of the driver) from fold_in(k_b, t), and the re-noising of known pixels (inpainting)
to the level of step index t from fold_in(k_b, N + 1 + t). A sample is then a function of (key,
global example index) alone, whatever the batch size or device split.

References: Ho et al. 2020, algorithm 2 (the loop these samplers generalise).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from diffusion_jax import forward
from diffusion_jax import reverse
from diffusion_jax import rng as rng_lib
from diffusion_jax.samplers import thresholding as thresholding_lib

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def start(rng: jax.Array, shape: Sequence[int], num_steps: int, x_init: jax.Array | None, *,
          prediction: str, variance: str, timesteps: jax.Array | None = None,
          thresholding: str = thresholding_lib.DEFAULT,
          percentile: float = thresholding_lib.DEFAULT_PERCENTILE):
  """The common prologue of a sampler: checks its static arguments, makes the example keys and
  the initial state.

  Returns:
    (shape as a tuple of ints, example keys [B], initial x [B, ...] from `initial_noise`).
  """
  forward.check_prediction(prediction)
  reverse.check_variance(variance)
  thresholding_lib.check_thresholding(thresholding, percentile)
  if num_steps < 1:
    raise ValueError(f"A sampler needs at least one step, got num_steps={num_steps}.")
  check_timesteps(timesteps, num_steps)
  shape = tuple(int(s) for s in shape)
  keys = rng_lib.example_keys(rng, shape[0])
  return shape, keys, initial_noise(keys, shape, num_steps, x_init)


def initial_noise(keys: jax.Array, shape: Sequence[int], num_steps: int,
                  x_init: jax.Array | None) -> jax.Array:
  """x at the start of sampling [B, ...]: `x_init`, or standard normal from fold_in(k_b, N)."""
  shape = tuple(shape)
  if x_init is None:
    return rng_lib.normal(rng_lib.fold_in_all(keys, num_steps), shape[1:])
  if x_init.shape != shape:
    raise ValueError(f"x_init has shape {x_init.shape}, expected {shape}.")
  return jnp.asarray(x_init, jnp.float32)


def step_noise(keys: jax.Array, index: jax.Array, shape: Sequence[int]) -> jax.Array:
  """Standard normal [B, ...] for step index `index` (a scalar, possibly traced)."""
  return rng_lib.normal(rng_lib.fold_in_all(keys, index), tuple(shape)[1:])


def inpaint_noise(keys: jax.Array, index: jax.Array, num_steps: int,
                  shape: Sequence[int]) -> jax.Array:
  """Standard normal [B, ...] for re-noising known pixels at step `index`."""
  return step_noise(keys, num_steps + 1 + index, shape)


def call_model(model_fn: ModelFn, x: jax.Array, index: jax.Array,
               timesteps: jax.Array | None) -> jax.Array:
  """model_fn(x, t) in float32 with t = timesteps[index] (or index itself), broadcast to [B]."""
  t = index if timesteps is None else jnp.take(jnp.asarray(timesteps), index, axis=0)
  t = jnp.broadcast_to(t, (x.shape[0],))
  return jnp.asarray(model_fn(x, t), jnp.float32)


def check_timesteps(timesteps: jax.Array | None, num_steps: int) -> None:
  """Raises a ValueError unless timesteps is None or has shape [num_steps]."""
  if timesteps is not None and jnp.shape(timesteps) != (num_steps,):
    raise ValueError(f"timesteps must have shape ({num_steps},) (one per schedule entry), got "
                     f"{jnp.shape(timesteps)}.")


def prediction_part(output: jax.Array, x: jax.Array, variance: str) -> jax.Array:
  """The prediction channels of a model output (learned-variance channels split off)."""
  prediction, _ = reverse.split_output(output, x, variance)
  return prediction


def resolve_thresholding(thresholding: str, clip_denoised: bool | None) -> str:
  """The x0 policy from `thresholding` and the older boolean `clip_denoised` (True: 'clip',
  False: 'none'); giving both with different meanings is an error."""
  if clip_denoised is None:
    return thresholding
  legacy = "clip" if clip_denoised else "none"
  if thresholding not in (thresholding_lib.DEFAULT, legacy):
    raise ValueError(f"clip_denoised={clip_denoised} contradicts thresholding={thresholding!r}; "
                     "pass thresholding only (allowed: "
                     f"{list(thresholding_lib.THRESHOLDINGS)}).")
  return legacy
