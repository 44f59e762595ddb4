"""Masked diffusion (MDLM) on Shakespeare, characters, sized for a 2-core CPU; `:ar` is its
autoregressive twin (same network size, steps, batch, data and optimizer).

  python -m experiments.prepare_text --corpus=shakespeare --out=data/shakespeare
  python -m experiments.train --config=experiments/configs/text_shakespeare.py \\
      --workdir=runs/shakespeare_mdlm
  python -m experiments.train --config=experiments/configs/text_shakespeare.py:ar \\
      --workdir=runs/shakespeare_ar
  python -m experiments.sample --workdir=runs/shakespeare_mdlm --num_samples=4 --out=samples.txt
  python -m experiments.evaluate_text --workdir=runs/shakespeare_mdlm

The network is a small text transformer (128 wide, 4 blocks, 4 heads: 1.23M parameters with
the corpus's 84 characters) on 128-character sequences; MDLM's choices otherwise: linear mask
schedule, continuous-time NELBO, time conditioning off (MDLM notes the SUBS network need not see
t: the masked fraction tells it), AdamW with a constant learning rate after warmup. The twin:
causal, no time conditioning, exact NLL. Both log their loss in bits per character (a bound for
the diffusion model). Each run's 2,000 steps take about 8 minutes on an idle 2-core CPU (4.1
steps/s); the measured results are in docs/text_results.md.

Every key and its default: `diffusion_jax/training/default_config.py`.
"""
import ml_collections

from diffusion_jax.training import default_config

VARIANTS = ("mdlm", "ar")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "mdlm"
  if variant not in VARIANTS:
    raise ValueError(f"text_shakespeare variant must be one of {VARIANTS}, got {variant!r}.")
  c = default_config.get_config()
  c.data.name = "text"
  c.data.text_dir = "data/shakespeare"
  c.data.seq_len = 128
  c.data.tokenizer = "char"

  c.model.name = "text_tiny"
  c.model.hidden_size = 128
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.time_conditioning = False

  c.diffusion.family = "masked" if variant == "mdlm" else "autoregressive"
  c.masked.schedule = "linear"
  c.masked.num_steps = 0

  c.optim.name = "adamw"
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.optim.decay = "constant"
  c.optim.grad_clip = 1.0

  c.train.num_steps = 2000
  c.train.batch_size = 32
  c.train.ema_decays = (0.999,)
  c.train.checkpoint_every = 500
  c.train.log_every = 100

  c.sample.num_samples = 4
  c.sample.text_steps = None        # seq_len steps (one token per step on average)
  return c
