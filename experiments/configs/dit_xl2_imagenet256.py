"""DiT-XL/2 on ImageNet 256x256 in the latent space of the Stable Diffusion VAE, with the DiT
paper's hyperparameters (Peebles & Xie 2023; /work/shared/REFERENCE.md, "DiT").

  python -m diffusion_jax.convert --format diffusers_vae \\
      --weights sd-vae-ft-mse/diffusion_pytorch_model.safetensors \\
      --config sd-vae-ft-mse/config.json --out ckpt/sd_vae
  python -m experiments.encode_latents --vae=ckpt/sd_vae --data.name=imagenet2012 \\
      --data.image_size=256 --flip --out=latents/imagenet256
  python -m experiments.train --config=experiments/configs/dit_xl2_imagenet256.py \\
      --workdir=runs/dit_xl2 [--config.data.latents_dir=... --config.autoencoder.workdir=...]

Variants: `dit_xl2_imagenet256.py:DiT-B/4` (any DiT preset; the ablations of the paper's Table 4).

- Data: the 1.28M training images, center-cropped and resized to 256 (as the DiT code's
  ADM-style crop), encoded once with their horizontal flips; each step takes the flipped or the
  unflipped image's latents at random (`data.random_flip`) and a posterior sample
  z = mean + std * eps (`data.latent_sample`; DiT's feature extraction stored one sample per
  image); latents 32x32x4, scaled by 0.18215 (in the autoencoder's model.json).
- Model: DiT-XL/2, 1000 classes + the null class, learned sigma.
- Diffusion: linear betas 1e-4..0.02, T = 1000, eps prediction; L_simple + L_vlb (the hybrid loss
  with lambda = 0.001 times T = 1000: the DiT / ADM `MSE` loss with learned range variance).
- Optimisation: AdamW lr 1e-4 constant, no weight decay, no warmup, no gradient clipping,
  batch 256, EMA 0.9999, label dropout 0.1; 400k steps (the paper's ablations; its FID 2.27
  model trained 7M steps).
- Sampling: 250 ancestral (DDPM) steps with the learned variance, classifier-free guidance 1.5
  on every channel (the official code guides the first 3 of 4 channels: pass
  `guide_channels=3` through `samplers.classifier_free_guidance` for that), no clipping of x0
  (latents are not bounded).
"""
import ml_collections

from diffusion_jax.training import default_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  name = arg or "DiT-XL/2"
  if not name.startswith("DiT-"):
    raise ValueError(f"dit_xl2_imagenet256 variant must be a DiT preset such as 'DiT-B/4', "
                     f"got {name!r}")
  c = default_config.get_config()
  c.data.name = "latents"
  c.data.latents_dir = "latents/imagenet256"   # experiments.encode_latents --flip output
  c.data.random_flip = True
  c.data.latent_sample = True
  c.autoencoder.workdir = "ckpt/sd_vae"         # the SD VAE that encoded the latents
  c.autoencoder.decode_batch_size = 32

  c.model.name = name
  c.model.in_channels = 4
  c.model.num_classes = 1000
  c.model.learn_sigma = True

  c.diffusion.schedule = "linear"
  c.diffusion.num_timesteps = 1000
  c.diffusion.prediction = "eps"
  c.diffusion.loss_type = "hybrid"
  c.diffusion.vlb_weight = 0.001
  c.diffusion.variance = "learned_range"

  c.optim.name = "adamw"
  c.optim.lr = 1e-4
  c.optim.weight_decay = 0.0
  c.optim.warmup_steps = 0
  c.optim.decay = "constant"
  c.optim.grad_clip = 0.0

  c.train.num_steps = 400_000
  c.train.batch_size = 256
  c.train.ema_decays = (0.9999,)
  c.train.label_dropout = 0.1
  c.train.log_every = 100
  c.train.checkpoint_every = 10_000
  c.train.snapshot_every = 50_000
  c.train.sample_every = 10_000

  c.sample.sampler = "ddpm"
  c.sample.steps = 250
  c.sample.guidance_scale = 1.5
  c.sample.clip_denoised = False
  c.sample.num_samples = 16
  return c
