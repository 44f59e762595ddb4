"""A synthetic TFDS image dataset whose pixels name their example: for tests and benchmarks.

Example i (of a split) is a 32x32x3 PNG whose row 0 is i % 256 everywhere, row 1 is i // 256
everywhere (both symmetric, so `example_id` survives a horizontal flip), row 2 is the column index
(so a flip is visible: `is_flipped`), and the other rows are seeded noise (so PNG decoding costs
about what CIFAR-10's does). label = i % 10. Built offline, as ArrayRecord, by the real TFDS
machinery. Configs: 'tiny' (240 train / 50 test) for tests, 'cifar_sized' (10,000 / 1,000) for
benchmarks. Names: 'synthetic_images/tiny', 'synthetic_images/cifar_sized'.

References: TFDS `GeneratorBasedBuilder` with `BUILDER_CONFIGS`.
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import tensorflow_datasets as tfds

SIZE = 32


def synthetic_image(i: int) -> np.ndarray:
  """uint8 [32, 32, 3]: the image of example i (see the module docstring)."""
  image = np.random.default_rng(i).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
  image[0] = i % 256
  image[1] = i // 256
  image[2] = np.arange(SIZE, dtype=np.uint8)[:, None]
  return image


def example_id(images: np.ndarray) -> np.ndarray:
  """uint8 [B, H>=2, W, C] images of this dataset (not resized) -> int64 [B] example ids."""
  return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 1, 0, 0].astype(np.int64)


def is_flipped(images: np.ndarray) -> np.ndarray:
  """uint8 [B, H>=3, W, C] images of this dataset -> bool [B], True if flipped left-right."""
  return images[:, 2, 0, 0] == SIZE - 1


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  """A config of the offline synthetic builders (images here, text in synthetic_text.py)."""
  num_train: int = 0
  num_test: int = 0


class SyntheticImages(tfds.core.GeneratorBasedBuilder):
  """Synthetic 32x32x3 images that encode their own index (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [
      SyntheticConfig(name="tiny", num_train=240, num_test=50),
      SyntheticConfig(name="cifar_sized", num_train=10_000, num_test=1_000),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Synthetic images encoding their index, for tests and benchmarks.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(SIZE, SIZE, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(self.builder_config.num_train),
            "test": self._generate_examples(self.builder_config.num_test)}

  def _generate_examples(self, num: int):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    for i in range(num):
      buffer = io.BytesIO()
      Image.fromarray(synthetic_image(i)).save(buffer, format="PNG")
      yield i, {"image": buffer.getvalue(), "label": i % 10}
