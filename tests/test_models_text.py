"""The text transformer (DiT blocks over tokens) and its autoregressive twin: exact parameter
counts, rotary embeddings against the complex-number formula, (bi)directionality, the t
conditioning switch, KV-cache decoding against the full forward pass, and the twin's
likelihood and sampler against brute force over every sequence of a tiny vocabulary.
"""
import math

import hlo_testlib
import jax
import jax.numpy as jnp
import numpy as np
import numerics_testlib
import pytest
from scipy import stats

from diffusion_jax import autoregressive
from diffusion_jax import models
from diffusion_jax.models import layers

TINY = dict(vocab_size=3, hidden_size=32, depth=2, num_heads=2)


def random_params(module, length, seed=0, scale=0.1):
  """Initial parameters plus noise: adaLN-Zero and the zero output layer start at zero, which
  would hide t and most of the network. Small enough (0.1) that attention does not saturate
  onto one token (at 0.3 it did: a causal position then ignored its prefix to 1e-7)."""
  def make():
    params = models.init_params(module, jax.random.key(seed), (length,))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys, strict=True)])
  return jax.jit(make)()


def expected_count(vocab, d, depth, time_conditioning=True, tied=True, mlp_ratio=4):
  """Parameter count written out layer by layer (weights + biases)."""
  dense = lambda i, o: i * o + o
  block = (dense(d, 6 * d) + dense(d, 3 * d) + dense(d, d) + dense(d, mlp_ratio * d)
           + dense(mlp_ratio * d, d))
  total = (vocab + 1) * d + depth * block + dense(d, 2 * d)
  if time_conditioning:
    total += dense(256, d) + dense(d, d)
  if not tied:
    total += dense(d, vocab + 1)
  return total


@pytest.mark.parametrize("name,vocab,d,depth", [("text_tiny", 256, 256, 4),
                                                ("text_small", 256, 768, 12)])
def test_preset_parameter_counts(name, vocab, d, depth):
  assert models.count_params(models.get_model(name), (64,)) == expected_count(vocab, d, depth)
  untied = models.get_model(name, tie_embeddings=False, time_conditioning=False)
  assert models.count_params(untied, (64,)) == expected_count(vocab, d, depth, False, False)


def test_rotary_embedding_matches_complex_rotation_and_is_relative():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
  pos = np.array([0, 3, 7, 11, 100])
  out = np.asarray(layers.rotary_embedding(jnp.asarray(x), jnp.asarray(pos), 10000.0))
  z = x[..., :4] + 1j * x[..., 4:]
  theta = pos[:, None] * 10000.0 ** (-2 * np.arange(4) / 8)
  ref = z * np.exp(1j * theta)[None, :, None, :]
  # float32 cos / sin of angles up to 100 rad: absolute error ~1e-5.
  np.testing.assert_allclose(out, np.concatenate([ref.real, ref.imag], -1), atol=5e-5)
  q, k = jnp.asarray(x[:, :1]), jnp.asarray(x[:, 1:2])
  dot = lambda m, n: jnp.sum(layers.rotary_embedding(q, jnp.array([m]))
                             * layers.rotary_embedding(k, jnp.array([n])), -1)
  np.testing.assert_allclose(dot(2, 9), dot(40, 47), atol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_directionality(causal):
  module = models.TextTransformer(**TINY, causal=causal)
  params = random_params(module, 8)
  x = jnp.asarray(np.random.default_rng(1).integers(0, 4, (1, 8)), jnp.int32)
  y = x.at[0, 6].set((x[0, 6] + 1) % 4)
  t = jnp.array([0.3])
  apply = jax.jit(module.apply)
  diff = np.abs(np.asarray(apply({"params": params}, x, t)
                           - apply({"params": params}, y, t)))[0].max(-1)
  assert np.all(diff[6:] > 1e-4)
  if causal:
    np.testing.assert_array_equal(diff[:6], 0.0)     # positions before 6 cannot see it
  else:
    assert np.all(diff[:6] > 1e-4)


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_time_conditioning_switch(time_conditioning):
  module = models.TextTransformer(**TINY, time_conditioning=time_conditioning)
  params = random_params(module, 6)
  x = jnp.zeros((1, 6), jnp.int32)
  a = module.apply({"params": params}, x, jnp.array([0.1]))
  b = module.apply({"params": params}, x, jnp.array([0.9]))
  assert a.shape == (1, 6, 4) and a.dtype == jnp.float32
  if time_conditioning:
    assert float(jnp.abs(a - b).max()) > 1e-3
    with pytest.raises(ValueError, match="needs t"):
      module.apply({"params": params}, x, None)
  else:
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("scan_blocks", [True, False])
def test_kv_cache_decoding_equals_the_full_pass(scan_blocks):
  module = models.TextTransformer(**TINY, causal=True, time_conditioning=False,
                                  tie_embeddings=False, scan_blocks=scan_blocks)
  params = random_params(module, 10)
  x = jnp.asarray(np.random.default_rng(2).integers(0, 4, (3, 10)), jnp.int32)
  full = jax.jit(module.apply)({"params": params}, x)
  caches = module.apply({"params": params}, 3, 10, method=module.init_caches)
  assert caches.k.shape == (TINY["depth"], 3, 10, 2, 16)     # [depth, B, S, heads, head_dim]
  decode = jax.jit(lambda p, tok, pos, c: module.apply({"params": p}, tok, pos, c,
                                                        method=module.decode))
  steps = []
  for i in range(10):
    logits, caches = decode(params, x[:, i:i + 1], jnp.array([i]), caches)
    steps.append(logits)
  # Same float32 operations in another order (masked attention over 10 cached keys).
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=2e-5, rtol=2e-5)
  with pytest.raises(ValueError, match="causal"):
    bidir = models.TextTransformer(**TINY)
    bidir.apply({"params": random_params(bidir, 4)}, x[:, :1], jnp.array([0]), caches,
                method=bidir.decode)


@pytest.mark.parametrize("causal", [False, True])
def test_scanned_blocks_match_unrolled_blocks(causal):
  """`scan_blocks=True` (the CPU default) is the same network as the unrolled loop, with the same
  parameter tree (checkpoints of either restore into the other): logits and gradients agree.

  Both run the same float32 operations in the same order inside a block; only XLA's fusion
  across blocks differs, so they differ by float32 rounding (numerics_testlib): ~30 dependent
  ops per block x 3 blocks plus the embedding and output layers, about 100 for the logits; the
  backward pass runs the forward chain and about twice as many ops again: 300 for gradients.
  """
  kw = dict(TINY, depth=3, causal=causal, time_conditioning=not causal)
  scanned = models.TextTransformer(**kw, scan_blocks=True)
  unrolled = models.TextTransformer(**kw, scan_blocks=False)
  params = random_params(scanned, 8)
  shapes = lambda p: jax.tree.map(lambda a: (a.shape, a.dtype), p)
  assert shapes(params) == shapes(random_params(unrolled, 8))
  assert {f"block_{i}" for i in range(3)} <= set(params)
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.integers(0, 4, (2, 8)), jnp.int32)
  t = None if causal else jnp.array([0.3, 0.8])
  weights = jnp.asarray(rng.normal(size=(2, 8, 4)), jnp.float32)

  def value_and_grad(module):
    loss = lambda p: jnp.sum(weights * jax.nn.log_softmax(module.apply({"params": p}, x, t)))
    return jax.jit(jax.value_and_grad(loss))(params)

  out_s = jax.jit(scanned.apply)({"params": params}, x, t)
  out_u = jax.jit(unrolled.apply)({"params": params}, x, t)
  numerics_testlib.assert_f32_close(out_s, out_u, ops=100)
  (l_s, g_s), (l_u, g_u) = value_and_grad(scanned), value_and_grad(unrolled)
  numerics_testlib.assert_f32_close(l_s, l_u, ops=100)
  # (adaLN gradients of the causal model, without time conditioning (c = 0), are exactly 0.)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_s), jax.tree.leaves(g_u),
                          strict=True):
    numerics_testlib.assert_f32_close(a, b, ops=300, err_msg=jax.tree_util.keystr(path))


def test_scanned_gradient_fusions_do_not_grow_with_depth():
  """The blocks really are scanned: the largest fusion of the compiled gradient is one block's
  work whatever the depth (unrolled, XLA:CPU fused the residual cotangent across blocks: text_tiny
  at depth 2 / 6 / 12 had largest fusions of 224 / 504 / 924 instructions, scanned 89 at every
  depth). Slack 10 %: the scan's own bookkeeping, not a per-block term (as test_models_dit)."""
  x = jnp.zeros((2, 8), jnp.int32)
  t = jnp.array([0.3, 0.8])
  sizes = []
  for depth in (2, 6):
    module = models.TextTransformer(**dict(TINY, depth=depth))
    params = jax.eval_shape(lambda m=module: models.init_params(m, jax.random.key(0), (8,)))
    loss = lambda p, m=module: jnp.sum(m.apply({"params": p}, x, t))
    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    sizes.append(hlo_testlib.largest_fusion(compiled.as_text()))
  assert sizes[1] <= 1.1 * sizes[0], sizes


def _twin(length, seed=3):
  module = models.TextTransformer(vocab_size=2, hidden_size=32, depth=2, num_heads=2,
                                  causal=True, time_conditioning=False)
  params = random_params(module, length, seed=seed, scale=0.3)
  logits_fn = lambda tokens: module.apply({"params": params}, tokens)
  decode_fn = lambda tokens, pos, cache: module.apply({"params": params}, tokens, pos, cache,
                                                      method=module.decode)
  init = lambda batch: module.apply({"params": params}, batch, length, method=module.init_caches)
  return logits_fn, decode_fn, init


def test_autoregressive_likelihood_is_normalised():
  # exp(-nll) summed over every sequence is 1 only if each position sees exactly its prefix.
  length = 5
  logits_fn, _, _ = _twin(length)
  xs = jnp.asarray(np.array(np.unravel_index(np.arange(2 ** length), (2,) * length)).T,
                   jnp.int32)
  p = np.exp(-np.asarray(jax.jit(lambda x: autoregressive.nll(logits_fn, x, bos_id=2))(xs),
                         np.float64))
  # float32 log-probabilities summed over 5 positions: relative error ~1e-6 per sequence.
  np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-5)


def test_autoregressive_sampling_cached_equals_uncached_and_follows_the_model():
  length, n = 3, 1 << 14
  logits_fn, decode_fn, init = _twin(length)
  key = jax.random.key(4)
  cached = jax.jit(lambda k: autoregressive.sample(
      k, bos_id=2, length=length, batch_size=n, decode_fn=decode_fn, cache=init(n)))(key)
  uncached = jax.jit(lambda k: autoregressive.sample(
      k, bos_id=2, length=length, batch_size=n, logits_fn=logits_fn))(key)
  np.testing.assert_array_equal(cached, uncached)
  xs = jnp.asarray(np.array(np.unravel_index(np.arange(8), (2,) * 3)).T, jnp.int32)
  law = np.exp(-np.asarray(autoregressive.nll(logits_fn, xs, bos_id=2), np.float64))
  law /= law.sum()
  counts = np.bincount(np.ravel_multi_index(np.asarray(cached).T, (2,) * 3), minlength=8)
  assert n * law.min() >= 5
  # Chi-square goodness of fit at significance 1e-3.
  assert stats.chisquare(counts, n * law).pvalue > 1e-3
  with pytest.raises(ValueError, match="decode_fn"):
    autoregressive.sample(key, bos_id=2, length=3, batch_size=2)
  assert math.isfinite(float(law.sum()))


def test_attention_field_picks_the_kernel():
  """The causal text transformer passes `attention` to its blocks: the CPU default is the
  'einsum' kernel (identical logits), and jax.nn's 'xla' kernel gives the same logits and
  parameter gradients up to float32 rounding (two blocks of sums over 10 keys, 32 channels and
  the 128-wide MLP: ops=300, as for the scanned-vs-unrolled comparison)."""
  module = models.TextTransformer(**TINY, causal=True, time_conditioning=False)
  params = random_params(module, 10)
  x = jnp.asarray(np.random.default_rng(3).integers(0, 4, (3, 10)), jnp.int32)

  def logits_and_grads(attention):
    m = module.clone(attention=attention)
    loss = lambda p: jnp.mean(jax.nn.log_softmax(m.apply({"params": p}, x))[..., 0])
    return m.apply({"params": params}, x), jax.grad(loss)(params)

  default, einsum, xla = (logits_and_grads(a) for a in (None, "einsum", "xla"))
  for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(einsum), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(xla), jax.tree.leaves(default), strict=True):
    numerics_testlib.assert_f32_close(a, b, ops=300)
