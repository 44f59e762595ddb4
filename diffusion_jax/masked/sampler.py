"""Ancestral sampling of masked diffusion (the reverse of the masking process) in one lax.scan.

N steps on the grid t_i = i / N, i = N .. 1. From t to s < t every masked position that may be
generated is revealed with probability (alpha(s) - alpha(t)) / (1 - alpha(t)), its token drawn
from x_theta(z_t, t) (SUBS: never the mask), with temperature and top-p applied to that
distribution; visible tokens are carried over, so given tokens (infilling, a prompt) are never
changed. The last step (s = 0) reveals every remaining masked position.

The cache (MDLM's `ddpm_cache`): when no token of the batch changed in a step, the network's
output for the next step is the previous one, reused instead of recomputed. This is exact for a
network that ignores t (MDLM trains without time conditioning for this reason); with time
conditioning it reuses the prediction of an earlier time, an approximation.

Randomness: example b draws one uniform u per position at step i from fold_in(k_b, i), k_b its
key (`diffusion_jax.rng`): a masked token is revealed when u < r (r the reveal probability), and
its value is the inverse CDF of x_theta at u / r (uniform on [0, 1) given the reveal), so one
number per token and step; a sample depends neither on the batch split nor on `use_cache`.

`block_sample` generates sequences longer than the network's context semi-autoregressively:
blocks of `block_size` tokens left to right, each sampled by `sample` in a window of `context`
tokens ending with the block (earlier tokens given, later ones masked and frozen).

References: Sahoo et al. 2024 (MDLM), sec. 3.3 and app. (ddpm_cache sampler, semi-autoregressive
generation); Shi et al. 2024 (MD4), sec. 3 (ancestral sampler) and app. (top-p); Holtzman et al.
2020, "The Curious Case of Neural Text Degeneration" (nucleus sampling).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from diffusion_jax import rng as rng_lib
from diffusion_jax.masked import forward
from diffusion_jax.masked.schedule import MaskSchedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


class Sample(NamedTuple):
  """tokens: [B, L] int32 (no mask left where generation was allowed); model_calls: int32
  scalar, how many times the network ran (N without the cache, fewer with it)."""
  tokens: jax.Array
  model_calls: jax.Array


def top_p_filter(log_probs: jax.Array, top_p: float | jax.Array) -> jax.Array:
  """Nucleus filter: keeps the most likely tokens whose total probability first reaches top_p.

  log_probs: [..., K] normalised; top_p in (0, 1] (1 keeps everything). Returns [..., K]
  renormalised log-probabilities with -inf outside the nucleus (the top token is always kept;
  tokens tied with the last one kept are kept too).
  """
  probs = jnp.exp(log_probs)
  sorted_probs = -jnp.sort(-probs, axis=-1)
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  kept = mass_before < top_p
  threshold = jnp.min(jnp.where(kept, sorted_probs, jnp.inf), axis=-1, keepdims=True)
  filtered = jax.nn.log_softmax(jnp.where(probs >= threshold, log_probs, -jnp.inf), axis=-1)
  return jnp.where(jnp.asarray(top_p) >= 1.0, log_probs, filtered)


def _token_log_probs(model_fn: ModelFn, z: jax.Array, t: jax.Array, mask_id: int,
                     temperature: jax.Array, top_p: jax.Array) -> jax.Array:
  """[B, L, K] log-probabilities to draw masked tokens from (SUBS, temperature, top-p)."""
  log_probs = forward.subs_log_probs(model_fn(z, t), z, mask_id=mask_id)
  log_probs = jax.nn.log_softmax(log_probs / temperature, axis=-1)
  return lax.cond(top_p < 1.0, top_p_filter, lambda lp, _: lp, log_probs, top_p)


def inverse_cdf(log_probs: jax.Array, u: jax.Array) -> jax.Array:
  """The token k with cdf[k-1] <= u < cdf[k] of exp(log_probs) [..., K], for u [...] in [0, 1);
  zero-probability tokens are never returned (u past a rounded-down cdf gives the last one with
  positive probability)."""
  probs = jnp.exp(log_probs)
  index = jnp.sum(jnp.cumsum(probs, axis=-1) <= u[..., None], axis=-1)
  last = probs.shape[-1] - 1 - jnp.argmax((probs > 0)[..., ::-1], axis=-1)
  return jnp.minimum(index, last)


def _check(num_steps: int, temperature, top_p) -> None:
  if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}.")
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  if isinstance(top_p, (int, float)) and not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}.")


def sample(model_fn: ModelFn, schedule: MaskSchedule, rng: jax.Array, *, mask_id: int,
           num_steps: int, init: jax.Array | None = None, shape: tuple[int, int] | None = None,
           active: jax.Array | None = None, temperature: float | jax.Array = 1.0,
           top_p: float | jax.Array = 1.0, use_cache: bool = True) -> Sample:
  """N ancestral steps from `init` (default: all masked) in one `lax.scan`.

  Args:
    model_fn: (z [B, L] int32, t [B] float32) -> logits [B, L, K], K = mask_id + 1 or mask_id.
    schedule: the mask schedule the network was trained with.
    rng: a key or per-example keys [B].
    mask_id: the mask token.
    num_steps: N (static).
    init: [B, L] int tokens, mask_id where to generate (infilling: the rest is kept).
    shape: (B, L) when init is None.
    active: [B, L] bool, where masked tokens may be revealed (default: everywhere); masked
      positions outside stay masked (`block_sample`'s later blocks).
    temperature: > 0, divides the log-probabilities before drawing (an array: no recompile).
    top_p: nucleus mass in (0, 1] (1: off).
    use_cache: skip the network when no token changed since its last call.

  Returns:
    `Sample(tokens [B, L] int32, model_calls int32 scalar)`.
  """
  _check(num_steps, temperature, top_p)
  if init is None:
    if shape is None:
      raise ValueError("sample needs init (tokens [B, L]) or shape (B, L); got neither.")
    init = jnp.full(shape, mask_id, jnp.int32)
  z0 = jnp.asarray(init, jnp.int32)
  batch = z0.shape[0]
  active = jnp.ones(z0.shape, bool) if active is None else jnp.asarray(active, bool)
  keys = rng_lib.example_keys(rng, batch)
  temperature = jnp.asarray(temperature, jnp.float32)
  top_p = jnp.asarray(top_p, jnp.float32)

  def predict(z, t):
    return _token_log_probs(model_fn, z, t, mask_id, temperature, top_p)

  def step(carry, i):
    z, cached, changed, calls = carry
    t = jnp.full((batch,), (num_steps - i) / num_steps, jnp.float32)
    s = jnp.full((batch,), (num_steps - i - 1) / num_steps, jnp.float32)
    need = changed | (not use_cache)
    log_probs = lax.cond(need, lambda: predict(z, t), lambda: cached)
    m_t, m_s = schedule.mask_prob(t), schedule.mask_prob(s)
    reveal_prob = ((m_t - m_s) / m_t)[:, None]
    u = jax.vmap(lambda k: jax.random.uniform(k, z.shape[1:]))(rng_lib.fold_in_all(keys, i))
    reveal = (z == mask_id) & active & (u < reveal_prob)
    tokens = inverse_cdf(log_probs, u / reveal_prob)
    z_next = jnp.where(reveal, tokens, z).astype(jnp.int32)
    return (z_next, log_probs, jnp.any(reveal), calls + need.astype(jnp.int32)), None

  num_classes = jax.eval_shape(model_fn, z0, jnp.zeros((batch,), jnp.float32)).shape[-1]
  cached = jnp.zeros(z0.shape + (num_classes,), jnp.float32)
  carry = (z0, cached, jnp.array(True), jnp.array(0, jnp.int32))
  (z, _, _, calls), _ = lax.scan(step, carry, jnp.arange(num_steps))
  return Sample(z, calls)


def block_sample(model_fn: ModelFn, schedule: MaskSchedule, rng: jax.Array, *, mask_id: int,
                 num_steps: int, block_size: int, context: int,
                 init: jax.Array | None = None, shape: tuple[int, int] | None = None,
                 temperature: float | jax.Array = 1.0, top_p: float | jax.Array = 1.0,
                 use_cache: bool = True) -> Sample:
  """Semi-autoregressive generation of [B, L] tokens, L a multiple of `block_size`.

  Block j (tokens j * block_size ... (j + 1) * block_size - 1) is sampled with `num_steps`
  steps of `sample` in the window of `context` tokens that ends with it (or starts at 0):
  the tokens before it are given, those after it stay masked. One `lax.scan` over blocks.

  Args:
    block_size: tokens per block, dividing L and at most `context`.
    context: the network's sequence length (window), at most L.
    init: [B, L] tokens, mask_id where to generate (e.g. a prompt followed by masks), or None
      with `shape`.
    rng: a key or per-example keys [B]; block j uses fold_in(k_b, j) as `sample`'s keys.
    Others as in `sample`.
  """
  if init is None:
    if shape is None:
      raise ValueError("block_sample needs init (tokens [B, L]) or shape (B, L); got neither.")
    init = jnp.full(shape, mask_id, jnp.int32)
  z = jnp.asarray(init, jnp.int32)
  batch, length = z.shape
  if not 0 < block_size <= context <= length or length % block_size:
    raise ValueError(f"need 0 < block_size <= context <= L and L % block_size == 0; got "
                     f"block_size={block_size}, context={context}, L={length}.")
  keys = rng_lib.example_keys(rng, batch)
  positions = jnp.arange(context)

  def one_block(carry, j):
    z, calls = carry
    start = jnp.clip((j + 1) * block_size - context, 0, length - context)
    window = lax.dynamic_slice_in_dim(z, start, context, axis=1)
    absolute = start + positions
    active = (absolute >= j * block_size) & (absolute < (j + 1) * block_size)
    out = sample(model_fn, schedule, rng_lib.fold_in_all(keys, j), mask_id=mask_id,
                 num_steps=num_steps, init=window,
                 active=jnp.broadcast_to(active, window.shape), temperature=temperature,
                 top_p=top_p, use_cache=use_cache)
    z = lax.dynamic_update_slice_in_dim(z, out.tokens, start, axis=1)
    return (z, calls + out.model_calls), None

  (z, calls), _ = lax.scan(one_block, (z, jnp.array(0, jnp.int32)),
                           jnp.arange(length // block_size))
  return Sample(z, calls)
