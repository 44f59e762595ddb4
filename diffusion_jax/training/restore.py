"""Load a run for sampling: config, model, schedule and (EMA) params from a workdir, without
building an optimizer or reading the optimizer state.

A run workdir (written by `trainer.train_and_evaluate`, or by `diffusion_jax.convert` from
published weights) holds `config.json`, `dataset_info.json` and
`checkpoints/<step>/{state, data}`; only `state.params` or one EMA entry of `state.ema_params` is
read from disk (an orbax partial restore), and its shapes are checked against the model.

References: ARCHITECTURE.md (workdir layout); orbax-checkpoint `PyTreeRestore(partial_restore)`.
"""
from typing import Any, NamedTuple
import json

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from diffusion_jax import models
from diffusion_jax import schedules
from diffusion_jax.data import text as text_lib
from diffusion_jax.training import checkpoint as ckpt_lib
from diffusion_jax.training import components
from diffusion_jax.training import default_config
from diffusion_jax.training import families
from diffusion_jax.training import state as state_lib
from diffusion_jax.training import text_run

PyTree = Any


class Loaded(NamedTuple):
  config: ml_collections.ConfigDict
  model: Any
  schedule: schedules.Schedule
  params: PyTree
  image_shape: tuple[int, int, int]
  num_classes: int   # of the model (> 0: class-conditional, label num_classes is the null class)
  step: int
  tokenizer: Any = None   # text runs: the run's tokenizer (`<workdir>/tokenizer.json`)


def load_config(workdir: str | epath.Path) -> ml_collections.ConfigDict:
  """The run's `config.json` over `default_config.get_config()` (keys a run written by an older
  version lacks take today's defaults; a key that is not declared is a ValueError)."""
  saved = json.loads((epath.Path(workdir) / "config.json").read_text())
  config = default_config.get_config()
  _merge(config, saved, "config")
  return config


def _merge(node: ml_collections.ConfigDict, saved: dict, where: str) -> None:
  for key, value in saved.items():
    if key not in node:
      raise ValueError(f"{where}.{key} in config.json is not a declared config key (see "
                       f"diffusion_jax/training/default_config.py)")
    if isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, dict):
      if key == "kwargs":   # free-form sampler settings
        node[key] = ml_collections.ConfigDict(value)
      else:
        _merge(node[key], value, f"{where}.{key}")
    else:
      node[key] = tuple(value) if isinstance(value, list) else value


def _read_params(directory: epath.Path, subtree: tuple[str, ...], target: PyTree,
                 step: int | None) -> tuple[int, PyTree]:
  """(step, arrays) of `state[subtree...]` from the newest readable checkpoint at or below `step`.

  target: ShapeDtypeStructs of the params (the model's); a checkpoint whose arrays differ in
  structure or shape is a ValueError; one that cannot be read is skipped with a warning.
  """
  mngr = ocp.CheckpointManager(directory, item_names=("state", "data"),
                               item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                              "data": ocp.JsonCheckpointHandler()})
  try:
    steps = sorted(s for s in mngr.all_steps() if step is None or s <= step)
    for s in reversed(steps):
      reason = ckpt_lib.missing_or_undecodable(directory / str(s))
      if reason is not None:
        logging.warning("Checkpoint %s/%d is unreadable (%s); trying the previous one.",
                        directory, s, reason)
        continue
      try:
        node = mngr.item_metadata(s)["state"]
        node.keys()
      except Exception as e:  # pylint: disable=broad-except
        _skip_unreadable(e, directory, s)
        continue
      for depth, key in enumerate(subtree):
        if key not in node.keys():
          raise ValueError(f"checkpoint {directory}/{s} has no state/{'/'.join(subtree[:depth + 1])}"
                           f"; it has: {sorted(node.keys())}")
        node = node[key]
      _check_like(node, target, f"{directory}/{s} state/{'/'.join(subtree)}")
      item = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), target)
      for key in reversed(subtree):
        item = {key: item}
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
      try:
        out = mngr.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True)))["state"]
      except Exception as e:  # pylint: disable=broad-except
        _skip_unreadable(e, directory, s)
        continue
      for key in subtree:
        out = out[key]
      return s, jax.tree.map(np.asarray, out)
  finally:
    mngr.close()
  raise FileNotFoundError(f"no readable checkpoint in {directory}"
                          + (f" at or below step {step}" if step is not None else ""))


def _check_like(saved: PyTree, target: PyTree, where: str) -> None:
  """ValueError unless `saved` (orbax metadata) has the structure and shapes of `target`."""
  flat_saved = {jax.tree_util.keystr(k): tuple(v.shape)
                for k, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
  flat_target = {jax.tree_util.keystr(k): tuple(v.shape)
                 for k, v in jax.tree_util.tree_flatten_with_path(target)[0]}
  missing = sorted(set(flat_target) - set(flat_saved))
  extra = sorted(set(flat_saved) - set(flat_target))
  shapes = sorted(k for k in set(flat_target) & set(flat_saved) if flat_saved[k] != flat_target[k])
  if missing or extra or shapes:
    raise ValueError(
        f"the params in {where} do not fit the model of config.json: missing {missing[:5]}, "
        f"unexpected {extra[:5]}, shape mismatches "
        f"{[(k, flat_saved[k], flat_target[k]) for k in shapes[:5]]}")


def best_checkpoint(workdir: str | epath.Path) -> tuple[epath.Path, int]:
  """(directory, step) of the run's best checkpoint by its in-training evaluation
  (`config.eval`: `<workdir>/eval/best.json` names the step, kept in `<workdir>/best/`)."""
  from diffusion_jax.evaluation import hook  # pylint: disable=import-outside-toplevel
  workdir = epath.Path(workdir)
  record = hook.read_best(workdir)
  if record is None:
    raise FileNotFoundError(f"{workdir / hook.BEST_RECORD} does not exist: the run kept no best "
                            "checkpoint (train with config.eval.every > 0).")
  return workdir / hook.BEST_DIR, int(record["step"])


def load_for_sampling(workdir: str | epath.Path, use_ema: bool = True,
                      ema_decay: float | None = None, step: int | str | None = None) -> Loaded:
  """Restores the params of the newest readable checkpoint (or the newest at or below `step`;
  `step='best'`: the best checkpoint of the in-training evaluation, `best_checkpoint`).

  use_ema, ema_decay: which params, by `state.sampling_params_path` (the rule the trainer's
  previews use; `ema_decay` defaults to `sample.ema_decay`). Builds the model and the schedule
  only. Only an unreadable checkpoint (`checkpoint.is_unreadable_error`) falls back to an older
  one; other errors propagate.
  """
  if step not in (None, "best") and not isinstance(step, (int, np.integer)):
    raise ValueError(f"step must be a step number, None (the latest) or 'best', got {step!r}.")
  workdir = epath.Path(workdir)
  config = load_config(workdir)
  info = json.loads((workdir / "dataset_info.json").read_text())
  image_shape = tuple(int(s) for s in info["image_shape"])
  tokenizer = None
  if text_run.is_text(config):
    vocab_size = int(info["vocab_size"])
    model = components.build_model(text_run.model_config(config, vocab_size), image_shape)
    tokenizer = text_lib.load_tokenizer(str(workdir / info["tokenizer"]))
  else:
    model = components.build_network(config, image_shape)
  num_classes = 0 if tokenizer is not None else components.model_num_classes(model)
  target = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0), image_shape,
                                                     num_classes > 0))
  if ema_decay is None:
    ema_decay = config.sample.ema_decay
  subtree = state_lib.sampling_params_path(config.train.ema_decays, use_ema, ema_decay)
  directory, best = workdir / "checkpoints", step == "best"
  if best:
    directory, step = best_checkpoint(workdir)
  at, params = _read_params(directory, subtree, target, step)
  if best and at != step:
    raise FileNotFoundError(f"the best checkpoint (step {step} in {workdir}/eval/best.json) is "
                            f"not readable in {directory}.")
  if tokenizer is not None:   # a text run: the beta schedule is unused
    return Loaded(config, model, components.build_schedule(config.diffusion), params,
                  image_shape, num_classes, at, tokenizer)
  schedule = families.sampling_schedule(config, model, params, components.run_schedule(config))
  return Loaded(config, model, schedule, params, image_shape, num_classes, at)


def _skip_unreadable(error: Exception, directory, step: int) -> None:
  """Re-raises `error` unless it says the checkpoint is unreadable; then warns that `step` is
  skipped (the caller tries the previous one)."""
  if not ckpt_lib.is_unreadable_error(error):
    raise error
  logging.warning("Checkpoint %s/%d is unreadable (%s: %s); trying the previous one.",
                  directory, step, type(error).__name__, str(error)[:300])
