"""Image decoding, cropping and resizing on the host (PIL, uint8 in, uint8 out).

References: ADM (Dhariwal & Nichol 2021) `image_datasets.center_crop_arr`: crop the central square
of the shorter side, then resize.
"""
from __future__ import annotations

import io
from typing import Optional

import numpy as np

CROPS = ("center", "none")
RESIZE_METHODS = ("bicubic", "bilinear", "nearest", "area", "lanczos")
CHANNELS = (1, 3)


def check_options(crop: str, resize_method: str) -> None:
  """Raises a ValueError naming the argument for an unknown crop or resize method."""
  if crop not in CROPS:
    raise ValueError(f"crop must be one of {CROPS}, got {crop!r}.")
  if resize_method not in RESIZE_METHODS:
    raise ValueError(f"resize_method must be one of {RESIZE_METHODS}, got {resize_method!r}.")


def _pil_filter(resize_method: str):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return {
      "bicubic": Image.Resampling.BICUBIC,
      "bilinear": Image.Resampling.BILINEAR,
      "nearest": Image.Resampling.NEAREST,
      "area": Image.Resampling.BOX,
      "lanczos": Image.Resampling.LANCZOS,
  }[resize_method]


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
  """The (left, top, right, bottom) box of the central square of side min(width, height)."""
  side = min(width, height)
  left, top = (width - side) // 2, (height - side) // 2
  return left, top, left + side, top + side


def resize_pil(image, image_size: Optional[int], crop: str, resize_method: str):
  """Crops (if `crop == 'center'`) and resizes a PIL image to image_size x image_size.

  `image_size=None` keeps the image as it is. Downsampling is antialiased (PIL's filters widen with
  the scale factor).
  """
  if not image_size:
    return image
  if crop == "center" and image.width != image.height:
    image = image.crop(center_crop_box(image.width, image.height))
  if image.size != (image_size, image_size):
    image = image.resize((image_size, image_size), resample=_pil_filter(resize_method))
  return image


def resize_array(image: np.ndarray, image_size: Optional[int], crop: str = "center",
                 resize_method: str = "bicubic") -> np.ndarray:
  """Crops and resizes a uint8 [H, W, C] array (C = 1 or 3) -> uint8 [S, S, C]."""
  if not image_size or image.shape[:2] == (image_size, image_size):
    return image
  from PIL import Image  # pylint: disable=g-import-not-at-top
  channels = image.shape[-1]
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  out = np.asarray(resize_pil(pil, image_size, crop, resize_method))
  return out[..., None] if channels == 1 else out


def decode_file_bytes(data: bytes, channels: int, image_size: Optional[int], crop: str,
                      resize_method: str) -> np.ndarray:
  """Decodes PNG/JPEG/... bytes with PIL -> uint8 [H, W, channels] (resized if image_size).

  Raises whatever PIL raises on a corrupt or truncated file (the caller adds the path).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(data)) as pil:
    pil.load()  # Decode fully now: a truncated file fails here, not later.
    pil = pil.convert("L" if channels == 1 else "RGB")
  array = np.asarray(resize_pil(pil, image_size, crop, resize_method))
  return array[..., None] if channels == 1 else array
