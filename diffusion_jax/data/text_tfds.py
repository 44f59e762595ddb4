"""Text records of a TFDS dataset (lm1b, a text8-like builder, ...) as one token stream.

A TFDS text dataset holds one string per record (lm1b: one sentence) in a `Text` feature
(`text_key`, default 'text'). A split becomes training data as a file corpus does:

  stream = tfds_token_stream(options, 'train', tokenizer)   # records joined by '\\n', encoded
  sequences = text.pack(stream, seq_len, dtype=stream.dtype)  # [N, L], consecutive chunks

The records are read in order through `tfds.data_source` (ArrayRecord, never TensorFlow, as the
image path reads; `sources.tfds_builder` prepares or explains), decoded as UTF-8 and joined by
RECORD_SEPARATOR, the separator `text.read_text` puts between the files of a folder. Encoding
goes by chunks of records whose boundaries fall on separators, so for a tokenizer that encodes
text piece by piece (bytes, characters) the stream is exactly `tokenizer.encode` of the whole
joined text: the same sequences as writing the records to a .txt file, one per line, and packing
that file. Tokens are held in the smallest unsigned dtype that fits the vocabulary (a byte
token takes one byte of host memory, not four); with `data.text_cache_dir` the encoded stream
is saved once and memory-mapped by every later start.

References: TFDS `data_source` guide; the lm1b builder ({'text': Text()}, splits train / test).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import threading
from typing import Any, Iterator

import numpy as np

from diffusion_jax.data import sources
from diffusion_jax.data.options import DataOptions

RECORD_SEPARATOR = "\n"
_CHUNK = 4096  # records read, decoded and encoded per task
_CACHE_FORMAT = 1  # bump when the cached content's meaning changes


def token_dtype(vocab_size: int) -> np.dtype:
  """The smallest unsigned dtype holding ids in [0, vocab_size): uint8, uint16 or uint32."""
  for dtype in (np.uint8, np.uint16, np.uint32):
    if vocab_size <= np.iinfo(dtype).max + 1:
      return np.dtype(dtype)
  raise ValueError(f"vocab_size must be <= 2**32, got {vocab_size}.")


def tfds_options(data_config: Any) -> DataOptions:
  """`DataOptions` of a text run's data config with `name` = `data.tfds_name` (for the builder)."""
  config = dict(data_config)
  tfds_name = config.get("tfds_name")
  if not isinstance(tfds_name, str) or not tfds_name:
    raise ValueError(f"data.tfds_name must name a TFDS text dataset (e.g. 'lm1b'), got "
                     f"{tfds_name!r}.")
  return DataOptions.from_config({**config, "name": tfds_name})


class _Records:
  """A split's records in order, in chunks of decoded strings."""

  def __init__(self, options: DataOptions, split: str):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = sources.tfds_builder(options, key="data.tfds_name")
    features = builder.info.features
    if options.text_key not in features:
      raise ValueError(f"data.text_key {options.text_key!r} is not a feature of "
                       f"{options.name!r}; features: {sorted(features.keys())}.")
    self.key, self.name, self.split = options.text_key, options.name, split
    self.version = str(builder.info.version)
    self.source = tfds.data_source(options.name, split=split, data_dir=options.data_dir,
                                   download=False)
    self.num_threads = max(1, int(options.num_threads))

  def chunk(self, start: int) -> list[str]:
    stop = min(start + _CHUNK, len(self.source))
    out = []
    for i, example in zip(range(start, stop), self.source.__getitems__(list(range(start, stop))),
                          strict=True):
      value = example[self.key]
      if isinstance(value, np.ndarray):
        value = value.item()
      if isinstance(value, bytes):
        try:
          value = value.decode("utf-8")
        except UnicodeDecodeError as e:
          raise ValueError(f"record {i} of {self.name!r} split {self.split!r} is not UTF-8 "
                           f"({e}).") from None
      if not isinstance(value, str):
        raise ValueError(f"data.text_key {self.key!r} of {self.name!r} holds "
                         f"{type(value).__name__}, not text.")
      out.append(value)
    return out

  def map_chunks(self, fn) -> Iterator[Any]:
    """fn(chunk_index, strings) over the chunks, on threads, results in record order."""
    starts = range(0, len(self.source), _CHUNK)
    if not starts:
      raise ValueError(f"split {self.split!r} of {self.name!r} has no records.")
    with concurrent.futures.ThreadPoolExecutor(self.num_threads) as pool:
      yield from pool.map(lambda ks: fn(ks[0], self.chunk(ks[1])), enumerate(starts))


def tfds_texts(options: DataOptions, split: str) -> list[str]:
  """The decoded records of a split, in order (small splits and tests; see tfds_token_stream)."""
  return [s for chunk in _Records(options, split).map_chunks(lambda k, c: c) for s in chunk]


def _cache_path(options: DataOptions, records: _Records, what: str, extra: Any,
                suffix: str) -> str | None:
  """`<text_cache_dir>/<name>-<split>-<what>-<hash>.<suffix>`, the hash over everything the
  content depends on (dataset, version, split, record count, text key, separator, `extra`);
  None without a cache dir."""
  if not options.text_cache_dir:
    return None
  key = json.dumps({"format": _CACHE_FORMAT, "name": options.name, "version": records.version,
                    "split": records.split, "records": len(records.source),
                    "text_key": options.text_key, "separator": RECORD_SEPARATOR, "extra": extra},
                   sort_keys=True)
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{options.name}-{records.split}-{what}")
  return os.path.join(os.path.expanduser(options.text_cache_dir), f"{stem}-{digest}.{suffix}")


def _write_atomically(path: str, write) -> None:
  """write(file) into a temporary file beside `path`, then renamed onto it (hosts sharing the
  folder may race: each rename installs identical content)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
  with open(tmp, "wb") as f:
    write(f)
  os.replace(tmp, path)


def tfds_alphabet(options: DataOptions, split: str) -> list[str]:
  """The sorted characters of a split's records (and the separator, if there are >= 2 records):
  the alphabet `text.CharTokenizer.from_text` builds from the joined text. Cached in
  `options.text_cache_dir` when set."""
  records = _Records(options, split)
  path = _cache_path(options, records, "alphabet", None, "json")
  if path and os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      return list(json.load(f))
  chars: set[str] = set()
  for part in records.map_chunks(lambda k, c: set().union(*c)):
    chars |= part
  if len(records.source) > 1:
    chars.add(RECORD_SEPARATOR)
  alphabet = sorted(chars)
  if path:
    _write_atomically(path, lambda f: f.write(json.dumps(alphabet).encode("utf-8")))
  return alphabet


def tfds_token_stream(options: DataOptions, split: str, tokenizer: Any) -> np.ndarray:
  """The split's records joined by RECORD_SEPARATOR and encoded: [n] in `token_dtype(V)`.

  With `options.text_cache_dir` the stream is saved there as .npy on the first call and later
  calls map that file instead of reading and encoding the split again (lm1b's 30M sentences
  take minutes to encode). The file name hashes the tokenizer's `to_json()`: a factory
  tokenizer is identified by its name only, so delete the cache after changing its code.
  """
  records = _Records(options, split)
  spec = tokenizer.to_json() if hasattr(tokenizer, "to_json") else None
  path = (_cache_path(options, records, "tokens", spec, "npy") if spec is not None else None)
  if path and os.path.isfile(path):
    return np.load(path, mmap_mode="r")
  dtype = token_dtype(tokenizer.vocab_size)
  separator = np.asarray(tokenizer.encode(RECORD_SEPARATOR)).astype(dtype)

  def encode(k: int, chunk: list[str]) -> np.ndarray:
    ids = np.asarray(tokenizer.encode(RECORD_SEPARATOR.join(chunk)))
    if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
      raise ValueError(f"the tokenizer gave ids outside [0, {tokenizer.vocab_size}).")
    ids = ids.astype(dtype)
    return ids if k == 0 else np.concatenate([separator, ids])

  stream = np.concatenate(list(records.map_chunks(encode)))
  if path:
    _write_atomically(path, lambda f: np.save(f, stream))
  return stream
