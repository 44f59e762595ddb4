"""The one reverse-process driver: every sampler is a pure step run by `run_reverse`.

A sampler supplies `step(x, carry, i, noise) -> (x, carry)` (i = 0 .. N-1 counts the steps
taken, `carry` holds whatever a multistep method remembers, `noise` is the step's standard
normal draw, unused by deterministic methods and then removed by XLA) and the level of its state
before each step (`Levels`). The driver owns what is common to all of them:

  * the loop: one `lax.scan` of N steps (a nested scan of N / stride chunks with trajectories),
    so the program does not grow with N;
  * the noise streams of `samplers.base` (per-example keys; step i draws fold_in(k_b, N-1-i));
  * inpainting: the known pixels, noised to the level of the state, replace x before the first
    step and after every step, the clean ones after the last (`samplers.inpainting`);
  * trajectories: x after every `stride` steps, its last entry equal to the output.

Guidance is a `model_fn` wrapper (`samplers.guidance`), so it works with every step unchanged;
the x0 thresholding policy (`samplers.thresholding`) is a setting every step applies to its x0.

References: Song et al. 2021, "Score-Based Generative Modeling through SDEs", sec. 4 and the
official `sampling.py` (one loop, pluggable predictor / corrector steps) and
`controllable_generation.py` (inpainting inside that loop).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from diffusion_jax.samplers import base
from diffusion_jax.samplers import inpainting
from diffusion_jax.schedules import Schedule

PyTree = Any
StepFn = Callable[[jax.Array, PyTree, jax.Array, jax.Array], tuple[jax.Array, PyTree]]


class Levels(NamedTuple):
  """Noise level of the state entering step j (j = 0 .. N-1) and of the output (j = N):
  x_j = scale[j] x0 + sigma[j] eps, each [N + 1], ending (1, 0)."""
  scale: jax.Array
  sigma: jax.Array


def vp_levels(schedule: Schedule) -> Levels:
  """Levels of a VP sampler stepping down a (respaced) schedule of N entries: step j starts at
  entry N-1-j, (sqrt(abar), sqrt(1 - abar)), and the output is clean (1, 0)."""
  return Levels(scale=jnp.append(schedule.sqrt_alphas_cumprod[::-1], 1.0),
                sigma=jnp.append(schedule.sqrt_one_minus_alphas_cumprod[::-1], 0.0))


def check_trajectory_stride(trajectory_stride: int, num_steps: int) -> None:
  """Raises a ValueError unless the stride is 0 or a positive divisor of N."""
  if trajectory_stride < 0 or (trajectory_stride and num_steps % trajectory_stride):
    raise ValueError(f"trajectory_stride must be 0 or a positive divisor of the number of steps "
                     f"N={num_steps}, got {trajectory_stride}.")


def run_reverse(step: StepFn, x: jax.Array, keys: jax.Array, levels: Levels, *,
                carry: PyTree = None, inpaint: inpainting.Inpaint | None = None,
                trajectory_stride: int = 0):
  """Runs N = len(levels.scale) - 1 steps of `step` from x in one `lax.scan`.

  Args:
    step: `(x [B, ...], carry, i int32 scalar, noise [B, ...]) -> (x, carry)`.
    x: the initial state [B, ...] at level 0.
    keys: per-example keys [B] (`rng.example_keys`).
    levels: `Levels` of the state, [N + 1] each.
    carry: the initial carry of a multistep method (any pytree), or None.
    inpaint: known pixels, or None. At level j < N they are re-noised with stream
      fold_in(k_b, 2N - j) (`base.inpaint_noise` of step index N-1-j).
    trajectory_stride: if > 0, also return x every `stride` steps (N must be a multiple).

  Returns:
    x after N steps [B, ...], or (x, trajectory [N // stride, B, ...]) when
    `trajectory_stride` > 0; trajectory[k] is x after (k + 1) * stride steps (after inpainting),
    so trajectory[-1] is the output.

  References: Song et al. 2021, official `sampling.py` (`get_pc_sampler`).
  """
  num_steps = int(levels.scale.shape[0]) - 1
  check_trajectory_stride(trajectory_stride, num_steps)
  shape = x.shape

  def place_known(x, j):
    if inpaint is None:
      return x
    noise = base.inpaint_noise(keys, num_steps - 1 - j, num_steps, shape)
    return inpainting.replace_known(inpaint, x, levels.scale[j], levels.sigma[j], noise)

  def body(state, i):
    x, carry = state
    x, carry = step(x, carry, i, base.step_noise(keys, num_steps - 1 - i, shape))
    return (place_known(x, i + 1), carry), None

  state = (place_known(x, 0), carry)
  if not trajectory_stride:
    (x, _), _ = lax.scan(body, state, jnp.arange(num_steps))
    return x

  def chunk(state, k):
    state, _ = lax.scan(body, state, k * trajectory_stride + jnp.arange(trajectory_stride))
    return state, state[0]

  (x, _), trajectory = lax.scan(chunk, state, jnp.arange(num_steps // trajectory_stride))
  return x, trajectory
