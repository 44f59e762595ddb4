"""Checkpoints through an orbax `CheckpointManager`: the train state and the data iterator's
state saved together, a frequent "latest" tier plus kept snapshots, restore with an abstract
target, and fallback to the previous checkpoint when the newest one fails to restore.

Layout: `<workdir>/checkpoints/<step>/{state, data}`. Every step that is a multiple of
`snapshot_every` is kept forever (orbax `keep_period`); of the others only the newest
`keep_latest` are kept.

References: orbax-checkpoint `CheckpointManager` docs; big_vision's preemptible checkpoints.
"""
from typing import Any
from absl import logging

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

PyTree = Any


class Checkpointer:
  """Saves and restores (state, data_state) pairs in `directory`."""

  def __init__(self, directory: str | epath.Path, *, keep_latest: int = 2,
               snapshot_every: int | None = None, async_save: bool = True):
    if keep_latest < 1:
      raise ValueError(f"keep_latest must be >= 1, got {keep_latest}")
    self.directory = epath.Path(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep_latest, keep_period=snapshot_every or None, create=True,
        enable_async_checkpointing=async_save)
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_names=("state", "data"))

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: PyTree, data_state: dict | None = None) -> None:
    """Saves host-local arrays (numpy) of `state` and the JSON `data_state` at `step`."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state or {}))
    self._mngr.save(int(step), args=args, force=True)

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def restore(self, target: PyTree, step: int | None = None
              ) -> tuple[int, PyTree, dict] | None:
    """Restores the newest readable checkpoint at or below `step` (default: the latest).

    target: a state pytree (arrays or ShapeDtypeStructs) giving the structure and dtypes.
    Returns (step, state, data_state), or None when there is no readable checkpoint. A
    checkpoint that fails to restore is skipped with a warning and the previous one is tried.
    """
    self.wait()
    abstract = jax.tree.map(_abstract, target)
    steps = [s for s in self.all_steps() if step is None or s <= step]
    for s in reversed(steps):
      try:
        out = self._mngr.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Checkpoint at step %d failed to restore (%s: %s); trying the previous "
                        "one.", s, type(e).__name__, e)
        continue
      return s, jax.tree.map(np.asarray, out["state"]), dict(out["data"] or {})
    return None

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def _abstract(x) -> np.ndarray:
  """A host numpy leaf of the target's shape and dtype, so orbax restores host numpy arrays."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return np.zeros(x.shape, x.dtype)
  return np.asarray(x)
