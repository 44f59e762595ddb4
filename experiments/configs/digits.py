"""The offline default: an unconditional DDPM on scikit-learn's 8x8 digits, sized to train on a
2-core CPU in a few minutes.

  python -m experiments.train --config=experiments/configs/digits.py --workdir=runs/digits
  python -m experiments.sample --workdir=runs/digits --num_samples=64 --out=runs/digits/samples.npz

Every key and its default: `diffusion_jax/training/default_config.py`; this file changes only the
data size and the network.
"""
import ml_collections

from diffusion_jax.training import default_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = default_config.get_config()
  c.data.image_size = 8            # native 8x8

  # Smaller than the unet_digits preset: one res block per level, two levels (8x8, 4x4),
  # attention at 4x4, no dropout; unconditional, fixed variance.
  c.model.name = "unet_digits"
  c.model.ch = 32
  c.model.ch_mult = (1, 2)
  c.model.num_res_blocks = 1
  c.model.attention_levels = (1,)
  c.model.num_groups = 8
  c.model.dropout = 0.0
  c.model.num_classes = 0
  c.model.learn_sigma = False
  return c
