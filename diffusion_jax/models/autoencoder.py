"""The KL-regularised autoencoder of latent diffusion (the Stable Diffusion VAE), in Flax.

Images [B, H, W, C] in [-1, 1] -> `Encoder` -> 1x1 `quant_conv` -> moments [B, H/f, W/f, 2L]
(mean and log-variance of a diagonal Gaussian, `DiagonalGaussian`), f = 2 ** (levels - 1);
latents [B, H/f, W/f, L] -> 1x1 `post_quant_conv` -> `Decoder` -> images [B, H, W, C].

The blocks are those of `layers` (GroupNorm with float32 statistics, ResBlock without a time
embedding, single-head AttnBlock, asymmetric-padding Downsample, nearest Upsample), laid out as the
LDM / diffusers `AutoencoderKL`: `layers_per_block` ResBlocks per level on the way down,
`layers_per_block + 1` on the way up, a mid ResBlock-Attn-ResBlock in each half, GroupNorm eps 1e-6.

`encode(vae, params, images)` / `decode(vae, params, latents)` are the pure helpers a diffusion
model uses: latents are scaled by `scaling_factor` (and shifted by `shift_factor` where set), so
that they have roughly unit variance.

References:
  Rombach et al. 2022, High-Resolution Image Synthesis with Latent Diffusion Models,
  arXiv:2112.10752, Sec. 3 and Appendix G (KL-f8 autoencoder, scale factor Sec. 4.3.2 / D.1);
  diffusers `AutoencoderKL` (v0.42, `models/autoencoders/autoencoder_kl.py`, `vae.py`).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from diffusion_jax.models import layers

Dtype = Any
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers / LDM DiagonalGaussianDistribution clamp


class DiagonalGaussian(struct.PyTreeNode):
  """The encoder's posterior q(z | x) = N(mean, diag(exp(logvar))).

  mean, logvar: [B, h, w, L] float32, logvar clipped to [-30, 20] as diffusers and LDM do.
  References: LDM `ldm/modules/distributions/distributions.py`; diffusers `DiagonalGaussianDistribution`.
  """
  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
    """moments: [B, h, w, 2L], the mean in the first L channels, the log-variance in the last L."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return cls(mean=mean, logvar=jnp.clip(logvar, *LOGVAR_RANGE))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> jax.Array:
    return jnp.exp(self.logvar)

  def mode(self) -> jax.Array:
    """The posterior mean (its mode), [B, h, w, L]."""
    return self.mean

  def sample(self, key: jax.Array) -> jax.Array:
    """z = mean + std * eps, eps ~ N(0, I) drawn from `key`; [B, h, w, L] float32."""
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

  def kl(self) -> jax.Array:
    """KL(q || N(0, I)) summed over h, w, L: [B]."""
    return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


class _Coder(nn.Module):
  """Fields shared by the encoder and the decoder."""
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  mid_attention: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _conv(self, channels: int, name: str, kernel: int = 3) -> nn.Conv:
    return nn.Conv(channels, (kernel, kernel), padding="SAME", dtype=self.dtype,
                   param_dtype=self.param_dtype, kernel_init=layers.default_kernel_init, name=name)

  def _res(self, channels: int, name: str) -> layers.ResBlock:
    return layers.ResBlock(channels, num_groups=self.norm_num_groups, epsilon=1e-6,
                           dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  def _mid(self, h: jax.Array) -> jax.Array:
    """ResBlock, single-head attention (if `mid_attention`), ResBlock at the deepest width."""
    ch = self.block_out_channels[-1]
    h = self._res(ch, "mid_res_0")(h, None)
    if self.mid_attention:
      h = layers.AttnBlock(None, self.norm_num_groups, 1e-6, self.dtype, self.param_dtype,
                           name="mid_attn")(h)
    return self._res(ch, "mid_res_1")(h, None)

  def _out(self, h: jax.Array, channels: int) -> jax.Array:
    h = nn.silu(layers.GroupNorm(self.norm_num_groups, 1e-6, self.dtype, self.param_dtype,
                                 name="norm_out")(h))
    return self._conv(channels, "conv_out")(h)


class Encoder(_Coder):
  """Images [B, H, W, C] -> moments [B, H/f, W/f, 2 * latent_channels] (before quant_conv).

  Level i (width block_out_channels[i]) has `layers_per_block` ResBlocks, then a stride-2 conv
  with (0, 1) padding except at the last level. References: diffusers `vae.Encoder`.
  """
  latent_channels: int = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    chans = tuple(self.block_out_channels)
    h = self._conv(chans[0], "conv_in")(x.astype(self.dtype))
    for lvl, ch in enumerate(chans):
      for j in range(self.layers_per_block):
        h = self._res(ch, f"down_{lvl}_res_{j}")(h, None)
      if lvl < len(chans) - 1:
        h = layers.Downsample(ch, "asymmetric", self.dtype, self.param_dtype,
                              name=f"down_{lvl}_downsample")(h)
    h = self._mid(h)
    return self._out(h, 2 * self.latent_channels)


class Decoder(_Coder):
  """Latents [B, h, w, L] (after post_quant_conv) -> images [B, h*f, w*f, out_channels].

  From the deepest level down to level 0: `layers_per_block + 1` ResBlocks at width
  block_out_channels[level], then nearest 2x upsampling + conv except at level 0.
  Parameters are named by level (`up_{level}_res_{j}`, level 0 = full resolution) as the LDM code.
  References: diffusers `vae.Decoder`.
  """
  out_channels: int = 3

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    chans = tuple(self.block_out_channels)
    h = self._conv(chans[-1], "conv_in")(z.astype(self.dtype))
    h = self._mid(h)
    for lvl in reversed(range(len(chans))):
      for j in range(self.layers_per_block + 1):
        h = self._res(chans[lvl], f"up_{lvl}_res_{j}")(h, None)
      if lvl > 0:
        h = layers.Upsample(chans[lvl], self.dtype, self.param_dtype, name=f"up_{lvl}_upsample")(h)
    return self._out(h, self.out_channels)


class AutoencoderKL(nn.Module):
  """KL autoencoder: `encode(x) -> DiagonalGaussian`, `decode(z) -> x`, `__call__` = both.

  Parameters are float32 (`param_dtype`); `dtype` sets the compute precision (bfloat16 on
  accelerators), GroupNorm statistics are float32 and the posterior and decoded images are returned
  in float32. `scaling_factor` / `shift_factor` are not used by the module itself: the
  `encode` / `decode` helpers of this file apply them.

  Params: {'encoder', 'quant_conv' (if use_quant_conv), 'post_quant_conv' (if
  use_post_quant_conv), 'decoder'}.
  References: arXiv:2112.10752 (LDM); diffusers `AutoencoderKL`.
  """
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  mid_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self) -> None:
    chans = tuple(self.block_out_channels)
    if not chans or any(c % self.norm_num_groups for c in chans):
      raise ValueError(f"block_out_channels={chans} must be non-empty multiples of "
                       f"norm_num_groups={self.norm_num_groups}")
    shared = dict(block_out_channels=chans, layers_per_block=self.layers_per_block,
                  norm_num_groups=self.norm_num_groups, mid_attention=self.mid_attention,
                  dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(latent_channels=self.latent_channels, **shared)
    self.decoder = Decoder(out_channels=self.out_channels, **shared)
    conv1x1 = lambda c: layers.Conv1x1(c, dtype=self.dtype, param_dtype=self.param_dtype)
    if self.use_quant_conv:
      self.quant_conv = conv1x1(2 * self.latent_channels)
    if self.use_post_quant_conv:
      self.post_quant_conv = conv1x1(self.latent_channels)

  @property
  def downsampling_factor(self) -> int:
    """f: latents are H/f x W/f."""
    return 2 ** (len(tuple(self.block_out_channels)) - 1)

  def encode(self, x: jax.Array) -> DiagonalGaussian:
    """x: [B, H, W, in_channels] in [-1, 1], H and W divisible by f -> posterior over [B, H/f, W/f, L]."""
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"x must be [B, H, W, in_channels={self.in_channels}], got {x.shape}")
    f = self.downsampling_factor
    if x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f"image size {x.shape[1:3]} must be divisible by the downsampling factor {f}")
    moments = self.encoder(x)
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    return DiagonalGaussian.from_moments(moments)

  def decode(self, z: jax.Array) -> jax.Array:
    """z: [B, h, w, latent_channels] (unscaled) -> images [B, h*f, w*f, out_channels] float32."""
    if z.ndim != 4 or z.shape[-1] != self.latent_channels:
      raise ValueError(f"z must be [B, h, w, latent_channels={self.latent_channels}], got {z.shape}")
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z.astype(self.dtype))
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> tuple[jax.Array, DiagonalGaussian]:
    """Reconstruction of x (from a posterior sample if `key` is given, else its mode) and the posterior."""
    posterior = self.encode(x)
    z = posterior.mode() if key is None else posterior.sample(key)
    return self.decode(z), posterior


def init_autoencoder(vae: AutoencoderKL, rng: jax.Array, image_size: int | None = None) -> Any:
  """Parameters of `vae` (the params pytree, no 'params' wrapper); they do not depend on the size.

  image_size defaults to the smallest valid one (f). Use under `jax.eval_shape` to count.
  """
  size = image_size or vae.downsampling_factor
  return vae.init(rng, jnp.zeros((1, size, size, vae.in_channels), jnp.float32))["params"]


def encode(vae: AutoencoderKL, params: Any, images: jax.Array,
           key: jax.Array | None = None) -> jax.Array:
  """Images -> diffusion-space latents: (z - shift_factor) * scaling_factor.

  Args:
    vae: the module; params: its parameters (no 'params' wrapper).
    images: [B, H, W, C] in [-1, 1], H and W divisible by f.
    key: None takes the posterior mean; a key draws z from the posterior.
  Returns:
    [B, H/f, W/f, L] float32.
  References: LDM `LatentDiffusion.get_first_stage_encoding`; diffusers pipelines
    (`latents = (latents - shift_factor) * scaling_factor`).
  """
  posterior = vae.apply({"params": params}, images, method=AutoencoderKL.encode)
  z = posterior.mode() if key is None else posterior.sample(key)
  return (z - (vae.shift_factor or 0.0)) * vae.scaling_factor


def decode(vae: AutoencoderKL, params: Any, latents: jax.Array) -> jax.Array:
  """Diffusion-space latents -> images: decoder(latents / scaling_factor + shift_factor).

  Args:
    latents: [B, h, w, L] as `encode` returns them.
  Returns:
    [B, h*f, w*f, C] float32, nominally in [-1, 1] (not clipped).
  """
  z = latents / vae.scaling_factor + (vae.shift_factor or 0.0)
  return vae.apply({"params": params}, z, method=AutoencoderKL.decode)
