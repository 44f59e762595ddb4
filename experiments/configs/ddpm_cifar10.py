"""DDPM on CIFAR-10 with the paper's hyperparameters (Ho et al. 2020; REFERENCE.md).

  python -m experiments.train --config=experiments/configs/ddpm_cifar10.py --workdir=runs/ddpm_c10

T = 1000, linear betas 1e-4..0.02, eps prediction, L_simple; the 35.7M-parameter U-Net
(dropout 0.1); Adam lr 2e-4, 5000 warmup steps, batch 128, grad clip 1.0, EMA 0.9999, random
horizontal flips, 800k steps; samples with "fixed large" variance (sigma_t^2 = beta_t).
Needs the TFDS cifar10 dataset prepared in data_dir (ArrayRecord).
"""
import ml_collections

from diffusion_jax.training import default_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = default_config.get_config()
  c.data.name = "cifar10"
  c.data.image_size = 32
  c.data.random_flip = True

  c.model.name = "ddpm_cifar10"     # the preset is the paper's network (dropout 0.1)

  c.diffusion.schedule = "linear"   # 1e-4..0.02, the linear factory's defaults at T = 1000
  c.diffusion.num_timesteps = 1000
  c.diffusion.variance = "fixed_large"

  c.optim.lr = 2e-4
  c.optim.warmup_steps = 5000
  c.optim.decay = "constant"

  c.train.num_steps = 800_000
  c.train.batch_size = 128
  c.train.parallel = "pmap"
  c.train.ema_decays = (0.9999,)
  c.train.checkpoint_every = 5000
  c.train.snapshot_every = 100_000
  c.train.log_every = 500
  c.train.sample_every = 50_000

  c.sample.num_samples = 64
  return c
