"""Masked diffusion math: schedules, the masking rate, SUBS, and the T-step and continuous ELBO
against float64 NumPy references on a tiny problem (V = 2 data tokens + mask, L = 3).

References used here, none of them library code:
- the T-step bound by exhaustive enumeration of the discrete process: every trajectory of the
  forward chain (each token's masking step), its probability under q, and its probability under
  the reverse chain p_theta built from transition probabilities of whole sequences;
- the continuous bound as scipy quadrature of a NumPy integrand;
- with the exact denoiser of a known joint p, the continuous bound equals -log p(x) (masked
  diffusion's continuous ELBO is an average over orders of exact autoregressive factorisations:
  Ou et al. 2024, "Your Absorbing Discrete Diffusion Secretly Models the Conditional
  Distributions of Clean Data", prop. 3.3; Shi et al. 2024, MD4 app. G).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

import masked_testlib as tl
from diffusion_jax import masked

V, L = 2, 3
MASK = V
SCHEDULES = [("linear", {}), ("cosine", {}), ("polynomial", {"exponent": 2.0})]


def m_np(name, t, exponent=2.0):
  """NumPy float64 masking probability 1 - alpha(t) from the papers' alpha."""
  t = np.asarray(t, np.float64)
  if name == "linear":
    return t
  if name == "cosine":
    return 1.0 - (1.0 - np.cos(np.pi / 2 * (1.0 - t)))   # alpha = 1 - cos(pi/2 (1 - t))
  return t ** exponent


def dm_np(name, t, exponent=2.0):
  t = np.asarray(t, np.float64)
  if name == "linear":
    return np.ones_like(t)
  if name == "cosine":
    return np.pi / 2 * np.sin(np.pi / 2 * (1.0 - t))
  return exponent * t ** (exponent - 1.0)


@pytest.fixture(scope="module")
def tables():
  return tl.random_tables(np.random.default_rng(0), V, L)


# ---------------------------------------------------------------- schedules and forward process

@pytest.mark.parametrize("name,kw", SCHEDULES)
def test_schedule_matches_closed_form_and_autodiff(name, kw):
  s = masked.get_mask_schedule(name, **kw)
  t = np.linspace(1e-3, 1.0, 257)
  # float32 evaluation of sin / cos / powers: a few ulps of values <= pi / 2.
  np.testing.assert_allclose(s.mask_prob(jnp.asarray(t)), m_np(name, t), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(s.mask_prob_derivative(jnp.asarray(t)), dm_np(name, t),
                             rtol=1e-5, atol=1e-6)
  grads = jax.vmap(jax.grad(s.alpha))(jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(grads, s.alpha_derivative(jnp.asarray(t)), rtol=1e-5, atol=1e-6)
  assert float(s.alpha(0.0)) == 1.0 and float(s.alpha(1.0)) == 0.0
  assert np.all(np.diff(np.asarray(s.alpha(jnp.asarray(t)))) < 0)


def test_cosine_mask_prob_accurate_near_zero():
  # 1 - alpha computed as cos(pi/2 (1 - t)) in float32 loses everything below t ~ 1e-7.
  s = masked.cosine()
  t = jnp.asarray([1e-9, 1e-7, 1e-5], jnp.float32)
  np.testing.assert_allclose(s.mask_prob(t), np.sin(np.pi / 2 * np.asarray(t, np.float64)),
                             rtol=1e-6)
  assert np.all(np.isfinite(np.asarray(s.elbo_weight(t))))


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="cosine"):
    masked.get_mask_schedule("cosin")
  with pytest.raises(ValueError, match="exponent"):
    masked.get_mask_schedule("linear", exponent=2.0)
  with pytest.raises(ValueError, match="exponent"):
    masked.polynomial(0.0)
  with pytest.raises(ValueError, match="num_steps"):
    masked.times_and_weights(masked.linear(), jnp.ones(2), num_steps=0)
  with pytest.raises(ValueError, match="t_min"):
    masked.antithetic_times(jax.random.key(0), 4, t_min=1.0)
  with pytest.raises(ValueError, match="mask_id"):
    masked.subs_log_probs(jnp.zeros((1, 3, 7)), jnp.zeros((1, 3), jnp.int32), mask_id=3)


@pytest.mark.parametrize("name,kw", SCHEDULES)
def test_masking_rate_is_one_minus_alpha(name, kw):
  s = masked.get_mask_schedule(name, **kw)
  times = np.array([0.05, 0.3, 0.5, 0.8, 0.97])
  batch, length = 4096, 64                       # n = 2^18 tokens per time
  t = jnp.asarray(np.repeat(times, batch), jnp.float32)
  z = masked.q_sample(s, jnp.zeros((t.shape[0], length), jnp.int32), t, jax.random.key(0),
                      mask_id=5)
  assert set(np.unique(np.asarray(z))) <= {0, 5}
  rates = np.asarray(jnp.mean((z == 5).reshape(len(times), -1), axis=1))
  p = m_np(name, times)
  # Binomial(n, p) proportion: 5 standard errors (two-sided failure chance 6e-7 per time).
  se = np.sqrt(p * (1 - p) / (batch * length))
  assert np.all(np.abs(rates - p) < 5 * se), (rates, p)


def test_q_sample_per_example_keys_do_not_depend_on_the_batch():
  s = masked.linear()
  x = jnp.arange(4 * 16).reshape(4, 16) % 7
  t = jnp.full((4,), 0.5)
  z = masked.q_sample(s, x, t, jax.random.key(3), mask_id=7)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(4))
  z2 = masked.q_sample(s, x[2:], t[2:], keys[2:], mask_id=7)
  np.testing.assert_array_equal(z[2:], z2)


def test_subs_parameterisation():
  logits = jax.random.normal(jax.random.key(0), (2, 5, 4)) * 3
  z = jnp.array([[3, 0, 3, 2, 1], [1, 3, 3, 3, 0]])
  lp = masked.subs_log_probs(logits, z, mask_id=3)
  p = np.exp(np.asarray(lp, np.float64))
  np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
  assert np.all(p[..., 3] == 0.0)                       # the mask is never predicted
  visible = np.asarray(z) != 3
  np.testing.assert_array_equal(p[visible], np.eye(4)[np.asarray(z)[visible]])
  ref = np.asarray(logits, np.float64)[..., :3]
  ref = np.exp(ref) / np.exp(ref).sum(-1, keepdims=True)
  np.testing.assert_allclose(p[~visible][:, :3], ref[~visible], rtol=1e-5)


def test_antithetic_times_cover_the_interval():
  t = np.asarray(masked.antithetic_times(jax.random.key(1), 64))
  assert np.all((t > 0) & (t <= 1))
  np.testing.assert_allclose(np.diff(np.sort(t)), 1 / 64, atol=1e-6)


# ---------------------------------------------------------------- the T-step ELBO by enumeration

def brute_force_discrete_nelbo(x, a, b, name, num_steps):
  """E_q[log q(z_{1:T} | x) - log p_theta(z_{0:T})] over every trajectory, float64."""
  alphas = 1.0 - m_np(name, np.arange(num_steps + 1) / num_steps)
  total = 0.0
  for taus in tl.all_states(num_steps, L) + 1:          # masking step of each token, 1..T
    q = np.prod(alphas[taus - 1] - alphas[taus])
    if q == 0:
      continue
    log_p = 0.0
    for i in range(num_steps, 0, -1):
      t = i / num_steps
      z_t = np.where(i >= taus, MASK, x)
      z_s = np.where(i - 1 >= taus, MASK, x)
      logits = a[tl.state_index(z_t, MASK)] + t * b[tl.state_index(z_t, MASK)]
      probs = tl.subs_probs_np(logits, z_t, MASK)
      for l in range(L):
        if z_t[l] != MASK:
          continue                                       # carried over with probability 1
        if z_s[l] == MASK:
          log_p += math.log((1 - alphas[i - 1]) / (1 - alphas[i]))
        else:
          log_p += math.log((alphas[i - 1] - alphas[i]) / (1 - alphas[i]) * probs[l, z_s[l]])
    total += q * (math.log(q) - log_p)
  return total


def expected_loss(model_fn, schedule, x, times, num_steps=None):
  """E over z_t ~ q(.|x) of the library's `loss_at`, for each time: masks enumerated. [len(t)].

  With num_steps = T the times must be grid points i / T.
  """
  patterns = tl.all_states(2, L).astype(bool)           # True = masked
  t_rep = np.repeat(np.asarray(times, np.float64), len(patterns))
  pat = np.tile(patterns, (len(times), 1))
  m = m_np(SCHEDULE_NAME[id(schedule)], t_rep)[:, None]
  prob = np.prod(np.where(pat, m, 1 - m), axis=1)
  z = np.where(pat, MASK, x[None])
  key = (id(model_fn), id(schedule), num_steps)
  if key not in _JITTED:        # one compilation per model, schedule and T (shapes permitting)
    # (model_fn and schedule are kept alive with the entry, so their ids are never reused)
    _JITTED[key] = (model_fn, schedule, jax.jit(lambda x, z, t: masked.loss_at(
        model_fn, schedule, x, z, t, mask_id=MASK, num_steps=num_steps)))
  loss = _JITTED[key][2](jnp.asarray(np.broadcast_to(x, z.shape), jnp.int32),
                      jnp.asarray(z, jnp.int32), jnp.asarray(t_rep, jnp.float32))
  return (prob * np.asarray(loss, np.float64)).reshape(len(times), -1).sum(1)


SCHEDULE_NAME = {}
_JITTED = {}


def schedule_of(name, kw):
  s = masked.get_mask_schedule(name, **kw)
  SCHEDULE_NAME[id(s)] = name
  return s


@pytest.mark.parametrize("name,kw", SCHEDULES)
@pytest.mark.parametrize("num_steps", [1, 2, 5])
def test_discrete_elbo_equals_enumeration(tables, name, kw, num_steps):
  a, b = tables
  s = schedule_of(name, kw)
  model_fn = tl.table_model_fn(a, b)
  for x in tl.all_states(V, L):
    ref = brute_force_discrete_nelbo(x, a, b, name, num_steps)
    # The one-sample estimate with a uniform step i: its expectation is the mean over the grid.
    grid = np.arange(1, num_steps + 1) / num_steps
    ours = expected_loss(model_fn, s, x, grid, num_steps=num_steps).mean()
    # float32 log-softmax of logits |.| < ~8 and T * 8 summed terms: relative error ~1e-6;
    # 1e-5 leaves a margin and still fails on any wrong weight (those change it by > 1e-2).
    np.testing.assert_allclose(ours, ref, rtol=1e-5)


# ---------------------------------------------------------------- the continuous ELBO

def integrand_np(x, a, b, name, t):
  """w(t) E_{z_t}[sum_{masked l} -log x_theta(z_t, t)[l, x_l]] in float64."""
  m, w = m_np(name, t), dm_np(name, t) / m_np(name, t)
  total = 0.0
  for pat in tl.all_states(2, L).astype(bool):
    z = np.where(pat, MASK, x)
    prob = np.prod(np.where(pat, m, 1 - m))
    logits = a[tl.state_index(z, MASK)] + t * b[tl.state_index(z, MASK)]
    probs = tl.subs_probs_np(logits, z, MASK)
    total += prob * sum(-math.log(probs[l, x[l]]) for l in range(L) if pat[l])
  return w * total


def quad(fn):
  value, err = integrate.quad(fn, 0.0, 1.0, epsabs=1e-12, epsrel=1e-12, limit=200)
  assert err < 1e-9
  return value


@pytest.mark.parametrize("name,kw", SCHEDULES)
def test_continuous_elbo_equals_quadrature(tables, name, kw):
  a, b = tables
  s = schedule_of(name, kw)
  model_fn = tl.table_model_fn(a, b)
  x = np.array([1, 0, 1])
  ref = quad(lambda t: integrand_np(x, a, b, name, t))
  # (1) the library's integrand (masks enumerated) on 64 Gauss-Legendre nodes: the integrand is
  # smooth on [0, 1] (w ~ 1/t cancels against P(masked) ~ m(t)), so 64 nodes are exact to ~1e-12;
  # what is left is float32 rounding of the integrand, ~1e-6 relative.
  nodes, weights = np.polynomial.legendre.leggauss(64)
  t = 0.5 * (nodes + 1.0)
  ours = 0.5 * np.sum(weights * expected_loss(model_fn, s, x, t))
  np.testing.assert_allclose(ours, ref, rtol=1e-5)
  # (2) the one-sample estimator `nelbo` (antithetic times, random masks): Monte-Carlo mean
  # within 5 standard errors (the antithetic batch is one stratified sample: its standard error
  # is estimated from 64 independent batches).
  batches, batch = 64, 1024
  xs = jnp.asarray(np.broadcast_to(x, (batch, L)), jnp.int32)
  fn = jax.jit(jax.vmap(lambda k: jnp.mean(masked.nelbo(model_fn, s, xs, k, mask_id=MASK))))
  means = np.asarray(fn(jax.random.split(jax.random.key(7), batches)), np.float64)
  se = means.std(ddof=1) / math.sqrt(batches)
  assert abs(means.mean() - ref) < 5 * se, (means.mean(), ref, se)


@pytest.mark.parametrize("name,kw", SCHEDULES)
def test_discrete_elbo_converges_to_continuous(tables, name, kw):
  a, b = tables
  s = schedule_of(name, kw)
  model_fn = tl.table_model_fn(a, b)
  x = np.array([0, 1, 1])
  cont = quad(lambda t: integrand_np(x, a, b, name, t))
  errors = []
  for num_steps in (10, 100, 1000):
    grid = np.arange(1, num_steps + 1) / num_steps
    errors.append(abs(expected_loss(model_fn, s, x, grid, num_steps=num_steps).mean() - cont))
  # The T-step bound is a Riemann-type sum of the integrand: error O(1/T), i.e. a factor ~10
  # per decade. Asserting a factor 4 allows constants to vary while still failing if it stalls.
  assert errors[1] < errors[0] / 4 and errors[2] < errors[1] / 4, errors
  assert errors[2] < 1e-2 * cont, errors


def test_exact_denoiser_continuous_elbo_is_log_likelihood():
  rng = np.random.default_rng(1)
  joint = rng.dirichlet(np.ones(V ** L))
  a = tl.exact_denoiser_logits(joint, V, L)
  s = schedule_of("cosine", {})
  model_fn = tl.table_model_fn(a)
  nodes, weights = np.polynomial.legendre.leggauss(64)
  t = 0.5 * (nodes + 1.0)
  discrete = []
  for i, x in enumerate(tl.all_states(V, L)):
    bound = 0.5 * np.sum(weights * expected_loss(model_fn, s, x, t))
    np.testing.assert_allclose(bound, -math.log(joint[i]), rtol=1e-5)
    discrete.append(expected_loss(model_fn, s, x, np.arange(1, 5) / 4, num_steps=4).mean())
  # The 4-step bound is a bound on the 4-step model's own likelihood, whose marginal is not p
  # (tokens revealed together are drawn independently), so only on average over x ~ p is it
  # above the entropy (Gibbs' inequality), strictly here.
  entropy = -np.sum(joint * np.log(joint))
  assert np.dot(joint, discrete) > entropy + 1e-3


def test_nelbo_is_differentiable_under_jit_and_vmap():
  a, b = tl.random_tables(np.random.default_rng(2), V, L)
  s = masked.cosine()
  x = jnp.asarray(np.random.default_rng(3).integers(0, V, (16, L)), jnp.int32)

  def loss(scale, key):
    fn = tl.table_model_fn(a * 1.0, b)
    return jnp.mean(masked.nelbo(lambda z, t: scale * fn(z, t), s, x, key, mask_id=MASK,
                                 t_min=0.0))
  g = jax.jit(jax.grad(loss))(1.0, jax.random.key(0))
  assert np.isfinite(float(g))
  per_key = jax.jit(jax.vmap(loss, in_axes=(None, 0)))(1.0, jax.random.split(jax.random.key(0), 3))
  assert per_key.shape == (3,) and np.all(np.isfinite(np.asarray(per_key)))


def test_nelbo_per_example_keys_do_not_depend_on_the_batch():
  a, b = tl.random_tables(np.random.default_rng(4), V, L)
  model_fn = tl.table_model_fn(a, b)
  x = jnp.asarray(np.random.default_rng(5).integers(0, V, (8, L)), jnp.int32)
  keys = jax.random.split(jax.random.key(6), 8)
  fn = jax.jit(lambda x, k: masked.nelbo(model_fn, masked.cosine(), x, k, mask_id=MASK,
                                         antithetic=False, num_steps=7))
  np.testing.assert_array_equal(fn(x, keys)[3:], fn(x[3:], keys[3:]))
  with pytest.raises(ValueError, match="antithetic"):
    masked.nelbo(model_fn, masked.cosine(), x, keys, mask_id=MASK)
