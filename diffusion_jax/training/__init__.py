"""diffusion_jax.training: train state, optax chain, per-device step, pmap / shard_map wrap,
orbax checkpoints, the train loop and loading a run for sampling.

Submodules and the names below are imported on first use, so that reading the config schema
(`diffusion_jax.training.default_config`, imported by every experiment config) does not import
the trainer, orbax and grain.
"""
import importlib
from typing import Any

# Re-exported name -> its submodule.
_NAMES = {
    "Checkpointer": "checkpoint",
    "make_lr_schedule": "optim", "make_optimizer": "optim",
    "ParallelStep": "parallel", "make_parallel_step": "parallel",
    "Loaded": "restore", "load_for_sampling": "restore",
    "TrainState": "state", "create_train_state": "state", "ema_key": "state",
    "ema_update": "state",
    "StepConfig": "step", "make_train_step": "step",
    "NonFiniteError": "trainer", "Preempted": "trainer", "train_and_evaluate": "trainer",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
  if name in _NAMES:
    return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
  try:
    return importlib.import_module(f"{__name__}.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"{__name__}.{name}":
      raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
  return sorted(list(globals()) + list(_NAMES))
