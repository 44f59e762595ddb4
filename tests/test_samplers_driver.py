"""The one driver: every sampler gets inpainting, trajectories, guidance and the x0 policy, and
the per-sampler default grids."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax as dj
from diffusion_jax.samplers import grids
from diffusion_jax.samplers import ode
from numerics_testlib import assert_f32_close

T = 100
SCHEDULE = dj.get_schedule("linear", T)
SHAPE = (8, 4, 4, 3)
ALL = ["ddpm", "ddim", "dpm_solver++", "euler", "heun", "pc"]


def toy_model(x, t):
  """A small fixed nonlinear eps-network mixing pixels: (x [B, H, W, C], t [B]) -> [B, H, W, C]."""
  t = jnp.asarray(t, jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
  spatial = jnp.mean(x, axis=(1, 2), keepdims=True)
  return jnp.tanh(0.7 * x + 0.01 * t + spatial) * 0.5 + 0.3 * x


def sampler_call(name, steps=10, **static):
  """(f(model_fn, key, **per_call) -> samples) for `steps` steps of the named sampler; jit it."""
  p = dj.samplers.plan(name, SCHEDULE, steps)
  sampler = dj.get_sampler(name, **p.static, **static)
  return lambda model_fn, key, **kw: sampler(model_fn, p.schedule, SHAPE, key, **p.per_call, **kw)


@pytest.mark.parametrize("name", ALL)
def test_inpainting_keeps_known_pixels(name):
  known = jax.random.uniform(jax.random.key(5), SHAPE, minval=-1.0, maxval=1.0)
  mask = (jnp.arange(SHAPE[2]) < 2).astype(jnp.float32)[None, None, :, None] * jnp.ones(SHAPE)
  call = sampler_call(name)
  key = jax.random.key(6)
  free = jax.jit(lambda k: call(toy_model, k))(key)
  inpainting = jax.jit(lambda m: call(toy_model, key, inpaint=dj.Inpaint(mask=m, known=known)))
  out = np.asarray(inpainting(mask))
  np.testing.assert_array_equal(out[mask > 0], np.asarray(known)[mask > 0])
  # The generated pixels see the known ones (they differ from the free sample's) ...
  assert np.abs(out[mask == 0] - np.asarray(free)[mask == 0]).max() > 1e-3
  # ... and an empty mask is no inpainting at all (same noise streams): the same arithmetic in
  # another compiled program, so equal up to rounding of ~10 float32 operations per step x 10
  # steps (x2 network calls for Heun and pc) of the largest state. A fixed 1e-6 failed on another
  # machine (issue 9: 4.3e-6 on values up to 140); see tests/README.md.
  assert_f32_close(inpainting(jnp.zeros(SHAPE)), free, ops=10 * 10 * 2)


@pytest.mark.parametrize("name", ALL)
def test_trajectory_ends_at_the_output(name):
  call = sampler_call(name)
  key = jax.random.key(1)
  x, trajectory = jax.jit(lambda k: call(toy_model, k, trajectory_stride=5))(key)
  plain = jax.jit(lambda k: call(toy_model, k))(key)
  assert trajectory.shape == (2,) + SHAPE
  np.testing.assert_array_equal(trajectory[-1], x)
  assert_f32_close(x, plain, ops=10 * 10 * 2)    # another program (the nested scan): rounding
  assert not np.allclose(trajectory[0], x)
  with pytest.raises(ValueError, match="trajectory_stride"):
    call(toy_model, key, trajectory_stride=3)


@pytest.mark.parametrize("name", ALL)
def test_guidance_scale_is_traced_and_mixes_the_halves(name):
  labels = jnp.arange(SHAPE[0]) % 3

  def cond_model(x, t, y):
    return toy_model(x, t) + 0.2 * (y.astype(jnp.float32) - 1.5)[:, None, None, None]

  call = sampler_call(name)
  key = jax.random.key(2)

  @jax.jit
  def guided(scale):
    return call(dj.classifier_free_guidance(cond_model, labels, scale, null_label=3), key)

  conditional = jax.jit(lambda: call(lambda x, t: cond_model(x, t, labels), key))()
  unconditional = jax.jit(lambda: call(lambda x, t: cond_model(x, t, jnp.full_like(labels, 3)),
                                       key))()
  # Scale 1 is the conditional model, 0 the unconditional one: float32 rounding of the mix.
  np.testing.assert_allclose(guided(1.0), conditional, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(guided(0.0), unconditional, rtol=1e-5, atol=1e-5)
  assert not np.allclose(guided(3.0), conditional, atol=1e-3)
  assert guided._cache_size() == 1


def test_threshold_x0_matches_numpy():
  x0 = np.asarray(jax.random.normal(jax.random.key(0), (4, 5, 5, 3)), np.float64) * 1.5
  x0[0] *= 0.3            # an example whose quantile is below 1: s = 1, plain clipping
  np.testing.assert_array_equal(dj.samplers.threshold_x0(jnp.asarray(x0, jnp.float32), "none"),
                                np.float32(x0))
  np.testing.assert_allclose(dj.samplers.threshold_x0(jnp.asarray(x0, jnp.float32), "clip"),
                             np.clip(x0, -1, 1), rtol=1e-6)
  s = np.maximum(np.quantile(np.abs(x0).reshape(4, -1), 0.9, axis=1), 1.0)[:, None, None, None]
  expected = np.clip(x0, -s, s) / s
  ours = dj.samplers.threshold_x0(jnp.asarray(x0, jnp.float32), "dynamic", 0.9)
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)    # float32 quantile and divide
  assert np.all(np.abs(np.asarray(ours)) <= 1.0)
  with pytest.raises(ValueError, match="thresholding"):
    dj.samplers.threshold_x0(jnp.zeros((1, 2)), "static")
  with pytest.raises(ValueError, match="percentile"):
    dj.samplers.threshold_x0(jnp.zeros((1, 2)), "dynamic", 1.5)


def blowing_up(x, t):
  """An eps-network whose implied x0 is far outside [-1, 1] at every level."""
  del t
  return -3.0 * jnp.sign(jnp.sin(7.0 * x + 1.0))


@pytest.mark.parametrize("name", ALL)
def test_every_sampler_thresholds_x0_by_default(name):
  key = jax.random.key(4)
  for policy in ("clip", "dynamic"):
    out = np.asarray(jax.jit(lambda k, policy=policy: sampler_call(name, thresholding=policy)(blowing_up, k))(
        key))
    assert np.abs(out).max() <= 1.0, (policy, np.abs(out).max())
  default = jax.jit(lambda k: sampler_call(name)(blowing_up, k))(key)
  np.testing.assert_array_equal(default, jax.jit(
      lambda k: sampler_call(name, thresholding="clip")(blowing_up, k))(key))
  off = np.asarray(jax.jit(lambda k: sampler_call(name, thresholding="none")(blowing_up, k))(key))
  assert np.abs(off).max() > 1.5


def test_every_sampler_has_the_same_settings_and_defaults():
  common = ("thresholding", "dynamic_percentile", "clip_denoised", "x_init", "inpaint",
            "trajectory_stride", "prediction", "variance")
  for name, fn in dj.samplers.SAMPLERS.items():
    params = inspect.signature(fn).parameters
    for setting in common:
      assert setting in params, (name, setting)
    assert params["thresholding"].default == "clip", name
  # The older boolean name still works, and a contradiction is an error.
  key = jax.random.key(0)
  np.testing.assert_array_equal(sampler_call("ddim", clip_denoised=False)(blowing_up, key),
                                sampler_call("ddim", thresholding="none")(blowing_up, key))
  with pytest.raises(ValueError, match="clip_denoised"):
    sampler_call("ddim", clip_denoised=False, thresholding="dynamic")(blowing_up, key)


# --- default grids --------------------------------------------------------------------------------

def test_default_grids_are_the_authors():
  cosine = dj.get_schedule("cosine", 250)
  np.testing.assert_array_equal(grids.default_timesteps("ddim", 250, 25),
                                dj.samplers.space_timesteps(250, "ddim25"))
  np.testing.assert_array_equal(grids.default_timesteps("ddim", 250, 20),
                                np.floor(np.arange(20) * 12.5))
  np.testing.assert_array_equal(grids.default_timesteps("dpm_solver++", 250, 20),
                                dj.samplers.space_timesteps(250, "linspace20"))
  np.testing.assert_array_equal(grids.default_timesteps("ddpm", 250, 10),
                                dj.samplers.space_timesteps(250, "10"))
  for name in grids.SCHEDULE_SAMPLERS:
    np.testing.assert_array_equal(grids.default_timesteps(name, 250, 250), np.arange(250))
    p = dj.samplers.plan(name, cosine, 7)
    assert p.schedule.num_timesteps == 7 and p.per_call["timesteps"].shape == (7,)
  assert dj.samplers.plan("heun", cosine, 7).static == {"num_steps": 7}
  assert [dj.samplers.network_evaluations(n, 10) for n in ALL] == [10, 10, 10, 10, 19, 20]
  assert grids.steps_within("heun", 20) == 10 and grids.steps_within("ddim", 20) == 20
  with pytest.raises(ValueError, match="num_steps"):
    grids.default_timesteps("ddim", 250, 251)
  with pytest.raises(ValueError, match="timesteps"):
    dj.samplers.plan("euler", cosine, timesteps="ddim10")
  with pytest.raises(ValueError, match="sampler"):
    dj.samplers.plan("plms", cosine, 10)


def test_sigma_space_samplers_start_from_a_bounded_sigma():
  # Cosine, T = 250: the table's last sigma is ~5e3 (alpha_bar 3.9e-8); the grid starts at 80.
  cosine = dj.get_schedule("cosine", 250)
  assert float(ode.training_sigmas(cosine)[-1]) > 1e3
  sigmas, timesteps = ode.sigma_grid(cosine, 10)
  np.testing.assert_allclose(sigmas[0], 80.0, rtol=1e-6)
  np.testing.assert_allclose(sigmas[-2], ode.training_sigmas(cosine)[0], rtol=1e-6)
  assert float(timesteps[0]) < 249.0
  # A schedule whose largest sigma is below 80 keeps its own (linear, T = 20: ~ 3.3).
  short = dj.get_schedule("linear", 20, rescale=False)
  assert float(ode.training_sigmas(short)[-1]) < 80.0
  np.testing.assert_allclose(ode.sigma_grid(short, 5)[0][0], ode.training_sigmas(short)[-1],
                             rtol=1e-6)
  # The start is the VP prior at that sigma: x = sqrt(1 + sigma_max^2) x_vp (one Euler step
  # of a zero-x0 denoiser maps it to x (sigma_next / sigma_max)).
  x_vp = jax.random.normal(jax.random.key(0), (2, 3))
  out, trajectory = dj.get_sampler("euler", num_steps=3, thresholding="none")(
      lambda x, t: x * jnp.sqrt(1.0 + ode.t_to_sigma(cosine, t)[:, None] ** 2) / jnp.maximum(
          ode.t_to_sigma(cosine, t)[:, None], 1e-6), cosine, (2, 3), jax.random.key(0),
      x_init=x_vp, trajectory_stride=1)
  sigmas3, _ = ode.sigma_grid(cosine, 3)
  np.testing.assert_allclose(trajectory[0], x_vp * np.sqrt(1 + 80.0 ** 2) * sigmas3[1] / 80.0,
                             rtol=1e-4)
