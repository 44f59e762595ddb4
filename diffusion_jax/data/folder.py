"""A folder of images (PNG, JPEG, ...) as an image source, with optional class sub-folders.

Layout: if `folder` holds images at its top level, the dataset is unlabelled (num_classes = 0,
labels 0) and every image below it is read; otherwise each top-level sub-folder is a class
(label = index of its name in sorted order) holding images at any depth. Files are sorted by
path, so the order is deterministic.

Opening decodes every file once (on threads) to find corrupt ones before training starts: they
are reported by path and either raise (`on_corrupt='raise'`) or are skipped with a warning
(`'skip'`). When the decoded split is small enough (`in_memory`), that pass also fills the
in-memory copy, so nothing is decoded twice.

References: torchvision `datasets.ImageFolder` (the class-per-sub-folder convention); ADM
`image_datasets.py` (center crop then resize).
"""
from __future__ import annotations

import concurrent.futures
import os
import warnings
from typing import Optional, Sequence

import numpy as np

from diffusion_jax.data import images
from diffusion_jax.data.options import AUTO_IN_MEMORY_BYTES, DataOptions
from diffusion_jax.data.sources import ArraySource, DatasetInfo, ImageSource

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_MAX_LISTED = 20  # Corrupt paths named in one message.


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _walk_images(root: str) -> list[str]:
  found = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
  return sorted(found)


def scan_folder(root: str) -> tuple[list[str], np.ndarray, list[str]]:
  """Lists the images under root -> (paths, int32 labels [N], class names)."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"data_config.folder {root!r} is not a directory.")
  entries = sorted(os.listdir(root))
  if any(_is_image(e) and os.path.isfile(os.path.join(root, e)) for e in entries):
    paths = _walk_images(root)
    return paths, np.zeros((len(paths),), np.int32), []
  classes, paths, labels = [], [], []
  for entry in entries:
    sub = os.path.join(root, entry)
    if entry.startswith(".") or not os.path.isdir(sub):
      continue
    found = _walk_images(sub)
    if found:
      labels.extend([len(classes)] * len(found))
      paths.extend(found)
      classes.append(entry)
  if not paths:
    raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}.")
  return paths, np.asarray(labels, np.int32), classes


def _decode_path(path: str, options: DataOptions) -> np.ndarray:
  with open(path, "rb") as f:
    data = f.read()
  return images.decode_file_bytes(data, options.channels, options.image_size, options.crop,
                                  options.resize_method)


class FolderSource:
  """Streams decoded images from a list of files (already checked by `open_folder`)."""

  def __init__(self, paths: Sequence[str], labels: np.ndarray, info: DatasetInfo,
               options: DataOptions):
    self.paths, self.labels, self.info, self._options = list(paths), labels, info, options

  def __len__(self) -> int:
    return len(self.paths)

  def read(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    indices = np.asarray(indices)
    out = np.empty((len(indices), *self.info.image_shape), np.uint8)
    for j, i in enumerate(indices):
      try:
        out[j] = _decode_path(self.paths[i], self._options)
      except Exception as e:
        raise OSError(f"Cannot read image {self.paths[i]!r}: {type(e).__name__}: {e}") from e
    return out, self.labels[indices]


def open_folder(options: DataOptions, *, in_memory: Optional[bool] = None) -> ImageSource:
  """Scans and checks options.folder -> an `ArraySource` (in memory) or a `FolderSource`.

  in_memory overrides options.in_memory when given. Raises ValueError naming the corrupt files
  (on_corrupt='raise') or images of different sizes without image_size.
  """
  paths, labels, classes = scan_folder(options.folder)
  channels = options.channels
  want = options.in_memory if in_memory is None else in_memory
  if options.image_size:
    side = options.image_size
  else:  # Estimate from the first image's header (PIL reads no pixels for .size).
    from PIL import Image  # pylint: disable=g-import-not-at-top
    try:
      with Image.open(paths[0]) as first:
        side = int(np.sqrt(first.size[0] * first.size[1]))
    except Exception:  # Corrupt first file: reported by the pass below.
      side = 0
  store = want is True or (want == "auto" and len(paths) * side * side * channels
                           <= AUTO_IN_MEMORY_BYTES)
  decoded: list = [None] * len(paths)  # Arrays if store, else only their shapes.
  errors: dict[int, str] = {}

  def check(i: int) -> None:
    try:
      image = _decode_path(paths[i], options)
      decoded[i] = image if store else image.shape
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on bad files.
      errors[i] = f"{type(e).__name__}: {e}"

  with concurrent.futures.ThreadPoolExecutor(max(1, options.num_threads)) as pool:
    list(pool.map(check, range(len(paths))))
  if errors:
    listed = "\n".join(f"  {paths[i]}: {msg}" for i, msg in sorted(errors.items())[:_MAX_LISTED])
    more = f"\n  ... and {len(errors) - _MAX_LISTED} more" if len(errors) > _MAX_LISTED else ""
    message = f"{len(errors)} unreadable image(s) in {options.folder!r}:\n{listed}{more}"
    if options.on_corrupt == "raise":
      raise ValueError(message + "\n(set data_config.on_corrupt='skip' to skip them)")
    warnings.warn(message + "\n(skipped: on_corrupt='skip')", RuntimeWarning, stacklevel=2)
  keep = [i for i in range(len(paths)) if i not in errors]
  if not keep:
    raise ValueError(f"No readable images in {options.folder!r}.")
  shapes = {decoded[i].shape if store else decoded[i] for i in keep}
  if len(shapes) > 1:
    raise ValueError(f"Images in {options.folder!r} have different sizes {sorted(shapes)[:5]}: "
                     f"set data_config.image_size to resize them (crop={options.crop!r}).")
  shape = shapes.pop()
  assert shape[-1] == channels
  info = DatasetInfo(tuple(shape), len(classes), len(keep))
  if store:
    return ArraySource(np.stack([decoded[i] for i in keep]), labels[keep], len(classes))
  return FolderSource([paths[i] for i in keep], labels[keep], info, options)
