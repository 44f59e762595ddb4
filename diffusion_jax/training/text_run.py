"""Text runs in the trainer: `diffusion.family` 'masked' (masked diffusion, MDLM) or
'autoregressive' (its causal twin), on a prepared corpus (`data.name = 'text'`).

What differs from an image run, all read here:
  data:    `data.text_dir` holds train.txt, valid.txt and (tokenizer 'char') tokenizer.json, as
           `experiments.prepare_text` writes them; or `data.tfds_name` names a TFDS text
           dataset (lm1b), whose `data.split` / `data.eval_split` records (`data.text_key`)
           are joined by newlines (`data.text_tfds`); packed into sequences of `data.seq_len`
           tokens; batches are {'tokens': int32 [D, b, L]}.
  model:   a `TextTransformer` preset with `vocab_size` = the tokenizer's V (id V is the mask /
           BOS token); 'masked' uses `model.time_conditioning` (default of the preset), the
           'autoregressive' twin is causal without time conditioning.
  loss:    bits per token [B] of each sequence: the masked-diffusion NELBO (`masked.nelbo` with
           per-example keys and i.i.d. times; `masked.num_steps` 0: continuous time, T: the
           T-step bound) or the twin's exact NLL (`autoregressive.nll`), both divided by L ln 2,
           so the logged loss of either family is a bits-per-character figure (a bound for
           'masked', exact for 'autoregressive').
  samples: text (`generate`), decoded by the run's tokenizer (`<workdir>/tokenizer.json`).

References: Sahoo et al. 2024 (MDLM: the NELBO, SUBS, the cached sampler); Shi et al. 2024 (MD4).
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import _checks
from diffusion_jax import autoregressive
from diffusion_jax import masked
from diffusion_jax.data import text as text_lib
from diffusion_jax.training import families

FAMILIES = families.TEXT_FAMILIES
TOKENIZERS = ("char", "byte")
TOKENIZER_FILE = "tokenizer.json"
# Placeholder character for a still-masked position when a sample is decoded.
MASK_CHAR = "_"


def family(config: Any) -> str:
  """`diffusion.family` of the run, checked (`families.family`)."""
  return families.family(config)


def is_text(config: Any) -> bool:
  """True for a text run; ValueError when `data.name` and `diffusion.family` disagree."""
  text_data = config.data.name == "text"
  text_family = family(config) in FAMILIES
  if text_data != text_family:
    raise ValueError(f"data.name={config.data.name!r} with diffusion.family={family(config)!r}: "
                     f"text data needs diffusion.family in {FAMILIES} and those families need "
                     "data.name='text'.")
  return text_data


class TextData(NamedTuple):
  tokenizer: Any               # data.text.Tokenizer
  train: np.ndarray            # int32 [N, L]
  valid: np.ndarray | None     # int32 [M, L] (None without valid.txt)


def tfds_name(data_config: Any) -> str | None:
  """`data.tfds_name` (None: the corpus is `data.text_dir`; configs older than the key too)."""
  return data_config.get("tfds_name") or None


def load_tokenizer(data_config: Any) -> Any:
  """The tokenizer of `data.tokenizer`: 'char' reads `<text_dir>/tokenizer.json` (with
  `data.tfds_name`: the characters of the TFDS training split), 'byte' needs nothing.

  Any other tokenizer plugs in here as `data.tokenizer='package.module:function'`: a
  zero-argument function returning an object with `vocab_size`, `encode(str) -> int [n]` and
  `decode(ids) -> str` (`data.text.Tokenizer`); the run saves that name in tokenizer.json and
  a restore imports and calls it again (`data.text.FactoryTokenizer`).
  """
  kind = data_config.tokenizer
  if isinstance(kind, str) and ":" in kind:
    return text_lib.FactoryTokenizer(kind)
  if kind not in TOKENIZERS:
    raise ValueError(f"Unknown data.tokenizer={kind!r}; allowed: {list(TOKENIZERS)}, or a "
                     "tokenizer factory 'package.module:function'.")
  if kind == "byte":
    return text_lib.ByteTokenizer()
  if tfds_name(data_config):
    from diffusion_jax.data import text_tfds  # pylint: disable=import-outside-toplevel
    options = text_tfds.tfds_options(data_config)
    return text_lib.CharTokenizer(text_tfds.tfds_alphabet(options, options.split))
  path = os.path.join(_text_dir(data_config), TOKENIZER_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data.tokenizer='char' needs {path} (written by "
                            "`python -m experiments.prepare_text`).")
  return text_lib.load_tokenizer(path)


def _text_dir(data_config: Any) -> str:
  if not data_config.text_dir:
    raise ValueError("data.name='text' needs data.text_dir: a folder with train.txt and "
                     "valid.txt (`python -m experiments.prepare_text --out=DIR`), or "
                     "data.tfds_name: a TFDS text dataset such as 'lm1b'.")
  return os.path.expanduser(str(data_config.text_dir))


def seq_len(data_config: Any) -> int:
  n = data_config.seq_len
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"data.seq_len must be a positive int, got {n!r}.")
  return n


def load_text_data(data_config: Any, splits: tuple[str, ...] = ("train", "valid"),
                   tokenizer: Any = None) -> TextData:
  """Tokenizer and packed [N, L] sequences of `<text_dir>/train.txt` and `valid.txt`, or of the
  TFDS dataset `data.tfds_name`'s `data.split` and `data.eval_split` (in the smallest unsigned
  dtype of the vocabulary). `tokenizer`: None loads `data.tokenizer`'s (`load_tokenizer`)."""
  tokenizer = tokenizer if tokenizer is not None else load_tokenizer(data_config)
  length = seq_len(data_config)
  if tfds_name(data_config):
    from diffusion_jax.data import text_tfds  # pylint: disable=import-outside-toplevel
    options = text_tfds.tfds_options(data_config)
    out = {}
    for split, tfds_split in (("train", options.split), ("valid", options.eval_split)):
      if split in splits:
        stream = text_tfds.tfds_token_stream(options, tfds_split, tokenizer)
        out[split] = text_lib.pack(stream, length, dtype=stream.dtype)
    return TextData(tokenizer, out.get("train"), out.get("valid"))
  folder = _text_dir(data_config)
  out = {}
  for split in ("train", "valid"):
    path = os.path.join(folder, f"{split}.txt")
    if split in splits and (split == "train" or os.path.isfile(path)):
      out[split] = text_lib.pack(tokenizer.encode(text_lib.read_text(path)), length)
  return TextData(tokenizer, out.get("train"), out.get("valid"))


def model_config(config: Any, vocab_size: int) -> dict:
  """The model keys with `vocab_size` set to the tokenizer's, and the family's constraints."""
  m = dict(config.model)
  if m.get("vocab_size") not in (None, vocab_size):
    raise ValueError(f"model.vocab_size={m['vocab_size']} but the tokenizer has {vocab_size} "
                     "tokens; leave model.vocab_size unset to follow the data.")
  m["vocab_size"] = int(vocab_size)
  if family(config) == "autoregressive":
    for key, want in (("causal", True), ("time_conditioning", False)):
      if m.get(key) not in (None, want):
        raise ValueError(f"diffusion.family='autoregressive' needs model.{key}={want}, got "
                         f"{m[key]!r}.")
      m[key] = want
  elif m.get("causal"):
    raise ValueError("diffusion.family='masked' needs a bidirectional model: model.causal=False.")
  return m


def mask_schedule(config: Any) -> masked.MaskSchedule:
  kwargs = {k: v for k, v in dict(config.masked.schedule_kwargs).items() if v is not None}
  return masked.get_mask_schedule(config.masked.schedule, **kwargs)


def _num_steps(config: Any) -> int | None:
  steps = int(config.masked.num_steps)
  if steps < 0:
    raise ValueError(f"masked.num_steps must be >= 0 (0: continuous time), got {steps}.")
  return steps or None


def bits_fn(config: Any, vocab_size: int, num_steps: int | None | str = "config"
            ) -> Callable[[Callable, jax.Array, jax.Array], jax.Array]:
  """`bits(model_fn, tokens [B, L], keys [B]) -> [B]` bits per token of each sequence.

  model_fn(tokens [B, L], t [B] or None) -> logits [B, L, V + 1]. 'masked': a one-sample NELBO
  estimate (its mean over keys is the bound; `num_steps` overrides `masked.num_steps`, None:
  continuous time); 'autoregressive': the exact NLL (keys unused).
  """
  name = _checks.check_choice("diffusion.family", family(config), FAMILIES)
  if name == "autoregressive":
    def ar_bits(model_fn, tokens, keys):
      del keys
      nats = autoregressive.nll(lambda x: model_fn(x, None), tokens, bos_id=vocab_size)
      return nats / (tokens.shape[1] * math.log(2.0))
    return ar_bits
  schedule = mask_schedule(config)
  steps = _num_steps(config) if num_steps == "config" else num_steps
  t_min = float(config.masked.t_min)

  def masked_bits(model_fn, tokens, keys):
    nats = masked.nelbo(model_fn, schedule, tokens, keys, mask_id=vocab_size, num_steps=steps,
                        antithetic=False, t_min=t_min)
    return nats / (tokens.shape[1] * math.log(2.0))
  return masked_bits


def check_sampling(config: Any) -> None:
  """ValueErrors for bad `sample.text_*` settings (before a run starts)."""
  s = config.sample
  if s.text_steps is not None and (isinstance(s.text_steps, bool) or int(s.text_steps) < 1):
    raise ValueError(f"sample.text_steps must be a positive int or None, got {s.text_steps!r}.")
  if not float(s.temperature) > 0:
    raise ValueError(f"sample.temperature must be > 0, got {s.temperature}.")
  if not 0 < float(s.top_p) <= 1:
    raise ValueError(f"sample.top_p must be in (0, 1], got {s.top_p}.")


def generate(config: Any, model: Any, params: Any, rng: jax.Array, num_samples: int,
             length: int, vocab_size: int, *, steps: int | None = None,
             temperature: float | jax.Array = 1.0, top_p: float | jax.Array = 1.0,
             init: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(tokens [N, L] int32, network calls) from a text run's model (traceable; steps static).

  'masked': `masked.sample` with `steps` (None: L) from all-masked sequences, or from `init`
  ([N, L], vocab_size where to fill: infilling keeps the other tokens); 'autoregressive':
  `autoregressive.sample` with the KV cache (L calls; `init` is not supported).
  """
  name = _checks.check_choice("diffusion.family", family(config), FAMILIES)
  if name == "autoregressive":
    if init is not None:
      raise ValueError("infilling needs a masked-diffusion run (diffusion.family='masked'); "
                       "the autoregressive twin only continues from the left.")
    caches = model.apply({"params": params}, num_samples, length, method="init_caches")
    decode = lambda tok, pos, cache: model.apply({"params": params}, tok, pos, cache,
                                                 method="decode")
    tokens = autoregressive.sample(rng, bos_id=vocab_size, length=length,
                                   batch_size=num_samples, decode_fn=decode, cache=caches,
                                   temperature=temperature, top_p=top_p)
    return tokens, jnp.asarray(length, jnp.int32)
  model_fn = lambda z, t: model.apply({"params": params}, z, t)
  out = masked.sample(model_fn, mask_schedule(config), rng, mask_id=vocab_size,
                      num_steps=int(steps or length), init=init,
                      shape=None if init is not None else (num_samples, length),
                      temperature=temperature, top_p=top_p)
  return out.tokens, out.model_calls


def decode(tokenizer: Any, tokens: np.ndarray) -> list[str]:
  """Texts of tokens [N, L]; a still-masked id (>= V) reads as MASK_CHAR."""
  tokens = np.asarray(tokens)
  out = []
  for row in tokens:
    pieces, run = [], []
    for tok in row.tolist():
      if tok >= tokenizer.vocab_size:
        if run:
          pieces.append(tokenizer.decode(np.asarray(run)))
          run = []
        pieces.append(MASK_CHAR)
      else:
        run.append(tok)
    if run:
      pieces.append(tokenizer.decode(np.asarray(run)))
    out.append("".join(pieces))
  return out


def infill_tokens(tokenizer: Any, template: str, length: int, hole: str = "_"
                  ) -> np.ndarray:
  """int32 [length] tokens of `template` with each occurrence of `hole` replaced by one mask id
  (V): '___' with hole '_' asks for three tokens there. Shorter templates are padded with masks
  at the end (a prompt); a hole string made of several characters is one token per occurrence.
  """
  if not hole:
    raise ValueError("hole must be a non-empty string.")
  ids, i = [], 0
  while i < len(template):
    if template.startswith(hole, i):
      ids.append(tokenizer.vocab_size)
      i += len(hole)
    else:
      j = template.find(hole, i)
      j = len(template) if j < 0 else j
      ids.extend(tokenizer.encode(template[i:j]).tolist())
      i = j
  if len(ids) > length:
    raise ValueError(f"the infilling template is {len(ids)} tokens, more than the run's "
                     f"seq_len={length}.")
  ids += [tokenizer.vocab_size] * (length - len(ids))
  return np.asarray(ids, np.int32)


def sample_texts(loaded: Any, num_samples: int, *, seed: int = 0, steps: int | None = None,
                 temperature: float = 1.0, top_p: float = 1.0, template: str | None = None,
                 hole: str = "_", batch_size: int = 64) -> tuple[list[str], np.ndarray]:
  """(texts, tokens int32 [N, L]) from a restored text run (`restore.load_for_sampling`).

  Example i draws from the key fold_in(PRNGKey(seed), i), whatever `batch_size`. `template`
  (masked runs only): text with `hole` runs to fill, padded with masks to seq_len (a prompt is a
  template without holes: the rest of the sequence is generated after it); its given characters
  are kept exactly.
  """
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
  from diffusion_jax import rng as rng_lib  # pylint: disable=import-outside-toplevel
  config, length, vocab = loaded.config, int(loaded.image_shape[0]), loaded.tokenizer.vocab_size
  init = None
  if template is not None:
    init = np.broadcast_to(infill_tokens(loaded.tokenizer, template, length, hole),
                           (num_samples, length))
  batch = min(batch_size, num_samples)

  @jax.jit
  def draw(params, keys, init_batch):
    return generate(config, loaded.model, params, keys, keys.shape[0], length, vocab,
                    steps=steps, temperature=temperature, top_p=top_p, init=init_batch)[0]

  base = jax.random.PRNGKey(seed)
  out = []
  for start in range(0, num_samples, batch):
    idx = np.arange(start, start + batch)   # the last batch is padded, then cut
    keys = rng_lib.keys_for_indices(base, jnp.asarray(idx))
    init_batch = None if init is None else jnp.asarray(init[np.minimum(idx, num_samples - 1)])
    out.append(np.asarray(draw(loaded.params, keys, init_batch)))
  tokens = np.concatenate(out)[:num_samples]
  return decode(loaded.tokenizer, tokens), tokens


def sequence_bits_fn(loaded: Any, *, num_time_samples: int = 16, seed: int = 0,
                     batch_size: int = 64, num_steps: int | None | str = None
                     ) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
  """bits(sequences [n, L] int, indices [n] int) -> float32 [n, draws]: bits per token of each
  held-out sequence under a restored text run, one column per draw.

  'autoregressive': the exact NLL (one draw; num_time_samples ignored). 'masked': one NELBO
  estimate per (time, mask) draw (continuous time with `num_steps=None`, the T-step bound with
  T, 'config': the run's masked.num_steps; always without t_min); sequence `indices[m]`'s draw j
  uses the key fold_in(fold_in(PRNGKey(seed), j), indices[m]). Every compiled call runs exactly
  `batch_size` sequences (the last call padded, then cut), so a sequence's values are the same
  bits whichever other sequences share its call, shard or process.
  """
  from diffusion_jax import rng as rng_lib  # pylint: disable=import-outside-toplevel
  config, vocab = loaded.config.copy_and_resolve_references(), loaded.tokenizer.vocab_size
  config.masked.t_min = 0.0
  draws = 1 if family(config) == "autoregressive" else int(num_time_samples)
  if draws < 1:
    raise ValueError(f"num_time_samples must be >= 1, got {num_time_samples}.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  bits = bits_fn(config, vocab, num_steps)

  @jax.jit
  def one(params, tokens, keys):
    return bits(lambda z, t: loaded.model.apply({"params": params}, z, t), tokens, keys)

  base = jax.random.PRNGKey(seed)

  def compute(sequences: np.ndarray, indices: np.ndarray) -> np.ndarray:
    sequences, indices = np.asarray(sequences, np.int32), np.asarray(indices)
    if sequences.ndim != 2 or indices.shape != sequences.shape[:1]:
      raise ValueError(f"sequences must be int [n, L] and indices [n], got {sequences.shape} "
                       f"and {indices.shape}.")
    n = len(sequences)
    out = np.zeros((n, draws), np.float32)
    for start in range(0, n, batch_size):
      rows = np.minimum(np.arange(start, start + batch_size), n - 1)   # padded with the last
      take = min(batch_size, n - start)
      for j in range(draws):
        keys = rng_lib.keys_for_indices(jax.random.fold_in(base, j), jnp.asarray(indices[rows]))
        value = one(loaded.params, jnp.asarray(sequences[rows]), keys)
        out[start:start + take, j] = np.asarray(value)[:take]
    return out

  return compute


def summarize_bits(bits: np.ndarray, tokens: np.ndarray) -> dict[str, float | int]:
  """Held-out figures from per-sequence bits [M, draws] (bits per token of each draw) and token
  counts [M], in float64.

  bits_per_token = sum_m n_m b_m / sum_m n_m with b_m the mean over sequence m's draws (the
  NELBO bound for a masked run is an upper bound on the true bits); stderr: the ratio
  estimator's standard error, sequences treated as i.i.d. (for equal n_m, the standard error of
  the mean of b_m); perplexity = 2 ** bits_per_token (a bound for a masked run).
  """
  bits, tokens = np.asarray(bits, np.float64), np.asarray(tokens, np.float64)
  if bits.ndim != 2 or tokens.shape != bits.shape[:1] or not len(bits):
    raise ValueError(f"bits must be [M, draws] with M >= 1 and tokens [M], got {bits.shape} and "
                     f"{tokens.shape}.")
  per_seq = bits.mean(axis=1)
  bpt = float(np.sum(tokens * per_seq) / np.sum(tokens))
  m = len(per_seq)
  stderr = (float(np.sqrt(np.sum((tokens * (per_seq - bpt)) ** 2) / (m * (m - 1)))
                  / tokens.mean()) if m > 1 else float("nan"))
  return {"bits_per_token": bpt, "stderr": stderr, "perplexity": float(2.0 ** bpt),
          "num_sequences": int(m), "num_tokens": int(tokens.sum()),
          "num_time_samples": int(bits.shape[1])}


def heldout_bits(loaded: Any, sequences: np.ndarray, *, num_time_samples: int = 16,
                 seed: int = 0, batch_size: int = 64, num_steps: int | None | str = None
                 ) -> dict[str, float | int]:
  """Bits per token of held-out sequences [M, L] under a restored text run, in memory
  (`sequence_bits_fn` with min(batch_size, M) sequences per call, then `summarize_bits`;
  `experiments.evaluate_text` does the same resumably, shard by shard).

  Returns {'bits_per_token', 'stderr', 'perplexity', 'num_sequences', 'num_tokens',
  'num_time_samples'}.
  """
  sequences = np.asarray(sequences, np.int32)
  if sequences.ndim != 2 or not len(sequences):
    raise ValueError(f"sequences must be int [M, L] with M >= 1, got {sequences.shape}.")
  bits = sequence_bits_fn(loaded, num_time_samples=num_time_samples, seed=seed,
                          batch_size=min(batch_size, len(sequences)), num_steps=num_steps)
  values = bits(sequences, np.arange(len(sequences)))
  return summarize_bits(values, np.full(len(sequences), sequences.shape[1]))
