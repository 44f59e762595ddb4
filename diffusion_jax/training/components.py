"""Build the pieces a run needs from its config: model, schedule, loss closure, optimizer and
the initial train state. Shared by the trainer and by `restore.load_for_sampling` (which builds
the model and the schedule only).

This is where the diffusion math and the network meet, through `model_fn(x_t, t)`. Every key
read here is declared, with its default, in `default_config.py`.

References: Ho et al. 2020 (the DDPM training objective); `families` (VDM, EDM);
ARCHITECTURE.md (config keys).
"""
import dataclasses
import inspect
from typing import Any, Callable, NamedTuple, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import _checks
from diffusion_jax import models
from diffusion_jax import schedules
from diffusion_jax.training import families
from diffusion_jax.training import optim
from diffusion_jax.training import state as state_lib
from diffusion_jax.training import text_run

PyTree = Any

# The config keys of `diffusion.*` passed to `losses.training_loss` (the 'ddpm' family).
LOSS_KEYS = families.DDPM_LOSS_KEYS


class Components(NamedTuple):
  model: Any                       # flax.linen.Module (models contract)
  schedule: schedules.Schedule
  image_shape: tuple[int, int, int]
  num_classes: int                 # of the model: > 0 means class-conditional
  tx: Any                          # optax.GradientTransformation
  lr_fn: Callable[[Any], Any]
  vocab_size: int = 0              # text runs (`text_run`): data tokens V; 0 for images


def _fields(cls: type) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


def build_model(model_config: Any, image_shape: Sequence[int]):
  """`get_model(model.name, **the model keys that are set)` for images of `image_shape`.

  Keys left at None take the preset's value, except `in_channels`, which defaults to the data's
  channel count (image_shape[-1]). Keys of the other backbone (a U-Net's `ch` for a DiT, a DiT's
  `patch_size` for a U-Net) are ignored with a warning; a key no model takes is a ValueError
  naming the chosen model's fields. 'dtype' / 'param_dtype' may be given as names.
  """
  name = _checks.check_choice("model.name", model_config["name"], models.PRESETS)
  cls = models.PRESETS[name][0]
  fields = _fields(cls)
  every_field = set().union(*(_fields(c) for c, _ in models.PRESETS.values()))
  given = {k: v for k, v in dict(model_config).items() if k != "name" and v is not None}
  _checks.check_keys(f"model {name!r} ({cls.__name__})", set(given) - (every_field - fields),
                     fields)
  foreign = sorted(set(given) - fields)
  if foreign:
    logging.warning("Model %r (%s) ignores the config keys of another backbone: %s.", name,
                    cls.__name__, ", ".join(f"model.{k}={given[k]!r}" for k in foreign))
  kwargs = {k: v for k, v in given.items() if k in fields}
  if "in_channels" in fields:   # token models have no channels
    kwargs.setdefault("in_channels", int(image_shape[-1]))
  for key in ("dtype", "param_dtype"):
    if isinstance(kwargs.get(key), str):
      kwargs[key] = jnp.dtype(kwargs[key])
  return models.get_model(name, **kwargs)


def build_schedule(diffusion_config: Any) -> schedules.Schedule:
  """`get_schedule(diffusion.schedule, diffusion.num_timesteps, ...)` with the set
  `diffusion.schedule_kwargs` (a ValueError names those the chosen schedule does not take)."""
  name = _checks.check_choice("diffusion.schedule", diffusion_config.schedule,
                              schedules.BETA_SCHEDULES)
  kwargs = {k: v for k, v in dict(diffusion_config.schedule_kwargs).items() if v is not None}
  takes = set(inspect.signature(schedules.BETA_SCHEDULES[name]).parameters) - {"num_timesteps"}
  _checks.check_keys(f"diffusion.schedule_kwargs of schedule {name!r}", kwargs, takes)
  return schedules.get_schedule(name, int(diffusion_config.num_timesteps),
                                zero_terminal_snr=bool(diffusion_config.zero_terminal_snr),
                                **kwargs)


def build_network(config: Any, image_shape: Sequence[int]):
  """The module a run trains and samples: `build_model`'s backbone inside its family's wrapper
  (`families.wrap_backbone`; the backbone itself for 'ddpm')."""
  return families.wrap_backbone(config, build_model(config.model, image_shape))


def run_schedule(config: Any) -> schedules.Schedule:
  """The run's T-step schedule: the beta schedule ('ddpm', `build_schedule`) or the family's
  (`families.base_schedule`)."""
  if families.family(config) == "ddpm":
    return build_schedule(config.diffusion)
  return families.base_schedule(config)


def run_loss_fn(config: Any, comp: Components) -> Callable[[Callable, jax.Array, jax.Array],
                                                         jax.Array]:
  """The train step's loss_fn(model_fn, x0 [B, ...], keys [B]) -> [B] of the run: the image
  families' `families.make_loss_fn` (ddpm / vdm / edm), or bits per token for text
  (`text_run.bits_fn`: the masked NELBO, or the autoregressive twin's exact NLL)."""
  if comp.vocab_size:
    return text_run.bits_fn(config, comp.vocab_size)
  return families.make_loss_fn(config, comp.schedule)


def model_num_classes(model: Any) -> int:
  """The model's number of classes (0: unconditional)."""
  return int(model.num_classes)


def build(config: Any, image_shape: tuple[int, ...], vocab_size: int = 0) -> Components:
  """Model, schedule and optimizer of a run whose data has `image_shape` (H, W, C), or for a
  text run (`text_run.is_text`) sequences of shape (L,) over `vocab_size` tokens."""
  tx, lr_fn = optim.make_optimizer(config.optim, int(config.train.num_steps))
  if text_run.is_text(config):
    if vocab_size < 1:
      raise ValueError(f"a text run needs the tokenizer's vocab_size >= 1, got {vocab_size}.")
    model = build_model(text_run.model_config(config, vocab_size), image_shape)
    return Components(model=model, schedule=build_schedule(config.diffusion),
                      image_shape=tuple(int(s) for s in image_shape), num_classes=0, tx=tx,
                      lr_fn=lr_fn, vocab_size=int(vocab_size))
  model = build_network(config, image_shape)
  if model.in_channels != image_shape[-1]:
    raise ValueError(f"model.in_channels={model.in_channels} but the data has {image_shape[-1]} "
                     f"channels (image shape {tuple(image_shape)}); leave model.in_channels "
                     f"unset to follow the data")
  return Components(model=model, schedule=run_schedule(config),
                    image_shape=tuple(int(s) for s in image_shape),
                    num_classes=model_num_classes(model), tx=tx, lr_fn=lr_fn)


def init_params(comp: Components, rng: jax.Array) -> PyTree:
  return models.init_params(comp.model, rng, comp.image_shape, comp.num_classes > 0)


# The step-0 state is computed once, in ~0.1 s, so XLA's backend optimisations only cost compile
# time: without them the Quickstart's (unet_digits) initial state took 2.0 s instead of 5.8 s
# (single runs on the 2-core CPU machine), with the same bits. (For dit_digits, 906 of 328,260 initial parameters,
# normal draws, differ from an optimised compile by 1-2 float32 ulp: tests/test_training_step.py.)
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def make_state_fn(config: Any, comp: Components) -> Callable[[jax.Array], state_lib.TrainState]:
  """rng -> the step-0 train state (params, optimizer state, EMA copies); pure, for `jit`."""
  decays = tuple(float(d) for d in config.train.ema_decays)
  return lambda r: state_lib.create_train_state(init_params(comp, r), comp.tx, decays)


def init_state(config: Any, comp: Components, rng: jax.Array, abstract: bool = False
               ) -> state_lib.TrainState:
  """The step-0 state on the host (numpy leaves); with `abstract`, ShapeDtypeStructs only."""
  make = make_state_fn(config, comp)
  if abstract:
    return jax.eval_shape(make, rng)
  return jax.tree.map(np.asarray, jax.jit(make, compiler_options=INIT_COMPILER_OPTIONS)(rng))
