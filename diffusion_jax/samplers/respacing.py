"""Respacing: sampling with an increasing subset of the training timesteps.

A respaced process keeps alpha_bar at the chosen timesteps and recomputes the betas from it, so
step i of the respaced process goes from alpha_bar[t_i] to alpha_bar[t_{i-1}] (and to alpha_bar = 1
after the first kept timestep). Samplers then run over the respaced `Schedule` (N entries) and call
the network at the original timesteps `timesteps[i]`.

The subset is an ordinary array: pass it (and the respaced schedule) as arguments of a jitted
sampler, and another subset of the same length reuses the compiled code.

References: Nichol & Dhariwal 2021, sec. 4 and appendix (space_timesteps, "ddimN" strides).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import schedules
from diffusion_jax.schedules import Schedule

TimestepSpec = str | int | Sequence[int] | np.ndarray


def _sections(num_timesteps: int, counts: Sequence[int]) -> list[int]:
  """Splits [0, T) into len(counts) near-equal sections and takes counts[k] evenly spaced
  (rounded) steps from section k, the first and last of each section included."""
  size, extra = divmod(num_timesteps, len(counts))
  steps, start = [], 0
  for k, count in enumerate(counts):
    length = size + (1 if k < extra else 0)
    if count < 1 or count > length:
      raise ValueError(f"timestep spec asks for {count} steps from a section of {length} "
                       f"timesteps (T={num_timesteps}, sections {list(counts)}); each count must "
                       f"be in [1, {length}].")
    stride = (length - 1) / (count - 1) if count > 1 else 1.0
    steps.extend(start + int(round(j * stride)) for j in range(count))
    start += length
  return steps


def space_timesteps(num_timesteps: int, spec: TimestepSpec) -> np.ndarray:
  """The increasing subset of {0, ..., T-1} named by `spec`.

  Args:
    num_timesteps: T of the training schedule.
    spec: 'N' (N evenly spaced steps, first and last included), 'a,b,c' (the range split in
      equal sections with a, b, c evenly spaced steps each), 'ddimN' (the stride s for which
      range(0, T, s) has N entries), 'linspaceN' (round(linspace(0, T-1, N+1)) without 0: the
      default grid of diffusers' DPM-Solver schedulers, so no step is spent at t = 0), an int N
      (as 'N'), or an explicit sequence of timesteps.

  Returns:
    int32 [N], strictly increasing, within [0, T).

  References: Nichol & Dhariwal 2021, appendix (space_timesteps).
  """
  if isinstance(spec, (list, tuple, np.ndarray, jax.Array)):
    steps = np.asarray(spec)
    if steps.ndim != 1 or steps.size < 1 or not np.issubdtype(steps.dtype, np.integer):
      raise ValueError(f"timesteps must be a non-empty 1-D integer sequence, got {spec!r}.")
    steps = np.sort(steps)
    if np.any(np.diff(steps) == 0) or steps[0] < 0 or steps[-1] >= num_timesteps:
      raise ValueError(f"timesteps must be distinct and within [0, {num_timesteps}), got {spec!r}.")
    return steps.astype(np.int32)
  if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
    spec = str(int(spec))
  if not isinstance(spec, str):
    raise ValueError(f"Unknown timestep spec={spec!r}; allowed: 'N', 'a,b,c', 'ddimN', "
                     "'linspaceN', an int or a sequence of timesteps.")
  try:
    if spec.startswith("linspace"):
      count = int(spec[len("linspace"):])
      if not 1 <= count < num_timesteps:
        raise ValueError(f"timestep spec={spec!r}: 'linspaceN' needs 1 <= N < T={num_timesteps}.")
      steps = np.round(np.linspace(0, num_timesteps - 1, count + 1))[1:]
      return np.unique(steps).astype(np.int32)
    if spec.startswith("ddim"):
      count = int(spec[len("ddim"):])
      for stride in range(1, num_timesteps + 1):
        if len(range(0, num_timesteps, stride)) == count:
          return np.arange(0, num_timesteps, stride, dtype=np.int32)
      raise ValueError(f"timestep spec={spec!r}: no integer stride gives exactly {count} steps "
                       f"out of T={num_timesteps}.")
    counts = [int(part) for part in spec.split(",")]
  except ValueError as e:
    if "stride" in str(e) or "linspaceN" in str(e):
      raise
    raise ValueError(f"Unknown timestep spec={spec!r}; allowed: 'N', 'a,b,c', 'ddimN', "
                     "'linspaceN', an int or a sequence of timesteps.") from e
  return np.asarray(sorted(set(_sections(num_timesteps, counts))), dtype=np.int32)


def respace(schedule: Schedule, spec: TimestepSpec) -> tuple[Schedule, jax.Array]:
  """The respaced schedule and the original timesteps it keeps (eager: call outside `jit`).

  alpha_bar is rebuilt in float64 from the training betas, then the respaced betas are
  1 - alpha_bar[t_i] / alpha_bar[t_{i-1}], so the full subset reproduces the training schedule.

  Args:
    schedule: the training schedule (T entries), concrete.
    spec: see `space_timesteps`.

  Returns:
    (respaced `Schedule` with N entries, timesteps int32 [N] increasing).

  References: Nichol & Dhariwal 2021, sec. 4.
  """
  steps = space_timesteps(schedule.num_timesteps, spec)
  alphas_cumprod = np.cumprod(1.0 - np.asarray(schedule.betas, np.float64))
  return schedules.from_alphas_cumprod(alphas_cumprod[steps]), jnp.asarray(steps)
