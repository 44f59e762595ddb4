"""The data options, read once from a data config and validated eagerly.

`data_config` is a mapping (an `ml_collections.ConfigDict` or a dict) of the `DataOptions` fields;
`name` is required, the others have the defaults below (the same as
`diffusion_jax/training/default_config.py` declares, which a test checks).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from diffusion_jax import _checks
from diffusion_jax.data import images

ON_CORRUPT = ("raise", "skip")
IN_MEMORY = ("auto", True, False)
DEFAULT_DATA_DIR_ENV = "DIFFUSION_JAX_DATA_DIR"
# Decode a whole split into host memory when it takes at most this many bytes (in_memory='auto').
AUTO_IN_MEMORY_BYTES = 1 << 30


def default_data_dir() -> str:
  """`$DIFFUSION_JAX_DATA_DIR`, else `~/tensorflow_datasets` (TFDS's own default)."""
  return os.environ.get(DEFAULT_DATA_DIR_ENV) or os.path.expanduser("~/tensorflow_datasets")


@dataclasses.dataclass(frozen=True)
class DataOptions:
  """Resolved data options.

  name: 'digits', 'folder', 'latents', or a TFDS dataset name (e.g. 'cifar10', 'mnist').
  data_dir: TFDS data dir (where prepared datasets live).
  split: the training split (TFDS split syntax, e.g. 'train[:90%]'); eval_split: the test split.
  image_size: side of the square output; None/0 keeps the native size.
  random_flip: random horizontal flips in the training iterator.
  folder: the image folder when name == 'folder'.
  on_corrupt: 'raise' or 'skip' (with a warning naming each file) for unreadable images.
  crop: 'center' (central square, then resize) or 'none' (resize, aspect ratio not kept).
  resize_method: PIL filter, one of images.RESIZE_METHODS.
  channels: folder images are converted to 1 (grey) or 3 (RGB) channels.
  in_memory: 'auto' (decode the split into host memory if <= 1 GiB), True or False.
  shuffle: shuffle the training stream (per epoch, by seed).
  download: let TFDS download and prepare a missing dataset (needs network, often TensorFlow).
  num_threads, prefetch: grain read threads and prefetch depth in batches (at least num_threads;
    num_threads=0 reads synchronously).
  num_workers: > 0 makes training batches in that many processes (grain mp_prefetch), for
    datasets streamed from disk whose decoding one process cannot keep up with.
  image_key, label_key: TFDS feature names.
  latents_dir: name == 'latents': a directory written by `experiments.encode_latents`; the
    'images' are then float32 latents (h, w, L) in diffusion space, not pixels.
  latent_sample: latents only: train on a posterior sample z = mean + std * eps (eps drawn from
    the seed and the stream position) instead of the posterior mean.
  text_dir, seq_len, tokenizer: text runs (name 'text'), read by `training.text_run`.
  tfds_name, text_key: a text run on a TFDS text dataset (e.g. 'lm1b') instead of text_dir: the
    records of feature text_key in `split` (training) and `eval_split` (held-out), read by
    `data.text_tfds` from data_dir. text_cache_dir: where the tokenized TFDS text is saved
    once and memory-mapped by later starts (None: encode the split at every start).
  """
  name: str
  data_dir: str
  split: str = "train"
  eval_split: str = "test"
  image_size: Optional[int] = None
  random_flip: bool = False
  folder: Optional[str] = None
  on_corrupt: str = "raise"
  crop: str = "center"
  resize_method: str = "bicubic"
  channels: int = 3
  in_memory: Any = "auto"
  shuffle: bool = True
  download: bool = False
  num_threads: int = 4
  prefetch: int = 4
  num_workers: int = 0
  image_key: str = "image"
  label_key: str = "label"
  latents_dir: Optional[str] = None
  latent_sample: bool = True
  text_dir: Optional[str] = None
  seq_len: int = 256
  tokenizer: str = "char"
  tfds_name: Optional[str] = None
  text_key: str = "text"
  text_cache_dir: Optional[str] = None

  @classmethod
  def from_config(cls, config: Any) -> "DataOptions":
    """Reads and validates a data config: a mapping (dict or `ConfigDict`) of the fields above.

    Keys left out, or set to None, take the defaults above; `data_dir` then defaults to
    `default_data_dir()`. An unknown key is a ValueError naming the nearest fields.
    """
    given = {k: v for k, v in dict(config).items() if v is not None}
    _checks.check_keys("the data config", given, [f.name for f in dataclasses.fields(cls)])
    name = given.get("name")
    if not isinstance(name, str) or not name:
      raise ValueError(f"data_config.name must be 'digits', 'folder', 'latents' or a TFDS name, got {name!r}.")
    given["data_dir"] = os.path.expanduser(str(given.get("data_dir") or default_data_dir()))
    options = cls(**given)
    options.validate()
    return options

  def validate(self) -> None:
    if self.on_corrupt not in ON_CORRUPT:
      raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {self.on_corrupt!r}.")
    images.check_options(self.crop, self.resize_method)
    if self.channels not in images.CHANNELS:
      raise ValueError(f"channels must be one of {images.CHANNELS}, got {self.channels!r}.")
    if self.in_memory not in IN_MEMORY:
      raise ValueError(f"in_memory must be one of {IN_MEMORY}, got {self.in_memory!r}.")
    if self.image_size and (int(self.image_size) != self.image_size or self.image_size < 1):
      raise ValueError(f"image_size must be a positive int or None, got {self.image_size!r}.")
    if self.name == "latents" and not self.latents_dir:
      raise ValueError("data_config.latents_dir must be set when data_config.name == 'latents' "
                       "(a directory written by experiments.encode_latents).")
    if self.name == "folder" and not self.folder:
      raise ValueError("data_config.folder must be set when data_config.name == 'folder'.")
    for key in ("num_threads", "prefetch", "num_workers"):
      if int(getattr(self, key)) < 0:
        raise ValueError(f"{key} must be >= 0, got {getattr(self, key)!r}.")
