"""Sampling from a trained model: the `model_fn` closure over params (and labels), the sampler
chosen by config, and uint8 / PNG-grid output.

References: Ho et al. 2020, algorithm 2 (the ancestral 'ddpm' sampler used by default).
"""
from typing import Any, Callable
import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from diffusion_jax import reverse
from diffusion_jax import samplers

PyTree = Any


def make_model_fn(model: Any, params: PyTree, labels: jax.Array | None = None
                  ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """model_fn(x_t [B, H, W, C], t [B]) -> output, evaluated without dropout."""
  def model_fn(x_t, t):
    return model.apply({"params": params}, x_t, t, labels, train=False)
  return model_fn


def default_labels(num_samples: int, num_classes: int) -> jax.Array | None:
  """Labels 0, 1, ..., num_classes-1, 0, ... for a class-conditional model; None otherwise."""
  return jnp.arange(num_samples, dtype=jnp.int32) % num_classes if num_classes else None


def sampling_variance(config: Any, override: str | None = None) -> str:
  """The reverse variance a run samples with: `override`, else `config.sample.variance`, else
  the run's own `diffusion.variance` (unset: `reverse.resolve_variance` of its loss type)."""
  chosen = override or config.sample.variance or config.diffusion.variance
  return reverse.resolve_variance(chosen, config.diffusion.loss_type)


def plan_sampling(config: Any, schedule: Any, sampler: str | None = None,
                  steps: int | None = None) -> tuple[Callable[..., jax.Array], Any, dict]:
  """(sample_fn, schedule to run on, per-call arrays) of the config's sampler (eager).

  `sampler` (default `config.sample.sampler`) names a sampler of `samplers.get_sampler` with the
  variance of `sampling_variance(config)` and `config.sample.kwargs` as static settings. `steps`
  (default `config.sample.steps`): that many steps on the sampler's default grid
  (`samplers.plan`, which respaces `schedule`, so it must be concrete); None runs the sampler on
  its own default (all T steps for ddpm / ddim).
  `sample_fn(model_fn, schedule, shape, rng, **per_call)` is pure: the caller jits it.
  """
  name = sampler or config.sample.sampler
  static = {"prediction": config.diffusion.prediction, "variance": sampling_variance(config)}
  static["clip_denoised"] = config.sample.clip_denoised   # every sampler's x0 policy
  per_call: dict[str, Any] = {}
  if steps is None:
    steps = config.sample.get("steps", None)
  if steps is not None:
    plan = samplers.plan(name, schedule, int(steps))
    static.update(plan.static)
    schedule, per_call = plan.schedule, dict(plan.per_call)
  static.update(dict(config.sample.kwargs))
  return samplers.get_sampler(name, **static), schedule, per_call


def guided_model_fn(config: Any, model: Any, params: PyTree, labels: jax.Array | None):
  """model_fn(x_t, t) of a run: `config.sample.guidance_scale` != 1 guides a class-conditional
  model (`labels` given; null label `model.num_classes`), else the plain `make_model_fn`."""
  scale = float(config.sample.get("guidance_scale", 1.0))
  if labels is not None and scale != 1.0:
    return samplers.classifier_free_guidance(
        lambda x, t, y: model.apply({"params": params}, x, t, y, train=False), labels, scale,
        null_label=int(model.num_classes))
  return make_model_fn(model, params, labels)


def sample_from_config(config: Any, model: Any, schedule: Any, params: PyTree, rng: jax.Array,
             num_samples: int, image_shape: tuple[int, ...],
             labels: jax.Array | None = None, sampler: str | None = None,
             steps: int | None = None) -> jax.Array:
  """Samples [N, H, W, C] in [-1, 1] with the config's sampler (`plan_sampling`) over
  `schedule` (concrete when steps are set), guided per `guided_model_fn`. Pure: the caller
  jits it."""
  sample_fn, schedule, per_call = plan_sampling(config, schedule, sampler, steps)
  shape = (num_samples,) + tuple(image_shape)
  return sample_fn(guided_model_fn(config, model, params, labels), schedule, shape, rng,
                   **per_call)


def to_uint8(images: jax.Array | np.ndarray) -> np.ndarray:
  """[-1, 1] float -> uint8 [0, 255] (round half to even after clipping)."""
  x = (np.clip(np.asarray(images, np.float32), -1.0, 1.0) + 1.0) * 127.5
  return np.rint(x).astype(np.uint8)


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
  """uint8 [N, H, W, C] -> one uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, C] grid image."""
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, q = divmod(i, ncols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] \
        = images[i]
  return grid


def save_grid(images: np.ndarray, path: str, ncols: int | None = None) -> None:
  """Writes uint8 [N, H, W, C] as a PNG grid (small images are upscaled to ~512 px wide)."""
  grid = image_grid(images, ncols)
  scale = max(1, 512 // grid.shape[1])
  grid = grid.repeat(scale, 0).repeat(scale, 1)
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
