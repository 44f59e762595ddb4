"""Structure of the samplers: one scan of N steps, no recompiles for traced knobs, device-count
independence, respacing specs, guidance, learned variances, the registry (inpainting,
trajectories and thresholding per sampler: test_samplers_driver.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax as dj
from diffusion_jax import rng as rng_lib
from numerics_testlib import assert_f32_close

T = 100
SCHEDULE = dj.get_schedule("linear", T)
SHAPE = (16, 4, 4, 3)


def toy_model(x, t):
  """A small fixed nonlinear network: (x [B, H, W, C], t [B]) -> [B, H, W, C]."""
  w = jnp.linspace(-0.5, 0.5, x.shape[-1] ** 2).reshape(x.shape[-1], x.shape[-1])
  t = jnp.asarray(t, jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
  spatial = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)), keepdims=True)
  return jnp.tanh(x @ w + 0.01 * t + spatial) * 0.5 + 0.3 * x


def run(name, model_fn=toy_model, shape=SHAPE, rng=None, steps=10, **kw):
  """The named sampler with `steps` steps (respaced for the schedule samplers)."""
  rng = jax.random.key(0) if rng is None else rng
  if name in dj.samplers.SCHEDULE_SAMPLERS:
    schedule, timesteps = dj.respace(SCHEDULE, steps)
    sampler = dj.get_sampler(name, **kw)
    return jax.jit(lambda s, ts, k: sampler(model_fn, s, shape, k, timesteps=ts))(
        schedule, timesteps, rng)
  sampler = dj.get_sampler(name, num_steps=steps, **kw)
  return jax.jit(lambda s, k: sampler(model_fn, s, shape, k))(SCHEDULE, rng)


ALL = ["ddpm", "ddim", "dpm_solver++", "euler", "heun", "pc"]


def scan_lengths(jaxpr):
  """Lengths of every scan in a jaxpr, sub-jaxprs (pjit, cond branches, scan bodies) included."""
  lengths = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      lengths.append(eqn.params["length"])
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):      # ClosedJaxpr
          lengths += scan_lengths(sub.jaxpr)
        elif hasattr(sub, "eqns"):                                    # Jaxpr
          lengths += scan_lengths(sub)
  return lengths


@pytest.mark.parametrize("steps", [7, 25])
@pytest.mark.parametrize("name", ALL)
def test_each_sampler_is_one_scan_of_its_step_count(name, steps):
  jaxpr = jax.make_jaxpr(lambda key: run(name, steps=steps, rng=key))(jax.random.key(0))
  assert scan_lengths(jaxpr.jaxpr) == [steps]


def test_nearest_timestep_mode_calls_the_network_with_integers():
  seen = []

  def model_fn(x, t):
    seen.append(t.dtype)
    return toy_model(x, t)

  run("heun", model_fn=model_fn, timestep_mode="nearest")
  assert seen and all(dtype == jnp.int32 for dtype in seen)


def test_likelihood_is_one_scan():
  x = jnp.zeros((2, 2, 2, 1))
  jaxpr = jax.make_jaxpr(lambda key: dj.ode_log_likelihood(toy_model, SCHEDULE, x, key,
                                                           num_steps=13))(jax.random.key(0))
  assert scan_lengths(jaxpr.jaxpr) == [13]


class CompileCounter:
  """Counts XLA backend compilations (jax.monitoring) while active."""
  EVENT = "/jax/core/compile/backend_compile_duration"
  active = None

  def __init__(self):
    self.count = 0

  def __enter__(self):
    CompileCounter.active = self
    return self

  def __exit__(self, *exc):
    CompileCounter.active = None

  @staticmethod
  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == CompileCounter.EVENT and CompileCounter.active is not None:
      CompileCounter.active.count += 1


jax.monitoring.register_event_duration_secs_listener(CompileCounter.listener)


def test_guidance_scale_and_timestep_subset_do_not_recompile():
  traces = []

  def cond_model(x, t, y):
    return toy_model(x, t) * (1.0 + 0.1 * y.astype(jnp.float32)[:, None, None, None])

  sampler = dj.get_sampler("ddim")

  @jax.jit
  def generate(schedule, timesteps, scale, eta, key):
    traces.append(1)
    model_fn = dj.classifier_free_guidance(cond_model, jnp.arange(SHAPE[0]) % 10, scale,
                                           null_label=10)
    return sampler(model_fn, schedule, SHAPE, key, timesteps=timesteps, eta=eta)

  key = jax.random.key(0)
  first = dj.respace(SCHEDULE, "20")
  out = generate(*first, jnp.float32(1.0), jnp.float32(0.0), key)
  with CompileCounter() as counter:
    calls = [
        generate(*first, jnp.float32(4.0), jnp.float32(0.0), key),          # guidance scale
        generate(*dj.respace(SCHEDULE, "10,10"), jnp.float32(1.0), jnp.float32(0.0), key),
        generate(*dj.respace(SCHEDULE, "ddim20"), jnp.float32(1.0), jnp.float32(0.0), key),
        generate(*first, jnp.float32(1.0), jnp.float32(1.0), key),          # eta
    ]
  assert counter.count == 0 and len(traces) == 1
  for other in calls:       # each change did change the samples
    assert not np.allclose(out, other)
  with CompileCounter() as counter:   # the counter does see a real recompile
    generate(*dj.respace(SCHEDULE, "30"), jnp.float32(1.0), jnp.float32(0.0), key)
  assert counter.count >= 1 and len(traces) == 2


# pc with the per-example corrector norms (its default batch norms tie a sample to the batch).
@pytest.mark.parametrize("name,kw", [("ddpm", {}), ("dpm_solver++", {}), ("heun", {}),
                                     ("pc", {"langevin_norms": "example"})])
def test_one_device_and_eight_devices_give_the_same_samples(name, kw):
  assert jax.local_device_count() == 8
  key = jax.random.key(42)
  single = jax.jit(lambda k: run(name, rng=k, **kw))(key)
  # Eight devices, two examples each: per-example keys from global example indices.
  keys = rng_lib.example_keys(key, SHAPE[0]).reshape(8, SHAPE[0] // 8)
  sharded = jax.pmap(lambda k: run(name, shape=(SHAPE[0] // 8,) + SHAPE[1:], rng=k, **kw))(keys)
  # Same keys and formulas, another compiled program (pmap): rounding only, up to ~10 float32
  # operations per network evaluation (2 per step for heun and pc) for 10 steps, on the largest
  # state.
  assert_f32_close(np.asarray(sharded).reshape(SHAPE), single,
                   ops=10 * 10 * dj.samplers.grids.EVALUATIONS_PER_STEP[name])


@pytest.mark.parametrize("thresholding", ["none", "clip", "dynamic"])
def test_ddim_with_eta_one_is_ancestral_sampling(thresholding):
  # With a thresholded x0, DDIM re-derives eps from it, which keeps eta = 1 equal to the posterior
  # mean at that x0: the identity holds under every policy.
  schedule, timesteps = dj.respace(SCHEDULE, "25")
  key = jax.random.key(3)
  ddpm = jax.jit(lambda s, ts: dj.get_sampler("ddpm", thresholding=thresholding)(
      toy_model, s, SHAPE, key, timesteps=ts))(schedule, timesteps)
  ddim = jax.jit(lambda s, ts: dj.get_sampler("ddim", thresholding=thresholding)(
      toy_model, s, SHAPE, key, timesteps=ts, eta=1.0))(schedule, timesteps)
  # Algebraically equal update rules written differently: rounding of ~10 operations x 25 steps.
  assert_f32_close(ddim, ddpm, ops=10 * 25)


@pytest.mark.parametrize("name", ["ddim", "dpm_solver++", "euler", "heun"])
def test_deterministic_samplers_ignore_learned_variance_channels(name):
  def learned(x, t):
    return jnp.concatenate([toy_model(x, t), jnp.sin(7.0 * x)], axis=-1)
  plain = run(name)
  with_variance = run(name, model_fn=learned, variance="learned_range")
  np.testing.assert_array_equal(with_variance, plain)
  with pytest.raises(ValueError, match="variance"):
    run(name, model_fn=learned)


def test_ancestral_uses_learned_variance():
  def learned(value):
    return lambda x, t: jnp.concatenate([toy_model(x, t), jnp.full_like(x, value)], axis=-1)
  small = run("ddpm")
  large = run("ddpm", variance="fixed_large")
  # v = -1 / +1 selects log(posterior variance) / log(beta): exp(log(.)) against the fixed
  # variance itself, a few ulps per step, 10 steps.
  assert_f32_close(run("ddpm", model_fn=learned(-1.0), variance="learned_range"), small,
                   ops=10 * 10)
  assert_f32_close(run("ddpm", model_fn=learned(1.0), variance="learned_range"), large,
                   ops=10 * 10)


# --- respacing ------------------------------------------------------------------------------------

def test_timestep_specs():
  np.testing.assert_array_equal(dj.samplers.space_timesteps(1000, "ddim50"), np.arange(0, 1000, 20))
  steps = dj.samplers.space_timesteps(1000, "10")
  assert len(steps) == 10 and steps[0] == 0 and steps[-1] == 999
  sections = dj.samplers.space_timesteps(300, "5,10,20")
  assert len(sections) == 35
  assert np.sum(sections < 100) == 5 and np.sum(sections >= 200) == 20
  assert np.all(np.diff(sections) > 0)
  np.testing.assert_array_equal(dj.samplers.space_timesteps(T, [30, 5, 60]), [5, 30, 60])
  np.testing.assert_array_equal(dj.samplers.space_timesteps(1000, "linspace4"),
                                [250, 500, 749, 999])
  for bad in ["ddim11", "linspace0", "abc", "0", "200", [3, 3], [100]]:
    with pytest.raises(ValueError):
      dj.samplers.space_timesteps(T, bad)


def test_respaced_schedule_keeps_alpha_bar_and_full_subset_is_identity():
  schedule, timesteps = dj.respace(SCHEDULE, "ddim10")
  np.testing.assert_allclose(schedule.alphas_cumprod, SCHEDULE.alphas_cumprod[timesteps],
                             rtol=1e-6)
  full, _ = dj.respace(SCHEDULE, str(T))
  for field in ("betas", "alphas_cumprod", "posterior_variance", "posterior_mean_coef1"):
    np.testing.assert_allclose(getattr(full, field), getattr(SCHEDULE, field), rtol=1e-6,
                               atol=1e-12)


# --- guidance and inpainting ----------------------------------------------------------------------

def test_classifier_free_guidance_is_one_batched_call_and_the_right_mix():
  calls = []

  def cond_model(x, t, y):
    calls.append(x.shape[0])
    out = toy_model(x, t) + 0.2 * y.astype(jnp.float32)[:, None, None, None]
    return jnp.concatenate([out, -out], axis=-1)    # prediction and "variance" channels

  x = jax.random.normal(jax.random.key(1), (4, 4, 4, 3))
  t = jnp.array([5, 6, 7, 8])
  labels = jnp.array([1, 2, 3, 4])
  cond = cond_model(x, t, labels)
  uncond = cond_model(x, t, jnp.full((4,), 10))
  calls.clear()
  guided = dj.classifier_free_guidance(cond_model, labels, 2.5, null_label=10)(x, t)
  assert calls == [8]
  mix = uncond + 2.5 * (cond - uncond)
  np.testing.assert_allclose(guided[..., :3], mix[..., :3], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(guided[..., 3:], cond[..., 3:], rtol=1e-6)      # variance: cond
  first = dj.classifier_free_guidance(cond_model, labels, 2.5, null_label=10, guide_channels=2)
  out = first(x, t)
  np.testing.assert_allclose(out[..., :2], mix[..., :2], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out[..., 2:], cond[..., 2:], rtol=1e-6)
  one = dj.classifier_free_guidance(cond_model, labels, 1.0, null_label=10)(x, t)
  np.testing.assert_allclose(one, cond, rtol=1e-6, atol=1e-6)


# --- registry -------------------------------------------------------------------------------------

def test_registry_rejects_unknown_names_and_settings():
  with pytest.raises(ValueError, match="allowed"):
    dj.get_sampler("plms")
  with pytest.raises(ValueError, match="num_steps"):
    dj.get_sampler("ddim", num_steps=10)
  with pytest.raises(ValueError, match="grid"):
    run("euler", grid="cosine")
  with pytest.raises(ValueError, match="timesteps"):
    dj.get_sampler("ddim")(toy_model, SCHEDULE, SHAPE, jax.random.key(0), timesteps=jnp.arange(3))
