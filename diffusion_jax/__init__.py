"""diffusion_jax: diffusion models in JAX/Flax.

`import diffusion_jax as dj` gives the pure diffusion math (schedules, forward and reverse
processes, losses, samplers) and the models, importing jax, flax and numpy only. The data
pipeline (`dj.data`: TFDS, grain), the trainer (`dj.training`: optax, orbax) and the weight
converter (`dj.convert`) are imported on first use, e.g. `dj.make_train_iterator` or
`dj.training.load_for_sampling`.
"""
import importlib
from typing import Any

from diffusion_jax import autoregressive
from diffusion_jax import forward
from diffusion_jax import losses
from diffusion_jax import masked
from diffusion_jax import reverse
from diffusion_jax import rng
from diffusion_jax import samplers
from diffusion_jax import schedules
from diffusion_jax.forward import eps_from_v
from diffusion_jax.forward import eps_from_x0
from diffusion_jax.forward import predict_eps
from diffusion_jax.forward import predict_x0
from diffusion_jax.forward import prediction_target
from diffusion_jax.forward import q_mean_variance
from diffusion_jax.forward import q_posterior_mean_variance
from diffusion_jax.forward import q_sample
from diffusion_jax.forward import v_from_eps_x0
from diffusion_jax.forward import x0_from_eps
from diffusion_jax.forward import x0_from_v
from diffusion_jax.losses import bits_per_dim
from diffusion_jax.losses import training_loss
from diffusion_jax.reverse import p_mean_variance
from diffusion_jax.reverse import p_sample
from diffusion_jax.reverse import PMeanVariance
from diffusion_jax.samplers import classifier_free_guidance
from diffusion_jax.samplers import get_sampler
from diffusion_jax.samplers import Inpaint
from diffusion_jax.samplers import ode_log_likelihood
from diffusion_jax.samplers import respace
from diffusion_jax.samplers import sample
from diffusion_jax.schedules import from_betas
from diffusion_jax.schedules import get_schedule
from diffusion_jax.schedules import Schedule
from diffusion_jax import models
from diffusion_jax.models import DiT, UNet, count_params, get_model

__version__ = "0.1.0"

# Heavy subpackages and their re-exported names, imported on first attribute access.
_LAZY_MODULES = ("data", "training", "convert")
_LAZY_NAMES = {
    "get_dataset_info": "data", "load_split_as_numpy": "data", "make_eval_iterator": "data",
    "make_train_iterator": "data", "train_and_evaluate": "training",
}


def __getattr__(name: str) -> Any:
  if name in _LAZY_MODULES:
    return importlib.import_module(f"diffusion_jax.{name}")
  if name in _LAZY_NAMES:
    return getattr(importlib.import_module(f"diffusion_jax.{_LAZY_NAMES[name]}"), name)
  raise AttributeError(f"module 'diffusion_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(list(globals()) + list(_LAZY_MODULES) + list(_LAZY_NAMES))
