"""Side by side with diffusers' PyTorch schedulers, in the same run, on the same inputs.

One small deterministic network (JAX) drives both: diffusers' loop calls it on the torch sample
(converted to NumPy), the fused JAX sampler calls it inside its `lax.scan`; the noise diffusers
injects (`variance_noise`) is the noise stream the JAX sampler draws for that step. Both run
from the same x_T over the same timestep grid, so the samples must agree to float32 rounding.
"""

# Test requirements (requirements-test.txt), imported directly: a missing reference must fail
# the suite, not skip every side-by-side comparison in silence.
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import diffusion_jax as dj
from diffusion_jax import rng as rng_lib
from diffusion_jax import schedules
from diffusion_jax.samplers import base, ddim, ode

T = 1000
SHAPE = (3, 4, 4, 2)
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def toy_model(x, t):
  """A fixed nonlinear 'network' (x [B, 4, 4, 2], t [B] int or float) -> [B, 4, 4, 2].

  Roughly a denoiser (output ~ x at high t, so samples stay O(1)) with a nonlinear, t-dependent
  perturbation.
  """
  w = jnp.array([[0.6, -0.4], [0.3, 0.8]], jnp.float32)
  t = jnp.asarray(t, jnp.float32).reshape(-1, 1, 1, 1)
  return jnp.tanh(0.004 * (t + 1.0)) * x + 0.3 * jnp.tanh(x @ w + 0.002 * t)


def call_toy(sample, t):
  x = jnp.asarray(sample.numpy())
  out = toy_model(x, jnp.full((x.shape[0],), float(t), jnp.float32))
  return torch.from_numpy(np.asarray(out))


def schedule_of(scheduler):
  """Our schedule built from diffusers' own float32 alpha_bar (same table on both sides)."""
  return schedules.from_alphas_cumprod(scheduler.alphas_cumprod.double().numpy())


def x_init():
  return jax.random.normal(jax.random.key(0), SHAPE)


def assert_close(ours, theirs, scale=1.0):
  """Equal to float32 rounding: rtol 1e-5, and atol a few float32 ulps of the largest state the
  loop holds (`scale`, e.g. sigma_max |x_T| in sigma space, where x0 = x - sigma eps cancels)."""
  atol = max(1e-5, 8 * np.finfo(np.float32).eps * scale)
  np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-5, atol=atol)


@pytest.mark.parametrize("eta,prediction", [(0.0, "eps"), (1.0, "eps"), (0.0, "v"), (1.0, "x0")])
def test_ddim_matches_diffusers(eta, prediction):
  scheduler = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="linear",
                                      clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                                      prediction_type=PREDICTION_TYPES[prediction])
  scheduler.set_timesteps(50)
  schedule, timesteps = dj.respace(schedule_of(scheduler), "ddim50")
  np.testing.assert_array_equal(np.asarray(timesteps)[::-1], scheduler.timesteps.numpy())

  key = jax.random.key(7)
  keys = rng_lib.example_keys(key, SHAPE[0])
  x = torch.from_numpy(np.array(x_init()))
  for i, t in enumerate(scheduler.timesteps):
    noise = torch.from_numpy(np.asarray(base.step_noise(keys, len(timesteps) - 1 - i, SHAPE)))
    x = scheduler.step(call_toy(x, t), t, x, eta=eta, variance_noise=noise).prev_sample

  sampler = dj.get_sampler("ddim", prediction=prediction, thresholding="none")
  ours = jax.jit(lambda s, ts, e: sampler(toy_model, s, SHAPE, key, timesteps=ts, eta=e,
                                          x_init=x_init()))(schedule, timesteps, eta)
  assert_close(ours, x)


def test_ddim_step_matches_diffusers_on_one_step():
  scheduler = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="linear",
                                      clip_sample=False, steps_offset=0)
  scheduler.set_timesteps(50)
  schedule, _ = dj.respace(schedule_of(scheduler), "ddim50")
  x = np.array(x_init())
  out = np.asarray(toy_model(x, jnp.full((3,), 480)))
  noise = np.asarray(jax.random.normal(jax.random.key(3), SHAPE))
  theirs = scheduler.step(torch.from_numpy(out), 480, torch.from_numpy(x), eta=0.7,
                          variance_noise=torch.from_numpy(noise)).prev_sample
  ours, _ = ddim.ddim_step(schedule, out, x, jnp.full((3,), 24), 0.7, noise)
  assert_close(ours, theirs)


@pytest.mark.parametrize("steps,prediction", [(8, "eps"), (20, "eps"), (20, "v")])
def test_dpm_solver_matches_diffusers(steps, prediction):
  scheduler = diffusers.DPMSolverMultistepScheduler(
      num_train_timesteps=T, beta_schedule="linear", solver_order=2,
      algorithm_type="dpmsolver++", prediction_type=PREDICTION_TYPES[prediction])
  scheduler.set_timesteps(steps)
  schedule, timesteps = dj.respace(schedule_of(scheduler), f"linspace{steps}")
  np.testing.assert_array_equal(np.asarray(timesteps)[::-1], scheduler.timesteps.numpy())

  x = torch.from_numpy(np.array(x_init()))
  for t in scheduler.timesteps:
    x = scheduler.step(call_toy(x, t), t, x).prev_sample

  sampler = dj.get_sampler("dpm_solver++", prediction=prediction, thresholding="none")
  ours = jax.jit(lambda s, ts: sampler(toy_model, s, SHAPE, jax.random.key(0), timesteps=ts,
                                       x_init=x_init()))(schedule, timesteps)
  assert_close(ours, x)


def run_diffusers_sigma_sampler(scheduler):
  # Our start is the VP prior in sigma space, x_T = sqrt(1 + sigma_max^2) x_vp; diffusers' own
  # `init_noise_sigma` is sigma_max for 'linspace' spacing (the VE convention; they differ by a
  # factor 1 + 1 / (2 sigma_max^2)), so the same x_T is given to both.
  x = torch.from_numpy(np.array(x_init())) * (scheduler.sigmas[0] ** 2 + 1) ** 0.5
  for t in scheduler.timesteps:
    x = scheduler.step(call_toy(scheduler.scale_model_input(x, t), t), t, x).prev_sample
  return x


@pytest.mark.parametrize("method,karras,prediction", [
    ("euler", False, "eps"), ("euler", True, "eps"), ("euler", True, "v"),
    ("heun", False, "eps"), ("heun", True, "eps"), ("heun", False, "v")])
def test_euler_heun_match_diffusers(method, karras, prediction):
  cls = {"euler": diffusers.EulerDiscreteScheduler, "heun": diffusers.HeunDiscreteScheduler}[method]
  scheduler = cls(num_train_timesteps=T, beta_schedule="linear", use_karras_sigmas=karras,
                  prediction_type=PREDICTION_TYPES[prediction])
  scheduler.set_timesteps(12)
  theirs = run_diffusers_sigma_sampler(scheduler)

  schedule = schedule_of(scheduler)
  sampler = dj.get_sampler(method, num_steps=12, grid="karras" if karras else "linspace",
                           prediction=prediction, thresholding="none")
  # diffusers' Karras grid spans the whole table (our default stops at sigma_max = 80).
  ours = jax.jit(lambda s: sampler(toy_model, s, SHAPE, jax.random.key(0), x_init=x_init(),
                                   sigma_max=ode.training_sigmas(s)[-1]))(schedule)
  assert_close(ours, theirs, scale=float(scheduler.sigmas[0]) * float(np.abs(x_init()).max()))
