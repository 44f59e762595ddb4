"""Samplers and the ODE likelihood on 2-D Gaussian data with the exact denoiser (closed forms).

For data N(mu, Sigma) every quantity is known: the optimal eps at any noise level, the
probability-flow ODE solution (x - mu = (Sigma + sigma^2)^(1/2) (Sigma + sigma_T^2)^(-1/2)
(x_T - mu) in sigma space, in Sigma's eigenbasis) and the density at every noise level.

Every deterministic sampler ends with the same first-order jump from the smallest training sigma
to 0, x -> D(x; sigma_min) (the DDIM / DPM-Solver++ step to alpha_bar = 1, the last Euler step);
the reference solution includes that jump, so the measured error is the solver's alone.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics_testlib import assert_f32_close, f32_tol

import diffusion_jax as dj
from diffusion_jax import schedules

MU = np.array([0.5, -0.3])
ROT = np.array([[np.cos(0.4), -np.sin(0.4)], [np.sin(0.4), np.cos(0.4)]])
LAMBDA = np.array([0.8, 0.05])            # eigenvalues of Sigma
SIGMA = ROT @ np.diag(LAMBDA) @ ROT.T
T = 1000
SCHEDULE = dj.get_schedule("linear", T)
# The reference tables, built here in float64 from the DDPM paper's definition (betas linear from
# 1e-4 to 0.02 over 1000 steps), never from the library's own sigma / timestep conversions.
BETAS64 = np.linspace(1e-4, 0.02, T, dtype=np.float64)
ABAR = np.cumprod(1.0 - BETAS64)
LOG_SIGMA64 = 0.5 * np.log((1.0 - ABAR) / ABAR)             # [T] increasing


def exact_model(prediction="eps", mean=MU, rotation=None, eigenvalues=LAMBDA):
  """The optimal network for N(MU, SIGMA) (or N(mean, rotation diag(eigenvalues) rotation^T),
  any dimension D): (x_vp [B, D], t [B] int or float) -> prediction.

  Written in sigma = sqrt((1 - abar) / abar) (from the float64-built table, log-interpolated at
  fractional t), in Sigma's eigenbasis: x = x_vp sqrt(1 + sigma^2), x0 = mu + lam / (lam +
  sigma^2) (x - mu), eps = sigma / (lam + sigma^2) (x - mu), without cancellation at small sigma.
  """
  rot = jnp.asarray(ROT if rotation is None else rotation, jnp.float32)
  lam = jnp.asarray(eigenvalues, jnp.float32)
  mu = jnp.asarray(mean, jnp.float32)

  log_sigma = jnp.asarray(LOG_SIGMA64, jnp.float32)
  steps = jnp.arange(T, dtype=jnp.float32)

  def model_fn(x_vp, t):
    # The timestep convention the samplers promise (ARCHITECTURE.md, diffusers' Euler): a
    # fractional t is the point where log sigma is linear between the training levels.
    t = jnp.asarray(t, jnp.float32)
    sigma = jnp.exp(jnp.interp(t, steps, log_sigma))[:, None]
    scale = jnp.sqrt(1.0 + sigma ** 2)
    centred = (x_vp * scale - mu) @ rot                     # eigenbasis coordinates
    x0 = mu + (lam / (lam + sigma ** 2) * centred) @ rot.T
    eps = (sigma / (lam + sigma ** 2) * centred) @ rot.T
    if prediction == "eps":
      return eps
    if prediction == "x0":
      return x0
    return (eps - sigma * x0) / scale                       # v = sqrt(abar) eps - sqrt(1-abar) x0

  return model_fn



def exact_ode_solution(x_vp_init):
  """PF-ODE from VP noise x_vp_init [B, 2] at t = T-1 to sigma_min, then x -> D(x; sigma_min)."""
  sigma_t2, sigma_min2 = 1.0 / ABAR[-1] - 1.0, 1.0 / ABAR[0] - 1.0
  x_t = np.asarray(x_vp_init, np.float64) * np.sqrt(1.0 + sigma_t2)
  gain = np.sqrt((LAMBDA + sigma_min2) / (LAMBDA + sigma_t2)) * LAMBDA / (LAMBDA + sigma_min2)
  return MU + (x_t - MU) @ (ROT @ np.diag(gain) @ ROT.T).T


def logsnr_grid(n):
  """A schedule of n levels uniform in log SNR between the training ends, and the fractional
  training timesteps of its levels (a smooth grid, so the order shows from few steps)."""
  logsnr = np.linspace(np.log(ABAR[-1] / (1 - ABAR[-1])), np.log(ABAR[0] / (1 - ABAR[0])), n)
  abar = 1.0 / (1.0 + np.exp(-logsnr[::-1]))
  log_sigma = 0.5 * np.log((1 - abar) / abar)
  timesteps = jnp.asarray(np.interp(log_sigma, LOG_SIGMA64, np.arange(T)), jnp.float32)
  return schedules.from_alphas_cumprod(abar), timesteps


def run_deterministic(name, n, x_init, prediction="eps"):
  # The published algorithms: no x0 thresholding, and the ODE samplers start from the table's
  # last sigma (the reference solution's start), not from the bounded default sigma_max = 80.
  model_fn = exact_model(prediction)
  if name in ("euler", "heun"):
    sampler = dj.get_sampler(name, num_steps=n, prediction=prediction, thresholding="none")
    sigma_max = jnp.float32(np.exp(LOG_SIGMA64[-1]))        # the float64 table's last level
    return jax.jit(lambda x: sampler(model_fn, SCHEDULE, x.shape, jax.random.key(0), x_init=x,
                                     sigma_max=sigma_max))(x_init)
  schedule, timesteps = logsnr_grid(n)
  sampler = dj.get_sampler(name, prediction=prediction, thresholding="none")
  return jax.jit(lambda x, s, ts: sampler(model_fn, s, x.shape, jax.random.key(0), x_init=x,
                                          timesteps=ts))(x_init, schedule, timesteps)


DETERMINISTIC = {  # name: (theoretical order, step counts whose doublings are compared)
    "ddim": (1, (20, 40, 80)),
    "euler": (1, (20, 40, 80)),
    "dpm_solver++": (2, (20, 40, 80)),
    "heun": (2, (20, 40, 80)),
}


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_deterministic_samplers_converge_at_their_order(name):
  order, counts = DETERMINISTIC[name]
  x_init = jax.random.normal(jax.random.key(1), (64, 2))
  exact = exact_ode_solution(x_init)
  errors = [np.abs(np.asarray(run_deterministic(name, n, x_init), np.float64) - exact).max()
            for n in counts]
  ratios = [errors[k] / errors[k + 1] for k in range(len(errors) - 1)]
  expected = 2.0 ** order
  assert errors[-1] < 0.1, errors
  for ratio in ratios:
    assert 0.8 * expected < ratio < 1.25 * expected, (errors, ratios)


@pytest.mark.parametrize("prediction", ["x0", "v"])
@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_deterministic_samplers_agree_across_parameterizations(name, prediction):
  x_init = jax.random.normal(jax.random.key(2), (16, 2))
  n = DETERMINISTIC[name][1][0]
  # The same exact denoiser written three ways: the samples differ by the rounding of the
  # conversions between eps, x0 and v, ~10 float32 operations per step (2 network calls for
  # Heun) over n = 20 steps. Measured: <= 1.9e-6 (the former atol 2e-4 was 100x that).
  assert_f32_close(run_deterministic(name, n, x_init, prediction),
                   run_deterministic(name, n, x_init, "eps"), ops=10 * 2 * n)


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_deterministic_samplers_reproduce_mean_and_covariance(name):
  # The map from VP noise to the sample is affine (A x + b) for Gaussian data and a linear
  # denoiser, so the sample distribution is exactly N(b, A A^T): read b and A off three points
  # and compare them with the exact ODE map (exact_ode_solution), not with (MU, SIGMA) at a
  # loose 1e-2. The allowed error follows from the solver's order p: measured at 80 steps
  # (e_80) it shrinks as (80 / n)^p at n steps; up to 2x that (the order test allows each halving
  # 0.8-1.25x of 2^p) plus the float32 floor of n steps x ~10 operations x 2 network calls.
  order = DETERMINISTIC[name][0]
  n = 1000 if order == 1 else 160
  points = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  exact = exact_ode_solution(points)
  e_80 = np.abs(np.asarray(run_deterministic(name, 80, points), np.float64) - exact).max()
  out = np.asarray(run_deterministic(name, n, points), np.float64)
  bound = 2.0 * e_80 * (80.0 / n) ** order + f32_tol(10 * 2 * n)
  np.testing.assert_allclose(out, exact, rtol=0, atol=bound)
  mean, gain = out[0], (out[1:] - out[0]).T
  mean_exact, gain_exact = exact[0], (exact[1:] - exact[0]).T
  np.testing.assert_allclose(mean, mean_exact, rtol=0, atol=bound)
  # |G G^T - A A^T| <= 2 |A| |G - A| + |G - A|^2 with |G - A| <= 2 bound per entry (2x2).
  d = 2 * 2 * bound
  cov_bound = 2 * np.abs(gain_exact).max() * d + d ** 2
  np.testing.assert_allclose(gain @ gain.T, gain_exact @ gain_exact.T, rtol=0, atol=cov_bound)
  # And the exact ODE map's law is the data's: covariance SIGMA up to the last jump's
  # O(sigma_min^2) bias; mean MU up to the N(0, I) prior's O(|MU| / sigma_max) mismatch.
  np.testing.assert_allclose(gain_exact @ gain_exact.T, SIGMA, atol=2 * (1.0 / ABAR[0] - 1.0))
  np.testing.assert_allclose(mean_exact, MU, atol=2 * np.abs(MU).max() / np.sqrt(1 / ABAR[-1] - 1))


@pytest.mark.parametrize("name,kw", [
    ("ddpm", dict(variance="fixed_small")),
    ("ddpm", dict(variance="fixed_large")),
    ("ddim", dict(eta=1.0)),
    ("ddim", dict(eta=0.5)),
])
def test_stochastic_samplers_reproduce_mean_and_covariance(name, kw):
  n_samples = 20000
  schedule, timesteps = dj.respace(SCHEDULE, "1000")
  static = {k: v for k, v in kw.items() if k != "eta"}
  per_call = {k: v for k, v in kw.items() if k == "eta"}
  sampler = dj.get_sampler(name, thresholding="none", **static)
  run = jax.jit(lambda s, ts: sampler(exact_model(), s, (n_samples, 2), jax.random.key(3),
                                      timesteps=ts, **per_call))
  x = np.asarray(run(schedule, timesteps), np.float64)
  # Monte Carlo standard errors: sqrt(var / n) for the mean, ~sqrt(2 / n) var for the covariance.
  np.testing.assert_allclose(x.mean(0), MU, atol=4 * np.sqrt(LAMBDA.max() / n_samples))
  np.testing.assert_allclose(np.cov(x.T), SIGMA, atol=5 * np.sqrt(2.0 / n_samples) * LAMBDA.max())


def gaussian_log_density(x, cov, mean):
  diff = np.asarray(x, np.float64) - mean
  inv = np.linalg.inv(cov)
  return (-0.5 * np.einsum("bi,ij,bj->b", diff, inv, diff)
          - 0.5 * np.log(np.linalg.det(2 * np.pi * cov)))


# The likelihood integrates to sigma_max = 157 and scores the end point under the VP prior
# N(0, I); the true law there has mean mu / sqrt(1 + sigma_max^2), an O(|mu| |y| / sigma_max) ~ 5e-3
# error of the method itself, so the closed-form comparisons use centred data.
CENTRED = np.zeros(2)
SIGMA_MIN = float(np.sqrt(1.0 / ABAR[0] - 1.0))


def test_ode_likelihood_exact_trace_matches_closed_form():
  x = np.asarray(jax.random.normal(jax.random.key(4), (32, 2))) @ np.linalg.cholesky(SIGMA).T
  expected = gaussian_log_density(x, SIGMA + SIGMA_MIN ** 2 * np.eye(2), CENTRED)
  fn = jax.jit(lambda x: dj.ode_log_likelihood(exact_model(mean=CENTRED), SCHEDULE, x,
                                               num_steps=400, trace="exact"))
  np.testing.assert_allclose(fn(jnp.asarray(x, jnp.float32)).log_p, expected, atol=5e-4)


def test_ode_likelihood_hutchinson_is_unbiased():
  x_one = np.array([[0.9, -0.6]])
  expected = gaussian_log_density(x_one, SIGMA + SIGMA_MIN ** 2 * np.eye(2), CENTRED)[0]
  probes = 4096
  x = jnp.asarray(np.repeat(x_one, probes, axis=0), jnp.float32)
  fn = jax.jit(lambda x, key: dj.ode_log_likelihood(exact_model(mean=CENTRED), SCHEDULE, x, key,
                                                    num_steps=50, probe="gaussian"))
  log_p = np.asarray(fn(x, jax.random.key(5)).log_p, np.float64)
  assert np.std(log_p) > 1e-2   # the estimator is random ...
  assert abs(log_p.mean() - expected) < 4 * np.std(log_p) / np.sqrt(probes)  # ... and unbiased


def test_ode_likelihood_default_probe_is_rademacher_and_unbiased():
  """The default Hutchinson probe: Rademacher. For data with a diagonal covariance the flow's
  Jacobian is diagonal, and z^T A z = tr A exactly when z_i^2 = 1: the default then equals the
  exact trace for every key (a Gaussian probe would not). For the rotated covariance it is random
  and its mean over probes is the exact trace's value (within 4 standard errors)."""
  x_one = np.array([[0.9, -0.6]])
  probes = 2048
  x = jnp.asarray(np.repeat(x_one, probes, axis=0), jnp.float32)
  for rotation, random in ((np.eye(2), False), (ROT, True)):
    model = exact_model(mean=CENTRED, rotation=rotation)
    exact = jax.jit(lambda x, m=model: dj.ode_log_likelihood(m, SCHEDULE, x[:1], num_steps=50,
                                                             trace="exact"))(x).log_p
    default = jax.jit(lambda x, key, m=model: dj.ode_log_likelihood(m, SCHEDULE, x, key,
                                                                    num_steps=50))(
        x, jax.random.key(6))
    log_p = np.asarray(default.log_p, np.float64)
    if not random:
      # The same divergence by another route (one JVP with z vs D JVPs): one rounding of log p's
      # size per evaluation, 2 evaluations (Heun) x 50 steps. Measured: 4.8e-7.
      np.testing.assert_allclose(log_p, float(exact[0]), rtol=0,
                                 atol=f32_tol(2 * 50, abs(float(exact[0]))))
    else:
      assert np.std(log_p) > 1e-2
      assert abs(log_p.mean() - float(exact[0])) < 4 * np.std(log_p) / np.sqrt(probes)


def test_ode_bits_per_dim_matches_the_closed_form():
  """experiments.evaluate_bpd's ODE path on Gaussian data with the exact model: its mean bits/dim
  equals the closed form E_u[-log2 N(x + u / 127.5; 0, Sigma + sigma_min^2 I)] / D + log2 127.5
  (u ~ U[0, 1)^D dequantisation, integrated exactly: a mean shift of 0.5 / 127.5 and a trace
  term with Var u = 1 / 12), within 4 standard errors of the per-example dequantisation noise
  plus the ODE's own error (5e-4 nats, the exact-trace test above). The data covariance is
  diagonal, so the default Rademacher probe is exact (previous test) and adds no noise."""
  from experiments import evaluate_bpd
  n_dev, per = 8, 32
  n = n_dev * per
  rs = np.random.RandomState(7)
  x = rs.normal(size=(n, 2)) * np.sqrt(LAMBDA)
  x = np.round((x + 1) * 127.5) / 127.5 - 1                 # the 256-level grid of images
  model = exact_model(mean=CENTRED, rotation=np.eye(2))
  apply_fn = lambda params, x, t, y: model(x.reshape(x.shape[0], 2), t).reshape(x.shape)
  batches = [{"image": x.reshape(n_dev, per, 1, 1, 2).astype(np.float32),
              "mask": np.ones((n_dev, per), bool)}]
  bpd, count = evaluate_bpd.evaluate_bits_per_dim(apply_fn, None, SCHEDULE, batches,
                                                  method="ode", ode_steps=400)
  assert count == n
  cov = np.diag(LAMBDA) + SIGMA_MIN ** 2 * np.eye(2)
  prec = np.linalg.inv(cov)
  shifted = x + 0.5 / 127.5
  var_u = np.eye(2) / (12 * 127.5 ** 2)
  nll = (0.5 * np.einsum("bi,ij,bj->b", shifted, prec, shifted) + 0.5 * np.trace(prec @ var_u)
         + 0.5 * np.log(np.linalg.det(2 * np.pi * cov)))             # E_u[-log p], nats
  expected = nll.mean() / 2 / np.log(2) + np.log2(127.5)
  # Per example, -log p varies with u by ~|prec (x + m)| / (127.5 sqrt 12) nats.
  per_example_sd = np.sqrt(np.einsum("bi,ij,bj->b", shifted @ prec, var_u, shifted @ prec))
  se = np.sqrt(np.sum(per_example_sd ** 2)) / n / 2 / np.log(2)
  assert abs(bpd - expected) < 4 * se + 5e-4 / 2 / np.log(2), (bpd, expected, se)


def test_dpm_solver_default_grid_beats_the_plain_respacing():
  # `--steps=20` used to respace to '20', whose last step is a second-order jump into t = 0
  # (issue 10: covariance error 0.164 there, 0.022 on 'linspace20'). The default grid must be
  # the good one: below 0.05 (the figure with 2x headroom) and below the '20' grid's.
  points = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  sampler = dj.get_sampler("dpm_solver++", thresholding="none")

  def covariance_error(schedule, timesteps):
    out = np.asarray(jax.jit(lambda s, ts: sampler(exact_model(), s, points.shape,
                                                   jax.random.key(0), x_init=points,
                                                   timesteps=ts))(schedule, timesteps), np.float64)
    gain = (out[1:] - out[0]).T
    return np.abs(gain @ gain.T - SIGMA).max()

  plan = dj.samplers.plan("dpm_solver++", SCHEDULE, 20)
  default = covariance_error(plan.schedule, plan.per_call["timesteps"])
  plain = covariance_error(*dj.respace(SCHEDULE, "20"))
  assert default < 0.05 and default < plain, (default, plain)
