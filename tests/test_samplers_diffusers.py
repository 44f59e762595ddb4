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
from diffusion_jax import edm
from diffusion_jax import schedules
from diffusion_jax.samplers import base, ddim, ode
from numerics_testlib import assert_f32_close, f32_tol

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


# --- EDM (Karras et al. 2022): diffusers' EDM schedulers, step by step ---------------------------
# diffusers' EDM schedulers hold the sigma-space state x = x0 + sigma eps and an EDM-preconditioned
# network F: D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) (sigma_data 0.5). This library's
# EDM samplers (`samplers.ode`) hold the same x and form D from a VP eps-network (table 1's VP
# column). So that both sides use one denoiser, diffusers' "network" is written here as the F
# whose preconditioned output is this library's D(x; sigma) (`ode.denoise` of the toy eps-model at
# t(sigma)); what is compared is everything else: the sigma grid, c_in (scale_model_input), the
# c_noise timesteps and x after every step.

EDM_SIGMA_MIN, EDM_SIGMA_MAX = 0.002, 80.0
EDM_SCHEDULE = dj.get_schedule("linear", T)


def library_denoiser(x, sigma):
  """This library's D(x; sigma) [B, ...] (torch in, torch out) at the fractional t(sigma)."""
  sigma = jnp.float32(sigma)
  t = ode.sigma_to_t(EDM_SCHEDULE, sigma)
  d = ode.denoise(toy_model, jnp.asarray(x.numpy()), sigma, t)
  return torch.from_numpy(np.asarray(d))


def edm_network(scheduler, x, sigma):
  """The F with c_skip x + c_out F = library_denoiser(x, sigma) (diffusers' 'epsilon' F)."""
  c = edm.coefficients(jnp.float32(sigma), precond="edm")
  return (library_denoiser(x, sigma) - float(c.c_skip) * x) / float(c.c_out)


def test_edm_sigma_grid_and_preconditioning_match_diffusers():
  scheduler = diffusers.EDMEulerScheduler(sigma_min=EDM_SIGMA_MIN, sigma_max=EDM_SIGMA_MAX,
                                          rho=7.0, final_sigmas_type="zero")
  scheduler.set_timesteps(18)
  # The Karras grid (eq. 5), float64 in diffusers, float32 here: a few ulps in the base, times
  # rho = 7 through the power: 10 * 7 ulps relative.
  ours, _ = ode.sigma_grid(EDM_SCHEDULE, 18, sigma_min=EDM_SIGMA_MIN, sigma_max=EDM_SIGMA_MAX)
  np.testing.assert_allclose(ours, scheduler.sigmas.numpy(), rtol=f32_tol(70), atol=0)
  np.testing.assert_allclose(ode.karras_sigmas(EDM_SIGMA_MIN, EDM_SIGMA_MAX, 18),
                             scheduler.sigmas.numpy()[:-1], rtol=f32_tol(70))
  assert float(scheduler.init_noise_sigma) == pytest.approx(np.sqrt(1 + EDM_SIGMA_MAX ** 2))
  # c_in, c_noise (diffusers' timesteps), c_skip and c_out of `edm.coefficients` at every sigma
  # of the grid: a handful of float32 operations each.
  sigmas = scheduler.sigmas[:-1]
  c = edm.coefficients(jnp.asarray(sigmas.numpy()), precond="edm")
  np.testing.assert_allclose(c.c_noise, scheduler.timesteps.numpy(), rtol=f32_tol(8), atol=f32_tol(8))
  ones = torch.ones(1)
  for i, sigma in enumerate(sigmas):
    np.testing.assert_allclose(c.c_in[i], float(scheduler.precondition_inputs(ones, sigma)),
                               rtol=f32_tol(8))
    np.testing.assert_allclose(c.c_skip[i], float(scheduler.precondition_outputs(
        ones, 0 * ones, sigma)), rtol=f32_tol(8))
    np.testing.assert_allclose(c.c_out[i], float(scheduler.precondition_outputs(
        0 * ones, ones, sigma)), rtol=f32_tol(8))
  x = torch.from_numpy(np.array(x_init()))
  scheduler.set_timesteps(18)
  for i, t in enumerate(scheduler.timesteps):
    np.testing.assert_allclose(scheduler.scale_model_input(x, t).numpy(),
                               np.asarray(c.c_in[i]) * x.numpy(), rtol=f32_tol(8))
    scheduler._step_index += 1      # scale_model_input alone does not advance the scheduler


@pytest.mark.parametrize("s_churn", [0.0, 40.0])
def test_edm_euler_matches_diffusers_step_by_step(s_churn, monkeypatch):
  steps, s_tmin, s_tmax, s_noise = 18, 0.05, 50.0, 1.003     # EDM's ImageNet-64 churn setting
  key = jax.random.key(4)
  keys = rng_lib.example_keys(key, SHAPE[0])
  noises = [base.step_noise(keys, steps - 1 - i, SHAPE) for i in range(steps)]
  scheduler = diffusers.EDMEulerScheduler(sigma_min=EDM_SIGMA_MIN, sigma_max=EDM_SIGMA_MAX,
                                          rho=7.0, final_sigmas_type="zero")
  # diffusers draws its churn noise with randn_tensor (on churn steps only); it is given this
  # library's stream of the same step instead.
  monkeypatch.setattr(diffusers.schedulers.scheduling_edm_euler, "randn_tensor",
                      lambda *a, **k: torch.from_numpy(np.array(noises[scheduler.step_index])))
  scheduler.set_timesteps(steps)
  x = torch.from_numpy(np.array(x_init())) * scheduler.init_noise_sigma
  theirs = []
  for i, t in enumerate(scheduler.timesteps):
    sigma = float(scheduler.sigmas[i])
    # diffusers' pipelines call the network on the state before the churn and its step adds the
    # churn afterwards (the output then belongs to another input); EDM's algorithm 2 evaluates
    # D at the churned state (x_hat, sigma_hat). The network is given that state here, so the
    # step compared is algorithm 2's on both sides (without churn the two orders coincide).
    gamma = min(s_churn / steps, np.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (1 + gamma)
    x_hat = x + torch.from_numpy(np.array(noises[i])) * s_noise * (sigma_hat ** 2 - sigma ** 2) ** 0.5
    scheduler.scale_model_input(x, t)
    out = edm_network(scheduler, x_hat, sigma_hat)
    x = scheduler.step(out, t, x, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                       s_noise=s_noise).prev_sample
    theirs.append(x.numpy())

  sampler = dj.get_sampler("euler", num_steps=steps, thresholding="none")
  _, ours = jax.jit(lambda s: sampler(toy_model, s, SHAPE, key, x_init=x_init(),
                                      sigma_min=EDM_SIGMA_MIN, sigma_max=EDM_SIGMA_MAX,
                                      s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                                      s_noise=s_noise, trajectory_stride=1))(EDM_SCHEDULE)
  # The same arithmetic in another order: ~20 float32 operations per step (the churn, D through
  # the F round trip, the Euler update), accumulated over the steps, on the largest state
  # (sigma_max |x_T|, where x - D cancels).
  scale = float(np.abs(theirs[0]).max()) * 2
  for i in range(steps):
    assert_f32_close(ours[i], theirs[i], ops=20 * (i + 1), scale=scale, err_msg=f"step {i}")


@pytest.mark.parametrize("steps", [8, 18])
def test_edm_dpm_solver_matches_diffusers_step_by_step(steps):
  # diffusers' EDM DPM-Solver++(2M) works in sigma space with alpha = 1, lambda = -log sigma;
  # this library's dpm_solver++ works on the VP state x_vp = x / sqrt(1 + sigma^2), where
  # lambda = log(alpha / sigma_vp) is the same -log sigma, and its update
  # x_vp' = (sigma_vp' / sigma_vp) x_vp - alpha' (e^-h - 1) D is diffusers' update multiplied by
  # alpha' = 1 / sqrt(1 + sigma'^2): the same step. It runs here on the VP schedule whose
  # entries are diffusers' Karras sigmas (alpha_bar = 1 / (1 + sigma^2)), the network at t(sigma).
  scheduler = diffusers.EDMDPMSolverMultistepScheduler(
      sigma_min=EDM_SIGMA_MIN, sigma_max=EDM_SIGMA_MAX, rho=7.0, solver_order=2,
      algorithm_type="dpmsolver++", final_sigmas_type="zero")
  scheduler.set_timesteps(steps)
  x = torch.from_numpy(np.array(x_init())) * scheduler.init_noise_sigma
  theirs = []
  for i, t in enumerate(scheduler.timesteps):
    scheduler.scale_model_input(x, t)
    x = scheduler.step(edm_network(scheduler, x, float(scheduler.sigmas[i])), t, x).prev_sample
    theirs.append(x.numpy())

  sigmas = scheduler.sigmas.numpy().astype(np.float64)          # [N + 1] decreasing, last 0
  increasing = sigmas[:-1][::-1]
  schedule = schedules.from_alphas_cumprod(1.0 / (1.0 + increasing ** 2))
  timesteps = ode.sigma_to_t(EDM_SCHEDULE, jnp.asarray(increasing, jnp.float32))
  sampler = dj.get_sampler("dpm_solver++", thresholding="none")
  _, ours_vp = jax.jit(lambda s, ts: sampler(toy_model, s, SHAPE, jax.random.key(0),
                                             timesteps=ts, x_init=x_init(),
                                             trajectory_stride=1))(schedule, timesteps)
  ours = np.asarray(ours_vp, np.float64) * np.sqrt(1.0 + sigmas[1:] ** 2)[:, None, None, None, None]
  # ~20 float32 operations per step (D through the F round trip, the multistep update, the
  # change of variable), accumulated over the steps, on the largest state (sigma_max |x_T|).
  scale = float(np.abs(theirs[0]).max()) * 2
  for i in range(steps):
    assert_f32_close(ours[i], theirs[i], ops=20 * (i + 1), scale=scale, err_msg=f"step {i}")
