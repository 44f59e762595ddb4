"""Per-example randomness: noise that does not depend on how a batch is split or sharded.

Every function that draws noise for a batch takes `rng`, which is either one PRNG key (then
example b uses `fold_in(rng, b)`) or a batch of keys [B] (one per example, e.g. made by a
multi-device caller from global example indices). Draws for step i of a loop use
`fold_in(example_key, i)`. A sample or a loss is then a function of (key, example index, step)
alone, so 1 device and 8 devices give the same numbers.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def is_single_key(rng: jax.Array) -> bool:
  """True for one key (typed scalar or raw uint32 [2]), False for a batch of keys [B]."""
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng.ndim == 0
  return rng.ndim == 1  # a raw uint32 key of shape [2]


def example_keys(rng: jax.Array, batch_size: int, offset: int | jax.Array = 0) -> jax.Array:
  """One key per example.

  Args:
    rng: a key, or keys [B] (returned as they are after a shape check).
    batch_size: B.
    offset: global index of the first example (for a shard of a larger batch).

  Returns:
    Keys [B] (typed keys or raw uint32 [B, 2], matching `rng`).
  """
  if is_single_key(rng):
    return keys_for_indices(rng, jnp.arange(batch_size) + offset)
  if rng.shape[0] != batch_size:
    raise ValueError(f"rng holds {rng.shape[0]} per-example keys but the batch has {batch_size} "
                     "examples; pass one key or exactly one key per example.")
  return rng


def keys_for_indices(rng: jax.Array, indices: jax.Array) -> jax.Array:
  """Keys [N]: `fold_in(rng, indices[n])`, the key of example `indices[n]` of a run.

  Args:
    rng: one key (typed or raw uint32 [2]).
    indices: int [N], global example indices (any order, e.g. a shard's or a device's rows).
  """
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.asarray(indices))


def fold_in_all(keys: jax.Array, data: int | jax.Array) -> jax.Array:
  """`fold_in(key, data)` for every key of a batch [B]."""
  return jax.vmap(lambda k: jax.random.fold_in(k, data))(keys)


def normal(keys: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """Standard normal noise [B, *shape], example b drawn from keys[b]."""
  return jax.vmap(lambda k: jax.random.normal(k, tuple(shape), dtype))(keys)


def randint(keys: jax.Array, minval: int, maxval: int) -> jax.Array:
  """Integers [B] uniform on [minval, maxval), example b drawn from keys[b]."""
  return jax.vmap(lambda k: jax.random.randint(k, (), minval, maxval))(keys)
