"""Text data: a file or a folder of .txt files, tokenized once, packed into fixed-length
sequences, served by the same sharded, resumable training stream as images.

The corpus is the files' UTF-8 text (a folder: its *.txt files in sorted order, each followed by
one blank line), encoded into one token stream. Split: the last `eval_fraction` of the stream is
'test', the rest 'train' (contiguous, so no sequence straddles the two). Each split is cut into
non-overlapping sequences of `seq_len` tokens (packing; the remainder is dropped): example i is
tokens [i L, (i + 1) L) of the split. Training batches follow `pipeline.ShuffledStream`: a
per-epoch permutation of the sequences by seed, host h taking the stream positions
p % process_count == h, and the iterator state is the number of sequences seen (exact resume,
valid under any process count with the same global batch size).

Batches: {'tokens': int32 [num_local_devices, per_device_batch, L]}; the evaluation pass adds
'mask': bool [D, b] (padding False).

References: Radford et al. 2019 (GPT-2: packed fixed-length training sequences); big_vision
`input_pipeline.py` (per-host batches).
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Optional

import numpy as np

from diffusion_jax.data import pipeline
from diffusion_jax.data.sources import DatasetInfo
from diffusion_jax.data.tokenizers import Tokenizer

SPLITS = ("train", "test")


def read_corpus(path: str) -> str:
  """The text of a .txt file, or of a folder's *.txt files (sorted, each + a blank line)."""
  if os.path.isdir(path):
    names = sorted(n for n in os.listdir(path) if n.endswith(".txt"))
    if not names:
      raise ValueError(f"text folder {path!r} has no .txt files.")
    parts = []
    for name in names:
      with open(os.path.join(path, name), encoding="utf-8") as f:
        parts.append(f.read().rstrip("\n") + "\n\n")
    return "".join(parts)
  if not os.path.isfile(path):
    raise ValueError(f"text path {path!r} is neither a file nor a folder.")
  with open(path, encoding="utf-8") as f:
    return f.read()


class TextSource:
  """Packed sequences of one split: `read(indices [B]) -> int32 [B, L]`, `len()` sequences."""

  def __init__(self, tokens: np.ndarray, seq_len: int, vocab_size: int):
    if seq_len < 1:
      raise ValueError(f"seq_len must be >= 1, got {seq_len}.")
    count = len(tokens) // seq_len
    if count == 0:
      raise ValueError(f"the split has {len(tokens)} tokens, fewer than seq_len={seq_len}.")
    self.sequences = np.asarray(tokens[:count * seq_len], np.int32).reshape(count, seq_len)
    self.info = DatasetInfo(image_shape=(seq_len,), num_classes=0, num_examples=count)
    self.vocab_size = vocab_size

  def __len__(self) -> int:
    return self.sequences.shape[0]

  def read(self, indices: np.ndarray) -> np.ndarray:
    return self.sequences[np.asarray(indices)]


def open_text(path: str, tokenizer: Tokenizer, *, seq_len: int, split: str = "train",
              eval_fraction: float = 0.05) -> TextSource:
  """The packed sequences of `split` ('train' or 'test') of the corpus at `path`."""
  if split not in SPLITS:
    raise ValueError(f"Unknown split={split!r}; allowed: {list(SPLITS)}.")
  if not 0.0 < eval_fraction < 1.0:
    raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}.")
  tokens = tokenizer.encode(read_corpus(path))
  cut = len(tokens) - int(round(eval_fraction * len(tokens)))
  part = tokens[:cut] if split == "train" else tokens[cut:]
  return TextSource(part, seq_len, tokenizer.vocab_size)


class _TextBatch:
  """Batch k of one host -> {'tokens': int32 [D, b, L]} (the `pipeline.TrainIterator` contract:
  a callable with a `stream`)."""

  def __init__(self, source: TextSource, stream: pipeline.ShuffledStream, *, per_host_batch: int,
               process_index: int, process_count: int, num_local_devices: int):
    self.source, self.stream = source, stream
    self.per_host_batch, self.process_index = per_host_batch, process_index
    self.process_count, self.num_local_devices = process_count, num_local_devices

  def __call__(self, k: int) -> dict[str, np.ndarray]:
    local = k * self.per_host_batch + np.arange(self.per_host_batch, dtype=np.int64)
    positions = local * self.process_count + self.process_index
    tokens = self.source.read(self.stream.indices(positions))
    return pipeline._shape({"tokens": tokens}, self.num_local_devices)


def make_text_train_iterator(source: TextSource, *, global_batch_size: int, seed: int,
                             shuffle: bool = True, process_index: Optional[int] = None,
                             process_count: Optional[int] = None,
                             num_local_devices: Optional[int] = None, num_threads: int = 0,
                             prefetch: int = 2) -> pipeline.TrainIterator:
  """The endless, shuffled, sharded stream of `source`'s sequences, with get_state/set_state.

  Yields {'tokens': int32 [num_local_devices, per_device_batch, L]}.
  """
  process_index, process_count, num_local_devices = pipeline._resolve_hosts(
      process_index, process_count, num_local_devices)
  per_host, _ = pipeline._check_batch(global_batch_size, process_index, process_count,
                                      num_local_devices)
  stream = pipeline.ShuffledStream(len(source), int(seed), shuffle)
  batch_fn = _TextBatch(source, stream, per_host_batch=per_host, process_index=process_index,
                        process_count=process_count, num_local_devices=num_local_devices)
  return pipeline.TrainIterator(batch_fn, global_batch_size=global_batch_size, info=source.info,
                                num_threads=num_threads, prefetch=prefetch)


def text_eval_batches(source: TextSource, *, global_batch_size: int,
                      process_index: Optional[int] = None, process_count: Optional[int] = None,
                      num_local_devices: Optional[int] = None) -> Iterator[dict[str, Any]]:
  """One pass over every sequence in order: host h takes sequences h, h + process_count, ...;
  batches {'tokens': int32 [D, b, L], 'mask': bool [D, b]}, padded (mask False) to the same
  number of batches on every host."""
  process_index, process_count, num_local_devices = pipeline._resolve_hosts(
      process_index, process_count, num_local_devices)
  per_host, _ = pipeline._check_batch(global_batch_size, process_index, process_count,
                                      num_local_devices)
  mine = np.arange(process_index, len(source), process_count)
  num_batches = -(-(-(-len(source) // process_count)) // per_host)
  for k in range(num_batches):
    indices = mine[k * per_host:(k + 1) * per_host]
    mask = np.zeros((per_host,), bool)
    mask[:len(indices)] = True
    padded = np.zeros((per_host,), np.int64)
    padded[:len(indices)] = indices
    yield pipeline._shape({"tokens": source.read(padded), "mask": mask}, num_local_devices)
