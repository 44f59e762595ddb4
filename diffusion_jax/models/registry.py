"""Model presets by name, and parameter counting without allocation.

`get_model('ddpm_cifar10')`, `get_model('DiT-XL/2', in_channels=3, num_classes=0)`: a preset is a
module class plus keyword arguments; overrides replace any of them (an ablation is a config
override, not a code edit).

References:
  DDPM (arXiv:2006.11239) Appendix B for ddpm_cifar10 / ddpm_256; DiT (arXiv:2212.09748) Table 1
  for the DiT-{S,B,L,XL}/{2,4,8} sizes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.autoencoder import AutoencoderKL
from diffusion_jax.models.dit import DiT
from diffusion_jax.models.text_transformer import TextTransformer
from diffusion_jax.models.unet import UNet

_DDPM = dict(ch=128, num_res_blocks=2, head_dim=None, num_groups=32, norm_eps=1e-6,
             downsample_padding="asymmetric", time_flip_sin_to_cos=False, time_freq_shift=1.0)

PRESETS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    # DDPM CIFAR-10: 35,746,307 parameters; attention at 16x16 (level 1 of a 32x32 input).
    "ddpm_cifar10": (UNet, dict(_DDPM, in_channels=3, ch_mult=(1, 2, 2, 2), attention_levels=(1,),
                                dropout=0.1)),
    # DDPM CelebA-HQ / LSUN 256x256: 113,673,219 parameters; attention at 16x16 (level 4).
    "ddpm_256": (UNet, dict(_DDPM, in_channels=3, ch_mult=(1, 1, 2, 2, 4, 4),
                            attention_levels=(4,), dropout=0.0)),
    # Test-sized U-Net (any H, W divisible by 2).
    "unet_tiny": (UNet, dict(in_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                             attention_levels=(1,), num_groups=8, dropout=0.0)),
    # Offline default: 1-channel 8x8 or 16x16 digits; small enough to train on 2 CPU cores.
    "unet_digits": (UNet, dict(in_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=2,
                               attention_levels=(1,), num_groups=8, dropout=0.1)),
    # Test-sized DiT (32x32x3 pixels or any size divisible by 2), 10 classes.
    "dit_tiny": (DiT, dict(in_channels=3, patch_size=2, hidden_size=64, depth=2, num_heads=4,
                           num_classes=10, learn_sigma=True)),
}
# Token models (masked diffusion or, with causal=True, autoregressive); byte vocabulary.
PRESETS.update({
    # CPU-sized: 4 blocks of width 256 (test and quickstart scale).
    "text_tiny": (TextTransformer, dict(vocab_size=256, hidden_size=256, depth=4, num_heads=4)),
    # MDLM / GPT-2 small size: 12 blocks, width 768, 12 heads.
    "text_small": (TextTransformer, dict(vocab_size=256, hidden_size=768, depth=12,
                                         num_heads=12)),
})
_DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
for _size, (_depth, _width, _heads) in _DIT_SIZES.items():
  for _patch in (2, 4, 8):
    PRESETS[f"DiT-{_size}/{_patch}"] = (DiT, dict(
        in_channels=4, patch_size=_patch, hidden_size=_width, depth=_depth, num_heads=_heads,
        num_classes=1000, learn_sigma=True))


# Autoencoders for latent diffusion (`get_autoencoder`): called as encode / decode, not (x, t, y).
_SD_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
               layers_per_block=2, latent_channels=4, norm_num_groups=32, shift_factor=None)
AUTOENCODER_PRESETS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    # Stable Diffusion 1.x / 2.x KL-f8 VAE: 83,653,863 parameters.
    "sd_vae": (AutoencoderKL, dict(_SD_VAE, scaling_factor=0.18215)),
    # SDXL VAE: the same architecture, latents scaled by 0.13025.
    "sdxl_vae": (AutoencoderKL, dict(_SD_VAE, scaling_factor=0.13025)),
    # Test-sized (f=2, 32x32x3 -> 16x16x4 on CPU in milliseconds).
    "vae_tiny": (AutoencoderKL, dict(in_channels=3, out_channels=3, block_out_channels=(32, 64),
                                     layers_per_block=1, latent_channels=4, norm_num_groups=8,
                                     scaling_factor=1.0, shift_factor=None)),
    # The CPU latent-diffusion path: 8x8x1 digits -> 4x4x2 latents (f=2, half the numbers of the
    # image). Its scaling factor is set by `experiments.train_autoencoder` after training.
    "vae_digits": (AutoencoderKL, dict(in_channels=1, out_channels=1, block_out_channels=(32, 64),
                                       layers_per_block=1, latent_channels=2, norm_num_groups=8,
                                       scaling_factor=1.0, shift_factor=None)),
}


def _instantiate(presets: dict[str, tuple[type[nn.Module], dict[str, Any]]], kind: str, name: str,
                 overrides: dict[str, Any]) -> nn.Module:
  if name not in presets:
    raise ValueError(f'unknown {kind} name {name!r}; known names: {", ".join(presets)}')
  cls, kwargs = presets[name]
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown override(s) {unknown} for {name!r} ({cls.__name__}); "
                     f"allowed: {sorted(fields)}")
  for key in ("ch_mult", "attention_levels", "block_out_channels"):
    if key in overrides:
      overrides[key] = tuple(overrides[key])
  return cls(**{**kwargs, **overrides})


def autoencoder_names() -> list[str]:
  """All autoencoder preset names."""
  return list(AUTOENCODER_PRESETS)


def get_autoencoder(name: str, **overrides: Any) -> nn.Module:
  """Build an autoencoder preset, e.g. `get_autoencoder('sd_vae', dtype=jnp.bfloat16)`.

  Raises ValueError for an unknown name or override.
  """
  return _instantiate(AUTOENCODER_PRESETS, "autoencoder", name, overrides)


def model_names() -> list[str]:
  """All preset names."""
  return list(PRESETS)


def get_model(name: str, **overrides: Any) -> nn.Module:
  """Build a preset, with any constructor argument overridden.

  Example: `get_model('unet_digits', dtype=jnp.bfloat16, remat=True)`.
  Raises ValueError for an unknown name or override.
  """
  return _instantiate(PRESETS, "model", name, overrides)


def init_params(module: nn.Module, rng: jax.Array, input_shape: Sequence[int],
                with_labels: bool = False) -> Any:
  """Initialise parameters for inputs of `input_shape` ([H, W, C] or [B, H, W, C]; token models:
  [L] or [B, L]).

  Runs Flax's `lazy_init` on abstract inputs: only the parameters' initialisers are computed,
  not the forward pass (ddpm_cifar10 outside `jit`, one run each on the 2-core CPU machine:
  6.0-6.6 s against 10.6-10.8 s for `init`, which executes the forward op by op). The values are
  the same bits as `init`'s, inside `jit` or not (tests/test_models_registry.py).
  Returns the params pytree (without the 'params' collection wrapper).
  """
  shape = tuple(input_shape)
  spec = jax.ShapeDtypeStruct
  if getattr(module, "is_token_model", False):
    shape = (1,) + shape if len(shape) == 1 else shape
    return module.lazy_init({"params": rng}, spec(shape, jnp.int32),
                            spec((shape[0],), jnp.float32))["params"]
  if len(shape) == 3:
    shape = (1,) + shape
  batch = (shape[0],)
  y = spec(batch, jnp.int32) if with_labels else None
  return module.lazy_init({"params": rng, "dropout": rng}, spec(shape, jnp.float32),
                          spec(batch, jnp.int32), y)["params"]


def count_params(module: nn.Module, input_shape: Sequence[int], with_labels: bool = False) -> int:
  """Number of parameters, from shapes only (`jax.eval_shape`: nothing is allocated).

  input_shape: [H, W, C] or [B, H, W, C] ([L] for token models). Labels make no difference to the count (the table is
  created either way for a class-conditional model); `with_labels` is kept for the contract.
  """
  shapes = jax.eval_shape(lambda: init_params(module, jax.random.key(0), input_shape, with_labels))
  return int(sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)))
