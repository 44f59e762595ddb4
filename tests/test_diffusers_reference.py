"""Side by side with the published PyTorch implementation: diffusers' DDPMScheduler.

Schedules are compared with the stock float32 scheduler. For the step, the scheduler's tensors
are replaced by float64 ones built from the same betas, so diffusers' own step code gives a
float64 reference and the comparison measures our float32 error, not the reference's.
"""
# Test requirements (requirements-test.txt), imported directly: a missing reference must fail
# the suite, not skip every side-by-side comparison in silence.
import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import diffusion_jax as dj

T = 1000
U32 = 2.0 ** -24  # float32 unit roundoff
TIMESTEPS = [0, 1, 2, 10, 100, 500, 900, 999]
NAMES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}
PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


def make(beta_schedule, **kw):
  return diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule, **kw)


@pytest.mark.parametrize("beta_schedule", list(NAMES))
def test_betas_and_alphas_cumprod_match_stock_diffusers(beta_schedule):
  ref = make(beta_schedule)
  ours = dj.get_schedule(NAMES[beta_schedule], T)
  betas_ref = ref.betas.numpy()
  if beta_schedule == "squaredcos_cap_v2":
    # Both compute float64 betas and round once to float32: bit-identical.
    np.testing.assert_array_equal(np.asarray(ours.betas), betas_ref)
  else:
    # torch.linspace in float32 vs numpy float64 rounded once: within a couple of ulps.
    np.testing.assert_allclose(np.asarray(ours.betas), betas_ref, rtol=4 * U32, atol=0)
  # diffusers multiplies 1000 float32 factors, each rounding adds <= u relative error:
  # |rel err| <= T u (plus the betas' own rounding). Ours is float64, rounded once.
  np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(),
                             rtol=(T + 4) * U32, atol=0)
  # From diffusers' own betas, ours is the correctly rounded product (float64, rounded once).
  exact = np.cumprod(1.0 - betas_ref.astype(np.float64))
  np.testing.assert_allclose(np.asarray(dj.from_betas(betas_ref).alphas_cumprod), exact,
                             rtol=U32, atol=0)


def float64_scheduler(beta_schedule, betas64, **kw):
  """A DDPMScheduler whose tensors are float64 from the given betas (its code is dtype-generic)."""
  sched = make(beta_schedule, **kw)
  sched.betas = torch.tensor(betas64, dtype=torch.float64)
  sched.alphas = 1.0 - sched.betas
  sched.alphas_cumprod = torch.cumprod(sched.alphas, dim=0)
  sched.one = torch.tensor(1.0, dtype=torch.float64)
  return sched


def shared_betas(beta_schedule):
  """float64 betas both sides use: diffusers' own float32 betas, widened."""
  return make(beta_schedule).betas.numpy().astype(np.float64)


@pytest.mark.parametrize("beta_schedule", list(NAMES))
def test_posterior_variance_matches_get_variance(beta_schedule):
  betas = shared_betas(beta_schedule)
  ref = float64_scheduler(beta_schedule, betas)
  ours = dj.from_betas(betas)
  want = np.array([float(ref._get_variance(t, variance_type="fixed_small")) for t in range(1, T)])
  np.testing.assert_allclose(np.asarray(ours.posterior_variance)[1:], want, rtol=4 * U32)
  large = np.array([float(ref._get_variance(t, variance_type="fixed_large")) for t in range(1, T)])
  np.testing.assert_allclose(np.asarray(ours.betas)[1:], large, rtol=4 * U32)
  # Stock float32 diffusers agrees to the precision its float32 1 - alpha_bar allows.
  stock = make(beta_schedule)
  want32 = np.array([float(stock._get_variance(t)) for t in range(1, T)])
  np.testing.assert_allclose(np.asarray(ours.posterior_variance)[1:], want32, rtol=1e-3)


def run_diffusers_step(sched, model_output, t, sample, seed):
  """DDPMScheduler.step, and the noise it drew (same generator seed, same draw)."""
  out = sched.step(torch.from_numpy(model_output), t, torch.from_numpy(sample),
                   generator=torch.Generator().manual_seed(seed))
  noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(seed),
                      dtype=torch.float64).numpy()
  return out.prev_sample.numpy(), out.pred_original_sample.numpy(), noise


@pytest.mark.parametrize("beta_schedule", list(NAMES))
@pytest.mark.parametrize("prediction_type", list(PREDICTIONS))
@pytest.mark.parametrize("clip", [True, False])
def test_step_mean_matches_ddpm_scheduler(beta_schedule, prediction_type, clip):
  betas = shared_betas(beta_schedule)
  sched = float64_scheduler(beta_schedule, betas, prediction_type=prediction_type,
                            clip_sample=clip, variance_type="fixed_small")
  ours = dj.from_betas(betas)
  abar = np.cumprod(1.0 - betas)
  rng = np.random.default_rng(0)
  batch, channels = 6, 3
  for t in TIMESTEPS:
    # float32 inputs so both sides see identical numbers.
    sample = (rng.standard_normal((batch, channels)) * 1.3).astype(np.float32).astype(np.float64)
    output = rng.standard_normal((batch, channels)).astype(np.float32).astype(np.float64)
    prev, pred_x0_ref, noise = run_diffusers_step(sched, output, t, sample, seed=t)
    var = float(sched._get_variance(t)) if t > 0 else 0.0
    mean_ref = prev - np.sqrt(var) * noise           # the noise term removed
    tt = jnp.full((batch,), t, jnp.int32)
    m = dj.p_mean_variance(ours, jnp.asarray(output, jnp.float32), jnp.asarray(sample, jnp.float32),
                           tt, prediction=PREDICTIONS[prediction_type], variance="fixed_small",
                           clip_denoised=clip)
    # pred_x0 from eps divides by sqrt(abar): float32 error ~ u |x| / sqrt(abar).
    x0_tol = 8 * U32 * (np.abs(sample) + np.abs(output)) / np.sqrt(abar[t]) + 1e-7
    assert np.all(np.abs(np.asarray(m.pred_x0) - pred_x0_ref) <= x0_tol), t
    np.testing.assert_allclose(np.asarray(m.mean), mean_ref, rtol=2e-6, atol=2e-6, err_msg=str(t))
    # The whole step with diffusers' noise passed in (p_sample's noise override).
    x_prev, _ = dj.p_sample(ours, jnp.asarray(output, jnp.float32),
                            jnp.asarray(sample, jnp.float32), tt, None,
                            prediction=PREDICTIONS[prediction_type], variance="fixed_small",
                            clip_denoised=clip, noise=jnp.asarray(noise, jnp.float32))
    np.testing.assert_allclose(np.asarray(x_prev), prev, rtol=2e-6, atol=2e-6, err_msg=str(t))


@pytest.mark.parametrize("variance_type,ours_variance", [("fixed_large", "fixed_large"),
                                                          ("learned_range", "learned_range")])
def test_step_with_other_variances(variance_type, ours_variance):
  betas = shared_betas("linear")
  sched = float64_scheduler("linear", betas, variance_type=variance_type)
  ours = dj.from_betas(betas)
  rng = np.random.default_rng(1)
  for t in TIMESTEPS[1:]:  # diffusers adds no noise at t = 0
    sample = rng.standard_normal((4, 3)).astype(np.float32).astype(np.float64)
    output = rng.standard_normal((4, 3)).astype(np.float32).astype(np.float64)
    if variance_type == "learned_range":
      frac = rng.uniform(-1, 1, (4, 3)).astype(np.float32).astype(np.float64)
      output = np.concatenate([output, frac], axis=1)
    prev, _, noise = run_diffusers_step(sched, output, t, sample, seed=100 + t)
    x_prev, _ = dj.p_sample(ours, jnp.asarray(output, jnp.float32),
                            jnp.asarray(sample, jnp.float32), jnp.full((4,), t, jnp.int32), None,
                            variance=ours_variance, noise=jnp.asarray(noise, jnp.float32))
    np.testing.assert_allclose(np.asarray(x_prev), prev, rtol=2e-6, atol=2e-6, err_msg=str(t))
