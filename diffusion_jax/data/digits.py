"""scikit-learn's bundled handwritten digits as a TFDS dataset, prepared offline.

The 1,797 8x8 grey images (values 0..16, labels 0..9) ship inside scikit-learn, so this builder
needs no network and no TensorFlow: it writes ArrayRecord files with PNG-encoded images.

Pixel mapping (lossless): the stored uint8 value is u = round(v * 255 / 16) for the original
v in 0..16, computed exactly in integers as (255 v + 8) // 16; the inverse v = round(u * 16 / 255)
recovers v exactly (`digits_to_uint8`, `uint8_to_digits`). Split: the first 1,500 images (in
scikit-learn's order) are `train`, the remaining 297 are `test` (every class has 27..33 of them).

References: Alpaydin & Kaynak, "Optical Recognition of Handwritten Digits", UCI ML Repository
(1998); scikit-learn `sklearn.datasets.load_digits`.
"""
from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds

NUM_TRAIN = 1500
NUM_EXAMPLES = 1797


def digits_to_uint8(values: np.ndarray) -> np.ndarray:
  """Maps digit intensities 0..16 (any real dtype holding integers) to uint8 round(v * 255 / 16)."""
  v = np.asarray(values)
  if v.size and (v.min() < 0 or v.max() > 16 or np.any(v != np.round(v))):
    raise ValueError("values must be integers in 0..16.")
  v = v.astype(np.int64)
  return ((255 * v + 8) // 16).astype(np.uint8)


def uint8_to_digits(pixels: np.ndarray) -> np.ndarray:
  """Inverse of `digits_to_uint8`: round(u * 16 / 255) as int64."""
  u = np.asarray(pixels).astype(np.int64)
  return (16 * u + 127) // 255


def _png_bytes(image: np.ndarray) -> bytes:
  """Encodes a uint8 [H, W, 1] image as PNG bytes with PIL (no TensorFlow needed)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0], mode="L").save(buffer, format="PNG")
  return buffer.getvalue()


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits (1,500 train / 297 test), stored losslessly as uint8."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: u = round(v * 255 / 16), train = first 1,500."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=("scikit-learn's bundled handwritten digits, 8x8 grey, 10 classes; pixel "
                     "u = round(v * 255 / 16) of the original 0..16 intensity v."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=10),
            "id": tfds.features.Scalar(dtype=np.int32),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,  # Keep scikit-learn's order: record i is image i of the split.
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
    )

  def _split_generators(self, dl_manager):  # No download: the data ships with scikit-learn.
    del dl_manager
    return {
        "train": self._generate_examples(0, NUM_TRAIN),
        "test": self._generate_examples(NUM_TRAIN, NUM_EXAMPLES),
    }

  def _generate_examples(self, start: int, stop: int):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    images = digits_to_uint8(digits.images)[..., None]  # [1797, 8, 8, 1]
    for i in range(start, stop):
      yield i, {"image": _png_bytes(images[i]), "label": int(digits.target[i]), "id": i}
