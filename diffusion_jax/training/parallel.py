"""Wrap the per-device step once: `jax.pmap` (default) or `jax.jit` + `shard_map` over a Mesh,
optionally fusing k steps per call with `lax.scan`.

Layouts (L local devices, k fused steps, b per-device batch):
  jit:       one device, no collectives (build the step with axis_name=None); state plain;
             batch leaves [k, b, ...] (the iterator's single device axis is dropped).
  auto:      jit when there is exactly one device, else pmap.
  pmap:      state replicated with a leading [L] axis; batch leaves [L, k, b, ...].
  shard_map: state global arrays replicated over the mesh; batch leaves global [k, D*b, ...]
             sharded along axis 1 over the 'batch' mesh axis.
`prepare_batch` turns the data iterator's [L, b, ...] arrays (stacked to [k, L, b, ...]) into
either layout; `put_state` / `get_state` move the state in and out.

References: the Flax ImageNet example (pmap + donate); JAX shard_map docs.
"""
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
MODES = ("pmap", "shard_map", "jit", "auto")
AXIS = "batch"


class ParallelStep(NamedTuple):
  """step(state, batch, rng) -> (state, metrics [k]) plus the helpers for its layout."""
  step: Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, dict]]
  put_state: Callable[[PyTree], PyTree]
  get_state: Callable[[PyTree], PyTree]
  prepare_batch: Callable[[PyTree], PyTree]
  mode: str
  mesh: Mesh | None
  # get_state returns host copies (np.array copies), never views of buffers a later call donates.


def global_mesh() -> Mesh:
  """A 1-D 'batch' mesh over all devices of all processes (process-major order)."""
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return Mesh(np.array(devices), (AXIS,))


def _fuse(step_fn, steps_per_call: int):
  """Per-device body running k steps: batch leaves [k, b, ...] -> metrics leaves [k].

  k = 1 calls the step directly: on XLA:CPU the same step inside a one-iteration `lax.scan` was
  measured 18x slower (0.15 s -> 2.8 s per step, digits U-Net, batch 64, 2 cores).
  """
  if steps_per_call == 1:
    def single(state, batch, rng):
      state, metrics = step_fn(state, jax.tree.map(lambda x: x[0], batch), rng)
      return state, jax.tree.map(lambda m: m[None], metrics)
    return single

  def fused(state, batch, rng):
    return lax.scan(lambda s, b: step_fn(s, b, rng), state, batch)
  return fused


def resolve_mode(mode: str) -> str:
  """'auto' -> 'jit' on a single device, else 'pmap'; other modes unchanged."""
  if mode == "auto":
    return "jit" if jax.device_count() == 1 else "pmap"
  return mode


def make_parallel_step(step_fn: Callable, mode: str = "pmap", donate: bool = True,
                       steps_per_call: int = 1,
                       compiler_options: dict[str, Any] | None = None) -> ParallelStep:
  """Wraps `step_fn(state, batch, rng)` (built with axis_name='batch', or None for 'jit') for
  all devices. Use `resolve_mode` first for 'auto'. `compiler_options` go to `jax.jit` in the
  'jit' and 'shard_map' modes (e.g. `xla_cpu.compiler_options`); `jax.pmap` takes none, so
  'pmap' compiles with JAX's defaults."""
  if mode not in MODES:
    raise ValueError(f"train.parallel must be one of {MODES}, got {mode!r}")
  if steps_per_call < 1:
    raise ValueError(f"train.steps_per_call must be >= 1, got {steps_per_call}")
  mode = resolve_mode(mode)
  fused = _fuse(step_fn, steps_per_call)
  donate_argnums = (0,) if donate else ()
  if mode == "jit":
    if jax.device_count() != 1:
      raise ValueError(f"train.parallel='jit' runs on one device, found {jax.device_count()}")
    stepped = jax.jit(fused, donate_argnums=donate_argnums, compiler_options=compiler_options)
    put = lambda tree: jax.tree.map(jnp.asarray, tree)
    get = lambda tree: jax.tree.map(np.array, tree)
    prep = lambda batch: jax.tree.map(lambda x: np.asarray(x)[:, 0], batch)  # [k, 1, b] -> [k, b]
    return ParallelStep(stepped, put, get, prep, mode, None)
  if mode == "pmap":
    stepped = jax.pmap(fused, axis_name=AXIS, in_axes=(0, 0, None), donate_argnums=donate_argnums)
    devices = jax.local_devices()

    def put_state(tree):
      return jax.tree.map(lambda x: _replicate_pmap(x, devices), tree)

    def get_state(tree):
      return jax.tree.map(lambda x: np.array(x.addressable_data(0)[0]), tree)

    def prepare_batch(batch):  # [k, L, b, ...] -> [L, k, b, ...]
      return jax.tree.map(lambda x: np.swapaxes(np.asarray(x), 0, 1), batch)

    return ParallelStep(stepped, put_state, get_state, prepare_batch, mode, None)

  mesh = global_mesh()
  # check_vma=False keeps pmap's semantics: with it on, the gradient of the replicated params is
  # already summed over devices by the transpose of the implicit pvary, and the explicit pmean in
  # the step would then average a sum.
  smap = jax.shard_map(fused, mesh=mesh, in_specs=(P(), P(None, AXIS), P()),
                       out_specs=(P(), P()), check_vma=False)
  stepped = jax.jit(smap, donate_argnums=donate_argnums, compiler_options=compiler_options)
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(None, AXIS))

  def put_state(tree):
    return jax.tree.map(lambda x: _put_replicated(np.asarray(x), replicated), tree)

  def get_state(tree):
    return jax.tree.map(lambda x: np.array(x.addressable_data(0)), tree)

  def prepare_batch(batch):  # local [k, L, b, ...] -> global [k, D*b, ...]
    def one(x):
      x = np.asarray(x)
      local = x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])
      global_shape = (local.shape[0], local.shape[1] * jax.process_count()) + local.shape[2:]
      return jax.make_array_from_process_local_data(batch_sharding, local, global_shape)
    return jax.tree.map(one, batch)

  return ParallelStep(stepped, put_state, get_state, prepare_batch, mode, mesh)


def _replicate_pmap(x, devices):
  x = np.asarray(x)
  stacked = np.broadcast_to(x, (len(devices),) + x.shape)
  sharding = NamedSharding(Mesh(np.array(devices), ("_replica",)), P("_replica"))
  return jax.device_put(stacked, sharding)


def _put_replicated(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
