"""Tokenizers for text: a small interface and the byte-level default (no vocabulary file).

A tokenizer maps str -> int32 ids in [0, vocab_size) and back. The models add one id,
`vocab_size`, for the mask (diffusion) or beginning of sequence (autoregressive), so a tokenizer
never emits it. Another tokenizer (characters, BPE from a package) plugs in by implementing
`Tokenizer` and registering a factory in `TOKENIZERS`.

References: Xue et al. 2022, "ByT5: Towards a Token-Free Future with Pre-trained Byte-to-Byte
Models" (UTF-8 bytes as tokens).
"""
from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from diffusion_jax import _checks


class Tokenizer(Protocol):
  """vocab_size: number of ids; encode(text) -> int32 [N]; decode(ids [N]) -> str."""
  vocab_size: int

  def encode(self, text: str) -> np.ndarray:
    ...

  def decode(self, ids: np.ndarray) -> str:
    ...


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255. Decoding replaces invalid byte sequences (a model may emit
  them) by U+FFFD, so any id sequence decodes."""
  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids: np.ndarray) -> str:
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() > 255):
      raise ValueError(f"byte ids must be in [0, 256); got values in [{ids.min()}, {ids.max()}].")
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


TOKENIZERS: dict[str, Callable[[], Tokenizer]] = {"bytes": ByteTokenizer}


def get_tokenizer(name: str) -> Tokenizer:
  """A tokenizer by name: 'bytes'."""
  return TOKENIZERS[_checks.check_choice("tokenizer", name, TOKENIZERS)]()
