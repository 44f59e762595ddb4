"""Training losses vs NumPy float64 on fixed inputs; grad, vmap and jit; the hybrid stop-gradient.

References: Ho et al. 2020 eq. 14 (L_simple) and eq. 5 (VLB); Nichol & Dhariwal 2021 sec. 3.1
(L_hybrid, learned range); Hang et al. 2023 (min-SNR-gamma); Choi et al. 2022 eq. 8 (P2).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_ndtr

import diffusion_jax as dj
from numerics_testlib import f32_tol
from diffusion_jax import schedules

T = 1000
NAME = "linear"
B, H, C = 6, 3, 2
T_FIXED = np.array([0, 1, 7, 300, 800, 999])


def np_schedule():
  betas = schedules.BETA_SCHEDULES[NAME](T)
  abar = np.cumprod(1 - betas)
  return betas, abar, np.append(1.0, abar[:-1])


def fixed_inputs(learned):
  rng = np.random.default_rng(0)
  x0 = rng.integers(0, 256, (B, H, C)) * (2.0 / 255.0) - 1.0        # on the 256-level grid
  x0[0, 0, 0], x0[1, 0, 1] = -1.0, 1.0                                  # the two edge bins
  noise = rng.standard_normal((B, H, C))
  out_c = 2 * C if learned else C
  w = rng.standard_normal((C, out_c)) * 0.5
  b = rng.standard_normal(out_c) * 0.1
  if learned:
    w[:, C:] *= 0.2
  return (x0.astype(np.float32), noise.astype(np.float32), w.astype(np.float32),
          b.astype(np.float32))


def jax_model(w, b):
  def model_fn(xt, t):
    return jnp.tanh(xt @ w + b + 1e-3 * t[:, None, None].astype(jnp.float32))
  return model_fn


def np_model(w, b, xt, t):
  return np.tanh(xt @ w.astype(np.float64) + b + 1e-3 * t[:, None, None])


def np_loss(x0, noise, w, b, t, prediction, loss_type, weighting, variance,
            gamma=5.0, p2_gamma=1.0, p2_k=1.0, vlb_weight=1e-3):
  """The per-example loss in float64 from the papers' formulas."""
  betas, abar, abar_prev = np_schedule()
  x0, noise = x0.astype(np.float64), noise.astype(np.float64)
  col = lambda v: v[t][:, None, None]
  a = col(abar)
  xt = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
  out = np_model(w, b, xt, t)
  pred, var_out = (out[..., :C], out[..., C:]) if out.shape[-1] == 2 * C else (out, None)
  flat = lambda v: v.reshape(B, -1).mean(axis=1)

  def vb():
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_log = np.log(np.append(post_var[1], post_var[1:]))
    c1 = np.sqrt(abar_prev) * betas / (1 - abar)
    c2 = np.sqrt(1 - betas) * (1 - abar_prev) / (1 - abar)
    true_mean = col(c1) * x0 + col(c2) * xt
    true_log = col(post_log)
    x0_hat = {"eps": (xt - np.sqrt(1 - a) * pred) / np.sqrt(a),
              "x0": pred, "v": np.sqrt(a) * xt - np.sqrt(1 - a) * pred}[prediction]
    mean = col(c1) * x0_hat + col(c2) * xt
    if variance == "fixed_small":
      log_var = np.broadcast_to(true_log, xt.shape)
    elif variance == "fixed_large":
      log_var = np.broadcast_to(col(np.log(np.append(post_var[1], betas[1:]))), xt.shape)
    else:  # learned_range
      frac = (var_out + 1) / 2
      log_var = frac * col(np.log(betas)) + (1 - frac) * true_log
    kl = 0.5 * (-1 + log_var - true_log + np.exp(true_log - log_var)
                + (true_mean - mean) ** 2 * np.exp(-log_var))
    s = np.exp(0.5 * log_var)
    up, lo = (x0 - mean + 1 / 255) / s, (x0 - mean - 1 / 255) / s
    # log(Phi(up) - Phi(lo)), evaluated in whichever tail keeps it accurate (Phi(up) - Phi(lo)
    # = Phi(-lo) - Phi(-up)), so far-off means give large finite values, not log(0).
    flip = up + lo > 0
    hi_arg, lo_arg = np.where(flip, -lo, up), np.where(flip, -up, lo)
    mid = log_ndtr(hi_arg) + np.log1p(-np.exp(log_ndtr(lo_arg) - log_ndtr(hi_arg)))
    ll = np.where(x0 < -0.999, log_ndtr(up), np.where(x0 > 0.999, log_ndtr(-lo), mid))
    return np.where(t == 0, -flat(ll), flat(kl)) / math.log(2)

  if loss_type == "kl":
    return vb()
  target = {"eps": noise, "x0": x0, "v": np.sqrt(a) * noise - np.sqrt(1 - a) * x0}[prediction]
  loss = flat(np.abs(target - pred)) if loss_type == "l1" else flat((target - pred) ** 2)
  snr = (abar / (1 - abar))[t]
  if weighting == "min_snr":
    clipped = np.minimum(snr, gamma)
    loss = loss * {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[prediction]
  elif weighting == "p2":
    loss = loss / (p2_k + snr) ** p2_gamma
  if loss_type == "hybrid":
    loss = loss + vlb_weight * T * vb()
  return loss


CASES = ([(p, l, w, "fixed_small") for p in ("eps", "x0", "v") for l in ("mse", "l1")
          for w in ("none", "min_snr", "p2")]
         + [(p, "kl", "none", v) for p in ("eps", "x0", "v")
            for v in ("fixed_small", "fixed_large", "learned_range")]
         + [(p, "hybrid", "none", "learned_range") for p in ("eps", "v")])


@pytest.mark.parametrize("prediction,loss_type,weighting,variance", CASES)
def test_loss_vs_numpy(prediction, loss_type, weighting, variance):
  learned = variance == "learned_range"
  x0, noise, w, b = fixed_inputs(learned)
  schedule = dj.get_schedule(NAME, T)
  kw = dict(prediction=prediction, loss_type=loss_type, weighting=weighting, variance=variance)
  # Eager (jit is covered below): op-by-op executables are cached across cases, a jit is not.
  got = dj.training_loss(jax_model(w, b), schedule, x0, None, t=jnp.asarray(T_FIXED), noise=noise,
                         **kw)
  want = np_loss(x0, noise, w, b, T_FIXED, prediction, loss_type, weighting, variance)
  assert got.shape == (B,) and got.dtype == jnp.float32
  # float32 forward pass vs float64; the eps -> x0 conversion at t = 999 amplifies by ~158.
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("gamma,p2_gamma,p2_k", [(1.0, 0.5, 2.0), (20.0, 2.0, 0.5)])
def test_weighting_parameters(gamma, p2_gamma, p2_k):
  x0, noise, w, b = fixed_inputs(False)
  schedule = dj.get_schedule(NAME, T)
  for weighting in ("min_snr", "p2"):
    got = dj.training_loss(jax_model(w, b), schedule, x0, None, t=jnp.asarray(T_FIXED),
                           noise=noise, weighting=weighting, min_snr_gamma=gamma,
                           p2_gamma=p2_gamma, p2_k=p2_k)
    want = np_loss(x0, noise, w, b, T_FIXED, "eps", "mse", weighting, "fixed_small",
                   gamma=gamma, p2_gamma=p2_gamma, p2_k=p2_k)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=1e-6)


def test_rng_draws_t_and_noise_per_example():
  """With only rng, t and noise come from each example's key as documented."""
  x0, _, w, b = fixed_inputs(False)
  schedule = dj.get_schedule(NAME, T)
  key = jax.random.PRNGKey(3)
  got = dj.training_loss(jax_model(w, b), schedule, x0, key)
  keys = dj.rng.example_keys(key, B)
  t = dj.rng.randint(dj.rng.fold_in_all(keys, 0), 0, T)
  noise = dj.rng.normal(dj.rng.fold_in_all(keys, 1), x0.shape[1:])
  want = dj.training_loss(jax_model(w, b), schedule, x0, None, t=t, noise=noise)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # Timesteps are uniform on {0..T-1}: a large batch covers the range with the right mean.
  n = 8000
  big = jax.jit(lambda k: dj.rng.randint(dj.rng.example_keys(k, n), 0, T))(key)
  assert int(big.min()) == 0 and int(big.max()) == T - 1
  assert abs(float(big.mean()) - (T - 1) / 2) < 4 * math.sqrt((T ** 2 - 1) / 12 / n)


@pytest.mark.parametrize("loss_type,variance", [("l1", "fixed_small"), ("kl", "fixed_large"),
                                                ("kl", "learned_range")])
def test_grad_matches_finite_differences(loss_type, variance):
  """(Not 'hybrid': its gradient is deliberately not the derivative of its value; see below.)"""
  learned = variance == "learned_range"
  x0, noise, w, b = fixed_inputs(learned)
  schedule = dj.get_schedule(NAME, T)
  # Away from t = 0, 1, where this random model's VLB terms are ~1e3 bits and too curved for a
  # float32 finite difference.
  t = jnp.asarray(T_FIXED[2:])
  x0, noise = x0[2:], noise[2:]

  def mean_loss(params):
    return jnp.mean(dj.training_loss(jax_model(*params), schedule, x0, None, t=t, noise=noise,
                                     loss_type=loss_type, variance=variance))

  params = (jnp.asarray(w), jnp.asarray(b))
  value_and_grad = jax.jit(jax.value_and_grad(mean_loss))
  _, grads = value_and_grad(params)
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0)
  # Richardson-extrapolated central difference along a random direction (error O(h^4)).
  direction = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(5), p.shape), params)
  at = lambda step: float(value_and_grad(
      jax.tree.map(lambda p, d: p + step * d, params, direction))[0])
  central = lambda h: (at(h) - at(-h)) / (2 * h)
  h = 5e-3
  fd = (4 * central(h) - central(2 * h)) / 3
  analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads),
                                                        jax.tree.leaves(direction), strict=True))
  # The error is float32 rounding of the loss values, divided by the step: a value rounds by
  # about ops x eps32 x |loss| (~20 operations), and the Richardson combination weighs those
  # roundings by (4/3 + 1/6) / h ~ 1.5 / h; the O(h^4) truncation is far below that. Measured
  # errors: 2.3e-6, 3.5e-6, 3.3e-6 absolute (<= 8.5e-4 relative) against bounds ~1e-5..1e-4
  # (the former rtol 2e-2 was 25x the largest measured error).
  scale = max(abs(at(s)) for s in (h, -h, 2 * h, -2 * h))
  np.testing.assert_allclose(fd, analytic, rtol=0, atol=1.5 * f32_tol(20, scale) / h)


def test_vmap_and_jit():
  """vmap over a leading group axis (e.g. per-device shards) == a loop; jit == eager."""
  x0, _, w, b = fixed_inputs(True)
  schedule = dj.get_schedule(NAME, T)
  per_group = lambda x, k: dj.training_loss(jax_model(w, b), schedule, x, k, loss_type="hybrid")
  xs = jnp.stack([x0, -x0, x0 * 0.5])
  keys = jax.random.split(jax.random.PRNGKey(4), 3)
  vmapped = np.asarray(jax.jit(jax.vmap(per_group))(xs, keys))
  for i in range(3):
    np.testing.assert_allclose(vmapped[i], np.asarray(per_group(xs[i], keys[i])), rtol=2e-5,
                               atol=1e-6)


def test_hybrid_stops_the_vb_gradient_into_the_mean():
  """d L_hybrid / d(mean channels) == d L_mse / d(mean channels); variance channels get only vb."""
  x0, noise, _, _ = fixed_inputs(True)
  schedule = dj.get_schedule(NAME, T)
  t = jnp.asarray(T_FIXED)
  out0 = jax.random.normal(jax.random.PRNGKey(6), (B, H, 2 * C)) * 0.3

  def loss(out, loss_type):
    model = lambda xt, tt: out
    return jnp.sum(dj.training_loss(model, schedule, x0, None, t=t, noise=noise,
                                    loss_type=loss_type, variance="learned_range"))

  grads = jax.jit(lambda out: {k: jax.grad(loss)(out, k) for k in ("hybrid", "mse", "kl")})(out0)
  g_hybrid, g_mse, g_kl = (np.asarray(grads[k]) for k in ("hybrid", "mse", "kl"))
  np.testing.assert_allclose(g_hybrid[..., :C], g_mse[..., :C], rtol=1e-6, atol=1e-9)
  assert np.all(g_mse[..., C:] == 0)
  np.testing.assert_allclose(g_hybrid[..., C:], 1e-3 * T * g_kl[..., C:], rtol=1e-5, atol=1e-9)
  # Without the stop-gradient the KL would push on the mean channels: it does here.
  assert np.abs(g_kl[..., :C]).max() > 1e-3


def test_bad_static_arguments():
  x0, _, w, b = fixed_inputs(False)
  s = dj.get_schedule(NAME, 100)
  m = jax_model(w, b)
  key = jax.random.PRNGKey(0)
  cases = [(dict(loss_type="huber"), "loss_type"), (dict(weighting="snr"), "weighting"),
           (dict(prediction="epsilon"), "prediction"), (dict(variance="small"), "variance"),
           (dict(loss_type="hybrid", variance="fixed_small"), "hybrid"),
           (dict(loss_type="kl", weighting="min_snr"), "weighting")]
  for kw, match in cases:
    with pytest.raises(ValueError, match=match):
      dj.training_loss(m, s, x0, key, **kw)
  with pytest.raises(ValueError, match="x0 and noise"):
    dj.training_loss(m, s, x0, None, t=jnp.zeros(B, jnp.int32), noise=jnp.zeros((B, 2)))


@pytest.mark.parametrize("prediction,expected_last", [("eps", 1.0), ("v", 0.0), ("x0", 0.0)])
def test_min_snr_weight_is_finite_at_zero_terminal_snr(prediction, expected_last):
  # min(SNR, gamma) / SNR -> 1 as SNR -> 0 (eps), min(SNR, gamma) / (SNR + 1) -> 0 (v), SNR -> 0 (x0).
  sched = dj.get_schedule("linear", 1000, zero_terminal_snr=True)
  t = jnp.arange(1000)
  w = np.asarray(dj.losses.snr_weight(sched, t, prediction=prediction, weighting="min_snr",
                                      min_snr_gamma=5.0))
  snr = np.asarray(sched.snr, np.float64)
  assert snr[-1] == 0.0 and np.all(np.isfinite(w))
  assert w[-1] == expected_last
  ref = {"eps": np.minimum(snr, 5.0) / np.where(snr > 0, snr, 1.0),
         "v": np.minimum(snr, 5.0) / (snr + 1.0), "x0": np.minimum(snr, 5.0)}[prediction]
  np.testing.assert_allclose(w[:-1], ref[:-1], rtol=1e-6)
