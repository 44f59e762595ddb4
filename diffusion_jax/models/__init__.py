"""Networks: a DDPM / ADM U-Net and a DiT, and presets by name.

`get_model(name, **overrides)` builds a `flax.linen.Module` called as
`apply({'params': p}, x [B, H, W, C], t [B], y=None, train=False)`.
"""
from diffusion_jax.models import layers
from diffusion_jax.models.dit import DiT, DiTBlock
from diffusion_jax.models.registry import PRESETS, count_params, get_model, init_params, model_names
from diffusion_jax.models.unet import UNet

__all__ = ['DiT', 'DiTBlock', 'PRESETS', 'UNet', 'count_params', 'get_model', 'init_params',
           'layers', 'model_names']
