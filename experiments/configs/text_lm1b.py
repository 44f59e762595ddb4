"""MDLM's LM1B setting (masked diffusion on the One Billion Word benchmark), read from TFDS.

  tfds build lm1b --data_dir=$HOME/tensorflow_datasets --file_format=array_record   # once; network
  python -m experiments.train --config=experiments/configs/text_lm1b.py --workdir=runs/lm1b
  python -m experiments.evaluate_text --workdir=runs/lm1b                        # TFDS 'test'

The data: TFDS 'lm1b' (one sentence per record, feature 'text'; splits 'train', 'test'), read
from ArrayRecord without TensorFlow (`data.text_tfds`); sentences joined by newlines, encoded,
and packed into sequences of 128 tokens; held out: the 'test' split, as MDLM validates on it.
Preparing lm1b needs network and TensorFlow once (its builder globs files with tf.io);
`pip install 'diffusion_jax[tensorflow]'`.

Values taken from the MDLM repository (kuleshov-group/mdlm, configs/data/lm1b.yaml,
configs/config.yaml, configs/model/small.yaml, configs/lr_scheduler/constant_warmup.yaml,
configs/noise/loglinear.yaml, scripts/train_lm1b_*.sh): sequences of 128 tokens
(model.length=128), tokenizer bert-base-uncased; global batch 512; AdamW lr 3e-4, betas (0.9,
0.999), eps 1e-8, weight decay 0, constant lr after 2500 warmup steps, gradient clipping 1.0;
EMA 0.9999; bf16; continuous time (T = 0), SUBS, no time conditioning, training times in
(1e-3, 1]; the log-linear noise (our 'linear' mask schedule); DiT 'small' (width 768, 12 blocks,
12 heads, untied output layer, dropout 0.1); 1,000,000 steps (trainer.max_steps). The paper
(Suppl. D.4) agrees: batch 512, 1M steps (its "33B tokens", a 27.04 perplexity bound) or 10M
(its "327B", 23.00); see docs/text_results.md "Published targets".

Where this config differs, and why:
  - tokenizer: bert-base-uncased (30,522 WordPiece tokens) cannot be fetched offline, so this
    config runs on UTF-8 bytes ('byte', V = 256): 128 bytes hold ~25 words, 128 WordPieces ~100,
    so per-token figures are not comparable with MDLM's perplexities. To use another tokenizer
    (e.g. a local copy of bert-base-uncased), set data.tokenizer='package.module:function': a
    zero-argument function returning any object with `vocab_size`, `encode(str) -> int [n]`
    and `decode(ids) -> str` (`data.text.Tokenizer`); the run records that name and a restore
    calls it again; model.vocab_size follows the tokenizer.
  - packing: MDLM pads and truncates each sentence to 128 tokens (`wrap: False`, after
    detokenization; Suppl. D.4); here sentences are joined by newlines and packed (MDLM's
    `lm1b-gpt2` / 'wrap' setting), as the file corpora are.
  - times: i.i.d. per example, not antithetic; the text transformer has no dropout.

Every key and its default: `diffusion_jax/training/default_config.py`.
"""
import ml_collections

from experiments.configs import text_owt_small


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = text_owt_small.get_config()     # MDLM's shared training recipe (config.yaml, small model)
  c.data.text_dir = None
  c.data.tfds_name = "lm1b"
  c.data.split = "train"
  c.data.eval_split = "test"
  c.data.text_key = "text"
  c.data.text_cache_dir = None        # set a folder to encode lm1b once (see default_config.py)
  c.data.seq_len = 128
  c.data.tokenizer = "byte"            # MDLM: bert-base-uncased (see the module docstring)
  return c
