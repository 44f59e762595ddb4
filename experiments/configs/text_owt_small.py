"""MDLM's OpenWebText setting (the 'small' model), as far as this library expresses it.

  python -m experiments.prepare_text --corpus=PATH/TO/openwebtext_txt --out=data/owt
  python -m experiments.train --config=experiments/configs/text_owt_small.py --workdir=runs/owt

Values taken from the MDLM repository (kuleshov-group/mdlm, commit 06dd29f, configs/config.yaml,
configs/model/small.yaml, configs/noise/loglinear.yaml, configs/lr_scheduler/
constant_warmup.yaml, configs/data/openwebtext-split.yaml): OpenWebText, sequences of 1024
tokens, GPT-2 tokenizer; global batch 512; AdamW lr 3e-4, betas (0.9, 0.999), eps 1e-8, weight
decay 0, constant lr after 2500 warmup steps, gradient clipping 1.0; 1,000,000 steps; EMA
0.9999; bf16; continuous time (T = 0), SUBS, no time conditioning, training times in
(1e-3, 1] (sampling_eps) drawn antithetically; the log-linear noise, i.e. alpha(t) = 1 - (1 -
1e-3) t, which is our 'linear' mask schedule up to that eps; DiT 'small': width 768, 12 blocks,
12 heads, untied output layer, dropout 0.1; sampler 'ddpm_cache' with 128 steps.

Where this config differs, and why:
  - tokenizer: GPT-2 BPE (50,257 tokens) cannot be fetched offline, so this config runs on UTF-8
    bytes ('byte', V = 256). Another tokenizer plugs in as data.tokenizer=
    'package.module:function', a zero-argument function returning any object with
    `vocab_size`, `encode(str) -> int32 [n]` and `decode(ids) -> str` (`data.text.Tokenizer`);
    model.vocab_size follows the tokenizer.
  - data: OpenWebText is not bundled; point data.text_dir at a prepared folder of its text.
  - times: the trainer draws i.i.d. times per example (each example's noise depends on its key
    only, so the step is independent of the device split), not MDLM's antithetic times.
  - the text transformer has no dropout, and no separate 128-wide conditioning (it ignores t).

Every key and its default: `diffusion_jax/training/default_config.py`.
"""
import ml_collections

from diffusion_jax.training import default_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = default_config.get_config()
  c.data.name = "text"
  c.data.text_dir = "data/owt"
  c.data.seq_len = 1024
  c.data.tokenizer = "byte"            # MDLM: GPT-2 BPE (see the module docstring)

  c.model.name = "text_small"          # width 768, 12 blocks, 12 heads
  c.model.time_conditioning = False
  c.model.tie_embeddings = False

  c.diffusion.family = "masked"
  c.masked.schedule = "linear"
  c.masked.num_steps = 0
  c.masked.t_min = 1e-3

  c.optim.name = "adamw"
  c.optim.lr = 3e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.warmup_steps = 2500
  c.optim.decay = "constant"
  c.optim.grad_clip = 1.0

  c.train.num_steps = 1_000_000
  c.train.batch_size = 512
  c.train.compute_dtype = "bfloat16"
  c.train.ema_decays = (0.9999,)
  c.train.checkpoint_every = 10_000
  c.train.log_every = 100

  c.sample.num_samples = 8
  c.sample.text_steps = 128
  return c
