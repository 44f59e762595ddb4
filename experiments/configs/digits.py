"""The offline default: an unconditional DDPM on scikit-learn's 8x8 digits, sized to train on a
2-core CPU in a few minutes.

  python -m experiments.train --config=experiments/configs/digits.py --workdir=runs/digits
  python -m experiments.sample --workdir=runs/digits --num_samples=64 --out=runs/digits/samples.npz
"""
import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"
  c.data.data_dir = config_dict.placeholder(str)  # default: $DIFFUSION_JAX_DATA_DIR or ~/tensorflow_datasets
  c.data.split = "train"
  c.data.image_size = 8            # native 8x8
  c.data.random_flip = False       # digits are not mirror-symmetric
  c.data.folder = config_dict.placeholder(str)    # image folder when name == 'folder'
  c.data.on_corrupt = "raise"

  c.model = ml_collections.ConfigDict()
  c.model.name = "unet_digits"
  # Smaller than the preset: one res block per level, two levels (8x8, 4x4), attention at 4x4.
  c.model.ch = 32
  c.model.ch_mult = (1, 2)
  c.model.num_res_blocks = 1
  c.model.attention_levels = (1,)
  c.model.num_groups = 8
  c.model.dropout = 0.0

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = "cosine"
  c.diffusion.num_timesteps = 250
  c.diffusion.prediction = "eps"
  c.diffusion.loss_type = "mse"
  c.diffusion.weighting = "none"
  c.diffusion.variance = "fixed_small"

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adam"
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 100
  c.optim.decay = "cosine"
  c.optim.grad_clip = 1.0
  c.optim.weight_decay = 0.0
  c.optim.accumulate = 1

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 2000
  c.train.batch_size = 64
  c.train.steps_per_call = 1
  c.train.parallel = "auto"         # jit on one device (a laptop CPU), pmap on several
  c.train.compute_dtype = "float32"
  c.train.ema_decays = (0.999,)
  c.train.label_dropout = 0.1      # used only by class-conditional models
  c.train.checkpoint_every = 500
  c.train.snapshot_every = 0       # 0: keep only the latest tier
  c.train.keep_latest = 2
  c.train.log_every = 100
  c.train.sample_every = 0         # 0: one grid at the end

  c.sample = ml_collections.ConfigDict()
  c.sample.sampler = "ddpm"
  c.sample.num_samples = 100
  c.sample.variance = "fixed_small"
  c.sample.clip_denoised = True
  return c
