"""Masked-diffusion samplers against exact laws: with the exact denoiser of a known joint p over
3 tokens (V = 3 values), the ancestral sampler's output is compared with the exact law of the
N-step process (transition matrices composed in float64 NumPy, `masked_testlib.ancestral_law`)
and with p itself, by chi-square tests.

Chi-square tests use significance 1e-3 (a correct sampler fails one by chance with probability
0.001) and n large enough that every expected count is at least 5 (asserted).
"""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from scipy import stats

import masked_testlib as tl
from diffusion_jax import masked

V, L = 3, 3
MASK = V
ALPHA = 1e-3
N_SAMPLES = 1 << 15


def m_linear(t):
  return t


def m_cosine(t):
  return np.sin(np.pi / 2 * t)


@pytest.fixture(scope="module")
def joint():
  # Strongly dependent tokens (mass on x0 = x1 = x2 and on x0 = x2), so that revealing tokens
  # together, independently, visibly changes the law: a sampler with wrong reveal
  # probabilities (e.g. another schedule's) moves the chi-square statistic by ~450 at this n.
  # Dirichlet(4) noise on top keeps every probability above 5 / N_SAMPLES.
  xs = tl.all_states(V, L)
  weight = 1.0 + 8.0 * ((xs[:, 0] == xs[:, 1]) & (xs[:, 1] == xs[:, 2])) + 3.0 * (
      xs[:, 0] == xs[:, 2])
  p = np.random.default_rng(0).dirichlet(4.0 * np.ones(V ** L)) * weight
  return p / p.sum()


@pytest.fixture(scope="module")
def exact(joint):
  return tl.exact_denoiser_logits(joint, V, L)


def draw(logits, schedule, num_steps, key=0, n=N_SAMPLES, **kw):
  kw.setdefault("shape", (n, L))
  fn = jax.jit(lambda k: masked.sample(tl.table_model_fn(logits), schedule, k, mask_id=MASK,
                                       num_steps=num_steps, **kw))
  return fn(jax.random.key(key))


def counts_of(tokens, num_values=V):
  idx = tl.state_index(np.asarray(tokens), num_values - 1)
  return np.bincount(idx, minlength=num_values ** L)


def chi_square_p(tokens, law):
  """p-value of a chi-square goodness-of-fit test of the sample against `law` [V^L]."""
  n = tokens.shape[0]
  expected = n * law
  assert expected[law > 0].min() >= 5
  observed = counts_of(tokens)
  assert observed[law == 0].sum() == 0
  return stats.chisquare(observed[law > 0], expected[law > 0]).pvalue


def data_law(law_with_masks):
  """Restricts a law over {0..V}^L (base V+1) to mask-free sequences (base V)."""
  out = np.zeros(V ** L)
  for i, x in enumerate(tl.all_states(V, L)):
    out[i] = law_with_masks[tl.state_index(x, MASK)]
  return out


@pytest.mark.parametrize("schedule,m_np", [(masked.linear(), m_linear),
                                           (masked.cosine(), m_cosine)])
def test_few_steps_match_the_exact_n_step_law(exact, joint, schedule, m_np):
  num_steps = 3
  law = data_law(tl.ancestral_law(exact, m_np, num_steps, np.full(L, MASK)))
  np.testing.assert_allclose(law.sum(), 1.0, rtol=1e-12)     # no mask left
  out = draw(exact, schedule, num_steps)
  assert chi_square_p(out.tokens, law) > ALPHA
  # The 3-step law is not p (tokens revealed together are independent): the test has power.
  assert np.abs(law - joint).sum() > 0.05


def test_many_steps_reproduce_the_joint(exact, joint):
  num_steps = 512
  law = data_law(tl.ancestral_law(exact, m_linear, num_steps, np.full(L, MASK)))
  # The N-step law's distance to p shifts the chi-square statistic by about
  # lambda = n sum (law - p)^2 / p; below 1 it is invisible next to the 26 degrees of freedom.
  assert N_SAMPLES * np.sum((law - joint) ** 2 / joint) < 1.0
  out = draw(exact, masked.linear(), num_steps, key=1)
  assert chi_square_p(out.tokens, joint) > ALPHA


@pytest.mark.parametrize("num_steps", [3, 64])
def test_cached_and_uncached_give_identical_tokens(num_steps):
  a, _ = tl.random_tables(np.random.default_rng(1), V, L)   # a time-independent network
  cached = draw(a, masked.cosine(), num_steps, n=1024, use_cache=True)
  uncached = draw(a, masked.cosine(), num_steps, n=1024, use_cache=False)
  np.testing.assert_array_equal(cached.tokens, uncached.tokens)
  assert int(uncached.model_calls) == num_steps
  # The cache is decided for the whole batch: with 2 sequences of 3 tokens at most 7 steps
  # change something, and the network runs only at the first step and after those.
  small = [draw(a, masked.cosine(), num_steps, n=2, use_cache=c, key=3) for c in (True, False)]
  np.testing.assert_array_equal(small[0].tokens, small[1].tokens)
  assert int(small[0].model_calls) <= min(num_steps, 2 * L + 1)


def test_infilling_keeps_given_tokens_and_samples_the_conditional(exact, joint):
  # Positions 0 and 2 given: the sampler must draw x_1 from p(x_1 | x_0, x_2).
  given = np.array([2, MASK, 0])
  init = jnp.asarray(np.broadcast_to(given, (N_SAMPLES, L)), jnp.int32)
  out = draw(exact, masked.linear(), 8, key=2, init=init, shape=None)
  tokens = np.asarray(out.tokens)
  np.testing.assert_array_equal(tokens[:, [0, 2]], np.broadcast_to(given[[0, 2]],
                                                                    (N_SAMPLES, 2)))
  xs = tl.all_states(V, L)
  cond = np.where((xs[:, 0] == 2) & (xs[:, 2] == 0), joint, 0.0)
  assert chi_square_p(out.tokens, cond / cond.sum()) > ALPHA


def test_infilling_keeps_every_given_token_on_random_patterns():
  vocab, length, batch = 11, 24, 64
  rng = np.random.default_rng(3)
  x = rng.integers(0, vocab, (batch, length))
  known = rng.random((batch, length)) < 0.4
  init = jnp.asarray(np.where(known, x, vocab), jnp.int32)
  w = jnp.asarray(rng.normal(size=(vocab + 1, vocab + 1)), jnp.float32)
  model_fn = lambda z, t: w[z] + jnp.mean(w[z], axis=1, keepdims=True)  # mixes positions
  out = jax.jit(lambda k: masked.sample(model_fn, masked.cosine(), k, mask_id=vocab,
                                        num_steps=10, init=init, top_p=0.9,
                                        temperature=0.7))(jax.random.key(4))
  tokens = np.asarray(out.tokens)
  np.testing.assert_array_equal(tokens[known], x[known])
  assert np.all(tokens < vocab)


def test_blocks_of_one_token_sample_the_joint_autoregressively(exact, joint):
  # Block j reveals token j given tokens < j (later ones masked and frozen): with the exact
  # denoiser that is p(x_j | x_<j), so the result is p exactly, whatever the number of steps.
  fn = jax.jit(lambda k: masked.block_sample(
      tl.table_model_fn(exact), masked.linear(), k, mask_id=MASK, num_steps=2, block_size=1,
      context=L, shape=(N_SAMPLES, L)))
  out = fn(jax.random.key(5))
  assert chi_square_p(out.tokens, joint) > ALPHA


def test_block_sample_longer_than_context_keeps_the_prompt():
  vocab, length, context, block = 7, 20, 8, 4
  prompt = np.random.default_rng(6).integers(0, vocab, (3, 6))
  init = np.full((3, length), vocab)
  init[:, :6] = prompt
  seen_lengths = []

  def model_fn(z, t):
    seen_lengths.append(z.shape[1])
    return jnp.zeros(z.shape + (vocab + 1,)) + jnp.arange(vocab + 1.0) * 0.1
  out = jax.jit(lambda k: masked.block_sample(
      model_fn, masked.linear(), k, mask_id=vocab, num_steps=4, block_size=block,
      context=context, init=jnp.asarray(init)))(jax.random.key(7))
  tokens = np.asarray(out.tokens)
  np.testing.assert_array_equal(tokens[:, :6], prompt)
  assert np.all(tokens < vocab)
  assert set(seen_lengths) == {context}                       # the network sees its context
  with pytest.raises(ValueError, match="block_size"):
    masked.block_sample(model_fn, masked.linear(), jax.random.key(0), mask_id=vocab,
                        num_steps=2, block_size=3, context=8, shape=(1, 20))


def test_temperature_and_top_p(exact, joint):
  # One step from all-masked reveals every token at once from the marginals p(x_l): the law is
  # the product of the tempered marginals.
  xs = tl.all_states(V, L)
  marginals = np.array([[joint[xs[:, l] == v].sum() for v in range(V)] for l in range(L)])
  tau = 0.5
  tempered = marginals ** (1 / tau)
  tempered /= tempered.sum(1, keepdims=True)
  law = np.prod(tempered[np.arange(L), xs], axis=1)
  out = draw(exact, masked.linear(), 1, key=8, temperature=tau)
  assert chi_square_p(out.tokens, law) > ALPHA
  # A tiny nucleus keeps only the most likely token: greedy decoding of each marginal.
  greedy = draw(exact, masked.linear(), 1, key=9, n=64, top_p=1e-6)
  np.testing.assert_array_equal(np.asarray(greedy.tokens),
                                np.broadcast_to(marginals.argmax(1), (64, L)))


def test_top_p_filter_matches_numpy():
  rng = np.random.default_rng(10)
  logits = rng.normal(size=(50, 9)) * 2
  log_probs = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32))
  for top_p in (0.3, 0.75, 0.95):
    out = np.exp(np.asarray(masked.top_p_filter(log_probs, top_p), np.float64))
    p = np.exp(np.asarray(log_probs, np.float64))
    for row, probs in zip(out, p, strict=True):
      order = np.argsort(-probs)
      n_keep = np.searchsorted(np.cumsum(probs[order]), top_p) + 1   # smallest set >= top_p
      ref = np.zeros_like(probs)
      ref[order[:n_keep]] = probs[order[:n_keep]] / probs[order[:n_keep]].sum()
      np.testing.assert_allclose(row, ref, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(masked.top_p_filter(log_probs, 1.0), log_probs)


def test_per_example_keys_make_samples_independent_of_the_batch():
  a, b = tl.random_tables(np.random.default_rng(11), V, L)
  keys = jax.random.split(jax.random.key(12), 8)
  fn = lambda k: masked.sample(tl.table_model_fn(a, b), masked.cosine(), k, mask_id=MASK,
                               num_steps=6, shape=(k.shape[0], L), use_cache=False)
  whole = jax.jit(fn)(keys).tokens
  part = jax.jit(fn)(keys[5:]).tokens
  np.testing.assert_array_equal(whole[5:], part)


def test_bad_arguments_raise():
  f = lambda z, t: jnp.zeros(z.shape + (4,))
  with pytest.raises(ValueError, match="num_steps"):
    masked.sample(f, masked.linear(), jax.random.key(0), mask_id=3, num_steps=0, shape=(1, 2))
  with pytest.raises(ValueError, match="temperature"):
    masked.sample(f, masked.linear(), jax.random.key(0), mask_id=3, num_steps=2, shape=(1, 2),
                  temperature=0.0)
  with pytest.raises(ValueError, match="top_p"):
    masked.sample(f, masked.linear(), jax.random.key(0), mask_id=3, num_steps=2, shape=(1, 2),
                  top_p=1.5)
  with pytest.raises(ValueError, match="shape"):
    masked.sample(f, masked.linear(), jax.random.key(0), mask_id=3, num_steps=2)
