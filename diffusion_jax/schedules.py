"""Noise schedules: the `Schedule` pytree and its factories.

A schedule holds every per-timestep constant of a discrete-time Gaussian diffusion with T steps
(t = 0 .. T-1, as in the DDPM code), computed once in float64 NumPy and stored as float32 [T]
arrays. It is a `flax.struct.dataclass`, so it passes through `jit`, `vmap`, `pmap` and `scan` as
an ordinary pytree argument.

References:
  Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", eqs. 4, 6, 7.
  Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models", eq. 17 and sec. 3.2.
  Chen 2023, "On the Importance of Noise Scheduling for Diffusion Models", algorithm 1 (sigmoid).
  Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", algorithm 1.
"""

from __future__ import annotations

import math
from typing import Callable

import flax
import jax
import jax.numpy as jnp

from diffusion_jax import _checks
import numpy as np


@flax.struct.dataclass
class Schedule:
  """Per-timestep constants of a discrete Gaussian diffusion; every field is float32 [T].

  Index t runs over 0 .. T-1; `alphas_cumprod[t]` is alpha_bar_t of the forward marginal
  q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I).
  """
  betas: jax.Array
  alphas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  log_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array
  snr: jax.Array

  @property
  def num_timesteps(self) -> int:
    """T, static (read from the array shape, so it is a Python int even under jit)."""
    return self.betas.shape[-1]


def from_betas(betas) -> Schedule:
  """Builds a `Schedule` from betas [T] (computed in float64, stored in float32).

  Args:
    betas: [T] values in (0, 1]; a last beta of exactly 1 (zero terminal SNR) is allowed.

  Returns:
    The `Schedule`. Entries that are infinite at zero terminal SNR
    (`sqrt_recip_alphas_cumprod[-1]`, `sqrt_recipm1_alphas_cumprod[-1]`, `snr` is 0 there) are
    kept as IEEE values: use v or x0 prediction with such a schedule.

  References: Ho et al. 2020, eqs. 4 and 7; Nichol & Dhariwal 2021 (clipped posterior log variance).
  """
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.shape[0] < 1:
    raise ValueError(f"betas must be a 1-D array with at least one entry, got shape {betas.shape}.")
  if not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas > 1):
    raise ValueError("betas must lie in (0, 1]; got min "
                     f"{betas.min() if betas.size else None}, max {betas.max() if betas.size else None}.")
  alphas = 1.0 - betas
  alphas_cumprod = np.cumprod(alphas)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  with np.errstate(divide="ignore", invalid="ignore"):
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # log(0) at t = 0 is replaced by the t = 1 value, as in the DDPM code; with T = 1 there is
    # no t = 1 and the (zero) variance is never used for noise.
    first = posterior_variance[1] if len(betas) > 1 else betas[0]
    posterior_log_variance_clipped = np.log(np.append(first, posterior_variance[1:]))
    fields = dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        snr=alphas_cumprod / (1.0 - alphas_cumprod),
    )
  return Schedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in fields.items()})


def from_alphas_cumprod(alphas_cumprod) -> Schedule:
  """Builds a `Schedule` from alpha_bar [T] (decreasing, in (0, 1]); betas_t = 1 - abar_t/abar_{t-1}.

  This is how a respaced schedule is made from a subset of a training schedule's timesteps.

  References: Nichol & Dhariwal 2021, sec. 4 (respacing).
  """
  abar = np.asarray(alphas_cumprod, dtype=np.float64)
  if abar.ndim != 1 or abar.shape[0] < 1:
    raise ValueError(f"alphas_cumprod must be 1-D and non-empty, got shape {abar.shape}.")
  return from_betas(1.0 - abar / np.append(1.0, abar[:-1]))


# --- Beta factories: each returns float64 betas [T]. ---------------------------------------------

def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02,
                 rescale: bool = True) -> np.ndarray:
  """Linear betas; with `rescale`, scaled by 1000/T so any T matches the T = 1000 process.

  References: Ho et al. 2020, sec. 4; Nichol & Dhariwal 2021, appendix (get_named_beta_schedule).
  """
  scale = 1000.0 / num_timesteps if rescale else 1.0
  if beta_end * scale >= 1.0:
    raise ValueError(f"The linear schedule rescaled to num_timesteps={num_timesteps} has beta_end = "
                     f"{beta_end} * 1000 / {num_timesteps} = {beta_end * scale:g} >= 1; use more "
                     "timesteps or rescale=False.")
  return np.linspace(beta_start * scale, beta_end * scale, num_timesteps, dtype=np.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float = 0.00085,
                        beta_end: float = 0.012) -> np.ndarray:
  """Betas linear in sqrt(beta) (the Stable Diffusion / latent-diffusion schedule)."""
  return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=np.float64) ** 2


def betas_from_alpha_bar_fn(num_timesteps: int, alpha_bar: Callable[[np.ndarray], np.ndarray],
                            max_beta: float = 0.999) -> np.ndarray:
  """beta_t = min(1 - alpha_bar((t+1)/T) / alpha_bar(t/T), max_beta) for t = 0 .. T-1.

  References: Nichol & Dhariwal 2021, eq. 17 and the text after it.
  """
  grid = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  values = alpha_bar(grid)
  return np.minimum(1.0 - values[1:] / values[:-1], max_beta)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Cosine schedule: alpha_bar(u) = cos^2((u + s)/(1 + s) * pi/2) / (same at u = 0).

  References: Nichol & Dhariwal 2021, eq. 17.
  """
  def alpha_bar(u):
    return np.cos((u + s) / (1.0 + s) * math.pi / 2) ** 2
  return betas_from_alpha_bar_fn(num_timesteps, alpha_bar, max_beta)


def sigmoid_betas(num_timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
                  max_beta: float = 0.999) -> np.ndarray:
  """Sigmoid schedule: alpha_bar(u) = (sig(end/tau) - sig((u (end-start) + start)/tau)) /
  (sig(end/tau) - sig(start/tau)), betas from its ratios as for the cosine schedule.

  References: Chen 2023, "On the Importance of Noise Scheduling", algorithm 1 (sigmoid_schedule).
  """
  def sig(z):
    return 1.0 / (1.0 + np.exp(-z))
  v_start, v_end = sig(start / tau), sig(end / tau)

  def alpha_bar(u):
    return (v_end - sig((u * (end - start) + start) / tau)) / (v_end - v_start)
  return betas_from_alpha_bar_fn(num_timesteps, alpha_bar, max_beta)


def rescale_zero_terminal_snr(betas) -> np.ndarray:
  """Shifts and scales sqrt(alpha_bar) so the last step has SNR exactly 0, keeping the first.

  Returns float64 betas [T] whose last entry is 1.

  References: Lin et al. 2024, algorithm 1.
  """
  betas = np.asarray(betas, dtype=np.float64)
  sqrt_abar = np.sqrt(np.cumprod(1.0 - betas))
  first, last = sqrt_abar[0], sqrt_abar[-1]
  sqrt_abar = (sqrt_abar - last) * first / (first - last)
  abar = sqrt_abar ** 2
  alphas = np.append(abar[0], abar[1:] / abar[:-1])
  return 1.0 - alphas


BETA_SCHEDULES: dict[str, Callable[..., np.ndarray]] = {
    "linear": linear_betas,
    "scaled_linear": scaled_linear_betas,
    "cosine": cosine_betas,
    "sigmoid": sigmoid_betas,
}


def get_schedule(name: str, num_timesteps: int, *, zero_terminal_snr: bool = False,
                 **kwargs) -> Schedule:
  """Returns the named schedule with T = `num_timesteps` steps.

  Args:
    name: one of `BETA_SCHEDULES` ('linear', 'scaled_linear', 'cosine', 'sigmoid').
    num_timesteps: T >= 1.
    zero_terminal_snr: rescale so that alpha_bar_{T-1} = 0 (Lin et al. 2024); pair with v
      prediction.
    **kwargs: passed to the beta factory (e.g. `beta_start`, `beta_end`, `rescale` for 'linear';
      `s`, `max_beta` for 'cosine'; `start`, `end`, `tau` for 'sigmoid').

  Returns:
    A `Schedule` of float32 [T] arrays.
  """
  _checks.check_choice("schedule name", name, sorted(BETA_SCHEDULES))
  if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)) \
      or num_timesteps < 1:
    raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}.")
  if zero_terminal_snr and num_timesteps < 2:
    raise ValueError("zero_terminal_snr needs num_timesteps >= 2 (it pins the first and last "
                     f"alpha_bar), got {num_timesteps}.")
  betas = BETA_SCHEDULES[name](int(num_timesteps), **kwargs)
  if zero_terminal_snr:
    betas = rescale_zero_terminal_snr(betas)
  return from_betas(betas)
