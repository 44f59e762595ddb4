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


def _integer_grey_to_8bit(pil):
  """16-bit (and 32-bit integer) grey images -> 8-bit 'L' by round(v * 255 / 65535).

  PIL opens a 16-bit grey PNG / TIFF as mode 'I;16' (or 'I'), and `convert('L')` clips every value
  above 255 to 255 (an almost all-white image). Other modes pass through unchanged (PIL itself
  reduces 16-bit RGB / RGBA / grey+alpha PNGs to 8 bits by their high byte). Floating-point
  images ('F') have no agreed pixel range: a ValueError.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if pil.mode == "F":
    raise ValueError("floating-point images (PIL mode 'F') are not supported: save them as 8- or "
                     "16-bit integers.")
  if not (pil.mode == "I" or pil.mode.startswith("I;16")):
    return pil
  values = np.asarray(pil).astype(np.int64)
  if values.size and (values.min() < 0 or values.max() > 65535):
    raise ValueError(f"integer image values must lie in 0..65535 (16-bit), got "
                     f"{values.min()}..{values.max()}.")
  return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), mode="L")


def decode_file_bytes(data: bytes, channels: int, image_size: Optional[int], crop: str,
                      resize_method: str) -> np.ndarray:
  """Decodes PNG/JPEG/... bytes with PIL -> uint8 [H, W, channels] (resized if image_size).

  Any PIL mode: grey ('L'), 1-bit ('1': 0 / 255), palette ('P', looked up), RGB, RGBA and
  grey+alpha (the alpha channel is dropped, as torchvision's ImageFolder does), 16-bit grey
  (scaled to 8 bits, see `_integer_grey_to_8bit`); colour to grey by PIL's ITU-R 601-2 luma.
  Raises whatever PIL raises on a corrupt or truncated file (the caller adds the path).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(data)) as pil:
    pil.load()  # Decode fully now: a truncated file fails here, not later.
    pil = _integer_grey_to_8bit(pil).convert("L" if channels == 1 else "RGB")
  array = np.asarray(resize_pil(pil, image_size, crop, resize_method))
  return array[..., None] if channels == 1 else array
