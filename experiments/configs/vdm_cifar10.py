"""VDM on CIFAR-10 with the hyperparameters of the authors' code (google-research/vdm,
configs/cifar10.py; Kingma et al. 2021), for when compute allows. Published: 2.65 bits/dim
(continuous time, no data augmentation).

  python -m experiments.train --config=experiments/configs/vdm_cifar10.py --workdir=runs/vdm_c10
  python -m experiments.evaluate_bpd --workdir=runs/vdm_c10

The authors' score network: 32 residual blocks of 128 channels at 32x32 (no downsampling),
dropout 0.1, attention only in the middle block; conditioning on the normalised gamma (x 1000);
here the U-Net with ch_mult=(1,) and 32 blocks. AdamW lr 2e-4 (100 warmup steps, no decay),
b2 0.99, weight decay 0.01, batch 128, EMA 0.9999, 10M steps, antithetic times, gamma from
-13.3 to 5. Differences: the authors' CIFAR-10 config learns only the end points
('learnable_scalar'; the paper's learned network is `vdm.gamma = 'learned'` here, the default);
their network's Fourier features of z (exponents 6, 7) are the U-Net's `fourier_exponents`.
"""
import ml_collections

from diffusion_jax.training import default_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = default_config.get_config()
  c.data.name = "cifar10"
  c.data.image_size = 32

  c.model.name = "ddpm_cifar10"
  c.model.ch = 128
  c.model.ch_mult = (1,)
  c.model.num_res_blocks = 32
  c.model.attention_levels = ()
  c.model.mid_attention = True
  c.model.dropout = 0.1
  c.model.fourier_exponents = (6, 7)

  c.diffusion.family = "vdm"
  c.diffusion.prediction = "eps"
  c.diffusion.num_timesteps = 1000   # ancestral sampling steps
  c.vdm.gamma = "learned"
  c.vdm.gamma_min = -13.3
  c.vdm.gamma_max = 5.0
  c.vdm.antithetic = True

  c.optim.name = "adamw"
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 100
  c.optim.decay = "constant"
  c.optim.b2 = 0.99
  c.optim.weight_decay = 0.01

  c.train.num_steps = 10_000_000
  c.train.batch_size = 128
  c.train.parallel = "pmap"
  c.train.ema_decays = (0.9999,)
  c.train.checkpoint_every = 10_000
  c.train.snapshot_every = 500_000
  c.train.log_every = 1000
  c.train.sample_every = 100_000
  c.sample.num_samples = 64
  return c
