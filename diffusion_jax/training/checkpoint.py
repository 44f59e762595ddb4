"""Checkpoints through an orbax `CheckpointManager`: the train state and the data iterator's
state saved together, a frequent "latest" tier plus kept snapshots, and a restore that tells an
unreadable checkpoint from every other failure.

Layout: `<workdir>/checkpoints/<step>/{state, data}`. Every step that is a multiple of
`snapshot_every` is kept forever (orbax `keep_period`); of the others only the newest
`keep_latest` are kept.

Restore policy (`Checkpointer.restore`), newest step first:
- a step whose files are incomplete or corrupt (a missing or undecodable metadata file, or a
  storage read error: tensorstore's DATA_LOSS / OUT_OF_RANGE / FAILED_PRECONDITION / NOT_FOUND)
  is *unreadable*: it is skipped with a warning and, with `set_aside=True`, renamed to
  `<step>.unreadable-<UTC time>` (kept for inspection; orbax ignores the name), so the run can
  save that step again;
- a readable step whose arrays differ from the target (missing or extra leaves, shape, dtype) is
  a `CheckpointMismatchError` naming the leaves: the run's config changed, no fallback;
- every other exception (permission, bad path, a bug) propagates;
- when checkpoints exist but none is readable, `NoReadableCheckpointError`: never a silent
  restart from step 0.

References: orbax-checkpoint `CheckpointManager` docs; big_vision's preemptible checkpoints.
"""
from typing import Any
import datetime
import json

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

PyTree = Any

# Status codes with which tensorstore reports bytes it cannot decode (truncated or missing data
# files, a damaged manifest). PERMISSION_DENIED, UNAVAILABLE, INVALID_ARGUMENT... are not here:
# they are not a property of the checkpoint, so they stop the run.
_CORRUPTION_CODES = ("DATA_LOSS:", "OUT_OF_RANGE:", "FAILED_PRECONDITION:", "NOT_FOUND:")
# Files that every complete step has, relative to the step directory; JSON ones are parsed.
_REQUIRED_FILES = ("state/_METADATA", "data/metadata")
_MAX_LISTED = 8


class CheckpointMismatchError(ValueError):
  """A readable checkpoint whose arrays do not match the state the config builds."""


class NoReadableCheckpointError(RuntimeError):
  """Checkpoints exist but none of them could be read."""


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
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def save(self, step: int, state: PyTree, data_state: dict | None = None) -> None:
    """Saves host-local arrays (numpy) of `state` and the JSON `data_state` at `step`."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state or {}))
    self._mngr.save(int(step), args=args, force=True)

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def delete(self, step: int) -> None:
    """Removes the checkpoint of `step` (every host calls it; orbax deletes on the primary)."""
    self.wait()
    self._mngr.delete(int(step))

  def restore(self, target: PyTree, step: int | None = None, *, set_aside: bool = False
              ) -> tuple[int, PyTree, dict] | None:
    """Restores the newest readable checkpoint at or below `step` (default: the latest).

    target: a state pytree (arrays or ShapeDtypeStructs) giving the structure and dtypes.
    set_aside: rename the unreadable steps newer than the restored one to
      `<step>.unreadable-<time>` (the trainer does, read-only users such as sampling do not).
    Returns (step, state with numpy leaves, data_state), or None when there is no checkpoint.

    Raises:
      CheckpointMismatchError: the newest readable checkpoint does not match `target`.
      NoReadableCheckpointError: checkpoints exist, none is readable (nothing is renamed).
      Anything else the storage or orbax raises that is not a sign of a damaged checkpoint.
    """
    self.wait()
    abstract = jax.tree.map(_abstract, target)
    steps = [s for s in self.all_steps() if step is None or s <= step]
    unreadable: list[tuple[int, str]] = []
    for s in reversed(steps):
      try:
        reason = self._missing_or_undecodable(s)
        if reason is None:
          check_matches(self._saved_arrays(s), target, f"checkpoint {self._step_dir(s)}")
          out = self._mngr.restore(s, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        if not is_unreadable_error(e):
          raise
        reason = f"{type(e).__name__}: {str(e)[:300]}"
      if reason is not None:
        logging.warning("Checkpoint at step %d is unreadable (%s).", s, reason)
        unreadable.append((s, reason))
        continue
      for bad, why in unreadable:
        self._report_unreadable(bad, why, s, set_aside)
      return s, jax.tree.map(np.asarray, out["state"]), dict(out["data"] or {})
    if unreadable:
      listing = "; ".join(f"step {s}: {why}" for s, why in unreadable)
      raise NoReadableCheckpointError(
          f"None of the {len(unreadable)} checkpoint(s) in {self.directory} can be read "
          f"({listing}). Nothing was changed. To start this run again from step 0, move "
          f"{self.directory} away (or use a fresh --workdir).")
    return None

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()

  def _step_dir(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def _missing_or_undecodable(self, step: int) -> str | None:
    return missing_or_undecodable(self._step_dir(step))

  def _saved_arrays(self, step: int) -> PyTree:
    """The checkpoint's tree of array metadata (shape, dtype per leaf)."""
    return self._mngr.item_metadata(step)["state"].tree

  def _report_unreadable(self, bad: int, why: str, restored: int, set_aside: bool) -> None:
    if not set_aside:
      logging.warning("Skipped the unreadable checkpoint at step %d (%s); using step %d.",
                      bad, why, restored)
      return
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    moved = self.directory / f"{bad}.unreadable-{stamp}"
    self._step_dir(bad).rename(moved)
    self._mngr.reload()
    logging.warning("The checkpoint at step %d is unreadable (%s): moved it to %s for "
                    "inspection and resumed from step %d.", bad, why, moved, restored)


def missing_or_undecodable(step_dir: epath.Path) -> str | None:
  """Why a step directory's files are incomplete or undecodable, or None. Read errors
  (permission...) propagate."""
  for rel in _REQUIRED_FILES:
    path = epath.Path(step_dir) / rel
    if not path.exists():
      return f"incomplete: {rel} is missing"
    try:
      json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      return f"{rel} is not valid JSON ({e})"
  return None


def is_unreadable_error(e: BaseException) -> bool:
  """True for the errors a damaged checkpoint raises (see the module docstring); every other
  exception must stop the caller rather than fall back to an older checkpoint."""
  if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)):
    return True
  return type(e) is ValueError and str(e).startswith(_CORRUPTION_CODES)  # pylint: disable=unidiomatic-typecheck


def _leaf_name(path) -> str:
  return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _shape_dtype(x) -> tuple[tuple[int, ...], str]:
  return tuple(int(d) for d in x.shape), str(np.dtype(x.dtype))


def check_matches(saved: PyTree, target: PyTree, what: str) -> None:
  """Raises CheckpointMismatchError naming every leaf (up to a few) whose presence, shape or
  dtype differs between `saved` (array metadata or arrays) and `target`."""
  have = {_leaf_name(p): _shape_dtype(v) for p, v in jax.tree_util.tree_leaves_with_path(saved)}
  want = {_leaf_name(p): _shape_dtype(v) for p, v in jax.tree_util.tree_leaves_with_path(target)}
  problems = [f"{k}: saved {have[k][0]} {have[k][1]}, expected {want[k][0]} {want[k][1]}"
              for k in want if k in have and have[k] != want[k]]
  problems += [f"{k}: not in the checkpoint" for k in want if k not in have]
  problems += [f"{k}: in the checkpoint only" for k in have if k not in want]
  if problems:
    more = len(problems) - _MAX_LISTED
    raise CheckpointMismatchError(
        f"The arrays of {what} do not match the state built from the config "
        f"({len(problems)} leaves differ): " + "; ".join(problems[:_MAX_LISTED])
        + (f"; and {more} more" if more > 0 else "")
        + ". The config's model/optimizer/EMA settings differ from the run's; restore with "
        "the run's own config.json, or train in a fresh workdir.")


def _abstract(x) -> np.ndarray:
  """A host numpy leaf of the target's shape and dtype, so orbax restores host numpy arrays."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return np.zeros(x.shape, x.dtype)
  return np.asarray(x)
