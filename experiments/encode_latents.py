"""Encode a dataset once with an autoencoder: posterior means and stds as ArrayRecord shards.

  python -m diffusion_jax.convert --format diffusers_vae --weights vae/diffusion_pytorch_model.safetensors \\
      --config vae/config.json --out ckpt/sd_vae
  python -m experiments.encode_latents --vae=ckpt/sd_vae --data.name=imagenet2012 \\
      --data.image_size=256 --data.split=train --flip --out=latents/imagenet256

`--vae` is a directory written by `diffusion_jax.convert` (model.json + orbax step). `--data.*`
are the data config keys of the training configs (name, split, image_size, data_dir, folder, ...).
Writes `OUT/latents.json` and `OUT/latents-KKKKK-of-NNNNN.array_record` (format:
`diffusion_jax.data.latents`), read back with `diffusion_jax.data.latents.LatentSource(OUT)`.

Each shard is written to a temporary file and renamed when complete, so a killed run leaves only
whole shards; rerunning the same command skips them and writes the rest (the output is the same as
an uninterrupted run). The batch of each compiled call is split over the local devices; with
several hosts, host p writes shards p, p + P, ... Every compiled call holds exactly
`--batch_size` images per device (padded), so the latents do not depend on the number of devices
or hosts (bitwise on CPU: tests/test_encode_latents.py); another --batch_size may change the last
bits (another convolution blocking), and the resume check does not compare it.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import ml_collections
from ml_collections import config_dict
from ml_collections import config_flags
import numpy as np

from diffusion_jax import convert
from diffusion_jax.data import latents as latent_format
from diffusion_jax.data import sources
from diffusion_jax.data.options import DataOptions
from diffusion_jax.data.pipeline import to_float
from diffusion_jax.models.autoencoder import AutoencoderKL
from diffusion_jax.training import console
from experiments import paths

FLAGS = flags.FLAGS


def _default_data() -> ml_collections.ConfigDict:
  # None (typed placeholders, so that --data.image_size=256 parses): the data pipeline's default
  # (diffusion_jax.data.DataOptions).
  ph = config_dict.placeholder
  return ml_collections.ConfigDict(dict(name="digits", split="train", image_size=ph(int),
                                        data_dir=ph(str), folder=ph(str), crop=ph(str),
                                        channels=ph(int), resize_method=ph(str)))


def define_flags() -> None:
  """The command line's flags; defined when run as a program, so that importing this module
  (tests, other entry points) defines no absl flags that could clash."""
  config_flags.DEFINE_config_dict("data", _default_data(), "Data config (as in the training configs).")
  flags.DEFINE_string("vae", None, "Autoencoder checkpoint directory (written by diffusion_jax.convert).")
  flags.DEFINE_string("out", None, "Output directory (created; rerun to resume).")
  flags.DEFINE_integer("batch_size", 64, "Images per device per compiled call.")
  flags.DEFINE_integer("shard_size", 4096, "Examples per ArrayRecord shard (the unit of resumption).")
  flags.DEFINE_bool("flip", False, "Also encode the horizontally flipped images (DiT does).")
  flags.DEFINE_integer("num_devices", 0, "Use the first N local devices (0: all).")
  flags.mark_flags_as_required(["vae", "out"])


def _encoder(vae: AutoencoderKL, params: Any, devices: Sequence[jax.Device], per_device: int):
  """images float32 [B, H, W, C], B <= per_device * len(devices) -> (mean, std) in diffusion space.

  Every call is padded to exactly `per_device` images on each device, so an image's latents are
  computed by the same compiled program whatever the device count (bitwise the same on CPU).
  """
  mesh = Mesh(np.asarray(devices), ("batch",))
  batch_sharding = NamedSharding(mesh, PartitionSpec("batch"))
  params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
  shift = vae.shift_factor or 0.0

  @jax.jit
  def encode(p, x):
    post = vae.apply({"params": p}, x, method=AutoencoderKL.encode)
    return (post.mean - shift) * vae.scaling_factor, post.std * vae.scaling_factor

  def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pad = per_device * len(devices) - len(x)
    xp = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
    mean, std = encode(params, jax.device_put(xp, batch_sharding))
    return np.asarray(mean)[:len(x)], np.asarray(std)[:len(x)]
  return run


def _check_resume(out: str, meta: latent_format.LatentMeta) -> None:
  """Raise ValueError if OUT already holds latents of another encoding."""
  try:
    old = latent_format.read_meta(out)
  except FileNotFoundError:
    return
  diff = sorted(k for k, v in meta.to_json().items() if old.to_json().get(k) != v)
  if diff:
    raise ValueError(f"{out} holds a different encoding (differs in {diff}); use another --out")


def encode_dataset(vae: AutoencoderKL, params: Any, vae_spec: dict[str, Any], data_config: Any,
                   out: str, *, batch_size: int = 64, shard_size: int = 4096, flip: bool = False,
                   devices: Sequence[jax.Device] | None = None, max_shards: int | None = None,
                   progress: bool = True) -> latent_format.LatentMeta:
  """Encode the split `data_config.split` into `out` (resuming: finished shards are kept).

  max_shards: stop after writing that many shards (a bounded run; the rest on the next call).
  batch_size: images per device per compiled call.
  Returns the metadata. Raises ValueError for bad sizes or an `out` holding another encoding.
  """
  if batch_size < 1 or shard_size < 1:
    raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
  options = DataOptions.from_config(data_config)
  split = options.split
  source = sources.open_source(options, split)
  info = source.info
  if info.image_shape[-1] != vae.in_channels:
    raise ValueError(f"the data have {info.image_shape[-1]} channels, the autoencoder "
                     f"in_channels={vae.in_channels}")
  f = vae.downsampling_factor
  if info.image_shape[0] % f or info.image_shape[1] % f:
    raise ValueError(f"image size {info.image_shape[:2]} must be divisible by the autoencoder "
                     f"factor {f} (set data.image_size)")
  devices = list(devices or jax.local_devices())
  meta = latent_format.LatentMeta(
      num_examples=len(source),
      latent_shape=(info.image_shape[0] // f, info.image_shape[1] // f, vae.latent_channels),
      image_shape=tuple(info.image_shape), num_classes=info.num_classes, shard_size=shard_size,
      flip=flip, scaling_factor=float(vae.scaling_factor),
      shift_factor=None if vae.shift_factor is None else float(vae.shift_factor),
      vae=dict(vae_spec), data=dict(data_config.to_dict() if hasattr(data_config, "to_dict")
                                     else data_config), split=split)
  os.makedirs(out, exist_ok=True)
  _check_resume(out, meta)
  if jax.process_index() == 0:
    tmp = os.path.join(out, latent_format.META_FILE + ".tmp")
    with open(tmp, "w") as fh:
      json.dump(meta.to_json(), fh, indent=2)
    os.replace(tmp, os.path.join(out, latent_format.META_FILE))
  run = _encoder(vae, params, devices, batch_size)
  step = batch_size * len(devices)
  mine = [k for k in range(meta.num_shards) if k % jax.process_count() == jax.process_index()]
  todo = [k for k in mine if not os.path.exists(meta.shard_path(out, k))]
  if max_shards is not None:
    todo = todo[:max_shards]
  logging.info("%d shards on this host, %d done, %d to write now", len(mine), len(mine) - len(todo),
               len(todo))
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top
  for k in tqdm.tqdm(todo, desc="shards", disable=not progress):
    start, stop = meta.shard_range(k)
    arrays = {name: [] for name in meta.fields}
    labels = []
    for b in range(start, stop, step):
      pixels, y = source.read(np.arange(b, min(b + step, stop)))
      x = to_float(pixels)
      mean, std = run(x)
      arrays["mean"].append(mean)
      arrays["std"].append(std)
      if flip:
        mean, std = run(x[:, :, ::-1])
        arrays["mean_flip"].append(mean)
        arrays["std_flip"].append(std)
      labels.append(y)
    records = latent_format.to_records(meta, np.concatenate(labels),
                                       {n: np.concatenate(v) for n, v in arrays.items()})
    path = meta.shard_path(out, k)
    writer = ArrayRecordWriter(path + ".tmp", "group_size:1")
    for r in records:
      writer.write(r)
    writer.close()
    os.replace(path + ".tmp", path)
  return meta


def main(argv):
  del argv
  console.quiet_libraries(FLAGS.verbosity)
  vae_dir = paths.absolute(FLAGS.vae)
  vae, params = convert.load_checkpoint(vae_dir)
  if not isinstance(vae, AutoencoderKL):
    raise ValueError(f"--vae={FLAGS.vae} holds a {type(vae).__name__}, not an AutoencoderKL")
  with open(os.path.join(vae_dir, "model.json")) as fh:
    spec = json.load(fh)
  devices = jax.local_devices()
  if FLAGS.num_devices:
    if not 0 < FLAGS.num_devices <= len(devices):
      raise ValueError(f"--num_devices must be in [1, {len(devices)}], got {FLAGS.num_devices}")
    devices = devices[:FLAGS.num_devices]
  meta = encode_dataset(vae, params, spec, FLAGS.data, paths.absolute(FLAGS.out),
                        batch_size=FLAGS.batch_size, shard_size=FLAGS.shard_size, flip=FLAGS.flip,
                        devices=devices)
  logging.info("encoded %d examples of %s to %s (%d shards, latents %s)", meta.num_examples,
               meta.split, FLAGS.out, meta.num_shards, meta.latent_shape)


if __name__ == "__main__":
  define_flags()
  app.run(main)
