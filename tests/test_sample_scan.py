"""dj.sample is one lax.scan: its program does not grow with T, and it is split-invariant."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax as dj
from numerics_testlib import assert_f32_close


def model_fn(x, t):
  return 0.1 * x * (t[:, None].astype(jnp.float32) / 100.0)


def walk(jaxpr):
  """Yields every equation, descending into sub-jaxprs (scan bodies, pjit, cond branches)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      subs = param if isinstance(param, (list, tuple)) else [param]
      for sub in subs:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from walk(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from walk(sub)


def sample_jaxpr(T, **kw):
  schedule = dj.get_schedule("cosine", T)
  return jax.make_jaxpr(lambda key: dj.sample(model_fn, schedule, (4, 2), key, **kw))(
      jax.random.PRNGKey(0))


@pytest.mark.parametrize("kw", [{}, dict(prediction="v", variance="fixed_large")])
def test_program_size_does_not_depend_on_T(kw):
  small, large = sample_jaxpr(10, **kw), sample_jaxpr(1000, **kw)
  n_small, n_large = len(list(walk(small.jaxpr))), len(list(walk(large.jaxpr)))
  assert n_small == n_large
  assert len(small.jaxpr.eqns) == len(large.jaxpr.eqns)
  for T, jaxpr in ((10, small), (1000, large)):
    scans = [e for e in walk(jaxpr.jaxpr) if e.primitive.name == "scan"]
    assert [e.params["length"] for e in scans] == [T]
    # The model is called inside the scan body, not unrolled outside it.
    outside = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "mul"]
    inside = [e for e in walk(scans[0].params["jaxpr"].jaxpr) if e.primitive.name == "mul"]
    assert inside and len(inside) > len(outside)


def test_trajectory_is_nested_scan():
  jaxpr = sample_jaxpr(1000, trajectory_stride=100)
  lengths = sorted(e.params["length"] for e in walk(jaxpr.jaxpr) if e.primitive.name == "scan")
  assert lengths == [10, 100]
  schedule = dj.get_schedule("cosine", 20)
  key = jax.random.PRNGKey(1)
  x, traj = jax.jit(lambda k: dj.sample(model_fn, schedule, (3, 2), k, trajectory_stride=5))(key)
  assert traj.shape == (4, 3, 2)
  np.testing.assert_array_equal(np.asarray(traj[-1]), np.asarray(x))
  x_plain = jax.jit(lambda k: dj.sample(model_fn, schedule, (3, 2), k))(key)
  # The nested scan does the same arithmetic in another compiled program: rounding only,
  # ~10 float32 operations per step x 20 steps.
  assert_f32_close(x_plain, x, ops=10 * 20)
  with pytest.raises(ValueError, match="trajectory_stride"):
    dj.sample(model_fn, schedule, (3, 2), key, trajectory_stride=3)


def test_sample_is_python_loop_of_p_sample_and_split_invariant():
  """The scan equals T explicit p_sample calls; halves of a batch (with offsets) equal the whole."""
  T = 12
  schedule = dj.get_schedule("linear", T, rescale=False)
  key = jax.random.PRNGKey(2)
  run = jax.jit(lambda k, x_init: dj.sample(model_fn, schedule, (6, 2), k, x_init=x_init))
  x_init = jax.random.normal(jax.random.PRNGKey(3), (6, 2))
  x_scan = run(key, x_init)
  keys = dj.rng.example_keys(key, 6)

  @jax.jit
  def step(x, t):
    tt = jnp.full((6,), t, jnp.int32)
    noise = dj.rng.normal(dj.rng.fold_in_all(keys, t), (2,))
    return dj.p_sample(schedule, model_fn(x, tt), x, tt, None, noise=noise)[0]

  x = x_init
  for t in range(T - 1, -1, -1):
    x = step(x, t)
  # Python loop of jitted steps vs one scan: rounding of ~10 operations per step x T steps.
  assert_f32_close(x_scan, x, ops=10 * T)
  # Device split: two shards with per-example keys from global indices give the same samples.
  full = jax.jit(lambda k: dj.sample(model_fn, schedule, (6, 2), k))(key)
  shard = jax.jit(lambda ks: dj.sample(model_fn, schedule, (3, 2), ks))
  halves = [shard(dj.rng.example_keys(key, 3, offset=o)) for o in (0, 3)]
  # Another batch size is another program (vectorisation may change): rounding only.
  assert_f32_close(np.concatenate([np.asarray(h) for h in halves]), full, ops=10 * T)
  # And under pmap over 2 devices with keys sharded by global example index.
  if jax.local_device_count() >= 2:
    pm = jax.pmap(lambda ks: dj.sample(model_fn, schedule, (3, 2), ks))
    out = pm(keys.reshape(2, 3, *keys.shape[1:])).reshape(6, 2)
    assert_f32_close(out, full, ops=10 * T)


def test_sample_errors():
  schedule = dj.get_schedule("cosine", 10)
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="prediction"):
    dj.sample(model_fn, schedule, (2, 2), key, prediction="epsilon")
  with pytest.raises(ValueError, match="variance"):
    dj.sample(model_fn, schedule, (2, 2), key, variance="large")
  with pytest.raises(ValueError, match="x_init"):
    dj.sample(model_fn, schedule, (2, 2), key, x_init=jnp.zeros((3, 2)))


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_single_step_schedule(variance):
  """T = 1: one denoising step, no noise, finite for both fixed variances."""
  schedule = dj.from_betas([0.5])
  x = dj.sample(model_fn, schedule, (3, 2), jax.random.PRNGKey(0), variance=variance)
  assert np.all(np.isfinite(np.asarray(x)))


def test_zero_terminal_snr_with_v_prediction_is_finite():
  schedule = dj.get_schedule("linear", 50, zero_terminal_snr=True)
  x = jax.jit(lambda k: [dj.sample(model_fn, schedule, (4, 2), k, prediction="v", variance=v)
                         for v in ("fixed_small", "fixed_large")])(jax.random.PRNGKey(0))
  assert np.all(np.isfinite(np.asarray(x)))
