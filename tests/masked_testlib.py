"""Tiny discrete problems for masked-diffusion tests: V data tokens, length L, mask id V.

A sequence z in {0, ..., V}^L (V = mask) is indexed by sum_l z_l (V + 1)^l, so a denoiser is a
table of logits per state. Everything here is NumPy float64 except `table_model_fn`, which looks
the same table up in JAX for the library code under test.
"""
import itertools

import jax.numpy as jnp
import numpy as np


def all_states(num_values, length):
  """[num_values^length, length] int: every sequence, position 0 varying fastest."""
  grid = np.array(list(itertools.product(range(num_values), repeat=length)), np.int64)
  return grid[:, ::-1].copy()


def state_index(z, mask_id):
  """Index of sequences z [..., L] with tokens in [0, mask_id] (base mask_id + 1)."""
  base = (mask_id + 1) ** np.arange(z.shape[-1])
  return np.sum(np.asarray(z) * base, axis=-1)


def random_tables(rng, vocab, length):
  """(a, b) float64 [(V+1)^L, L, V+1]: logits a + t b, a time-dependent denoiser."""
  shape = ((vocab + 1) ** length, length, vocab + 1)
  return rng.normal(size=shape) * 1.5, rng.normal(size=shape)


def table_model_fn(a, b=None):
  """model_fn(z [B, L], t [B]) -> logits [B, L, V+1] = a[state] + t b[state] (float32)."""
  mask_id = a.shape[-1] - 1
  a32 = jnp.asarray(a, jnp.float32)
  b32 = None if b is None else jnp.asarray(b, jnp.float32)
  base = jnp.asarray((mask_id + 1) ** np.arange(a.shape[1]), jnp.int32)

  def model_fn(z, t):
    idx = jnp.sum(z.astype(jnp.int32) * base, axis=-1)
    out = a32[idx]
    if b32 is not None:
      out = out + jnp.asarray(t, jnp.float32)[:, None, None] * b32[idx]
    return out
  return model_fn


def subs_probs_np(logits, z, mask_id):
  """NumPy float64 x_theta(z): softmax over data tokens at masked positions. [L, V]."""
  lg = np.asarray(logits, np.float64)[..., :mask_id]
  p = np.exp(lg - lg.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def exact_denoiser_logits(joint, vocab, length):
  """Logits [(V+1)^L, L, V+1] of p(x_l | visible tokens of z) for a joint [V^L] over sequences.

  joint is indexed like `all_states(vocab, length)`. Visible positions get a one-hot (their
  value); the mask column is -inf.
  """
  mask_id = vocab
  xs = all_states(vocab, length)
  states = all_states(vocab + 1, length)
  out = np.full((len(states), length, vocab + 1), -np.inf)
  for i, z in enumerate(states):
    visible = z != mask_id
    consistent = np.all((xs == z) | ~visible, axis=1)
    w = joint * consistent
    for l in range(length):
      marg = np.array([w[xs[:, l] == v].sum() for v in range(vocab)])
      if marg.sum() > 0:
        with np.errstate(divide="ignore"):
          out[i, l, :vocab] = np.log(marg / marg.sum())
  return np.maximum(out, -1e30)  # finite, so float32 lookups stay finite


def ancestral_law(logits, schedule_mask_prob, num_steps, init, active=None, temperature=1.0):
  """Exact law [(V+1)^L] of the N-step ancestral sampler, by composing transition matrices.

  logits: [(V+1)^L, L, V+1] a time-independent denoiser table; schedule_mask_prob: float64
  function m(t); init: [L] start state (mask = V); active: [L] bool where reveals are allowed.
  """
  num_classes = logits.shape[-1]
  mask_id = num_classes - 1
  length = logits.shape[1]
  active = np.ones(length, bool) if active is None else np.asarray(active, bool)
  states = all_states(num_classes, length)
  # Every transition k -> j as (revealed count r, revealable count M, token probabilities):
  # its probability in a step with reveal probability u is u^r (1 - u)^(M - r) prod(p).
  src, dst, revealed, revealable, token_p = [], [], [], [], []
  for k, z in enumerate(states):
    probs = subs_probs_np(np.asarray(logits[k]) / temperature, z, mask_id)
    options = []
    for l in range(length):
      if z[l] != mask_id or not active[l]:
        options.append([(z[l], 0, 1.0)])
      else:
        options.append([(mask_id, 0, 1.0)] + [(v, 1, probs[l, v]) for v in range(mask_id)])
    m = sum(len(o) > 1 for o in options)
    for combo in itertools.product(*options):
      src.append(k)
      dst.append(state_index(np.array([c[0] for c in combo]), mask_id))
      revealed.append(sum(c[1] for c in combo))
      revealable.append(m)
      token_p.append(np.prod([c[2] for c in combo]))
  src, dst, revealed, revealable, token_p = map(np.asarray, (src, dst, revealed, revealable,
                                                            token_p))
  law = np.zeros(len(states))
  law[state_index(np.asarray(init), mask_id)] = 1.0
  for i in range(num_steps, 0, -1):
    m_t, m_s = schedule_mask_prob(i / num_steps), schedule_mask_prob((i - 1) / num_steps)
    u = (m_t - m_s) / m_t
    w = token_p * u ** revealed * (1.0 - u) ** (revealable - revealed)
    law = np.bincount(dst, weights=law[src] * w, minlength=len(states))
  return law
