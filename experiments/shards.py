"""Resumable, per-process sharded computation over items [0, N), committed to disk shard by shard.

Shared by `experiments.evaluate` (samples and their features) and `experiments.evaluate_text`
(held-out bits per sequence). Shard i covers items [i S, min((i + 1) S, N)) for a shard size S,
belongs to process i % process_count, and is written atomically to `<dir>/shard_<i>.npz`
(arrays whose leading axis is the shard's items). `<dir>/settings.json` records what determines
the shards' contents: a rerun with the same settings skips the shards already committed (a
killed run continues where it stopped; a larger N reuses the shards of a smaller one), other
settings are refused. Results do not depend on the process count as long as an item's values
depend only on its index and the settings.

References: JAX docs, "Multi-host and multi-process environments" (every process runs the same
program; `multihost_utils.sync_global_devices` as the barrier).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

import numpy as np


def settings_key(settings: dict[str, Any]) -> str:
  """A short hash of the settings that determine the shards' contents."""
  return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def atomic_savez(path: str, **arrays: np.ndarray) -> None:
  """np.savez to a temporary name, then renamed: a reader sees the whole file or none."""
  tmp = f"{path}.{os.getpid()}.tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def shard_path(shard_dir: str, index: int) -> str:
  return os.path.join(shard_dir, f"shard_{index:06d}.npz")


def _check_settings(shard_dir: str, settings: dict[str, Any], process_index: int) -> None:
  os.makedirs(shard_dir, exist_ok=True)
  path = os.path.join(shard_dir, "settings.json")
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    if stored != settings:
      raise ValueError(f"{shard_dir} holds shards for other settings ({stored}); expected "
                       f"{settings}.")
  elif process_index == 0:
    with open(path + ".tmp", "w") as f:
      json.dump(settings, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def run(compute: Callable[[int, int], dict[str, np.ndarray]], *, num_items: int,
        shard_size: int, shard_dir: str, settings: dict[str, Any], process_index: int = 0,
        process_count: int = 1, progress: bool = True, desc: str = "shards",
        unit: str = "item") -> list[str]:
  """Computes and commits this process's missing shards, then waits for every process.

  compute(start, count) -> {name: array [count, ...]} for items start..start+count-1. A shard is
  complete when its file holds `count` rows in every array (a shorter last shard of a smaller N
  is recomputed).

  Returns:
    The paths of all shards in item order (every one complete; RuntimeError if another
    process's shards are missing after the barrier, e.g. a directory that is not shared).
  """
  if num_items < 1 or shard_size < 1:
    raise ValueError(f"num_items and shard_size must be >= 1, got {num_items}, {shard_size}.")
  _check_settings(shard_dir, settings, process_index)
  num_shards = -(-num_items // shard_size)
  bounds = [(i * shard_size, min((i + 1) * shard_size, num_items)) for i in range(num_shards)]
  paths = [shard_path(shard_dir, i) for i in range(num_shards)]

  def complete(i: int) -> bool:
    if not os.path.exists(paths[i]):
      return False
    with np.load(paths[i]) as data:
      return bool(data.files) and all(len(data[k]) == bounds[i][1] - bounds[i][0]
                                      for k in data.files)

  mine = [i for i in range(num_shards) if i % process_count == process_index]
  todo = [i for i in mine if not complete(i)]
  bar = None
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    size = lambda i: bounds[i][1] - bounds[i][0]
    suffix = f" (process {process_index}/{process_count})" if process_count > 1 else ""
    bar = tqdm.tqdm(total=sum(size(i) for i in mine),
                    initial=sum(size(i) for i in mine if i not in todo), unit=unit,
                    desc=desc + suffix, smoothing=0.1)
  for i in todo:
    start, stop = bounds[i]
    arrays = compute(start, stop - start)
    bad = {k: np.shape(v) for k, v in arrays.items() if len(v) != stop - start}
    if bad:
      raise ValueError(f"compute({start}, {stop - start}) returned arrays without "
                       f"{stop - start} rows: {bad}")
    atomic_savez(paths[i], **arrays)
    if bar is not None:
      bar.update(stop - start)
  if bar is not None:
    bar.close()
  if process_count > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("experiments.shards.run")
    missing = [i for i in range(num_shards) if not complete(i)]
    if missing:
      raise RuntimeError(f"shards {missing} of {shard_dir} are missing after every process "
                         "finished its own: the shard directory must be shared by all processes.")
  return paths
