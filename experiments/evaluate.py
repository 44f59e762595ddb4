"""Evaluate a trained run: sample, compute features in the same pass, report FID / IS / KID / P-R.

  # The offline digits figure (the cached digits classifier's features, vs the held-out digits):
  python -m experiments.evaluate --workdir=runs/digits --num_samples=1000 --sampler=ddim \\
      --steps=50 --ref=digits
  # CIFAR-10 as the papers report it (50k samples vs the training set, the FID Inception net):
  python -m experiments.evaluate --workdir=runs/cifar10 --num_samples=50000 --sampler=ddpm \\
      --ref=dataset --ref_split=train --features=inception \\
      --inception_weights=pt_inception-2015-12-05-6726825d.pth
  # Against published statistics (pytorch-fid / clean-fid .npz, or an ADM reference batch):
  python -m experiments.evaluate --workdir=DIR --ref=cifar10_train_stats.npz --features=inception ...
  # Several hosts: the same command in every process (--distributed alone on a TPU pod), e.g.
  python -m experiments.evaluate --workdir=DIR ... --coordinator_address=HOST0:PORT \
      --num_processes=2 --process_id=I [--cpu_collectives=gloo]

Samples are drawn over every local device (and host: shard i belongs to process
i % process_count; all processes must share DIR) with one `sampling_lib.make_run_generator` for
all shards; example i uses fold_in(PRNGKey(seed), i) and
every device runs the same per-device batch (--per_device_batch), so the images and features do
not depend on the device count. Shards of --shard_size samples (images and features) are
committed to DIR/eval/shards-<key>/ as they finish: a killed run, rerun, continues where it
stopped and gives the numbers of an uninterrupted run; a larger --num_samples reuses the shards
already drawn. Results: DIR/eval/<step>-<sampler>-<steps>.json (the exact settings and the
metrics) and a grid of the first 64 samples beside it (.png).

References: Heusel et al. 2017 (FID), Salimans et al. 2016 (IS), Binkowski et al. 2018 (KID),
Kynkaanniemi et al. 2019 (P/R), Naeem et al. 2020 (density/coverage); see
diffusion_jax/evaluation/metrics.py.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from diffusion_jax.evaluation import features as features_lib
from diffusion_jax.evaluation import metrics
from diffusion_jax.evaluation import reference as reference_lib
from diffusion_jax.training import local_batch
from experiments import shards

GRID_SAMPLES = 64


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, never at import)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from experiments import multihost, sampling_lib  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "Workdir of a training run.", required=True)
  flags.DEFINE_integer("num_samples", 1000, "Number of samples to evaluate.")
  flags.DEFINE_string("ref", "digits", "Reference: 'digits' (held-out digits), 'dataset' (the "
                      "run's dataset, split --ref_split) or a statistics .npz (pytorch-fid / "
                      "clean-fid mu/sigma, or an ADM reference batch).")
  flags.DEFINE_string("ref_split", "train", "Split of --ref=dataset (papers use 'train').")
  flags.DEFINE_enum("features", "auto", ["auto", *features_lib.FEATURE_NETS],
                    "Feature net: 'digits', 'inception', or 'auto' (digits for 8x8x1 images, "
                    "else inception).")
  flags.DEFINE_string("inception_weights", None, "pt_inception-2015-12-05-6726825d.pth "
                      "(pytorch-fid) or weights-inception-2015-12-05-6726825d.pth (torch-fidelity).")
  flags.DEFINE_list("metrics", list(metrics.ALL_METRICS), "Subset of fd,is,kid,pr,dc.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_bool("use_ema", True, "Sample with EMA params (else the raw params).")
  flags.DEFINE_integer("per_device_batch", 32, "Samples (and feature images) per device per call.")
  flags.DEFINE_integer("shard_size", 1000, "Samples per committed shard.")
  flags.DEFINE_string("save_ref", None, "Also write the reference mu/sigma here (pytorch-fid .npz).")
  sampling_lib.define_flags()
  multihost.define_flags()


def make_feature_fn(net: features_lib.FeatureNet, devices: Sequence[jax.Device],
                    per_device_batch: int) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
  """uint8 [N, H, W, C] -> {'pool': float32 [N, D], 'logits': float32 [N, K]}, split over
  `devices` (`training.local_batch`).

  Every call runs `per_device_batch` images on each device (the last call padded), so an image's
  features are the same bits whatever the number of devices.
  """
  local = local_batch.LocalBatch(devices)
  params = local.place(net.params)
  apply = jax.jit(lambda p, x: net.apply(p, local.constrain(x)), out_shardings=local.sharded)
  per_call = per_device_batch * local.num_devices

  def compute(images: np.ndarray) -> dict[str, np.ndarray]:
    if net.image_shape is not None and images.shape[1:] != net.image_shape:
      raise ValueError(f"the {net.name} feature net takes images of shape {net.image_shape}, got "
                       f"{images.shape[1:]}; use --features=inception for other sizes.")
    out: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), per_call):
      chunk = images[start:start + per_call]
      padded = np.concatenate([chunk, np.zeros((per_call - len(chunk),) + chunk.shape[1:],
                                                chunk.dtype)])
      result = apply(params, local.shard(padded))
      for key, value in result.items():
        out.setdefault(key, []).append(np.asarray(value)[:len(chunk)])
    return {key: np.concatenate(parts) for key, parts in out.items()}

  return compute


settings_key = shards.settings_key


def run_shards(sample_fn: Callable[[int, int], np.ndarray],
               feature_fn: Callable[[np.ndarray], dict[str, np.ndarray]], *, num_samples: int,
               shard_size: int, shard_dir: str, shard_settings: dict[str, Any],
               progress: bool = True, process_index: int = 0,
               process_count: int = 1) -> dict[str, np.ndarray]:
  """Samples and featurises examples [0, num_samples) shard by shard, committing each to disk.

  sample_fn(start, count) -> uint8 [count, H, W, C] (examples start..start+count-1, each from
  its own key); feature_fn(images) -> {'pool', 'logits'}. Shard i ([i S, (i + 1) S)) holds the
  images and their features, written atomically to shard_dir/shard_<i>.npz by process
  i % process_count; shards already there (with the same settings, checked against
  shard_dir/settings.json) are read back instead of recomputed (`experiments.shards.run`).

  Returns:
    {'images': uint8 [min(64, N), ...] (for the grid), 'pool': [N, D], 'logits': [N, K]}.
  """
  if num_samples < 1 or shard_size < 1:
    raise ValueError(f"num_samples and shard_size must be >= 1, got {num_samples}, {shard_size}.")

  def compute(start: int, count: int) -> dict[str, np.ndarray]:
    images = sample_fn(start, count)
    return {"images": images, **feature_fn(images)}

  paths = shards.run(compute, num_items=num_samples, shard_size=shard_size,
                     shard_dir=shard_dir, settings=shard_settings, process_index=process_index,
                     process_count=process_count, progress=progress, desc="sample+features",
                     unit="img")
  parts: dict[str, list[np.ndarray]] = {"pool": [], "logits": []}
  grid: list[np.ndarray] = []
  for path in paths:
    with np.load(path) as data:
      for key in parts:
        parts[key].append(data[key])
      if sum(len(g) for g in grid) < GRID_SAMPLES:
        grid.append(data["images"])
  return {"images": np.concatenate(grid)[:GRID_SAMPLES],
          **{key: np.concatenate(value) for key, value in parts.items()}}


def make_sample_fn(loaded: Any, *, seed: int, labels: Optional[np.ndarray],
                   devices: Sequence[jax.Device], per_device_batch: int, decoder: Any = None,
                   **sampler_kw) -> Callable[[int, int], np.ndarray]:
  """sample_fn(start, count) for `run_shards` from a restored run (`restore.load_for_sampling`).

  One sampler (`sampling_lib.make_run_generator`, compiled at the first shard) serves
  every shard. Every call runs whole batches of per_device_batch x devices (padded with
  examples beyond count, dropped), so the per-device shape and hence the numerics never depend
  on count or on the device count. sampler_kw: sampler, steps, timesteps, eta, s_churn,
  guidance_scale, thresholding, variance (as `make_generator`). decoder: a latent run's
  `latent_decoder.load_decoder(loaded.config)`, which decodes the samples to pixels (None: a
  pixel-space run).
  """
  from diffusion_jax.training import latent_decoder  # pylint: disable=g-import-not-at-top
  from experiments import sampling_lib  # pylint: disable=g-import-not-at-top
  per_call = per_device_batch * len(devices)
  draw = sampling_lib.make_run_generator(loaded, seed=seed, batch_size=per_call,
                                         devices=devices, **sampler_kw)

  def sample(start: int, count: int) -> np.ndarray:
    padded = -(-count // per_call) * per_call
    y = None if labels is None else np.resize(labels[start:start + count], padded)
    return latent_decoder.to_images(draw(padded, y, first_index=start)[:count], decoder)

  return sample


def build_reference(ref: str, feature_fn: Callable[[np.ndarray], dict[str, np.ndarray]],
                    net_name: str, data_config: Any, ref_split: str,
                    cache_dir: str) -> tuple[reference_lib.Reference, dict[str, Any]]:
  """(Reference, a description for the results) for --ref: 'digits', 'dataset' or a .npz path.

  Features of real images (digits, a dataset split, an ADM batch's images) are computed with
  the same feature_fn as the samples and cached in cache_dir.
  """
  info: dict[str, Any] = {"ref": ref}
  if ref in ("digits", "dataset"):
    if ref == "digits":
      data_config, split = {"name": "digits", "image_size": 8}, "test"
    else:
      split = ref_split
    name = data_config["name"] if isinstance(data_config, dict) else data_config.name
    cache = os.path.join(cache_dir, f"reference-{name}-{split.replace('/', '_')}-{net_name}.npz")
    info.update(dataset=name, split=split)
    if os.path.exists(cache):
      with np.load(cache) as data:
        real = data["features"]
    else:
      from diffusion_jax.data import load_split_as_numpy  # pylint: disable=g-import-not-at-top
      real = feature_fn(load_split_as_numpy(data_config, split)["image"])["pool"]
      os.makedirs(cache_dir, exist_ok=True)
      shards.atomic_savez(cache, features=real)
    reference = reference_lib.from_features(real)
  else:
    reference = reference_lib.load_reference(ref)
    if reference.images is not None:
      real = feature_fn(reference.images)["pool"]
      stats = reference_lib.from_features(real)
      # An ADM batch's stored statistics are the reference's own: keep them for FD.
      reference = stats if not reference.mu.size else reference._replace(features=real)
  info["num_reference"] = None if reference.features is None else int(len(reference.features))
  if ref == "digits" and net_name == "digits":
    from diffusion_jax.evaluation import digits  # pylint: disable=g-import-not-at-top
    info["real_floor"] = digits.real_floor()
    info["real_floor_note"] = ("Frechet distance of the 297 held-out digits to the 1,500 "
                               "training digits in the same features")
  return reference, info


def results_path(workdir: str, step: int, sampler: str, steps: Optional[str]) -> str:
  steps_token = str(steps).replace("/", "_") if steps not in (None, "") else "default"
  return os.path.join(workdir, "eval", f"{step}-{sampler}-{steps_token}.json")


def evaluate(workdir: str, *, num_samples: int, ref: str = "digits", ref_split: str = "train",
             features: str = "auto", inception_weights: Optional[str] = None,
             which: Sequence[str] = metrics.ALL_METRICS, seed: int = 0, use_ema: bool = True,
             per_device_batch: int = 32, shard_size: int = 1000, sampler: str = "ddpm",
             steps: Optional[str] = None, timesteps: Optional[str] = None, eta: float = 0.0,
             s_churn: float = 0.0, guidance_scale: Optional[float] = None,
             thresholding: Optional[str] = None, labels: Optional[str] = None,
             checkpoint: str | int | None = None, save_ref: Optional[str] = None,
             devices: Optional[Sequence[jax.Device]] = None,
             progress: bool = True) -> dict[str, Any]:
  """Evaluates a run (see the module docstring); writes and returns the results dict.

  checkpoint: None or 'latest' (the newest readable), 'best' (the in-training evaluation's
  best, `restore.best_checkpoint`) or a step number. steps / guidance_scale None: the run's
  sample.steps / sample.guidance_scale. A latent run's samples are decoded to pixels first.
  """
  from diffusion_jax.training import latent_decoder, restore, sampling  # pylint: disable=g-import-not-at-top
  from experiments import paths, sampling_lib  # pylint: disable=g-import-not-at-top
  started = time.time()
  workdir = paths.absolute(workdir)
  devices = list(devices or jax.local_devices())
  loaded = restore.load_for_sampling(workdir, use_ema=use_ema,
                                     step=sampling_lib.parse_checkpoint(checkpoint))
  decoder = latent_decoder.load_decoder(loaded.config, devices)   # None: pixel samples
  image_shape = (tuple(loaded.image_shape) if decoder is None
                 else decoder.image_shape(loaded.image_shape))
  steps, guidance_scale = sampling_lib.run_defaults(loaded.config, steps, timesteps,
                                                    guidance_scale)
  if features == "auto":
    features = "digits" if image_shape == (8, 8, 1) else "inception"
  net = features_lib.get_feature_net(features, inception_weights)
  if net.image_shape is not None and image_shape != net.image_shape:
    raise ValueError(f"features={features!r} takes {net.image_shape} images; the run makes "
                     f"{image_shape}: use features='inception'.")
  label_array = sampling_lib.parse_labels(labels, num_samples, loaded.num_classes)
  shard_settings = {
      "step": int(loaded.step), "use_ema": use_ema, "seed": seed, "sampler": sampler,
      "steps": steps, "timesteps": timesteps, "eta": eta, "s_churn": s_churn,
      "guidance_scale": guidance_scale, "thresholding": thresholding, "labels": labels,
      "shard_size": shard_size, "per_device_batch": per_device_batch, "features": features,
      "feature_net": (os.path.abspath(inception_weights) if features == "inception" else
                      "digits-classifier-" + _digits_key()),
  }
  eval_dir = os.path.join(workdir, "eval")
  shard_dir = os.path.join(eval_dir, f"shards-{settings_key(shard_settings)}")
  feature_fn = make_feature_fn(net, devices, per_device_batch)
  sample_fn = make_sample_fn(loaded, seed=seed, labels=label_array, devices=devices,
                             per_device_batch=per_device_batch, decoder=decoder, sampler=sampler,
                             steps=steps, timesteps=timesteps, eta=eta, s_churn=s_churn,
                             guidance_scale=guidance_scale, thresholding=thresholding)
  out = run_shards(sample_fn, feature_fn, num_samples=num_samples, shard_size=shard_size,
                   shard_dir=shard_dir, shard_settings=shard_settings, progress=progress,
                   process_index=jax.process_index(), process_count=jax.process_count())
  data_config = loaded.config.data
  if data_config.get("name", None) == "latents" and ref == "dataset":
    from diffusion_jax.data import latents  # pylint: disable=g-import-not-at-top
    data_config = latents.read_meta(data_config.latents_dir).data   # the images it encoded
  reference, ref_info = build_reference(ref, feature_fn, features, data_config, ref_split,
                                        eval_dir)
  if save_ref:
    reference_lib.save_statistics(paths.absolute(save_ref), reference.mu, reference.sigma)
  values = metrics.all_metrics(out["pool"], reference.mu, reference.sigma,
                               fake_logits=out["logits"], ref=reference.features,
                               which=tuple(which))
  results = {
      "metrics": values,
      "reference": ref_info,
      "settings": {**shard_settings, "workdir": workdir, "num_samples": num_samples,
                   "checkpoint": "latest" if checkpoint is None else str(checkpoint),
                   "ref": ref, "ref_split": ref_split, "metrics": list(which),
                   "inception_weights": inception_weights},
      "shards": shard_dir,
      "num_devices": len(devices) * jax.process_count(),
      "local_devices": len(devices),
      "process_count": jax.process_count(),
      "seconds": time.time() - started,
  }
  path = results_path(workdir, loaded.step, sampler, steps or timesteps)
  if jax.process_index() == 0:
    with open(path + ".tmp", "w") as f:
      json.dump(results, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
    sampling.save_grid(out["images"], path[:-5] + ".png")
  results["path"] = path
  return results


def _digits_key() -> str:
  from diffusion_jax.evaluation import digits  # pylint: disable=g-import-not-at-top
  return digits.DEFAULT_SETTINGS.key()


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from diffusion_jax import compile_cache  # pylint: disable=g-import-not-at-top
  from diffusion_jax.training import console  # pylint: disable=g-import-not-at-top
  from experiments import multihost  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  console.quiet_libraries(f.verbosity)
  compile_cache.enable(f.compile_cache)
  multihost.initialize(f)
  results = evaluate(f.workdir, num_samples=f.num_samples, ref=f.ref, ref_split=f.ref_split,
                     features=f.features, inception_weights=f.inception_weights,
                     which=f.metrics, seed=f.seed, use_ema=f.use_ema,
                     per_device_batch=f.per_device_batch, shard_size=f.shard_size,
                     sampler=f.sampler, steps=f.steps, timesteps=f.timesteps, eta=f.eta,
                     s_churn=f.s_churn, guidance_scale=f.guidance_scale,
                     thresholding=f.thresholding, labels=f.labels, checkpoint=f.checkpoint,
                     save_ref=f.save_ref)
  if jax.process_index() != 0:
    print(f"process {jax.process_index()}/{jax.process_count()}: done; process 0 writes "
          f"{results['path']}")
    return
  for key, value in sorted(results["metrics"].items()):
    print(f"{key}: {value:.6g}")
  if "real_floor" in results["reference"]:
    print(f"real floor (held-out vs training digits): {results['reference']['real_floor']:.6g}")
  print(f"wrote {results['path']} and {results['path'][:-5]}.png")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from diffusion_jax import compile_cache  # pylint: disable=g-import-not-at-top
  compile_cache.define_flag()
  define_flags()
  app.run(main)
