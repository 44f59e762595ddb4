"""Samples of a latent-diffusion run -> pixels: the one place where latents are decoded.

A run trains in the latent space of the autoencoder named by `config.autoencoder.workdir` (a
directory of `experiments.train_autoencoder` or `diffusion_jax.convert`). Its samples are
latents in diffusion space; the trainer's previews, `experiments.sample` and
`experiments.evaluate` all turn samples into uint8 images with `to_images(samples, decoder)`,
where `decoder` is `load_decoder(config)` (None for a pixel-space run).

References: Rombach et al. 2022 (arXiv:2112.10752), Sec. 3 (decode D(z / scale_factor)).
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import numpy as np

from diffusion_jax.models import autoencoder as ae_lib
from diffusion_jax.training import local_batch
from diffusion_jax.training import sampling

PyTree = Any


class LatentDecoder:
  """Decodes diffusion-space latents [N, h, w, L] to images [N, h f, w f, C] (float32, nominally
  in [-1, 1], not clipped), `batch_size` latents per jitted call, split over `devices`.

  Every call runs the same padded shape, so it compiles once; the params stay on the devices.
  """

  def __init__(self, vae: ae_lib.AutoencoderKL, params: PyTree, batch_size: int = 64,
               devices: Sequence[jax.Device] | None = None, directory: str | None = None):
    if int(batch_size) < 1:
      raise ValueError(f"decode batch_size must be >= 1, got {batch_size}")
    self.vae, self.directory = vae, directory
    self._local = local_batch.LocalBatch(devices)
    self.batch_size = self._local.round_up(batch_size)
    self._params = self._local.place(params)
    self._decode = jax.jit(lambda p, z: ae_lib.decode(vae, p, z))

  def image_shape(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
    """(H, W, C) of the images decoded from latents of shape (h, w, L)."""
    h, w, channels = (int(s) for s in latent_shape)
    if channels != self.vae.latent_channels:
      raise ValueError(f"latents have {channels} channels, the autoencoder "
                       f"{self.directory or ''} latent_channels={self.vae.latent_channels}")
    f = self.vae.downsampling_factor
    return h * f, w * f, int(self.vae.out_channels)

  def __call__(self, latents: jax.Array | np.ndarray) -> np.ndarray:
    latents = np.asarray(latents, np.float32)
    self.image_shape(latents.shape[1:])
    out = []
    for start in range(0, len(latents), self.batch_size):
      chunk = latents[start:start + self.batch_size]
      pad = self.batch_size - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
      images = self._decode(self._params, self._local.shard(chunk))
      out.append(np.asarray(images)[:self.batch_size - pad])
    return np.concatenate(out)


def to_images(samples: jax.Array | np.ndarray, decoder: LatentDecoder | None) -> np.ndarray:
  """uint8 [N, H, W, C] of a run's samples: decoded first when the run is a latent one."""
  return sampling.to_uint8(samples if decoder is None else decoder(samples))


def load_decoder(config: Any, devices: Sequence[jax.Device] | None = None
                 ) -> LatentDecoder | None:
  """The decoder of `config.autoencoder.workdir`, or None for a pixel-space run.

  Raises ValueError when the data are latents (`data.name == 'latents'`) but no autoencoder is
  named, or when the latents were encoded by another autoencoder (model.json differs).
  """
  section = config.get("autoencoder", None) or {}
  workdir = section.get("workdir", None)
  data = config.data
  if not workdir:
    if data.get("name", None) == "latents":
      raise ValueError("config.data.name='latents' needs config.autoencoder.workdir (the "
                       "autoencoder that encoded data.latents_dir) to decode samples to images")
    return None
  from diffusion_jax import convert  # pylint: disable=g-import-not-at-top  (convert imports training)
  vae, params = convert.load_checkpoint(workdir)
  if not isinstance(vae, ae_lib.AutoencoderKL):
    raise ValueError(f"config.autoencoder.workdir={workdir} holds a {type(vae).__name__}, not an "
                     f"autoencoder (write one with experiments.train_autoencoder or convert)")
  if data.get("name", None) == "latents" and data.get("latents_dir", None):
    check_same_autoencoder(workdir, data.latents_dir)
  return LatentDecoder(vae, params, int(section.get("decode_batch_size", 64) or 64), devices,
                       directory=workdir)


def check_same_autoencoder(autoencoder_dir: str, latents_dir: str) -> None:
  """ValueError unless `latents_dir` was encoded by the autoencoder of `autoencoder_dir` (same
  preset and overrides in model.json, hence the same architecture and scaling)."""
  from diffusion_jax.data import latents  # pylint: disable=g-import-not-at-top
  with open(os.path.join(autoencoder_dir, "model.json")) as f:
    spec = json.load(f)
  encoded_by = latents.read_meta(latents_dir).vae
  mine = {"name": spec.get("name"), "overrides": spec.get("overrides", {})}
  theirs = {"name": encoded_by.get("name"), "overrides": encoded_by.get("overrides", {})}
  if mine != theirs:
    raise ValueError(f"the latents in {latents_dir} were encoded by the autoencoder {theirs}, "
                     f"config.autoencoder.workdir={autoencoder_dir} is {mine}: decoding would "
                     f"not invert the encoding")
