"""Sampling for the command line: any registered sampler, split over the local devices.

`experiments/sample.py` (the entry point) calls `define_flags()` at import and
`generate(...)` in main, e.g.

  python -m experiments.sample --workdir=runs/digits --out=s.npz \\
      --sampler=dpm_solver++ --steps=20 --guidance_scale=2.0 --labels=3

`--steps=N` is N steps on the sampler's default grid (`samplers.grids`: the authors' grid for
each sampler), for every sampler; `--timesteps` gives an explicit respacing spec instead
(ddpm / ddim / dpm_solver++ / pc). Network evaluations: N for every sampler but heun (2N - 1)
and pc ((1 + corrector_steps) N).

Example i of a run (over all batches) uses the key fold_in(PRNGKey(seed), i), whatever the batch
size or the number of devices; the samplers draw every random number from that key, so the
same seed gives the same images on 1 or 8 devices (the same bits with the same batch per device,
as `experiments/evaluate.py` runs it; else up to float32 rounding). `make_generator` builds the sampler
once (compiled at its first call) and draws any number of samples, at any first index, with it:
`experiments/evaluate.py` draws all its shards with one; `generate` builds one per call.

References: ARCHITECTURE.md (model_fn and sampler contracts); Ho & Salimans 2022 (guidance).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import rng as rng_lib
from diffusion_jax import samplers
from diffusion_jax.schedules import Schedule
from diffusion_jax.training import local_batch

PyTree = Any


def define_flags() -> None:
  """Defines --sampler, --steps, --timesteps, --thresholding, --eta, --s_churn, --snr,
  --corrector_steps, --guidance_scale, --labels, --checkpoint (absl), once."""
  from absl import flags
  if "sampler" in flags.FLAGS:
    return
  flags.DEFINE_enum("sampler", "ddpm", sorted(samplers.SAMPLERS), "Sampler.")
  flags.DEFINE_integer("steps", None, "Number of steps on the sampler's default grid (default: "
                       "the run's sample.steps, else all T for ddpm/ddim/dpm_solver++/pc, 50 for "
                       "euler/heun). Heun spends 2N-1 network evaluations, pc (1 + "
                       "corrector_steps) N, the others N.")
  flags.DEFINE_string("timesteps", None, "Instead of --steps, an explicit respacing spec for "
                      "ddpm/ddim/dpm_solver++ ('50,50', 'ddim50', 'linspace20').")
  flags.DEFINE_enum("thresholding", None, list(samplers.thresholding.THRESHOLDINGS),
                    "x0 policy (default: the config's sample.clip_denoised, 'clip' for pixel "
                    "models; 'none' for latent models).")
  flags.DEFINE_float("eta", 0.0, "DDIM eta (0 deterministic, 1 ancestral).")
  flags.DEFINE_float("s_churn", 0.0, "Euler/Heun: EDM's S_churn (0: the deterministic ODE "
                     "sampler; > 0: EDM's stochastic sampler, algorithm 2).")
  flags.DEFINE_float("snr", samplers.pc.DEFAULT_SNR, "pc: the Langevin corrector's "
                     "signal-to-noise ratio (score_sde's 0.16).")
  flags.DEFINE_integer("corrector_steps", 1, "pc: Langevin corrector steps per step (each one "
                       "more network evaluation: (1 + corrector_steps) N in all).", lower_bound=1)
  flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale (class-conditional "
                     "models; 1 = plain conditional sampling); default: the run's "
                     "sample.guidance_scale.")
  flags.DEFINE_string("labels", None, "Class labels: one class ('3'), a list cycled over the "
                      "samples ('0,1,2'), or unset for 0, 1, ..., K-1, 0, ...")
  flags.DEFINE_string("checkpoint", "latest", "Which checkpoint: 'latest' (the newest readable), "
                      "'best' (the best of the in-training evaluation, config.eval) or a step "
                      "number (the newest at or below it).")


def parse_labels(spec: str | None, num_samples: int, num_classes: int) -> np.ndarray | None:
  """int32 [num_samples] labels from a --labels spec, or None for an unconditional model."""
  if not num_classes:
    if spec:
      raise ValueError(f"labels={spec!r} given but the model is unconditional (num_classes=0).")
    return None
  if not spec:
    classes = np.arange(num_classes)
  else:
    try:
      classes = np.array([int(part) for part in spec.split(",")])
    except ValueError as e:
      raise ValueError(f"labels must be integers separated by commas, got {spec!r}.") from e
    if classes.size == 0 or classes.min() < 0 or classes.max() >= num_classes:
      raise ValueError(f"labels must lie in [0, {num_classes}), got {spec!r}.")
  return np.resize(classes, num_samples).astype(np.int32)


def run_defaults(config: Any, steps: str | int | None, timesteps: str | None,
                 guidance_scale: float | None) -> tuple[str | int | None, float]:
  """(steps, guidance_scale) of a command line, unset ones taken from the run's `sample.steps`
  (when no --timesteps is given either) and `sample.guidance_scale`."""
  sample = config.get("sample", {})
  if steps in (None, "") and timesteps in (None, ""):
    steps = sample.get("steps", None)
  if guidance_scale is None:
    guidance_scale = float(sample.get("guidance_scale", 1.0))
  return steps, guidance_scale


def parse_checkpoint(spec: str | int | None) -> str | int | None:
  """--checkpoint as `load_for_sampling`'s step: None (latest), 'best' or a step number."""
  if spec in (None, "", "latest"):
    return None
  if spec == "best":
    return "best"
  try:
    return int(spec)
  except ValueError as e:
    raise ValueError(f"checkpoint must be 'latest', 'best' or a step number, got {spec!r}.") from e


def parse_steps(steps: str | int | None) -> int | None:
  """--steps as an int (or None); a respacing spec belongs in --timesteps."""
  if steps is None or steps == "":
    return None
  try:
    return int(steps)
  except ValueError as e:
    raise ValueError(f"steps must be a number of steps, got {steps!r}; pass a respacing spec "
                     "such as 'ddim50' as timesteps.") from e


def make_generator(apply_fn, params: PyTree, schedule: Schedule, image_shape: Sequence[int], *,
                   seed: int = 0, batch_size: int = 256, sampler: str = "ddpm",
                   steps: str | int | None = None, timesteps: str | None = None,
                   eta: float = 0.0, s_churn: float = 0.0,
                   snr: float = samplers.pc.DEFAULT_SNR, corrector_steps: int = 1,
                   guidance_scale: float = 1.0, num_classes: int = 0, prediction: str = "eps",
                   variance: str = "fixed_small", thresholding: str | None = None,
                   clip_denoised: bool = True, devices: Sequence[jax.Device] | None = None,
                   static: dict[str, Any] | None = None) -> Callable[..., np.ndarray]:
  """A sampler over `devices`, built once: `draw(num_samples, labels=None, first_index=0,
  progress=False) -> float32 [num_samples, H, W, C]`.

  Every call runs batches of batch_size (rounded up to a multiple of the devices) examples, split
  over the devices (`training.local_batch`: params replicated, batch sharded), through the same
  jitted function (compiled at the first call, reused by later calls: one compile for all the
  shards of an evaluation). Example i of a call uses fold_in(PRNGKey(seed), first_index + i).

  Args:
    apply_fn: `(params, x [B, H, W, C], t [B], y [B] int32 or None) -> output`.
    params: model parameters (replicated to every device once).
    schedule: the training schedule.
    image_shape: (H, W, C).
    seed, batch_size: the root key; examples per call over all devices (rounded up to a
      multiple of the device count).
    sampler, steps, timesteps, eta, s_churn, snr, corrector_steps: see `define_flags` (snr
      is traced, corrector_steps static).
    guidance_scale: classifier-free guidance (class-conditional models, null label num_classes);
      at 1 the model runs once per step without the unconditional half.
    num_classes: the model's number of classes (0: unconditional).
    prediction, variance: the model's parameterisation.
    thresholding: the x0 policy ('clip', 'dynamic', 'none'); None: 'clip' if clip_denoised
      else 'none'.
    devices: devices to split each batch over (default: all local devices).
    static: further static settings of the sampler (`get_sampler`, as a config's
      `sample.kwargs`), e.g. {'predictor': 'ancestral', 'corrector': 'none'} for pc.

  draw's labels: int32 [num_samples] for a class-conditional model (see `parse_labels`; None:
  0, 1, ..., K-1, 0, ...); first_index: global index of the call's first example (shards,
  hosts); progress: a tqdm bar over batches.
  """
  local = local_batch.LocalBatch(devices)
  per_call = local.round_up(batch_size)
  if thresholding is None:
    thresholding = "clip" if clip_denoised else "none"
  plan = samplers.plan(sampler, schedule, parse_steps(steps), timesteps)
  static = dict(plan.static, **(static or {}))
  if sampler == "pc":
    static["corrector_steps"] = corrector_steps
  sample_fn = samplers.get_sampler(sampler, prediction=prediction, variance=variance,
                                   thresholding=thresholding, **static)
  conditional = num_classes > 0
  guided = conditional and guidance_scale != 1.0
  shape = (per_call,) + tuple(image_shape)

  def one_batch(params, run_schedule, per_call_args, eta, churn, corrector_snr, scale, keys, y):
    if guided:
      guided_fn = samplers.classifier_free_guidance(
          lambda x, t, yy: apply_fn(params, x, t, yy), y, scale, null_label=num_classes)
      model_fn = lambda x, t: guided_fn(local.constrain(x), t)
    else:
      model_fn = lambda x, t: apply_fn(params, local.constrain(x), t, y if conditional else None)
    if sampler == "ddim":
      per_call_args = dict(per_call_args, eta=eta)
    if sampler in samplers.grids.ODE_SAMPLERS:
      per_call_args = dict(per_call_args, s_churn=churn)
    if sampler == "pc":
      per_call_args = dict(per_call_args, snr=corrector_snr)
    return sample_fn(model_fn, run_schedule, shape, keys, **per_call_args)

  jitted = jax.jit(one_batch, out_shardings=local.sharded)
  replicated = local.place(params)
  root = jax.random.PRNGKey(seed)
  traced = (jnp.float32(eta), jnp.float32(s_churn), jnp.float32(snr), jnp.float32(guidance_scale))

  def draw(num_samples: int, labels: np.ndarray | None = None, first_index: int = 0,
           progress: bool = False) -> np.ndarray:
    if conditional and labels is None:
      labels = parse_labels(None, num_samples, num_classes)
    batches = range(0, num_samples, per_call)
    if progress:
      try:
        import tqdm
        batches = tqdm.tqdm(batches, desc=f"{sampler} sampling", unit="batch")
      except ImportError:
        pass
    out = []
    for start in batches:
      indices = first_index + start + np.arange(per_call)
      keys = rng_lib.keys_for_indices(root, indices)
      if conditional:
        y = np.resize(np.asarray(labels[start:start + per_call], np.int32), per_call)
      else:
        y = np.zeros((per_call,), np.int32)
      images = jitted(replicated, plan.schedule, plan.per_call, *traced, *local.shard((keys, y)))
      out.append(np.asarray(images))
    return np.concatenate(out)[:num_samples]

  return draw


def generate(apply_fn, params: PyTree, schedule: Schedule, image_shape: Sequence[int], *,
             num_samples: int, batch_size: int = 256, labels: np.ndarray | None = None,
             first_index: int = 0, progress: bool = True, **settings) -> np.ndarray:
  """Samples float32 [num_samples, H, W, C] (in [-1, 1] for image models) in one go:
  `make_generator(..., batch_size=min(batch_size, num_samples), **settings)(num_samples,
  labels, first_index, progress)`. Callers that sample several times build the generator once.
  """
  draw = make_generator(apply_fn, params, schedule, image_shape,
                        batch_size=min(batch_size, num_samples), **settings)
  return draw(num_samples, labels, first_index, progress)


def make_run_generator(loaded: Any, *, variance: str | None = None,
                       **settings) -> Callable[..., np.ndarray]:
  """`make_generator` for a restored run (`training.restore.load_for_sampling`): its model,
  params, schedule, classes, prediction, reverse variance (`variance`, else the run's own by
  `training.sampling.sampling_variance`) and x0 clipping; `settings` as make_generator's
  (steps / guidance_scale left out or None take the run's `sample.steps` /
  `sample.guidance_scale`: `run_defaults`)."""
  from diffusion_jax.training import sampling  # pylint: disable=g-import-not-at-top
  config = loaded.config
  settings["steps"], settings["guidance_scale"] = run_defaults(
      config, settings.get("steps"), settings.get("timesteps"), settings.get("guidance_scale"))
  apply_fn = lambda p, x, t, y: loaded.model.apply({"params": p}, x, t, y, train=False)
  settings.setdefault("clip_denoised", config.sample.clip_denoised)
  return make_generator(apply_fn, loaded.params, loaded.schedule, loaded.image_shape,
                        num_classes=loaded.num_classes, prediction=config.diffusion.prediction,
                        variance=sampling.sampling_variance(config, variance), **settings)
