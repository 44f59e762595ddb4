"""The input pipeline: per-host sharding, per-epoch shuffles, flips, [-1, 1] batches, resumable.

The training stream is one global sequence of example indices: epoch e is the permutation
`perm_e` of [0, N) drawn from (seed, e), and position p of the stream is example
perm_{p // N}[p % N]. Global batch k holds positions [k G, (k + 1) G) (G = global batch size);
host h takes the positions p with p % process_count == h, in order. So the hosts' streams are
disjoint, together they are exactly the global stream, and every epoch visits every example once
(a batch may straddle two epochs). A flip is a hash of (seed, p), so flips, like the order, do not
depend on the number of hosts, devices or threads. The iterator state is the number of examples
consumed, which is valid under any process count with the same global batch size.

Batches are built on grain threads (`grain.MapDataset` over batch indices, prefetched); small
splits are decoded once into host memory, large ones are read and decoded per batch.

References: grain `MapDataset` / `DatasetIterator.get_state` (github.com/google/grain);
big_vision `input_pipeline.py` (per-host batches reshaped to [devices, per_device, ...]).
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Iterator, Optional

import grain
import numpy as np

from diffusion_jax.data import sources
from diffusion_jax.data.options import DataOptions
from diffusion_jax.data.sources import DatasetInfo, ImageSource

_MAX_BATCHES = 1 << 62  # The training stream is endless.
_FLIP_SALT = 0x5EED_F11B


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
  x = x + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def flip_mask(seed: int, positions: np.ndarray) -> np.ndarray:
  """bool [B]: whether the example at each global stream position is flipped (fair coin)."""
  key = _splitmix64(np.asarray([(seed ^ _FLIP_SALT) & 0xFFFF_FFFF_FFFF_FFFF], np.uint64))
  bits = _splitmix64(np.asarray(positions, np.uint64) ^ key)
  return (bits >> np.uint64(63)).astype(bool)


class ShuffledStream:
  """Position p of the global stream -> example index (see the module docstring)."""

  def __init__(self, num_examples: int, seed: int, shuffle: bool = True):
    self.num_examples, self.seed, self.shuffle = num_examples, seed, shuffle
    self._cache: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def __getstate__(self) -> dict[str, Any]:  # Picklable for worker processes: no lock, no cache.
    return {"num_examples": self.num_examples, "seed": self.seed, "shuffle": self.shuffle}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(**state)

  def permutation(self, epoch: int) -> np.ndarray:
    """int64 [N]: the order of epoch `epoch` (the identity when shuffle is off)."""
    if not self.shuffle:
      return np.arange(self.num_examples)
    with self._lock:
      perm = self._cache.get(epoch)
      if perm is None:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        if len(self._cache) >= 4:  # Threads work on at most a few neighbouring epochs.
          self._cache.pop(min(self._cache))
        self._cache[epoch] = perm
      return perm

  def indices(self, positions: np.ndarray) -> np.ndarray:
    """positions: int64 [B] -> example indices int64 [B]."""
    epochs, offsets = np.divmod(positions, self.num_examples)
    out = np.empty_like(positions)
    for epoch in np.unique(epochs):
      where = epochs == epoch
      out[where] = self.permutation(int(epoch))[offsets[where]]
    return out


def to_float(pixels: np.ndarray) -> np.ndarray:
  """uint8 [...] -> float32 [...] in [-1, 1]: (u - 127.5) / 127.5 (0 -> -1, 255 -> 1 exactly)."""
  out = pixels.astype(np.float32)
  out -= 127.5
  out /= 127.5
  return out


def read_float(source: ImageSource, indices: np.ndarray, positions: np.ndarray | None = None,
               flips: np.ndarray | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(float32 [B, H, W, C], int32 [B]) of examples `indices`: pixels in [-1, 1], flipped where
  `flips` [B] is True, or a latent source's latents (`latents.LatentTrainSource.read_float`)."""
  if hasattr(source, "read_float"):
    return source.read_float(indices, positions, flips, seed)
  pixels, labels = source.read(indices)
  if flips is not None:
    pixels[flips] = pixels[flips, :, ::-1]
  return to_float(pixels), labels


def check_batch_layout(global_batch_size: int, process_index: int, process_count: int,
                       num_local_devices: int) -> tuple[int, int]:
  """Validates the batch layout -> (per_host_batch, per_device_batch)."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, process_count={process_count}), "
                     f"got {process_index}.")
  if num_local_devices < 1:
    raise ValueError(f"num_local_devices must be >= 1, got {num_local_devices}.")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                     f"process_count={process_count}.")
  per_host = global_batch_size // process_count
  if per_host % num_local_devices:
    raise ValueError(
        f"global_batch_size={global_batch_size} does not divide over the devices: "
        f"{per_host} examples per host (process_count={process_count}) is not a multiple of "
        f"num_local_devices={num_local_devices}; use a global batch size that is a multiple of "
        f"{process_count * num_local_devices}.")
  return per_host, per_host // num_local_devices


def resolve_hosts(process_index: Optional[int], process_count: Optional[int],
                  num_local_devices: Optional[int]) -> tuple[int, int, int]:
  """(process_index, process_count, num_local_devices), each None replaced by jax's value."""
  if process_index is None or process_count is None or num_local_devices is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    num_local_devices = jax.local_device_count() if num_local_devices is None else num_local_devices
  return int(process_index), int(process_count), int(num_local_devices)


def _shape(batch: dict[str, np.ndarray], num_local_devices: int) -> dict[str, np.ndarray]:
  return {k: v.reshape(num_local_devices, -1, *v.shape[1:]) for k, v in batch.items()}


def _read_options(num_threads: int, prefetch: int):
  """grain read options; the buffer holds at least one batch per thread."""
  return grain.ReadOptions(num_threads=num_threads,
                           prefetch_buffer_size=max(prefetch, num_threads) if num_threads else 0)


class _TrainBatch:
  """Batch index k of one host -> {'image': float32 [D, b, H, W, C], 'label': int32 [D, b]}."""

  def __init__(self, source: ImageSource, stream: ShuffledStream, *, per_host_batch: int,
               process_index: int, process_count: int, num_local_devices: int,
               random_flip: bool, seed: int):
    self.source, self.stream = source, stream
    self.per_host_batch, self.process_index, self.process_count = (per_host_batch, process_index,
                                                                   process_count)
    self.num_local_devices, self.random_flip, self.seed = num_local_devices, random_flip, seed

  def positions(self, k: int) -> np.ndarray:
    """int64 [per_host_batch]: the global stream positions of this host's batch k."""
    local = k * self.per_host_batch + np.arange(self.per_host_batch, dtype=np.int64)
    return local * self.process_count + self.process_index

  def __call__(self, k: int) -> dict[str, np.ndarray]:
    positions = self.positions(k)
    flips = flip_mask(self.seed, positions) if self.random_flip else None
    x, labels = read_float(self.source, self.stream.indices(positions), positions, flips,
                           self.seed)
    return _shape({"image": x, "label": labels.astype(np.int32)}, self.num_local_devices)


def _close(iterator) -> None:
  if hasattr(iterator, "close"):
    iterator.close()


class TrainIterator(Iterator[dict]):
  """The endless training iterator, with `get_state()` / `set_state()` for exact resume.

  Batches are made on `num_threads` grain threads, or, with num_workers > 0, in that many worker
  processes (grain `mp_prefetch`; the order is the same either way).
  """

  def __init__(self, batch_fn: _TrainBatch, *, global_batch_size: int, info: DatasetInfo,
               num_threads: int, prefetch: int, num_workers: int = 0):
    self.info, self.global_batch_size, self._batch_fn = info, global_batch_size, batch_fn
    self._threads, self._prefetch, self._workers = num_threads, prefetch, num_workers
    self._iterator, self._finalizer = None, None
    self._start(0)

  def _start(self, next_batch: int) -> None:
    self.close()
    dataset = grain.MapDataset.source(range(next_batch, _MAX_BATCHES)).map(self._batch_fn)
    dataset = dataset.to_iter_dataset(_read_options(self._threads, self._prefetch))
    if self._workers:
      from absl import flags  # pylint: disable=g-import-not-at-top
      if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (defaults suffice).
        flags.FLAGS.mark_as_parsed()
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self._workers, per_worker_buffer_size=max(1, self._prefetch)))
    self._iterator, self._next_batch = iter(dataset), next_batch
    # Close grain's threads / processes when this iterator is collected or at interpreter exit
    # (before module teardown, where grain's own __del__ would fail noisily).
    self._finalizer = weakref.finalize(self, _close, self._iterator)

  def close(self) -> None:
    """Stops the prefetch threads / worker processes (also done when garbage collected)."""
    if self._finalizer is not None:
      self._finalizer()
    self._iterator, self._finalizer = None, None

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    self._next_batch += 1
    if self._workers:  # Plain arrays, out of grain's shared memory (freed at once).
      batch = {key: np.array(value) for key, value in batch.items()}
    return batch

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable: {'examples_seen', 'seed', 'num_examples', 'shuffle'}."""
    stream = self._batch_fn.stream
    return {"examples_seen": self._next_batch * self.global_batch_size, "seed": int(stream.seed),
            "num_examples": int(stream.num_examples), "shuffle": bool(stream.shuffle)}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from a `get_state()` result (any process count, same global batch size)."""
    stream = self._batch_fn.stream
    expected = {"seed": stream.seed, "num_examples": stream.num_examples, "shuffle": stream.shuffle}
    for key, value in expected.items():
      if key in state and state[key] != value:
        raise ValueError(f"set_state: the saved state has {key}={state[key]!r} but this iterator "
                         f"has {key}={value!r}; the data order would not continue.")
    seen = int(state["examples_seen"])
    if seen % self.global_batch_size:
      raise ValueError(f"set_state: examples_seen={seen} is not a multiple of "
                       f"global_batch_size={self.global_batch_size}.")
    self._start(seen // self.global_batch_size)


def make_train_iterator(data_config: Any, *, global_batch_size: int, seed: int,
                        process_index: Optional[int] = None, process_count: Optional[int] = None,
                        num_local_devices: Optional[int] = None) -> TrainIterator:
  """The endless, shuffled, sharded training iterator of data_config.split.

  Yields {'image': float32 [num_local_devices, per_device_batch, H, W, C] in [-1, 1],
  'label': int32 [num_local_devices, per_device_batch]}, per_device_batch = global_batch_size /
  (process_count * num_local_devices) (a ValueError if that is not an integer). process_index,
  process_count and num_local_devices default to jax's.
  """
  options = DataOptions.from_config(data_config)
  process_index, process_count, num_local_devices = resolve_hosts(process_index, process_count,
                                                                  num_local_devices)
  per_host, _ = check_batch_layout(global_batch_size, process_index, process_count,
                                   num_local_devices)
  source = sources.open_source(options, options.split)
  stream = ShuffledStream(len(source), int(seed), options.shuffle)
  batch_fn = _TrainBatch(source, stream, per_host_batch=per_host, process_index=process_index,
                         process_count=process_count, num_local_devices=num_local_devices,
                         random_flip=bool(options.random_flip), seed=int(seed))
  return TrainIterator(batch_fn, global_batch_size=global_batch_size, info=source.info,
                       num_threads=options.num_threads, prefetch=options.prefetch,
                       num_workers=options.num_workers)


class EvalIterable:
  """A finite, deterministic pass over a split, padded to whole batches with a mask.

  Host h reads examples h, h + process_count, ... in order; every host yields the same number of
  batches (`len(self)`), so collectives stay in step. Each batch is {'image': float32
  [D, b, H, W, C], 'label': int32 [D, b], 'mask': bool [D, b]}; padding has mask False (its image
  repeats example 0). Over all hosts the masked-in examples are each example exactly once.
  """

  def __init__(self, source: ImageSource, *, per_host_batch: int, process_index: int,
               process_count: int, num_local_devices: int, num_threads: int, prefetch: int):
    self.source, self.info = source, source.info
    self._host = np.arange(process_index, len(source), process_count)
    largest_host = -(-len(source) // process_count)
    self.num_batches = -(-largest_host // per_host_batch)
    self._per_host, self._devices = per_host_batch, num_local_devices
    self._threads, self._prefetch = num_threads, prefetch

  def __len__(self) -> int:
    return self.num_batches

  def _batch(self, k: int) -> dict[str, np.ndarray]:
    indices = self._host[k * self._per_host:(k + 1) * self._per_host]
    mask = np.zeros((self._per_host,), bool)
    mask[:len(indices)] = True
    padded = np.zeros((self._per_host,), np.int64)
    padded[:len(indices)] = indices
    x, labels = read_float(self.source, padded, padded)
    return _shape({"image": x, "label": labels.astype(np.int32), "mask": mask}, self._devices)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    dataset = grain.MapDataset.source(range(self.num_batches)).map(self._batch)
    return iter(dataset.to_iter_dataset(_read_options(self._threads, self._prefetch)))


def make_eval_iterator(data_config: Any, *, global_batch_size: int,
                       process_index: Optional[int] = None, process_count: Optional[int] = None,
                       num_local_devices: Optional[int] = None,
                       split: Optional[str] = None) -> EvalIterable:
  """A finite evaluation pass over `split` (default data_config.eval_split, else 'test').

  No shuffling, no flips; see `EvalIterable` for the batches and the padding mask.
  """
  options = DataOptions.from_config(data_config)
  process_index, process_count, num_local_devices = resolve_hosts(process_index, process_count,
                                                                  num_local_devices)
  per_host, _ = check_batch_layout(global_batch_size, process_index, process_count,
                                   num_local_devices)
  source = sources.open_source(options, split or options.eval_split)
  return EvalIterable(source, per_host_batch=per_host, process_index=process_index,
                      process_count=process_count, num_local_devices=num_local_devices,
                      num_threads=options.num_threads, prefetch=options.prefetch)


def get_dataset_info(data_config: Any, split: Optional[str] = None) -> DatasetInfo:
  """DatasetInfo(image_shape=(H, W, C) as emitted, num_classes, num_examples of the split).

  split defaults to data_config.split. Prepares digits on first use; decodes nothing for TFDS
  (a folder is scanned and checked).
  """
  options = DataOptions.from_config(data_config)
  return sources.open_source(options, split or options.split, in_memory=False).info


def load_split_as_numpy(data_config: Any, split: Optional[str] = None) -> dict[str, np.ndarray]:
  """A whole split in host memory: {'image': uint8 [N, H, W, C], 'label': int32 [N]}, in order.

  split defaults to data_config.split. Resized and cropped as the config says; never flipped.
  """
  options = DataOptions.from_config(data_config)
  source = sources.load_into_memory(sources.open_source(options, split or options.split),
                                    options.num_threads)
  return {"image": source.images, "label": source.labels}

