"""Per-example work on a batch split over this host's local devices, under `jax.jit`.

The parameters are replicated on the devices (`place`), the batch is sharded along its first
axis (`shard` for inputs, `constrain` inside the jitted function, `sharded` as out_shardings),
and XLA partitions the program: each device runs its slice of the batch. For work in which each
example's computation is its own (sampling, decoding), the random numbers do not depend on the
number of devices (JAX's partitionable threefry), and the results are the same bits as long as
each device's batch has the size it would have on one device (`experiments.evaluate` keeps the
per-device batch fixed); with another per-device batch, kernels may sum in another order, so
results agree up to float32 rounding.

Used by the trainer's sample grids and evaluations (`trainer._ImageSampler`), the command-line
samplers (`experiments/sampling_lib.make_generator`), `experiments.evaluate`'s feature network,
`experiments.evaluate_bpd`'s bounds and the latent decoder.

References: JAX "Distributed arrays and automatic parallelization" (jit with NamedSharding).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any
AXIS = "batch"


class LocalBatch:
  """The shardings of a batch split over `devices` (default: this host's local devices)."""

  def __init__(self, devices: Sequence[jax.Device] | None = None):
    self.devices = list(devices or jax.local_devices())
    mesh = Mesh(np.asarray(self.devices), (AXIS,))
    self.replicated = NamedSharding(mesh, PartitionSpec())
    self.sharded = NamedSharding(mesh, PartitionSpec(AXIS))

  @classmethod
  def dividing(cls, batch_size: int, devices: Sequence[jax.Device] | None = None) -> LocalBatch:
    """Over `devices` when their number divides `batch_size`, else over the first one alone."""
    devices = list(devices or jax.local_devices())
    return cls(devices if batch_size % len(devices) == 0 else devices[:1])

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  def round_up(self, batch_size: int) -> int:
    """The smallest multiple of the number of devices >= max(batch_size, 1)."""
    return -(-max(1, int(batch_size)) // self.num_devices) * self.num_devices

  def place(self, tree: PyTree) -> PyTree:
    """`tree` replicated on every device (a no-op for arrays already placed so)."""
    return jax.device_put(tree, self.replicated)

  def shard(self, tree: PyTree) -> PyTree:
    """`tree`'s leaves split along their first axis (a multiple of the number of devices)."""
    return jax.device_put(tree, self.sharded)

  def constrain(self, x: jax.Array) -> jax.Array:
    """Inside a jitted function: x [B, ...] split along B over the devices."""
    return jax.lax.with_sharding_constraint(x, self.sharded)
