"""Load a trained run for sampling: config, model, schedule and (EMA) params from a workdir.

References: ARCHITECTURE.md (workdir layout written by `trainer.train_and_evaluate`).
"""
from typing import Any, NamedTuple
import json

import jax
import ml_collections
from etils import epath

from diffusion_jax import schedules
from diffusion_jax.training import checkpoint as ckpt_lib
from diffusion_jax.training import components
from diffusion_jax.training import state as state_lib

PyTree = Any


class Loaded(NamedTuple):
  config: ml_collections.ConfigDict
  model: Any
  schedule: schedules.Schedule
  params: PyTree
  image_shape: tuple[int, int, int]
  num_classes: int   # of the model (> 0: class-conditional, label num_classes is the null class)
  step: int


def load_config(workdir: str | epath.Path) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads((epath.Path(workdir) / "config.json").read_text()))


def load_for_sampling(workdir: str | epath.Path, use_ema: bool = True,
                      ema_decay: float | None = None, step: int | None = None) -> Loaded:
  """Restores the newest readable checkpoint (or the newest at or below `step`).

  use_ema, ema_decay: which params, per `state.params_for_sampling` (the rule the trainer's
  previews use).
  """
  workdir = epath.Path(workdir)
  config = load_config(workdir)
  info = json.loads((workdir / "dataset_info.json").read_text())
  comp = components.build(config, tuple(info["image_shape"]))
  target = components.init_state(config, comp, jax.random.PRNGKey(0), abstract=True)
  ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", async_save=False)
  try:
    restored = ckpt.restore(target, step)
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
  at, state, _ = restored
  params, _ = state_lib.params_for_sampling(state, config.train.ema_decays, use_ema, ema_decay)
  return Loaded(config, comp.model, comp.schedule, params, comp.image_shape, comp.num_classes, at)
