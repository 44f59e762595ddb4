"""A pixel-space DiT on CIFAR-10, class-conditional with label dropout for classifier-free
guidance (Peebles & Xie 2023 training recipe: AdamW lr 1e-4, no weight decay, no warmup,
EMA 0.9999, learned sigma with the hybrid loss).

  python -m experiments.train --config=experiments/configs/dit_cifar10.py --workdir=runs/dit_c10
  python -m experiments.train --config=experiments/configs/dit_cifar10.py:DiT-S/4 --workdir=...
"""
import ml_collections

from experiments.configs import ddpm_cifar10


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  name = arg or "DiT-S/2"
  if not name.startswith("DiT-"):
    raise ValueError(f"dit_cifar10 variant must be a DiT preset such as 'DiT-S/2', got {name!r}")
  c = ddpm_cifar10.get_config()
  c.model = ml_collections.ConfigDict(
      {"name": name, "in_channels": 3, "num_classes": 10, "learn_sigma": True})
  c.diffusion.schedule = "linear"
  c.diffusion.num_timesteps = 1000
  c.diffusion.loss_type = "hybrid"
  c.diffusion.variance = "learned_range"
  c.optim.name = "adamw"
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 0
  c.optim.weight_decay = 0.0
  c.train.num_steps = 400_000
  c.train.batch_size = 256
  c.train.label_dropout = 0.1
  c.sample.variance = "learned_range"
  return c
