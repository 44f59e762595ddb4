"""A dataset encoded once by an autoencoder: ArrayRecord shards of posterior means and stds.

Layout of a latent directory (written by `experiments.encode_latents`):
  latents.json                              metadata (`LatentMeta` as JSON)
  latents-00000-of-00012.array_record ...   one record per example, examples in split order

A record is raw little-endian bytes: label int32, then float32 [h, w, L] arrays in the order of
`meta.fields` ('mean', 'std', and with flips 'mean_flip', 'std_flip': the latents of the
horizontally flipped image, as DiT's feature extraction does). Latents are stored in diffusion
space: mean = (posterior mean - shift_factor) * scaling_factor, std = posterior std * scaling_factor,
so z = mean + std * eps is a posterior sample that a diffusion model trains on.

References: DiT `extract_features.py` (latents of flipped and unflipped images); LDM
(arXiv:2112.10752) Sec. 4.3.2 for the scale factor.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

META_FILE = "latents.json"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class LatentMeta:
  """What a latent directory holds.

  latent_shape: (h, w, L); image_shape: (H, W, C) of the encoded images; num_classes: 0 if
  unlabelled; shard_size: examples per shard (the last may hold fewer); flip: flipped latents too;
  vae: the autoencoder's {'name', 'overrides', 'source'} (model.json); data: the data config.
  """
  num_examples: int
  latent_shape: tuple[int, int, int]
  image_shape: tuple[int, int, int]
  num_classes: int
  shard_size: int
  flip: bool
  scaling_factor: float
  shift_factor: float | None
  vae: dict[str, Any]
  data: dict[str, Any]
  split: str
  format_version: int = FORMAT_VERSION

  @property
  def fields(self) -> tuple[str, ...]:
    return ("mean", "std") + (("mean_flip", "std_flip") if self.flip else ())

  @property
  def num_shards(self) -> int:
    return -(-self.num_examples // self.shard_size)

  def shard_path(self, directory: str, k: int) -> str:
    return os.path.join(directory, f"latents-{k:05d}-of-{self.num_shards:05d}.array_record")

  def shard_range(self, k: int) -> tuple[int, int]:
    return k * self.shard_size, min((k + 1) * self.shard_size, self.num_examples)

  def to_json(self) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> LatentMeta:
    d = dict(d)
    for key in ("latent_shape", "image_shape"):
      d[key] = tuple(d[key])
    return cls(**d)


def read_meta(directory: str) -> LatentMeta:
  """The metadata of a latent directory; FileNotFoundError if there is none."""
  path = os.path.join(directory, META_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: not a latent directory (see experiments.encode_latents)")
  with open(path) as f:
    return LatentMeta.from_json(json.load(f))


def to_records(meta: LatentMeta, labels: np.ndarray, arrays: dict[str, np.ndarray]) -> list[bytes]:
  """labels [n] and arrays {field: float32 [n, h, w, L]} -> n records."""
  n = len(labels)
  for f in meta.fields:
    if arrays[f].shape != (n, *meta.latent_shape):
      raise ValueError(f"{f} must have shape {(n, *meta.latent_shape)}, got {arrays[f].shape}")
  parts = [np.asarray(labels, "<i4").reshape(n, 1).view(np.uint8)]
  parts += [np.asarray(arrays[f], "<f4").reshape(n, -1).view(np.uint8) for f in meta.fields]
  rows = np.concatenate(parts, axis=1)
  return [row.tobytes() for row in rows]


def from_records(meta: LatentMeta, records: Sequence[bytes]) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Records -> ({field: float32 [n, h, w, L]}, labels int32 [n])."""
  size = int(np.prod(meta.latent_shape))
  flat = np.frombuffer(b"".join(records), np.uint8).reshape(len(records), -1)
  labels = flat[:, :4].copy().view("<i4")[:, 0].astype(np.int32)
  floats = flat[:, 4:].copy().view("<f4")
  out = {f: floats[:, i * size:(i + 1) * size].reshape(len(records), *meta.latent_shape)
         for i, f in enumerate(meta.fields)}
  return out, labels


class LatentSource:
  """Random access to an encoded split: `read(indices) -> ({field: [B, h, w, L]}, labels [B])`.

  Raises FileNotFoundError when a shard is missing (an unfinished encoding: rerun it to resume).
  """

  def __init__(self, directory: str):
    from array_record.python.array_record_data_source import ArrayRecordDataSource  # pylint: disable=g-import-not-at-top
    self.meta = read_meta(directory)
    paths = [self.meta.shard_path(directory, k) for k in range(self.meta.num_shards)]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
      raise FileNotFoundError(f"{len(missing)} of {len(paths)} shards missing in {directory} "
                              f"(first: {os.path.basename(missing[0])}); rerun the encoding to finish")
    self._source = ArrayRecordDataSource(paths)
    if len(self._source) != self.meta.num_examples:
      raise ValueError(f"{directory} holds {len(self._source)} records, its metadata says "
                       f"{self.meta.num_examples}")

  def __len__(self) -> int:
    return self.meta.num_examples

  def read(self, indices: Sequence[int]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    return from_records(self.meta, self._source.__getitems__([int(i) for i in indices]))


# Salt of the posterior-sample noise stream (distinct from the pipeline's flip stream).
_NOISE_SALT = 0x1A7E_17


class LatentTrainSource:
  """A latent directory as the training pipeline reads it: float32 latents instead of pixels.

  `info` is a `DatasetInfo` whose image_shape is the latent shape (h, w, L). `read_float(indices,
  positions, flips, seed)` -> (float32 [B, h, w, L], int32 [B]): the posterior mean, or with
  `sample=True` the sample mean + std * eps whose eps [h, w, L] is drawn from (seed, stream
  position) alone, so batches do not depend on hosts, threads or resumption; `flips` [B] bool
  picks the latents of the flipped image (a directory encoded with flips).
  """

  def __init__(self, directory: str, *, split: str, sample: bool, random_flip: bool):
    from diffusion_jax.data.sources import DatasetInfo  # pylint: disable=g-import-not-at-top
    self._latents = LatentSource(directory)
    meta = self.meta = self._latents.meta
    if split != meta.split:
      raise ValueError(f"data_config.split={split!r} but {directory} holds the latents of split "
                       f"{meta.split!r}; encode that split into its own directory")
    if random_flip and not meta.flip:
      raise ValueError(f"data_config.random_flip=True needs latents of flipped images: "
                       f"{directory} was encoded without --flip (flipping latents is not "
                       f"flipping images)")
    self.sample = bool(sample)
    self.info = DatasetInfo(tuple(meta.latent_shape), int(meta.num_classes), meta.num_examples)

  def __len__(self) -> int:
    return self.meta.num_examples

  def read(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    raise TypeError("latents are float32, not uint8 images: use read_float (load_split_as_numpy "
                    "and in-memory decoding apply to image datasets only)")

  def read_float(self, indices: Sequence[int], positions: np.ndarray | None = None,
                 flips: np.ndarray | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    arrays, labels = self._latents.read(indices)
    mean, std = arrays["mean"], arrays["std"]
    if flips is not None and np.any(flips):
      mean = np.where(flips[:, None, None, None], arrays["mean_flip"], mean)
      std = np.where(flips[:, None, None, None], arrays["std_flip"], std)
    if not self.sample:
      return np.ascontiguousarray(mean, np.float32), labels
    if positions is None:
      raise ValueError("positions are needed to draw posterior samples (sample=True)")
    eps = np.stack([np.random.default_rng([int(seed), _NOISE_SALT, int(p)]).standard_normal(
        self.meta.latent_shape, np.float32) for p in positions])
    return (mean + std * eps).astype(np.float32), labels
