"""Build the pieces a run needs from its config: model, schedule, loss closure, optimizer and
the initial train state. Shared by the trainer and by `restore.load_for_sampling`.

This is where the diffusion math and the network meet, through `model_fn(x_t, t)`.

References: Ho et al. 2020 (the DDPM training objective); ARCHITECTURE.md (config keys).
"""
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import losses
from diffusion_jax import schedules
from diffusion_jax.training import optim
from diffusion_jax.training import state as state_lib

PyTree = Any


class Components(NamedTuple):
  model: Any                       # flax.linen.Module (models contract)
  schedule: schedules.Schedule
  image_shape: tuple[int, int, int]
  num_classes: int                 # of the model: > 0 means class-conditional
  tx: Any                          # optax.GradientTransformation
  lr_fn: Callable[[Any], Any]


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
  return cfg.get(key, default) if cfg is not None and hasattr(cfg, "get") else default


def build_model(model_config: Any):
  """`get_model(model.name, **other model keys)`."""
  from diffusion_jax import models  # pylint: disable=import-outside-toplevel
  overrides = {k: v for k, v in dict(model_config).items() if k != "name"}
  return models.get_model(model_config.name, **overrides)


def build_schedule(diffusion_config: Any) -> schedules.Schedule:
  kw = dict(_cfg_get(diffusion_config, "schedule_kwargs", {}) or {})
  return schedules.get_schedule(diffusion_config.schedule, int(diffusion_config.num_timesteps),
                                **kw)


def make_loss_fn(diffusion_config: Any, schedule: schedules.Schedule
                 ) -> Callable[[Callable, jax.Array, jax.Array], jax.Array]:
  """loss_fn(model_fn, x0 [B, ...], rng) -> [B]: `losses.training_loss` with the config's
  prediction, loss type, weighting and variance."""
  kw = dict(prediction=_cfg_get(diffusion_config, "prediction", "eps"),
            loss_type=_cfg_get(diffusion_config, "loss_type", "mse"),
            weighting=_cfg_get(diffusion_config, "weighting", "none"),
            variance=_cfg_get(diffusion_config, "variance", None))
  def loss_fn(model_fn, x0, rng):
    return losses.training_loss(model_fn, schedule, x0, rng, **kw)
  return loss_fn


def build(config: Any, image_shape: tuple[int, int, int]) -> Components:
  model = build_model(config.model)
  in_ch = getattr(model, "in_channels", image_shape[-1])
  if in_ch != image_shape[-1]:
    raise ValueError(f"model.in_channels={in_ch} but the data has {image_shape[-1]} channels "
                     f"(image shape {tuple(image_shape)})")
  tx, lr_fn = optim.make_optimizer(config.optim, int(config.train.num_steps))
  return Components(model=model, schedule=build_schedule(config.diffusion),
                    image_shape=tuple(int(s) for s in image_shape),
                    num_classes=int(getattr(model, "num_classes", 0) or 0), tx=tx, lr_fn=lr_fn)


def init_params(comp: Components, rng: jax.Array) -> PyTree:
  x = jnp.zeros((1,) + comp.image_shape, jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  y = jnp.zeros((1,), jnp.int32) if comp.num_classes else None
  return comp.model.init({"params": rng}, x, t, y, train=False)["params"]


def init_state(config: Any, comp: Components, rng: jax.Array, abstract: bool = False
               ) -> state_lib.TrainState:
  """The step-0 state on the host (numpy leaves); with `abstract`, ShapeDtypeStructs only."""
  decays = tuple(float(d) for d in config.train.ema_decays)
  make = lambda r: state_lib.create_train_state(init_params(comp, r), comp.tx, decays)
  if abstract:
    return jax.eval_shape(make, rng)
  return jax.tree.map(np.asarray, jax.jit(make)(rng))
