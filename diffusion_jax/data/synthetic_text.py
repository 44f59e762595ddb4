"""A synthetic TFDS text dataset (one sentence per record, like lm1b): for tests, built offline.

Record i of a split is `synthetic_sentence(i, split)`: its index, then seeded words drawn from a
small word list that includes non-ASCII words (so UTF-8 decoding is exercised and the byte and
character counts differ). Feature 'text' (`tfds.features.Text`, as lm1b has). Built offline, as
ArrayRecord, by the real TFDS machinery, without TensorFlow. Configs: 'tiny' (300 train / 40
test records) for tests, 'bench' (200,000 / 1,000; lm1b-like sentence lengths) for timing the
reader. Names: 'synthetic_text/tiny', 'synthetic_text/bench'.

References: TFDS `GeneratorBasedBuilder`; the lm1b builder's features ({'text': Text()}).
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from diffusion_jax.data.synthetic import SyntheticConfig

WORDS = ("the", "a", "masked", "diffusion", "model", "learns", "text", "café", "naïve", "über",
         "—", "déjà", "vu", "of", "tokens", "and", "bytes", "ünïcödé", "end", ".")


def synthetic_sentence(i: int, split: str) -> str:
  """The text of record i of `split` ('train' or 'test'): '<split> <i>: w1 w2 ...' (3-24 words)."""
  rng = np.random.default_rng([i, 0 if split == "train" else 1])
  words = rng.choice(len(WORDS), size=int(rng.integers(3, 25)))
  return f"{split} {i}: " + " ".join(WORDS[w] for w in words)


class SyntheticText(tfds.core.GeneratorBasedBuilder):
  """Synthetic one-sentence text records (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [SyntheticConfig(name="tiny", num_train=300, num_test=40),
                     SyntheticConfig(name="bench", num_train=200_000, num_test=1_000)]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Synthetic one-sentence text records, for tests.",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(self.builder_config.num_train, "train"),
            "test": self._generate_examples(self.builder_config.num_test, "test")}

  def _generate_examples(self, num: int, split: str):
    for i in range(num):
      yield i, {"text": synthetic_sentence(i, split)}
