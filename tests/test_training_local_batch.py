"""training.local_batch: a batch split over the (8 test) local devices under jit."""
import jax
import jax.numpy as jnp
import numpy as np
from numerics_testlib import assert_f32_close

from diffusion_jax.training import local_batch


def test_rounding_dividing_and_placement():
  local = local_batch.LocalBatch()
  assert local.num_devices == jax.local_device_count() == 8
  assert [local.round_up(b) for b in (0, 1, 8, 9, 17)] == [8, 8, 8, 16, 24]
  assert local_batch.LocalBatch.dividing(16).num_devices == 8
  assert local_batch.LocalBatch.dividing(12).num_devices == 1
  params = local.place({"w": np.ones((3, 3), np.float32)})
  assert params["w"].sharding.is_fully_replicated and len(params["w"].sharding.device_set) == 8
  x = local.shard(np.arange(16 * 2, dtype=np.float32).reshape(16, 2))
  assert x.sharding.shard_shape(x.shape) == (2, 2)


def test_constrained_jit_splits_the_batch_and_keeps_the_values():
  # A per-example function jitted with the batch constrained: the output is split 8 ways and
  # equals the unsplit computation up to the rounding of its 5-term dot products and the tanh
  # (a kernel for 2 rows may sum in another order than one for 16).
  local = local_batch.LocalBatch()
  w = jax.random.normal(jax.random.PRNGKey(0), (5, 5))
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 5))
  f = lambda w, x: jnp.tanh(x @ w)
  split = jax.jit(lambda w, x: f(w, local.constrain(x)), out_shardings=local.sharded)(
      local.place(w), x)
  assert split.sharding.shard_shape(split.shape) == (2, 5)
  one = local_batch.LocalBatch(jax.devices()[:1])
  whole = jax.jit(f, out_shardings=one.sharded)(one.place(w), x)
  assert_f32_close(split, whole, ops=5 + 1, scale=float(jnp.abs(x).sum(-1).max() * jnp.abs(w).max()))
