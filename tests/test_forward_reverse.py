"""Forward posterior vs brute-force Bayes, parameterization conversions, reverse-step moments.

The references are float64 NumPy written here: Gaussian conditioning of the joint of
(x_{t-1}, x_t) given x0 built from the one-step kernel q(x_t | x_{t-1}) = N(sqrt(a_t) x_{t-1}, b_t)
and the marginal q(x_{t-1} | x0) = N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}), and a numerical
integration of the unnormalised posterior on a grid.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics_testlib import assert_f32_close

import diffusion_jax as dj

F32_OPS = 16

SCHEDULES = [("linear", 1000), ("cosine", 1000), ("sigmoid", 300)]


def np_schedule(name, T):
  """float64 alpha_bar and betas from the library's (float64-exact) betas factory."""
  from diffusion_jax import schedules
  betas = schedules.BETA_SCHEDULES[name](T)
  return betas, np.cumprod(1.0 - betas)


def assert_within(got, want, tol):
  """|got - want| <= tol elementwise, with broadcasting (tol may be per-row)."""
  err = np.abs(np.asarray(got, np.float64) - want)
  tol = np.broadcast_to(tol, err.shape)
  bad = err > tol
  assert not bad.any(), f"{bad.sum()} of {bad.size} off; worst error/tol {np.max(err / tol):.3g}"


def data(key, shape):
  k1, k2 = jax.random.split(key)
  return jax.random.uniform(k1, shape, minval=-1.0, maxval=1.0), jax.random.normal(k2, shape)


@pytest.mark.parametrize("name,T", SCHEDULES)
def test_q_posterior_is_bayes_rule_by_gaussian_conditioning_at_every_t(name, T):
  schedule = dj.get_schedule(name, T)
  betas, abar = np_schedule(name, T)
  t = np.arange(T)
  x0, noise = data(jax.random.PRNGKey(0), (T, 3))        # one example per timestep
  xt = dj.q_sample(schedule, x0, jnp.asarray(t), noise)
  mean, var, log_var = dj.q_posterior_mean_variance(schedule, x0, xt, jnp.asarray(t))

  x0_64, xt_64 = np.asarray(x0, np.float64), np.asarray(xt, np.float64)
  abar_prev = np.append(1.0, abar[:-1])[:, None]
  alpha = (1.0 - betas)[:, None]
  beta = betas[:, None]
  # Joint of (y = x_{t-1}, x_t) given x0: y ~ N(m1, V1); x_t | y ~ N(sqrt(a) y, b).
  m1, v1 = np.sqrt(abar_prev) * x0_64, 1.0 - abar_prev
  m2, v2 = np.sqrt(alpha) * m1, alpha * v1 + beta
  c12 = np.sqrt(alpha) * v1
  ref_mean = m1 + c12 / v2 * (xt_64 - m2)
  ref_var = np.broadcast_to(v1 - c12 ** 2 / v2, ref_mean.shape)

  # float32 tables (each within eps / 2 of float64) and ~5 operations: 16 ulps of the largest
  # value (F32_OPS) holds every comparison against the float64 references in this file.
  assert_f32_close(mean, ref_mean, ops=F32_OPS)
  assert_f32_close(np.asarray(var)[1:], ref_var[1:], ops=F32_OPS)
  assert_f32_close(np.asarray(log_var)[1:], np.log(ref_var[1:]), ops=F32_OPS)
  # t = 0: x_{-1} is x0 itself; variance 0, log variance clipped to the t = 1 value.
  assert_f32_close(np.asarray(mean)[0], x0_64[0], ops=F32_OPS)
  assert float(var[0, 0]) == 0.0
  assert_f32_close(np.asarray(log_var)[0], np.broadcast_to(np.log(ref_var[1]), log_var[0].shape),
                   ops=F32_OPS)


@pytest.mark.parametrize("name,T", SCHEDULES[:2])
def test_q_posterior_by_numerical_integration_at_every_t(name, T):
  """Bayes' rule with no algebra: normalise kernel x marginal on a grid of x_{t-1}."""
  schedule = dj.get_schedule(name, T)
  betas, abar = np_schedule(name, T)
  t = np.arange(1, T)
  x0, noise = data(jax.random.PRNGKey(1), (T - 1, 1))
  xt = dj.q_sample(schedule, x0, jnp.asarray(t), noise)
  mean, var, _ = dj.q_posterior_mean_variance(schedule, x0, xt, jnp.asarray(t))

  x0_64, xt_64 = np.asarray(x0, np.float64)[:, 0], np.asarray(xt, np.float64)[:, 0]
  abar_prev, alpha, beta = abar[t - 1], 1.0 - betas[t], betas[t]
  prior_mean, prior_var = np.sqrt(abar_prev) * x0_64, 1.0 - abar_prev
  lik_mean, lik_var = xt_64 / np.sqrt(alpha), beta / alpha      # kernel seen as a function of y
  s = np.sqrt(np.minimum(prior_var, lik_var))                   # the posterior is narrower
  lo = np.minimum(prior_mean, lik_mean) - 12 * s
  hi = np.maximum(prior_mean, lik_mean) + 12 * s
  y = lo[:, None] + (hi - lo)[:, None] * np.linspace(0.0, 1.0, 6001)[None, :]
  log_w = (-0.5 * (xt_64[:, None] - np.sqrt(alpha)[:, None] * y) ** 2 / beta[:, None]
           - 0.5 * (y - prior_mean[:, None]) ** 2 / prior_var[:, None])
  w = np.exp(log_w - log_w.max(axis=1, keepdims=True))
  w /= w.sum(axis=1, keepdims=True)
  ref_mean = (w * y).sum(axis=1)
  ref_var = (w * (y - ref_mean[:, None]) ** 2).sum(axis=1)
  assert_f32_close(np.asarray(mean)[:, 0], ref_mean, ops=F32_OPS)
  assert_f32_close(np.asarray(var)[:, 0], ref_var, ops=F32_OPS)


def test_q_mean_variance_and_q_sample():
  schedule = dj.get_schedule("cosine", 100)
  betas, abar = np_schedule("cosine", 100)
  x0, noise = data(jax.random.PRNGKey(2), (5, 4, 4, 2))
  t = jnp.array([0, 10, 50, 98, 99])
  mean, var, log_var = dj.q_mean_variance(schedule, x0, t)
  a = abar[np.asarray(t)][:, None, None, None]
  assert_f32_close(mean, np.sqrt(a) * np.asarray(x0), ops=F32_OPS)
  assert_f32_close(var, np.broadcast_to(1 - a, x0.shape), ops=F32_OPS)
  assert_f32_close(log_var, np.broadcast_to(np.log(1 - a), x0.shape), ops=F32_OPS)
  xt = dj.q_sample(schedule, x0, t, noise)
  assert_f32_close(xt, np.sqrt(a) * np.asarray(x0) + np.sqrt(1 - a) * np.asarray(noise),
                   ops=F32_OPS)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_conversions_round_trip(name):
  T = 1000
  schedule = dj.get_schedule(name, T)
  _, abar = np_schedule(name, T)
  t = jnp.arange(0, T, 7)
  x0, eps = data(jax.random.PRNGKey(3), (t.shape[0], 6))
  xt = dj.q_sample(schedule, x0, t, eps)
  v = dj.v_from_eps_x0(schedule, t, eps, x0)
  a = abar[np.asarray(t)][:, None]
  x0_64, eps_64 = np.asarray(x0, np.float64), np.asarray(eps, np.float64)
  assert_f32_close(v, np.sqrt(a) * eps_64 - np.sqrt(1 - a) * x0_64, ops=F32_OPS)
  # Recovering x0 from eps divides by sqrt(abar): float32 error grows like 1/sqrt(abar).
  tol_x0 = 4e-6 * np.sqrt(1 / a)
  tol_eps = 4e-6 * np.sqrt(1 / (1 - a))
  close = assert_within
  close(dj.x0_from_eps(schedule, xt, t, eps), x0_64, tol_x0)
  close(dj.eps_from_x0(schedule, xt, t, x0), eps_64, tol_eps)
  close(dj.x0_from_v(schedule, xt, t, v), x0_64, 4e-6)
  close(dj.eps_from_v(schedule, xt, t, v), eps_64, 4e-6)
  for pred, out in (("eps", eps), ("x0", x0), ("v", v)):
    close(dj.predict_x0(schedule, out, xt, t, pred), x0_64, tol_x0)
    close(dj.predict_eps(schedule, out, xt, t, pred), eps_64, tol_eps)
    np.testing.assert_allclose(np.asarray(dj.prediction_target(schedule, x0, t, eps, pred)),
                               np.asarray(out), rtol=1e-6, atol=1e-7)


# --- p_mean_variance against NumPy ----------------------------------------------------------------

def np_p_mean_variance(betas, output, xt, t, prediction, variance, clip):
  """Reverse-step moments in float64 from the papers' formulas."""
  abar = np.cumprod(1 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  post_var = betas * (1 - abar_prev) / (1 - abar)
  post_log_clipped = np.log(np.append(post_var[1], post_var[1:]))
  c = xt.shape[-1]
  learned = variance.startswith("learned")
  pred, var_out = (output[..., :c], output[..., c:]) if learned else (output, None)
  col = lambda arr: arr[t][:, None]
  a = col(abar)
  if prediction == "eps":
    x0 = (xt - np.sqrt(1 - a) * pred) / np.sqrt(a)
  elif prediction == "v":
    x0 = np.sqrt(a) * xt - np.sqrt(1 - a) * pred
  else:
    x0 = pred
  if clip:
    x0 = np.clip(x0, -1, 1)
  mean = (col(np.sqrt(abar_prev) * betas / (1 - abar)) * x0
          + col(np.sqrt(1 - betas) * (1 - abar_prev) / (1 - abar)) * xt)
  if variance == "fixed_small":
    log_var = np.broadcast_to(col(post_log_clipped), xt.shape)
  elif variance == "fixed_large":
    log_var = np.broadcast_to(col(np.log(np.append(post_var[1], betas[1:]))), xt.shape)
  elif variance == "learned":
    log_var = var_out
  else:  # Nichol & Dhariwal 2021, eq. 15
    frac = (var_out + 1) / 2
    log_var = frac * col(np.log(betas)) + (1 - frac) * col(post_log_clipped)
  return mean, np.exp(log_var), log_var, x0


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned", "learned_range"])
@pytest.mark.parametrize("clip", [True, False])
def test_p_mean_variance_vs_numpy(prediction, variance, clip):
  T = 1000
  schedule = dj.get_schedule("linear", T)
  betas, _ = np_schedule("linear", T)
  t = np.array([0, 1, 2, 10, 100, 500, 998, 999])
  c = 3
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(4), 3)
  xt = jax.random.normal(k1, (len(t), c)) * 1.5
  out = jax.random.normal(k2, (len(t), c))
  if variance == "learned":
    out = jnp.concatenate([out, jax.random.uniform(k3, (len(t), c), minval=-12.0, maxval=-2.0)], -1)
  elif variance == "learned_range":
    out = jnp.concatenate([out, jax.random.uniform(k3, (len(t), c), minval=-1.0, maxval=1.0)], -1)
  fn = jax.jit(lambda o, x, tt: dj.p_mean_variance(schedule, o, x, tt, prediction=prediction,
                                                   variance=variance, clip_denoised=clip))
  got = fn(out, xt, jnp.asarray(t))
  ref = np_p_mean_variance(betas, np.asarray(out, np.float64), np.asarray(xt, np.float64), t,
                           prediction, variance, clip)
  # pred_x0 from eps divides by sqrt(abar) (~158 at t = 999 for the linear schedule).
  scale = np.sqrt(1 / np.cumprod(1 - betas))[t][:, None]
  assert_within(got.pred_x0, ref[3], 4e-6 * scale + 1e-6)
  assert_f32_close(got.mean, ref[0], ops=F32_OPS)
  assert_f32_close(got.log_variance, ref[2], ops=F32_OPS)
  assert_f32_close(got.variance, ref[1], ops=F32_OPS)


def test_p_sample_noise_override_and_t0():
  schedule = dj.get_schedule("cosine", 50)
  xt = jax.random.normal(jax.random.PRNGKey(5), (4, 2))
  out = jax.random.normal(jax.random.PRNGKey(6), (4, 2))
  z = jax.random.normal(jax.random.PRNGKey(7), (4, 2))
  t = jnp.array([0, 1, 25, 49])
  for variance in ("fixed_small", "fixed_large"):
    m = dj.p_mean_variance(schedule, out, xt, t, variance=variance)
    x_prev, pred_x0 = dj.p_sample(schedule, out, xt, t, None, variance=variance, noise=z)
    want = np.asarray(m.mean) + np.array([0, 1, 1, 1])[:, None] * np.exp(
        0.5 * np.asarray(m.log_variance)) * np.asarray(z)
    np.testing.assert_allclose(np.asarray(x_prev), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(x_prev)[0], np.asarray(m.mean)[0])  # no noise at t=0
    np.testing.assert_array_equal(np.asarray(pred_x0), np.asarray(m.pred_x0))


@pytest.mark.parametrize("typed", [False, True])
def test_p_sample_rng_is_per_example(typed):
  """One key == its per-example keys; a batch split with offsets gives the same draws."""
  schedule = dj.get_schedule("linear", 100)
  key = jax.random.key(8) if typed else jax.random.PRNGKey(8)
  xt = jax.random.normal(jax.random.PRNGKey(9), (8, 3))
  out = jnp.zeros((8, 3))
  t = jnp.full((8,), 40)
  step = jax.jit(lambda o, x, tt, k: dj.p_sample(schedule, o, x, tt, k)[0])
  full = step(out, xt, t, key)
  eager, _ = dj.p_sample(schedule, out, xt, t, key)
  np.testing.assert_allclose(np.asarray(eager), np.asarray(full), rtol=1e-6)  # XLA fusion ulps
  keys = dj.rng.example_keys(key, 8)
  np.testing.assert_array_equal(np.asarray(full), np.asarray(step(out, xt, t, keys)))
  halves = [step(out[i:i + 4], xt[i:i + 4], t[i:i + 4], dj.rng.example_keys(key, 4, offset=i))
            for i in (0, 4)]
  np.testing.assert_array_equal(np.asarray(full), np.concatenate([np.asarray(h) for h in halves]))
  # Different examples get different noise.
  noise = np.asarray(full) - np.asarray(dj.p_mean_variance(schedule, out, xt, t).mean)
  assert len(np.unique(noise[:, 0])) == 8
  with pytest.raises(ValueError, match="per-example keys"):
    dj.p_sample(schedule, out, xt, t, keys[:3])
  with pytest.raises(ValueError, match="rng"):
    dj.p_sample(schedule, out, xt, t, None)


def test_shape_and_name_errors():
  s = dj.get_schedule("linear", 100)
  x = jnp.zeros((2, 4, 4, 3))
  t = jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match="x0 and noise"):
    dj.q_sample(s, x, t, jnp.zeros((2, 4, 4, 1)))
  with pytest.raises(ValueError, match="x0 and xt"):
    dj.q_posterior_mean_variance(s, x, jnp.zeros((2, 4, 3)), t)
  with pytest.raises(ValueError, match="eps and x0"):
    dj.v_from_eps_x0(s, t, x, jnp.zeros((1, 4, 4, 3)))
  with pytest.raises(ValueError, match="shaped like x_t"):
    dj.p_mean_variance(s, jnp.zeros((2, 4, 4, 6)), x, t)
  with pytest.raises(ValueError, match="learned_range"):
    dj.p_mean_variance(s, x, x, t, variance="learned_range")
  with pytest.raises(ValueError, match=r"'eps', 'x0', 'v'"):
    dj.p_mean_variance(s, x, x, t, prediction="epsilon")
  with pytest.raises(ValueError, match="fixed_small"):
    dj.p_mean_variance(s, x, x, t, variance="small")
  with pytest.raises(ValueError, match="noise and xt"):
    dj.p_sample(s, x, x, t, None, noise=jnp.zeros((2, 4, 4, 1)))


# --- timesteps out of range (issue 9) --------------------------------------------------------------

@pytest.mark.parametrize("bad", [[-1, 0], [0, 10], [10, 11], [0.0, 1.0]])
def test_concrete_timesteps_outside_the_schedule_raise(bad):
  schedule = dj.get_schedule("cosine", 10)
  x = jnp.ones((2, 3))
  t = jnp.asarray(bad)
  calls = {
      "q_sample": lambda: dj.q_sample(schedule, x, t, x),
      "q_mean_variance": lambda: dj.q_mean_variance(schedule, x, t),
      "q_posterior_mean_variance": lambda: dj.q_posterior_mean_variance(schedule, x, x, t),
      "p_mean_variance": lambda: dj.p_mean_variance(schedule, x, x, t),
      "training_loss": lambda: dj.training_loss(lambda xt, tt: xt, schedule, x, None, t=t,
                                                noise=x),
  }
  for name, call in calls.items():
    with pytest.raises(ValueError, match=r"t must .*\[0, 9\]"):
      call()
      pytest.fail(name)
  with pytest.raises(ValueError, match="t must lie"):      # a Python int too
    dj.q_sample(schedule, x, 10, x)


def test_traced_timesteps_outside_the_schedule_give_nan_not_another_step():
  """Under jit t cannot be checked: -1 must not silently mean T - 1, T must not read garbage."""
  schedule = dj.get_schedule("cosine", 10)
  x = jnp.ones((3, 2))
  t = jnp.array([-1, 4, 10])
  q = np.asarray(jax.jit(lambda t: dj.q_sample(schedule, x, t, x))(t))
  p = np.asarray(jax.jit(lambda t: dj.p_mean_variance(schedule, x, x, t).mean)(t))
  for out in (q, p):
    assert np.all(np.isnan(out[[0, 2]])) and np.all(np.isfinite(out[1]))
  np.testing.assert_array_equal(q[1], np.asarray(dj.q_sample(schedule, x[1:2], jnp.array([4]),
                                                             x[1:2]))[0])
