"""Text for language models: tokenizers, corpora read from files, fixed-length packed sequences.

A corpus becomes training data in three steps, each a plain function:

  text = read_text("data/shakespeare/train.txt")       # a .txt file, or a folder of them
  tokenizer = CharTokenizer.from_text(text)             # or ByteTokenizer() (no vocabulary file)
  sequences = pack(tokenizer.encode(text), seq_len=256)  # int32 [N, 256], consecutive chunks

`make_text_train_iterator(sequences, ...)` then streams them exactly as the image pipeline
streams images: one global shuffled order per seed (`pipeline.ShuffledStream`), host h takes the
positions p % process_count == h, batches shaped [local_devices, per_device_batch, L], and the
iterator state is the number of sequences consumed (`get_state` / `set_state`, exact resume
under any process count with the same global batch).

A tokenizer is any object with `vocab_size`, `encode(str) -> int32 [n]` and
`decode(ids) -> str` (`Tokenizer`); `ByteTokenizer` (UTF-8 bytes, 256 ids) needs nothing, and
`CharTokenizer` (the corpus's characters, sorted) is saved beside a run as JSON so samples decode
the same way. Any other tokenizer (WordPiece, BPE, ...) plugs in as a zero-argument function
'package.module:function' that returns one (`FactoryTokenizer`; config `data.tokenizer`).

References: MDLM (Sahoo et al. 2024) and MD4 (Shi et al. 2024) train on packed fixed-length
sequences; text8 / enwik8 practice of holding out the corpus's last characters.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional, Protocol, Sequence

import numpy as np

from diffusion_jax.data import pipeline
from diffusion_jax.data.sources import DatasetInfo


class Tokenizer(Protocol):
  """Text <-> token ids; ids lie in [0, vocab_size)."""

  vocab_size: int

  def encode(self, text: str) -> np.ndarray:
    """int32 [n] ids of `text`."""

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """The text of ids [n]."""


class ByteTokenizer:
  """UTF-8 bytes as tokens: vocab_size 256, every string encodes, nothing to save.

  Decoding replaces byte sequences that are not valid UTF-8 (a sampled sequence may contain
  them) with U+FFFD.
  """

  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids)
    _check_ids(ids, self.vocab_size)
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def to_json(self) -> dict[str, Any]:
    return {"kind": "byte"}


class CharTokenizer:
  """One token per character of a fixed alphabet (the sorted characters of a corpus)."""

  def __init__(self, chars: Sequence[str]):
    chars = list(chars)
    if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars) or not chars:
      raise ValueError("chars must be a non-empty sequence of distinct single characters.")
    self.chars = chars
    self.vocab_size = len(chars)
    self._index = {c: i for i, c in enumerate(chars)}
    self._table = np.asarray(chars)

  @classmethod
  def from_text(cls, text: str) -> "CharTokenizer":
    """The tokenizer whose alphabet is every character of `text`, sorted by code point."""
    return cls(sorted(set(text)))

  def encode(self, text: str) -> np.ndarray:
    try:
      return np.fromiter((self._index[c] for c in text), np.int32, count=len(text))
    except KeyError as e:
      raise ValueError(f"character {e.args[0]!r} is not in this tokenizer's alphabet of "
                       f"{self.vocab_size} characters (built from another corpus?).") from None

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids)
    _check_ids(ids, self.vocab_size)
    return "".join(self._table[ids.reshape(-1)].tolist())

  def to_json(self) -> dict[str, Any]:
    return {"kind": "char", "chars": "".join(self.chars)}


class FactoryTokenizer:
  """A user's tokenizer, made by a zero-argument callable named 'package.module:function'.

  The callable returns any `Tokenizer` (vocab_size, encode, decode); this wrapper delegates to
  it and saves only the callable's name, so a restored run rebuilds the same tokenizer by
  importing and calling it again (the callable must be importable, and deterministic).
  """

  def __init__(self, factory: str):
    import importlib  # pylint: disable=import-outside-toplevel
    module, _, name = factory.partition(":")
    if not module or not name:
      raise ValueError(f"a tokenizer factory must be written 'package.module:function', got "
                       f"{factory!r}.")
    try:
      fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
      raise ValueError(f"cannot import the tokenizer factory {factory!r}: {e}") from e
    inner = fn()
    for attr in ("vocab_size", "encode", "decode"):
      if not hasattr(inner, attr):
        raise ValueError(f"the tokenizer made by {factory!r} has no {attr!r} (a tokenizer needs "
                         "vocab_size, encode(str) -> int [n] and decode(ids) -> str).")
    self.factory, self.inner = factory, inner
    self.vocab_size = int(inner.vocab_size)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.inner.encode(text), np.int32).reshape(-1)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids)
    _check_ids(ids, self.vocab_size)
    return self.inner.decode(ids)

  def to_json(self) -> dict[str, Any]:
    return {"kind": "factory", "factory": self.factory}


TOKENIZERS = ("byte", "char", "factory")


def tokenizer_from_json(spec: dict[str, Any]) -> ByteTokenizer | CharTokenizer | FactoryTokenizer:
  """The tokenizer `to_json()` described ({'kind': 'byte'}, {'kind': 'char', 'chars': ...} or
  {'kind': 'factory', 'factory': 'package.module:function'})."""
  kind = spec.get("kind")
  if kind == "byte":
    return ByteTokenizer()
  if kind == "char":
    return CharTokenizer(list(spec["chars"]))
  if kind == "factory":
    return FactoryTokenizer(spec["factory"])
  raise ValueError(f"Unknown tokenizer kind={kind!r}; allowed: {list(TOKENIZERS)}.")


def save_tokenizer(tokenizer: ByteTokenizer | CharTokenizer | FactoryTokenizer, path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(tokenizer.to_json(), f, ensure_ascii=False)


def load_tokenizer(path: str) -> ByteTokenizer | CharTokenizer | FactoryTokenizer:
  with open(path, encoding="utf-8") as f:
    return tokenizer_from_json(json.load(f))


def _check_ids(ids: np.ndarray, vocab_size: int) -> None:
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{ids.min()}, {ids.max()}] "
                     "(a mask token must be replaced before decoding).")


def read_text(path: str) -> str:
  """The text of a .txt file, or of every .txt file in a folder (sorted by name, newline-joined).

  Files are read as UTF-8; '\\r\\n' line ends become '\\n'.
  """
  if os.path.isdir(path):
    names = sorted(n for n in os.listdir(path) if n.endswith(".txt"))
    if not names:
      raise ValueError(f"no .txt files in the folder {path!r}.")
    parts = [read_text(os.path.join(path, n)) for n in names]
    return "\n".join(parts)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no text file or folder at {path!r}.")
  with open(path, encoding="utf-8") as f:
    return f.read().replace("\r\n", "\n")


def pack(ids: np.ndarray, seq_len: int, dtype: Any = np.int32) -> np.ndarray:
  """Consecutive, non-overlapping chunks of a token stream: [n // seq_len, seq_len] of `dtype`
  (int32; a large corpus may keep its tokens in a smaller unsigned dtype, which the train
  iterator widens per batch).

  The last n % seq_len tokens are dropped. ValueError if the stream is shorter than one chunk.
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}.")
  ids = np.asarray(ids, dtype).reshape(-1)
  n = ids.size // seq_len
  if n == 0:
    raise ValueError(f"{ids.size} tokens make no sequence of seq_len={seq_len}.")
  return ids[:n * seq_len].reshape(n, seq_len)


def split_holdout(text: str, holdout_fraction: float) -> tuple[str, str]:
  """(train, held-out): the held-out part is the last `holdout_fraction` of the characters."""
  if not 0.0 < holdout_fraction < 1.0:
    raise ValueError(f"holdout_fraction must lie in (0, 1), got {holdout_fraction}.")
  cut = int(round(len(text) * (1.0 - holdout_fraction)))
  return text[:cut], text[cut:]


class _TextBatch:
  """Batch index k of one host -> {'tokens': int32 [D, b, L]} (the image pipeline's layout)."""

  def __init__(self, sequences: np.ndarray, stream: pipeline.ShuffledStream, *,
               per_host_batch: int, process_index: int, process_count: int,
               num_local_devices: int):
    self.sequences, self.stream = sequences, stream
    self.per_host_batch, self.process_index = per_host_batch, process_index
    self.process_count, self.num_local_devices = process_count, num_local_devices

  def __call__(self, k: int) -> dict[str, np.ndarray]:
    local = k * self.per_host_batch + np.arange(self.per_host_batch, dtype=np.int64)
    positions = local * self.process_count + self.process_index
    tokens = self.sequences[self.stream.indices(positions)].astype(np.int32)
    return {"tokens": tokens.reshape(self.num_local_devices, -1, tokens.shape[-1])}


def make_text_train_iterator(sequences: np.ndarray, *, global_batch_size: int, seed: int,
                             process_index: Optional[int] = None,
                             process_count: Optional[int] = None,
                             num_local_devices: Optional[int] = None,
                             shuffle: bool = True, num_threads: int = 2,
                             prefetch: int = 4) -> pipeline.TrainIterator:
  """The endless, shuffled, sharded iterator over packed sequences [N, L] (any integer dtype).

  Yields {'tokens': int32 [num_local_devices, per_device_batch, L]}; the order, sharding and
  resume state follow `pipeline` (see this module's docstring). process_index, process_count and
  num_local_devices default to jax's.
  """
  sequences = np.asarray(sequences)
  if sequences.dtype.kind not in "iu":
    sequences = sequences.astype(np.int32)
  if sequences.ndim != 2 or not len(sequences):
    raise ValueError(f"sequences must be int [N, L] with N >= 1, got shape {sequences.shape}.")
  process_index, process_count, num_local_devices = pipeline.resolve_hosts(
      process_index, process_count, num_local_devices)
  per_host, _ = pipeline.check_batch_layout(global_batch_size, process_index, process_count,
                                            num_local_devices)
  stream = pipeline.ShuffledStream(len(sequences), int(seed), shuffle)
  batch_fn = _TextBatch(sequences, stream, per_host_batch=per_host, process_index=process_index,
                        process_count=process_count, num_local_devices=num_local_devices)
  info = DatasetInfo(image_shape=(int(sequences.shape[1]),), num_classes=0,
                     num_examples=int(len(sequences)))
  return pipeline.TrainIterator(batch_fn, global_batch_size=global_batch_size, info=info,
                                num_threads=num_threads, prefetch=prefetch)
