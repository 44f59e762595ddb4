"""Autoregressive language modelling with a causal token network: the exact negative
log-likelihood and sampling, with a KV cache, in one lax.scan.

The network sees [BOS, x_0, ..., x_{L-2}] and predicts x_0 ... x_{L-1}; `bos_id` is the extra
token of the vocabulary (the mask id of the diffusion twin) and is never predicted (its logit
is set to -inf, as SUBS does for the mask).

`logits_fn(tokens [B, L] int32) -> logits [B, L, K]` is the whole causal network;
`decode_fn(tokens [B, 1], positions [1], cache) -> (logits [B, 1, K], cache)` is one cached step
(`TextTransformer.decode`), `cache` any pytree (`TextTransformer.init_caches`).

References: Vaswani et al. 2017 (causal masking, incremental decoding); Holtzman et al. 2020
(nucleus sampling).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from diffusion_jax import rng as rng_lib
from diffusion_jax.masked import sampler as masked_sampler

LogitsFn = Callable[[jax.Array], jax.Array]
DecodeFn = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def shift_right(x: jax.Array, bos_id: int) -> jax.Array:
  """[B, L] -> [B, L]: BOS followed by x without its last token (the network's input)."""
  return jnp.concatenate([jnp.full_like(x[:, :1], bos_id), x[:, :-1]], axis=1)


def _log_probs(logits: jax.Array, bos_id: int) -> jax.Array:
  """log_softmax with BOS never predicted, float32 [..., K]."""
  logits = jnp.asarray(logits, jnp.float32)
  return jax.nn.log_softmax(jnp.where(jnp.arange(logits.shape[-1]) == bos_id, -jnp.inf, logits),
                            axis=-1)


def nll(logits_fn: LogitsFn, x: jax.Array, *, bos_id: int) -> jax.Array:
  """-log p(x) [B] in nats of tokens x [B, L] (divide by L ln 2 for bits per token)."""
  log_probs = _log_probs(logits_fn(shift_right(x, bos_id)), bos_id)
  picked = jnp.take_along_axis(log_probs, x[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return -jnp.sum(picked, axis=-1)


def sample(rng: jax.Array, *, bos_id: int, length: int, batch_size: int,
           decode_fn: DecodeFn | None = None, cache: Any = None,
           logits_fn: LogitsFn | None = None, temperature: float | jax.Array = 1.0,
           top_p: float | jax.Array = 1.0) -> jax.Array:
  """`length` tokens [B, L] int32, one per step of a `lax.scan`.

  With `decode_fn` and `cache` each step runs the network on the newest token only (KV cache);
  with `logits_fn` each step reruns it on the whole sequence so far (the reference: same
  tokens). Token i of example b is the inverse CDF at a uniform drawn from fold_in(k_b, i), the
  distribution tempered and nucleus-filtered as in the masked sampler.
  """
  if (decode_fn is None) == (logits_fn is None) or (decode_fn is not None and cache is None):
    raise ValueError("sample needs either decode_fn with cache (KV-cache decoding) or logits_fn "
                     "(full recomputation), not both.")
  keys = rng_lib.example_keys(rng, batch_size)
  temperature = jnp.asarray(temperature, jnp.float32)
  top_p = jnp.asarray(top_p, jnp.float32)

  def draw(logits, i):
    lp = jax.nn.log_softmax(_log_probs(logits, bos_id) / temperature, axis=-1)
    lp = lax.cond(top_p < 1.0, masked_sampler.top_p_filter, lambda a, _: a, lp, top_p)
    u = jax.vmap(lambda k: jax.random.uniform(k, ()))(rng_lib.fold_in_all(keys, i))
    return masked_sampler.inverse_cdf(lp, u).astype(jnp.int32)

  if decode_fn is not None:
    def step(carry, i):
      token, cache = carry
      logits, cache = decode_fn(token[:, None], i[None], cache)
      new = draw(logits[:, 0], i)
      return (new, cache), new
    start = jnp.full((batch_size,), bos_id, jnp.int32)
    _, tokens = lax.scan(step, (start, cache), jnp.arange(length))
    return tokens.T

  def full_step(seq, i):
    logits = logits_fn(shift_right(seq, bos_id))
    new = draw(lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False), i)
    return lax.dynamic_update_index_in_dim(seq, new, i, axis=1), None
  seq, _ = lax.scan(full_step, jnp.zeros((batch_size, length), jnp.int32), jnp.arange(length))
  return seq
