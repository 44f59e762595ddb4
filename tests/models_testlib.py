"""Helpers shared by the model / convert tests: diffusers references with random weights."""
from __future__ import annotations

import numpy as np
import torch

torch.set_num_threads(2)

# google/ddpm-cifar10-32 config.json (the diffusers port of the DDPM release).
DDPM_CIFAR10_CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3, act_fn="silu", attention_head_dim=None,
    block_out_channels=(128, 256, 256, 256), center_input_sample=False,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-6, norm_num_groups=32, time_embedding_type="positional")

# A small ADM-style config: attention at two levels and in the middle, 2 heads of 16, scale-shift
# norm, residual up/down-sampling, symmetric padding, cos-first time embedding, 5 classes + null,
# learned sigma.
SMALL_UNET_CONFIG = dict(
    sample_size=16, in_channels=3, out_channels=6, block_out_channels=(32, 64, 64),
    down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"),
    layers_per_block=2, norm_num_groups=8, attn_norm_num_groups=8, downsample_type="resnet",
    upsample_type="resnet", attention_head_dim=16, resnet_time_scale_shift="scale_shift",
    num_class_embeds=6, flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5)

# The same family without scale-shift / resnet resampling: conv resamplers with (1, 1) padding.
SMALL_UNET_CONV_CONFIG = dict(
    sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32, 32),
    down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"),
    layers_per_block=1, norm_num_groups=4, attention_head_dim=8, downsample_padding=1,
    flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6)

SMALL_DIT_CONFIG = dict(num_attention_heads=4, attention_head_dim=16, in_channels=4,
                        out_channels=8, num_layers=3, sample_size=8, patch_size=2,
                        num_embeds_ada_norm=10, norm_eps=1e-6)


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
  """Random weights everywhere (zero-initialised layers included), norm scales around 1."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * std
      is_norm_scale = p.ndim == 1 and "norm" in name and name.endswith("weight")
      p.copy_(1 + noise if is_norm_scale else noise)
  return module.eval()


def tie_dit_embedders(model: torch.nn.Module) -> None:
  """Give every diffusers DiT block block 0's timestep / label embedder (official DiT shares one)."""
  shared = model.transformer_blocks[0].norm1.emb.state_dict()
  for block in model.transformer_blocks[1:]:
    block.norm1.emb.load_state_dict(shared)


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
  """max |ours - ref| / max |ref|."""
  return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


def nchw_to_nhwc(x: torch.Tensor) -> np.ndarray:
  return x.numpy().transpose(0, 2, 3, 1)


def random_params(module, input_shape, with_labels: bool = False, seed: int = 0,
                  std: float = 0.05):
  """Random float32 params of the module's structure, without compiling its initializer.

  Shapes come from `jax.eval_shape`; values are N(0, std^2) from NumPy (zero-initialised layers
  included, so every path of the network contributes).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from diffusion_jax.models import init_params  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(lambda: init_params(module, jax.random.key(0), input_shape, with_labels))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (std * rng.standard_normal(s.shape)).astype(np.float32), shapes)
