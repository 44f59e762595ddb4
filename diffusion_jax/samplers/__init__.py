"""Samplers: each a pure step run by one driver (`driver.run_reverse`); callers jit or pmap them.

`get_sampler(name, **static)` returns `sampler(model_fn, schedule, shape, rng, **per_call)`:
static settings (prediction type, x0 thresholding, step count of the ODE samplers, grid) are
fixed by the factory; the per-call arguments (`timesteps`, `eta`, `x_init`, `inpaint`,
`sigma_min`, ...) are arrays a jitted caller may pass as arguments, so changing them does not
recompile. Every sampler takes `inpaint=`, `trajectory_stride=` and `thresholding=` ('clip' by
default for pixel data; 'dynamic'; 'none' for latents), and is guided by wrapping `model_fn`
(`classifier_free_guidance`).

  ddpm, ddim, dpm_solver++ : run over a (respaced) schedule of N entries; `plan(name, schedule,
                             N)` gives the sampler's default grid, `respace(schedule, 'ddim50')`
                             any other.
  euler, heun              : run on the training schedule; `num_steps` is static.
  pc                       : score_sde's predictor-corrector on the VP or VE SDE, over a
                             (respaced) schedule like ddpm; `snr` per call, `corrector_steps`
                             static.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

from diffusion_jax import _checks
from diffusion_jax.samplers import ancestral
from diffusion_jax.samplers import base
from diffusion_jax.samplers import ddim
from diffusion_jax.samplers import dpm_solver
from diffusion_jax.samplers import driver
from diffusion_jax.samplers import grids
from diffusion_jax.samplers import guidance
from diffusion_jax.samplers import inpainting
from diffusion_jax.samplers import likelihood
from diffusion_jax.samplers import ode
from diffusion_jax.samplers import pc
from diffusion_jax.samplers import respacing
from diffusion_jax.samplers import thresholding
from diffusion_jax.samplers.ancestral import sample
from diffusion_jax.samplers.driver import run_reverse
from diffusion_jax.samplers.grids import network_evaluations
from diffusion_jax.samplers.grids import plan
from diffusion_jax.samplers.grids import SCHEDULE_SAMPLERS
from diffusion_jax.samplers.guidance import classifier_free_guidance
from diffusion_jax.samplers.inpainting import Inpaint
from diffusion_jax.samplers.likelihood import ode_log_likelihood
from diffusion_jax.samplers.respacing import respace
from diffusion_jax.samplers.respacing import space_timesteps
from diffusion_jax.samplers.thresholding import threshold_x0

SAMPLERS: dict[str, Callable] = {
    "ddpm": ancestral.sample,
    "ddim": ddim.sample,
    "dpm_solver++": dpm_solver.sample,
    "euler": functools.partial(ode.sample, method="euler"),
    "heun": functools.partial(ode.sample, method="heun"),
    "pc": pc.sample,
}


def get_sampler(name: str, **static) -> Callable:
  """The named sampler with its static settings bound.

  Args:
    name: one of `SAMPLERS` ('ddpm', 'ddim', 'dpm_solver++', 'euler', 'heun', 'pc').
    **static: keyword settings of that sampler (e.g. `prediction='v'`, `variance='learned_range'`,
      `num_steps=18` for euler/heun, `corrector_steps=2` for pc, `thresholding='none'`).

  Returns:
    `sampler(model_fn, schedule, shape, rng, **per_call) -> samples [B, ...]`.
  """
  fn = SAMPLERS[_checks.check_choice("sampler", name, sorted(SAMPLERS))]
  allowed = {p.name for p in inspect.signature(fn).parameters.values()
             if p.kind == inspect.Parameter.KEYWORD_ONLY}
  unknown = sorted(set(static) - allowed)
  if unknown:
    raise ValueError(f"get_sampler({name!r}) got unknown settings {unknown}; allowed: "
                     f"{sorted(allowed)}.")
  return functools.partial(fn, **static)
