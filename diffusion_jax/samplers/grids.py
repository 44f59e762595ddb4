"""Each sampler's default step grid, and what `N steps` costs in network evaluations.

`num_steps=N` means N steps on the grid the sampler's authors use, whatever the sampler:

  ddpm          'N' spacing: N timesteps evenly spaced over [0, T-1], both ends included
                (Nichol & Dhariwal 2021, sec. 4); N = T is the full ancestral chain.
  ddim          DDIM's 'uniform' subsequence tau_i = floor(i T / N), i = 0 .. N-1 (Song et al.
                2021, appendix D.2; the 'ddimN' stride where T/N is an integer).
  dpm_solver++  'linspaceN': N timesteps uniform in time, round(linspace(0, T-1, N+1))[1:], then
                a first-order last step to alpha_bar = 1 (Lu et al. 2022, time-uniform grid of
                their discrete-time wrapper; diffusers' default).
  euler, heun   the Karras grid, rho = 7, from min(80, largest training sigma) to the smallest
                (Karras et al. 2022, eq. 5; see `samplers.ode`).
  pc            as ddpm: the SDE discretised on N evenly spaced levels of the training schedule
                (Song et al. 2021 discretise theirs uniformly in time; N = T is the model's own).

Network evaluations per step: 1 for ddpm, ddim, dpm_solver++ and euler; 2 for heun, whose last
step (to sigma = 0) is an Euler step, so N Heun steps cost 2N - 1; 1 + C for pc with C
Langevin corrector steps (the default C = 1: 2N; C = 0 stands for corrector='none').

References: the papers above.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import _checks
from diffusion_jax.samplers import respacing
from diffusion_jax.schedules import Schedule

SCHEDULE_SAMPLERS = ("ddpm", "ddim", "dpm_solver++", "pc")
ODE_SAMPLERS = ("euler", "heun")
EVALUATIONS_PER_STEP = {"ddpm": 1, "ddim": 1, "dpm_solver++": 1, "euler": 1, "heun": 2, "pc": 2}


def _check(name: str, num_steps: int) -> None:
  _checks.check_choice("sampler", name, sorted(EVALUATIONS_PER_STEP))
  if int(num_steps) < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")


def default_timesteps(name: str, num_timesteps: int, num_steps: int) -> np.ndarray:
  """The default respacing subset of a schedule sampler: int32 [N] increasing, within [0, T).

  Args:
    name: 'ddpm', 'ddim', 'dpm_solver++' or 'pc'.
    num_timesteps: T of the training schedule.
    num_steps: N, 1 <= N <= T.
  """
  _check(name, num_steps)
  if name not in SCHEDULE_SAMPLERS:
    raise ValueError(f"default_timesteps is for the schedule samplers {list(SCHEDULE_SAMPLERS)}; "
                     f"{name!r} takes num_steps itself.")
  if num_steps > num_timesteps:
    raise ValueError(f"num_steps={num_steps} exceeds the T={num_timesteps} training timesteps.")
  if num_steps == num_timesteps:
    return np.arange(num_timesteps, dtype=np.int32)
  if name in ("ddpm", "pc"):
    return respacing.space_timesteps(num_timesteps, str(num_steps))
  if name == "ddim":
    return (np.arange(num_steps) * num_timesteps // num_steps).astype(np.int32)
  return respacing.space_timesteps(num_timesteps, f"linspace{num_steps}")


def network_evaluations(name: str, num_steps: int, corrector_steps: int = 1) -> int:
  """Network evaluations of N steps of the named sampler (per sample, without guidance);
  `corrector_steps` C is pc's (1 + C per step; 0 for corrector='none')."""
  _check(name, num_steps)
  if name == "pc":
    if int(corrector_steps) < 0:
      raise ValueError(f"corrector_steps must be >= 0, got {corrector_steps}.")
    return (1 + int(corrector_steps)) * int(num_steps)
  return EVALUATIONS_PER_STEP[name] * int(num_steps) - (1 if name == "heun" else 0)


def steps_within(name: str, evaluations: int) -> int:
  """The most steps whose network evaluations stay within `evaluations` (>= 1 step; pc with
  its default single corrector step)."""
  _check(name, 1)
  if name == "heun":
    return max(1, (int(evaluations) + 1) // 2)
  return max(1, int(evaluations) // EVALUATIONS_PER_STEP[name])


class Plan(NamedTuple):
  """What a call of the named sampler needs: `static` settings for `get_sampler`, the `schedule`
  to pass and the per-call keyword arguments `per_call` (arrays: a new grid of the same length
  does not recompile)."""
  static: dict[str, Any]
  schedule: Schedule
  per_call: dict[str, jax.Array]


def plan(name: str, schedule: Schedule, num_steps: int | None = None,
         timesteps: respacing.TimestepSpec | None = None) -> Plan:
  """N steps of `name` on its default grid, or on an explicit respacing spec (eager).

  Args:
    name: a sampler name.
    schedule: the training schedule (concrete).
    num_steps: N (default: T for the schedule samplers, 50 for euler / heun).
    timesteps: instead of the default grid, a respacing spec (`respacing.space_timesteps`,
      e.g. 'ddim50', '50,50') for the schedule samplers.

  Returns:
    `Plan`.
  """
  _check(name, 1 if num_steps is None else num_steps)
  if name in ODE_SAMPLERS:
    if timesteps is not None:
      raise ValueError(f"timesteps={timesteps!r} applies to {list(SCHEDULE_SAMPLERS)} only; "
                       f"{name} takes num_steps.")
    return Plan({"num_steps": 50 if num_steps is None else int(num_steps)}, schedule, {})
  if timesteps is None:
    count = schedule.num_timesteps if num_steps is None else int(num_steps)
    timesteps = default_timesteps(name, schedule.num_timesteps, count)
  elif num_steps is not None:
    raise ValueError("Give num_steps (the default grid) or timesteps (a respacing spec), not both.")
  respaced, steps = respacing.respace(schedule, timesteps)
  return Plan({}, respaced, {"timesteps": jnp.asarray(steps)})
