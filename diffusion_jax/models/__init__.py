"""Networks: a DDPM / ADM U-Net, a DiT, a text transformer from DiT blocks, and presets by name; the latent-diffusion autoencoder.

`get_model(name, **overrides)` builds a `flax.linen.Module` called as
`apply({'params': p}, x [B, H, W, C], t [B], y=None, train=False)`.
`get_autoencoder('sd_vae')` builds an `AutoencoderKL`; `autoencoder.encode` / `autoencoder.decode`
map images to scaled latents and back.
"""
from diffusion_jax.models import autoencoder
from diffusion_jax.models import layers
from diffusion_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian
from diffusion_jax.models.dit import DiT, DiTBlock, KVCache
from diffusion_jax.models.registry import (AUTOENCODER_PRESETS, PRESETS, autoencoder_names,
                                           count_params, get_autoencoder, get_model, init_params,
                                           model_names)
from diffusion_jax.models.text_transformer import TextTransformer
from diffusion_jax.models.unet import UNet

__all__ = ["AUTOENCODER_PRESETS", "AutoencoderKL", "DiT", "DiTBlock", "DiagonalGaussian", "KVCache",
           "PRESETS", "TextTransformer",
           "UNet", "autoencoder", "autoencoder_names", "count_params", "get_autoencoder", "get_model",
           "init_params", "layers", "model_names"]
