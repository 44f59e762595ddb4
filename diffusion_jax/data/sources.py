"""Random-access image sources: TFDS (ArrayRecord, via `tfds.data_source`), folders, arrays.

A source has `info` (a `DatasetInfo`), `len(source)` and `read(indices) -> (uint8 [B, H, W, C],
int32 [B])`. TFDS datasets are read with `tfds.data_source`, which needs the dataset prepared with
`file_format='array_record'` and never imports TensorFlow.

References: TFDS "Using grain / data sources" guide (tensorflow.org/datasets/api_docs/python/tfds/
data_source).
"""
from __future__ import annotations

import concurrent.futures
import difflib
import os
import socket
from typing import NamedTuple, Protocol, Sequence

import numpy as np

from diffusion_jax.data import images
from diffusion_jax.data.options import AUTO_IN_MEMORY_BYTES, DataOptions

_READ_CHUNK = 1024  # Examples decoded per task when loading a split into memory.


class DatasetInfo(NamedTuple):
  """image_shape: (H, W, C) as the pipeline emits it; num_classes: 0 if unlabelled."""
  image_shape: tuple[int, int, int]
  num_classes: int
  num_examples: int


class ImageSource(Protocol):
  info: DatasetInfo

  def __len__(self) -> int:
    ...

  def read(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """indices: [B] ints in [0, len) -> (uint8 [B, H, W, C], int32 [B])."""
    ...


class ArraySource:
  """A split held in host memory: images uint8 [N, H, W, C], labels int32 [N]."""

  def __init__(self, images_: np.ndarray, labels: np.ndarray, num_classes: int):
    if images_.dtype != np.uint8 or images_.ndim != 4 or labels.shape != images_.shape[:1]:
      raise ValueError(f"images must be uint8 [N, H, W, C] and labels [N], got "
                       f"{images_.dtype} {images_.shape} and {labels.shape}.")
    self.images, self.labels = images_, labels.astype(np.int32)
    self.info = DatasetInfo(tuple(images_.shape[1:]), num_classes, len(images_))

  def __len__(self) -> int:
    return len(self.images)

  def read(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    indices = np.asarray(indices)
    return self.images[indices], self.labels[indices]


def load_into_memory(source: ImageSource, num_threads: int = 4) -> ArraySource:
  """Decodes a whole source once (in chunks, on threads) into an `ArraySource`."""
  if isinstance(source, ArraySource):
    return source
  n = len(source)
  out = np.empty((n, *source.info.image_shape), np.uint8)
  labels = np.empty((n,), np.int32)

  def fill(start: int) -> None:
    stop = min(start + _READ_CHUNK, n)
    out[start:stop], labels[start:stop] = source.read(np.arange(start, stop))

  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    list(pool.map(fill, range(0, n, _READ_CHUNK)))
  return ArraySource(out, labels, source.info.num_classes)


def maybe_in_memory(source: ImageSource, options: DataOptions) -> ImageSource:
  """Applies options.in_memory: True, False, or 'auto' (if the split takes <= 1 GiB)."""
  nbytes = len(source) * int(np.prod(source.info.image_shape))
  if options.in_memory is True or (options.in_memory == "auto" and nbytes <= AUTO_IN_MEMORY_BYTES):
    return load_into_memory(source, options.num_threads)
  return source


# ----------------------------------------------------------------------------------------------
# TFDS


# Builders in this package that prepare offline, without TensorFlow: prepared on first use.
OFFLINE_BUILDERS = ("digits", "synthetic_images", "synthetic_text")


def _prepare_hint(name: str, data_dir: str) -> str:
  return (f"Prepare it once as ArrayRecord (this needs network, and TensorFlow for most builders: "
          f"pip install 'diffusion_jax[tensorflow]'):\n"
          f"  tfds build {name} --data_dir={data_dir} --file_format=array_record\n"
          f"or point data_config.data_dir at the folder that holds it "
          f"(data_config.download=True lets TFDS try to download and prepare it).")


# Where TFDS fetches metadata and most datasets from: probed once before a download, so that a
# machine without network fails in seconds instead of after TFDS's retries (~3.5 minutes).
NETWORK_PROBE = ("storage.googleapis.com", 443)
NETWORK_PROBE_TIMEOUT_S = 5.0


def network_error() -> str | None:
  """None if NETWORK_PROBE accepts a TCP connection (or a proxy is configured, which a direct
  probe cannot judge), else the reason as text."""
  if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
    return None
  try:
    with socket.create_connection(NETWORK_PROBE, timeout=NETWORK_PROBE_TIMEOUT_S):
      return None
  except OSError as e:
    return f"no network: cannot reach {NETWORK_PROBE[0]}:{NETWORK_PROBE[1]} ({e})"


def tfds_builder(options: DataOptions, key: str = "data_config.name"):
  """The TFDS builder of options.name, prepared (digits is prepared offline on first use).

  `key`: the config key that named the dataset, for error messages.

  Raises ValueError for an unknown name and FileNotFoundError for a dataset that is not prepared
  (and, with download=True, could not be downloaded and prepared).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # Registers the package's builders with TFDS.
  from diffusion_jax.data import digits, synthetic, synthetic_text  # noqa: F401  # pylint: disable=unused-import
  try:
    builder = tfds.builder(options.name, data_dir=options.data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    known = tfds.list_builders(with_community_datasets=False)
    close = difflib.get_close_matches(options.name, known, n=3)
    raise ValueError(
        f"Unknown dataset name {options.name!r} ({key}). Use 'digits' (offline, "
        f"bundled), 'folder' (with data_config.folder), or a TFDS dataset name"
        f"{'; did you mean ' + ', '.join(repr(c) for c in close) + '?' if close else '.'} "
        f"A TFDS dataset must be prepared in {options.data_dir}. "
        + _prepare_hint(options.name, options.data_dir)) from e
  if not builder.is_prepared():
    offline = options.name.split("/")[0] in OFFLINE_BUILDERS
    if offline or options.download:
      offline_reason = None if offline else network_error()
      if offline_reason:
        raise FileNotFoundError(
            f"Dataset {options.name!r} is not prepared in {options.data_dir} and preparing it "
            f"failed ({offline_reason}). " + _prepare_hint(options.name, options.data_dir))
      try:
        builder.download_and_prepare(file_format="array_record")
      except Exception as e:  # Network, TensorFlow or source errors: all end in the same advice.
        raise FileNotFoundError(
            f"Dataset {options.name!r} is not prepared in {options.data_dir} and preparing it "
            f"failed ({type(e).__name__}: {e}). " + _prepare_hint(options.name, options.data_dir)
        ) from e
    else:
      raise FileNotFoundError(
          f"Dataset {options.name!r} is not prepared in {options.data_dir} (download=False). "
          + _prepare_hint(options.name, options.data_dir))
  file_format = getattr(builder.info, "file_format", None)
  if file_format is not None and "array_record" not in str(file_format).lower():
    raise FileNotFoundError(
        f"Dataset {options.name!r} in {options.data_dir} is prepared as {file_format}, which "
        f"cannot be read without TensorFlow. Rebuild it as ArrayRecord: "
        f"tfds build {options.name} --data_dir={options.data_dir} --file_format=array_record")
  return builder


class TfdsSource:
  """A TFDS split read through `tfds.data_source` (ArrayRecord), resized as the options say."""

  def __init__(self, options: DataOptions, split: str):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = tfds_builder(options)
    features = builder.info.features
    if options.image_key not in features:
      raise ValueError(f"image_key {options.image_key!r} is not a feature of {options.name!r}; "
                       f"features: {sorted(features.keys())}.")
    image_feature = features[options.image_key]
    height, width, channels = image_feature.shape
    if height is None and not options.image_size:
      raise ValueError(f"{options.name!r} has images of varying size: set data_config.image_size.")
    self._label_key = options.label_key if options.label_key in features else None
    num_classes = (getattr(features[self._label_key], "num_classes", 0) or 0
                   if self._label_key else 0)
    self._source = tfds.data_source(options.name, split=split, data_dir=options.data_dir,
                                    download=False)
    self._options = options
    size = options.image_size
    shape = (size, size, channels) if size else (height, width, channels)
    self.info = DatasetInfo(shape, int(num_classes), len(self._source))

  def __len__(self) -> int:
    return self.info.num_examples

  def read(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    examples = self._source.__getitems__([int(i) for i in indices])
    o = self._options
    pixels = np.stack([images.resize_array(np.asarray(ex[o.image_key]), o.image_size, o.crop,
                                           o.resize_method) for ex in examples])
    if self._label_key:
      labels = np.asarray([ex[self._label_key] for ex in examples], np.int32)
    else:
      labels = np.zeros((len(examples),), np.int32)
    return pixels, labels


def open_source(options: DataOptions, split: str, *, in_memory: bool = True) -> ImageSource:
  """The source of options.name ('folder', 'latents' or a TFDS name, 'digits' included) for a
  split ('latents': a `latents.LatentTrainSource`, float32 latents through `read_float`).

  A folder has no splits: `split` is ignored for it (the whole folder is read).
  in_memory=False ignores options.in_memory and streams (used by `get_dataset_info`).
  """
  if options.name == "latents":
    from diffusion_jax.data import latents  # pylint: disable=g-import-not-at-top
    return latents.LatentTrainSource(options.latents_dir, split=split,
                                     sample=options.latent_sample,
                                     random_flip=options.random_flip)
  if options.name == "folder":
    from diffusion_jax.data import folder  # pylint: disable=g-import-not-at-top
    return folder.open_folder(options, in_memory=None if in_memory else False)
  source = TfdsSource(options, split)
  return maybe_in_memory(source, options) if in_memory else source
