"""score_sde: the continuous VP / VE SDEs and the predictor-corrector sampler.

Checked against closed forms: the VP SDE's marginals against the discrete DDPM chain as T grows;
the ancestral predictor against `ancestral.sample` step for step; the reverse-diffusion predictor
against the ancestral step by its closed-form O(beta^2) difference; the sampler's moments on
Gaussian data with the exact score (inpainting, trajectories and guidance:
test_samplers_driver.py; one scan and device independence: test_samplers_structure.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics_testlib import assert_f32_close, f32_tol
from test_samplers_driver import toy_model
from test_samplers_gaussian import ABAR, BETAS64, SCHEDULE, exact_model

import diffusion_jax as dj
from diffusion_jax import sde as sde_lib
from diffusion_jax.samplers import ancestral
from diffusion_jax.samplers import pc

SHAPE = (8, 4, 4, 3)


# --- the SDEs --------------------------------------------------------------------------------------

def test_vp_sde_discretisation_is_the_linear_ddpm_schedule():
  # beta_i = beta(i / (N - 1)) / N with (0.1, 20) is the DDPM schedule rescaled to N steps.
  for n in (250, 1000):
    np.testing.assert_allclose(sde_lib.vp_schedule(sde_lib.VPSDE(), n).betas,
                               dj.get_schedule("linear", n).betas, rtol=2 * 1.2e-7)


def test_vp_sde_marginals_are_the_limit_of_the_discrete_chain():
  # alpha_bar_i of the N-step chain (float64 here) against m(t)^2 at t = (i + 1) / N: the sum of
  # log(1 - beta_i) is a Riemann sum of -int beta (error O(1 / N)) plus -beta_i^2 / 2 per step
  # (O(1 / N) in all), so each 4x in N divides the error by ~4 (allowed: by more than 3).
  errors = []
  for n in (250, 1000, 4000):
    betas = np.linspace(0.1 / n, 20.0 / n, n)
    mean_discrete = np.sqrt(np.cumprod(1.0 - betas))
    mean, std = sde_lib.marginal(sde_lib.VPSDE(), jnp.arange(1, n + 1, dtype=jnp.float32) / n)
    errors.append(np.abs(np.asarray(mean, np.float64) - mean_discrete).max())
    np.testing.assert_allclose(np.asarray(std) ** 2 + np.asarray(mean) ** 2, 1.0, atol=4e-7)
  assert errors[0] / errors[1] > 3.0 and errors[1] / errors[2] > 3.0, errors
  assert errors[2] < 1e-3, errors


@pytest.mark.parametrize("sde", [sde_lib.VPSDE(), sde_lib.VPSDE(0.5, 5.0), sde_lib.VESDE(),
                                 sde_lib.VESDE(0.02, 80.0)])
def test_drift_and_diffusion_generate_the_marginals(sde):
  # For a linear SDE dx = f(t) x dt + g(t) dw the marginal obeys d log m / dt = f(t) and
  # d s^2 / dt = 2 f(t) s^2 + g(t)^2: checked with autodiff of `marginal` at t in (0, 1).
  t = jnp.linspace(0.05, 0.95, 7)
  def log_mean(u):
    return jnp.log(sde_lib.marginal(sde, u)[0])
  def var(u):
    return sde_lib.marginal(sde, u)[1] ** 2
  f = sde_lib.drift(sde, jnp.ones((7, 1)), t)[:, 0]
  g2 = sde_lib.diffusion(sde, t) ** 2
  # The derivative of a few float32 operations: ~8 ulps of each value (VE: exactly 0).
  np.testing.assert_allclose(jax.vmap(jax.grad(log_mean))(t), f, rtol=f32_tol(8), atol=1e-12)
  # 2 f s^2 + g^2 cancels (VP: beta (1 - s^2)): rounding of ~10 operations on values ~ g^2.
  np.testing.assert_allclose(jax.vmap(jax.grad(var))(t), 2 * f * var(t) + g2, rtol=1e-5,
                             atol=f32_tol(10, float(np.max(g2))))
  x = jax.random.normal(jax.random.key(0), (7, 3))
  score = -x
  np.testing.assert_allclose(sde_lib.reverse_drift(sde, x, t, score),
                             f[:, None] * x + g2[:, None] * x, rtol=1e-6)
  prior = sde_lib.prior_sample(sde, jax.random.key(1), (20000,))
  # The sample std of 20000 normals: standard error 1 / sqrt(2 n) = 0.5% relative; 4 se.
  np.testing.assert_allclose(np.std(np.asarray(prior)), sde_lib.prior_std(sde), rtol=0.02)


def test_sde_bad_input_raises():
  with pytest.raises(ValueError, match="beta_min"):
    sde_lib.marginal(sde_lib.VPSDE(20.0, 0.1), jnp.ones(2))
  with pytest.raises(ValueError, match="sigma_min"):
    sde_lib.diffusion(sde_lib.VESDE(0.0, 1.0), jnp.ones(2))
  with pytest.raises(ValueError, match="VPSDE or a VESDE"):
    sde_lib.prior_std("vp")
  with pytest.raises(ValueError, match="num_steps"):
    sde_lib.vp_schedule(sde_lib.VPSDE(), 10)     # beta_max / 10 = 2 >= 1
  call = dj.get_sampler
  for key, value in [("sde", "subvp"), ("predictor", "ddim"), ("corrector", "ald")]:
    with pytest.raises(ValueError, match=key):
      call("pc", **{key: value})(toy_model, SCHEDULE, SHAPE, jax.random.key(0))
  with pytest.raises(ValueError, match="corrector_steps"):
    call("pc", corrector_steps=0)(toy_model, SCHEDULE, SHAPE, jax.random.key(0))
  zero_snr = dj.get_schedule("linear", 100, zero_terminal_snr=True)
  for kw in (dict(sde="ve"), dict(predictor="ancestral"), dict(predictor="euler_maruyama")):
    with pytest.raises(ValueError, match="zero terminal SNR"):
      call("pc", **kw)(toy_model, zero_snr, SHAPE, jax.random.key(0))
  # The VP reverse-diffusion step is finite there (beta = 1: x' = x + s + z with s = -x).
  out = jax.jit(lambda k: call("pc", prediction="v")(toy_model, zero_snr, SHAPE, k))(
      jax.random.key(0))
  assert np.all(np.isfinite(np.asarray(out)))


def test_score_from_eps_wraps_a_discrete_model():
  # For x = sqrt(abar) x0 + sqrt(1 - abar) eps with a point mass x0, the score of x_t is
  # -(x - sqrt(abar) x0) / (1 - abar) = -eps / sqrt(1 - abar).
  abar = jnp.array([0.9, 0.3])
  eps = jax.random.normal(jax.random.key(0), (2, 5))
  x0 = jnp.ones((2, 5))
  x = jnp.sqrt(abar)[:, None] * x0 + jnp.sqrt(1 - abar)[:, None] * eps
  expected = -(x - jnp.sqrt(abar)[:, None] * x0) / (1 - abar)[:, None]
  # x is formed and unformed again: ~8 roundings of values up to max |score|.
  np.testing.assert_allclose(sde_lib.score_from_eps(eps, jnp.sqrt(1 - abar)), expected,
                             rtol=f32_tol(8), atol=f32_tol(8, float(np.abs(expected).max())))


# --- the predictors against DDPM's ancestral step -------------------------------------------------

@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("thresholding", ["none", "clip"])
def test_ancestral_predictor_is_ddpm_step_for_step(variance, thresholding):
  # (x + beta s) / sqrt(1 - beta) with s = -eps / sqrt(1 - abar) is DDPM's posterior mean at the
  # predicted x0 (algebra in samplers/pc.py); same noise streams, so every state of the chain
  # agrees up to rounding: ~10 float32 operations per step, 25 steps, on the largest state.
  p = dj.samplers.plan("pc", dj.get_schedule("linear", 100), 25)
  key = jax.random.key(7)
  def chain(name, **kw):
    sampler = dj.get_sampler(name, variance=variance, thresholding=thresholding, **kw)
    return jax.jit(lambda s, ts: sampler(toy_model, s, SHAPE, key, timesteps=ts,
                                         trajectory_stride=1))(p.schedule, p.per_call["timesteps"])
  _, ours = chain("pc", predictor="ancestral", corrector="none")
  _, ddpm = chain("ddpm")
  assert ours.shape == (25,) + SHAPE
  for step in range(25):
    assert_f32_close(ours[step], ddpm[step], ops=10 * (step + 1), scale=float(np.abs(ddpm).max()),
                     err_msg=f"step {step}")


def test_reverse_diffusion_differs_from_ddpm_by_the_closed_form_o_beta_squared():
  # One step from the same x, score and noise at every entry k of the T = 1000 linear schedule:
  #   reverse diffusion  (2 - a) x + beta s + sqrt(beta) z,  a = sqrt(1 - beta)
  #   ancestral (large)  (x + beta s) / a + sqrt(beta) z
  # differ by (2 - a - 1 / a) x + beta (1 - 1 / a) s = -(1 - a)^2 / a x + ..., both O(beta^2)
  # (score_sde appendix F), computed here in float64. Rounding: ~10 float32 operations on
  # values of size max(|x|, |beta s|).
  schedule = SCHEDULE
  disc = pc.discretize(schedule, "vp")
  k = jnp.arange(schedule.num_timesteps)
  x = jax.random.normal(jax.random.key(0), (schedule.num_timesteps, 6))
  eps = jax.random.normal(jax.random.key(1), x.shape)
  z = jax.random.normal(jax.random.key(2), x.shape)
  score = sde_lib.score_from_eps(eps, schedule.sqrt_one_minus_alphas_cumprod[:, None])
  ddpm, x0 = ancestral.ancestral_step(schedule, eps, x, k, z, variance="fixed_large")
  rd = jax.vmap(lambda *a: pc.predictor_step("reverse_diffusion", disc, *a))(x, score, x0, k, z)
  beta = BETAS64[:, None]
  a = np.sqrt(1.0 - beta)
  x64, s64 = np.asarray(x, np.float64), np.asarray(score, np.float64)
  expected = (2.0 - a - 1.0 / a) * x64 + beta * (1.0 - 1.0 / a) * s64
  expected[0] = 0.0           # entry 0: both end on the denoised x0 (Tweedie)
  scale = max(np.abs(x64).max(), np.abs(beta * s64).max())
  np.testing.assert_allclose(np.asarray(rd, np.float64) - np.asarray(ddpm, np.float64), expected,
                             rtol=0, atol=f32_tol(10, scale))
  # The difference is O(beta^2): below beta^2 (|x| + |s|) at every entry.
  assert np.all(np.abs(expected) <= beta ** 2 * (np.abs(x64) + np.abs(s64)))
  assert np.abs(expected).max() > 1e-6      # and not zero: the two steps are not the same


@pytest.mark.slow       # six compilations (~30 s on 2 busy cores)
def test_reverse_diffusion_chain_tends_to_ddpm_as_steps_grow():
  # The same noise streams through N steps of the linear schedule rescaled to N: per step the
  # two differ by O(beta^2) = O(1 / N^2), over N steps O(1 / N); a 4x finer chain must bring the
  # final samples at least 2x closer (expected ~4x).
  key = jax.random.key(5)
  gaps = []
  for n in (25, 100, 400):
    schedule = dj.get_schedule("linear", n)
    def run(name, schedule=schedule, **kw):
      sampler = dj.get_sampler(name, thresholding="none", **kw)
      return np.asarray(jax.jit(lambda s: sampler(toy_model, s, SHAPE, key))(schedule))
    gaps.append(np.abs(run("pc", corrector="none") - run("ddpm", variance="fixed_large")).max())
  assert gaps[0] / gaps[1] > 2.0 and gaps[1] / gaps[2] > 2.0, gaps


# --- moments on Gaussian data with the exact score ------------------------------------------------

# A 16-dimensional Gaussian: the corrector's step size uses the norms |z| and |s| of each
# example, which concentrate in many dimensions (for images); in 2-D, 1 / |s|^2 has an infinite
# mean and single examples take huge steps.
DIM = 16
LAM16 = np.geomspace(0.2, 0.8, DIM)
ROT16 = np.linalg.qr(np.random.default_rng(0).normal(size=(DIM, DIM)))[0]
MU16 = 0.5 * np.random.default_rng(1).normal(size=DIM)


def predictor_law(sde, predictor, lam, mu, variance="fixed_small"):
  """Mean and variance [D] per eigendirection (eigenvalues lam, mean mu in that basis) of the
  predictor-only chain with the exact score on the T = 1000 linear schedule, propagated exactly
  in float64 (the chain is linear for Gaussian data)."""
  sigma2 = (1.0 - ABAR) / ABAR if sde == "ve" else 1.0 - ABAR
  scale2 = np.ones_like(ABAR) if sde == "ve" else ABAR
  mean, var = np.zeros_like(lam), np.full_like(lam, sigma2[-1] + scale2[-1])   # the VP prior
  for k in range(len(ABAR) - 1, -1, -1):
    beta = BETAS64[k]
    g2 = beta / ABAR[k] if sde == "ve" else beta
    a = 1.0 if sde == "ve" else np.sqrt(1.0 - beta)
    v = scale2[k] * lam + sigma2[k]                    # marginal variance at entry k
    c, d = -1.0 / v, np.sqrt(scale2[k]) * mu / v      # exact score s = c x + d
    if k == 0:                                         # the last step: Tweedie's x0
      lin = (1.0 + sigma2[0] * c) / np.sqrt(scale2[0])
      mean, var = lin * mean + sigma2[0] * d / np.sqrt(scale2[0]), lin ** 2 * var
      break
    if predictor == "reverse_diffusion":
      lin, gain, std2 = 2.0 - a, g2, g2
    elif predictor == "euler_maruyama":
      b = g2 if sde == "ve" else -np.log(1.0 - beta)
      lin, gain, std2 = 1.0 + (0.0 if sde == "ve" else 0.5 * b), b, b
    else:
      prev2 = sigma2[k - 1] if k else 0.0
      lin, gain = 1.0 / a, g2 / a
      std2 = g2 if variance == "fixed_large" else g2 * prev2 / sigma2[k]
    mean = (lin + gain * c) * mean + gain * d
    var = (lin + gain * c) ** 2 * var + std2
  return mean, var


@pytest.mark.parametrize("sde,predictor,corrector", [
    ("vp", "reverse_diffusion", "langevin"),
    ("ve", "reverse_diffusion", "langevin"),
    ("vp", "euler_maruyama", "langevin"),
    ("vp", "ancestral", "langevin"),
])
def test_pc_sampler_reaches_the_gaussian_target(sde, predictor, corrector):
  # n samples of a 16-D Gaussian (eigenvalues 0.2 .. 0.8) with the exact score, T = 1000.
  # Compared in its eigenbasis, per direction i (decided before running it):
  #  - Monte Carlo: standard errors sqrt(lam_i / n) (mean) and sqrt(2 / n) lam_i (variance);
  #    5 standard errors each (16 directions x 2 moments x 4 cases: a false alarm ~1e-4).
  #  - the predictor's own discretisation bias: the predictor-only chain propagated exactly in
  #    float64 (`predictor_law`), added to the allowance (it is O(1 / T)).
  #  - the Langevin corrector: a ULA step of size e on N(m, v) keeps the mean (the step size
  #    depends on norms only, so the law stays symmetric about the mean) and, run to
  #    stationarity, would scale v by 1 / (1 - e / 2v); with e = 2 snr^2 |z|^2 / |s|^2 ~
  #    2 snr^2 D / sum_j (1 / v_j), e / 2v_i <= snr^2 v_max / v_min = 4 snr^2 ~ 0.1 here (one
  #    step per level stays below the stationary bias): allowance 4 snr^2 lam_i on the variance.
  n = 8000
  sampler = dj.get_sampler("pc", sde=sde, predictor=predictor, corrector=corrector,
                           thresholding="none")
  model = exact_model(mean=MU16, rotation=ROT16, eigenvalues=LAM16)
  x = np.asarray(jax.jit(lambda s: sampler(model, s, (n, DIM), jax.random.key(11)))(SCHEDULE),
                 np.float64)
  y = x @ ROT16                                         # eigen coordinates
  mu, lam = ROT16.T @ MU16, LAM16
  law_mean, law_var = predictor_law(sde, predictor, lam, mu)
  corrector_allowance = 4 * pc.DEFAULT_SNR ** 2 * lam if corrector == "langevin" else 0.0
  mean_tol = 5 * np.sqrt(lam / n) + np.abs(law_mean - mu)
  var_tol = 5 * np.sqrt(2.0 / n) * lam + np.abs(law_var - lam) + corrector_allowance
  assert np.all(np.abs(y.mean(0) - mu) <= mean_tol), (y.mean(0) - mu, mean_tol)
  assert np.all(np.abs(y.var(0) - lam) <= var_tol), (y.var(0) / lam, var_tol / lam)
  # The predictor-only law itself is the target up to O(1 / T) and the VP prior's mismatch.
  np.testing.assert_allclose(law_var, lam, rtol=0.02)
  np.testing.assert_allclose(law_mean, mu, atol=0.01)


def test_pc_network_evaluations():
  assert dj.samplers.network_evaluations("pc", 50) == 100
  assert dj.samplers.network_evaluations("pc", 50, corrector_steps=2) == 150
  assert dj.samplers.network_evaluations("pc", 50, corrector_steps=0) == 50
  assert dj.samplers.grids.steps_within("pc", 100) == 50
  calls = []
  def counting(x, t):
    calls.append(1)
    return toy_model(x, t)
  schedule = dj.get_schedule("linear", 100)
  for steps in (1, 3):
    calls.clear()
    sampler = dj.get_sampler("pc", corrector_steps=steps)
    jax.make_jaxpr(lambda k, sampler=sampler: sampler(counting, schedule, SHAPE, k))(
        jax.random.key(0))
    assert len(calls) == 1 + steps      # traced once per step body: (1 + C) calls per step


def test_a_config_samples_with_pc_and_its_kwargs():
  # config.sample.sampler = 'pc' with sample.kwargs: the trainer's preview path
  # (`training.sampling.sample_from_config`) gives the sampler its static settings, snr included.
  from diffusion_jax.training import sampling
  from diffusion_jax.training import default_config

  class Toy:
    def apply(self, variables, x, t, y, train):
      return toy_model(x, t) * variables["params"]["w"]

  config = default_config.get_config()
  config.sample.sampler = "pc"
  config.sample.kwargs = {"predictor": "ancestral", "corrector": "none"}
  schedule = dj.get_schedule("linear", 25)
  params = {"w": jnp.float32(1.0)}
  key = jax.random.key(3)
  out = jax.jit(lambda: sampling.sample_from_config(config, Toy(), schedule, params, key, SHAPE[0],
                                          SHAPE[1:]))()
  ddpm = jax.jit(lambda: dj.get_sampler("ddpm", clip_denoised=config.sample.clip_denoised)(
      toy_model, schedule, SHAPE, key))()
  assert_f32_close(out, ddpm, ops=10 * 25)    # the same chain (see above), 25 steps
  config.sample.kwargs = {"snr": 0.3, "corrector_steps": 2}
  other = jax.jit(lambda: sampling.sample_from_config(config, Toy(), schedule, params, key, SHAPE[0],
                                            SHAPE[1:]))()
  assert not np.allclose(other, out)
