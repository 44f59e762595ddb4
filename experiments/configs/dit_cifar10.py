"""A pixel-space DiT on CIFAR-10, class-conditional with label dropout for classifier-free
guidance (Peebles & Xie 2023 training recipe: AdamW lr 1e-4, no weight decay, no warmup,
EMA 0.9999, learned sigma with the hybrid loss).

  python -m experiments.train --config=experiments/configs/dit_cifar10.py --workdir=runs/dit_c10
  python -m experiments.train --config=experiments/configs/dit_cifar10.py:DiT-S/4 --workdir=...

Starts from `ddpm_cifar10.py` (same data, schedule and cadence) and changes the network and the
optimizer.
"""
import ml_collections

from experiments.configs import ddpm_cifar10


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  name = arg or "DiT-S/2"
  if not name.startswith("DiT-"):
    raise ValueError(f"dit_cifar10 variant must be a DiT preset such as 'DiT-S/2', got {name!r}")
  c = ddpm_cifar10.get_config()
  c.model.name = name
  c.model.num_classes = 10
  c.model.learn_sigma = True
  c.diffusion.loss_type = "hybrid"
  c.diffusion.variance = "learned_range"
  c.optim.name = "adamw"
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 0
  c.train.num_steps = 400_000
  c.train.batch_size = 256
  return c
