"""The DDPM / ADM U-Net in flax.linen.

Level i of the U-Net works at resolution H / 2^i with `ch * ch_mult[i]` channels. On the way down
each level has `num_res_blocks` residual blocks (each followed by self-attention when i is in
`attention_levels`) and, except the last level, a downsampler; the middle is res, attn, res; on
the way up each level has `num_res_blocks + 1` residual blocks, each consuming one skip connection
(concatenated after the features), then an upsampler. With `resblock_updown` the resamplers are
residual blocks that resample inside (BigGAN / ADM); otherwise a strided conv and nearest + conv.

Parameter names follow the structure (`down_1_res_0`, `down_1_attn_0`, `down_1_downsample`,
`mid_res_0`, `mid_attn`, `mid_res_1`, `up_1_res_2`, `up_1_upsample`, ...), which is what
`diffusion_jax.convert` maps the diffusers `UNet2DModel` keys onto.

References:
  Ho, Jain, Abbeel 2020 (DDPM), arXiv:2006.11239, Appendix B and the released `diffusion_tf/models/unet.py`;
  Dhariwal, Nichol 2021 (ADM), arXiv:2105.05233, Sec. 3 (scale-shift norm, resblock up/down,
  multi-head attention).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import layers

Dtype = Any


class UNet(nn.Module):
  """Epsilon (or x0 / v) network of the DDPM / ADM family.

  Call: `apply({'params': p}, x, t, y=None, train=False, rngs={'dropout': key})` with
  x [B, H, W, in_channels] float, t [B] int or float timesteps, y [B] int32 labels or None.
  Returns [B, H, W, out_channels] float32, out_channels = 2 * in_channels with `learn_sigma`
  (the first half is the mean output, the second the variance interpolation v), else in_channels.
  A class-conditional model (`num_classes > 0`) has num_classes + 1 label embeddings; label
  `num_classes` is the null class, which is also used when y is None.

  Attributes:
    in_channels: image channels.
    ch: base channel count; level i has ch * ch_mult[i] channels.
    ch_mult: channel multiplier per level.
    num_res_blocks: residual blocks per level on the way down (one more on the way up).
    attention_levels: levels (0 = full resolution) with self-attention after each res block.
    head_dim: attention head width; None means one head as wide as the features.
    dropout: dropout rate inside the residual blocks (active when train=True).
    num_groups, norm_eps: GroupNorm groups and epsilon.
    scale_shift: ADM adaptive group norm (norm(h) * (1 + s) + b) instead of adding the embedding.
    resblock_updown: residual blocks with built-in resampling instead of conv resamplers.
    downsample_padding: 'asymmetric' (TF SAME, DDPM) or 'symmetric' for the strided conv.
    mid_attention: self-attention in the middle block.
    time_embed_dim: width of the embedding MLP (default 4 * ch).
    time_flip_sin_to_cos, time_freq_shift: sinusoidal embedding variant (DDPM: False, 1;
      ADM: True, 0); see `layers.timestep_embedding`.
    num_classes: 0 for unconditional; else labels 0..num_classes-1 plus the null class.
    learn_sigma: double the output channels for a learned variance.
    fourier_exponents: VDM's Fourier features of the input (`layers.base2_fourier_features`,
      e.g. (6, 7)) concatenated to x before the first convolution; () for none. The output keeps
      `out_channels`.
    remat: rematerialise each residual / attention block in the backward pass.
    attention: the attention kernel, `layers.attention`'s implementation: None (the 'einsum'
      kernel on CPU, JAX's choice elsewhere), 'einsum', 'xla' or 'cudnn' (GPU, bfloat16).
    dtype: computation dtype; param_dtype: parameter dtype (float32).
  """
  in_channels: int = 3
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attention_levels: tuple[int, ...] = (1,)
  head_dim: int | None = None
  dropout: float = 0.0
  num_groups: int = 32
  norm_eps: float = 1e-6
  scale_shift: bool = False
  resblock_updown: bool = False
  downsample_padding: str = "asymmetric"
  mid_attention: bool = True
  time_embed_dim: int | None = None
  time_flip_sin_to_cos: bool = False
  time_freq_shift: float = 1.0
  num_classes: int = 0
  learn_sigma: bool = False
  fourier_exponents: tuple[int, ...] = ()
  remat: bool = False
  attention: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  def _check_config(self) -> None:
    levels = len(self.ch_mult)
    for lvl in self.attention_levels:
      if not 0 <= lvl < levels:
        raise ValueError(f"attention_levels {self.attention_levels} must lie in [0, {levels})")
    if self.num_res_blocks < 1:
      raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
    if self.downsample_padding not in ("asymmetric", "symmetric"):
      raise ValueError("downsample_padding must be 'asymmetric' or 'symmetric', "
                       f"got {self.downsample_padding!r}")

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    self._check_config()
    t = layers.check_inputs(x, t, y, in_channels=self.in_channels, num_classes=self.num_classes)
    factor = 2 ** (len(self.ch_mult) - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"image size {x.shape[1:3]} must be divisible by 2^(levels-1) = {factor} "
                       f"for ch_mult={self.ch_mult}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    res_cls = nn.remat(layers.ResBlock, static_argnums=(3,)) if self.remat else layers.ResBlock
    attn_cls = nn.remat(layers.AttnBlock) if self.remat else layers.AttnBlock
    res = lambda c, name, resample="none": res_cls(
        c, self.num_groups, self.norm_eps, self.dropout, self.scale_shift, resample, name=name,
        **kw)
    attn = lambda name: attn_cls(self.head_dim, self.num_groups, self.norm_eps,
                                 attention=self.attention, name=name, **kw)
    dense = lambda c, name: layers.Dense(c, kernel_init=layers.default_kernel_init, name=name, **kw)

    # Conditioning embedding.
    temb_dim = self.time_embed_dim or 4 * self.ch
    emb = layers.timestep_embedding(t, self.ch, flip_sin_to_cos=self.time_flip_sin_to_cos,
                                    freq_shift=self.time_freq_shift)
    emb = dense(temb_dim, "time_embed_1")(emb.astype(self.dtype))
    emb = dense(temb_dim, "time_embed_2")(nn.silu(emb))
    if self.num_classes > 0:
      if y is None:
        y = jnp.full((x.shape[0],), self.num_classes, jnp.int32)
      emb = emb + nn.Embed(self.num_classes + 1, temb_dim, embedding_init=nn.initializers.normal(1.0),
                           name="class_embed", **kw)(y)

    # Down.
    if self.fourier_exponents:
      x = jnp.concatenate([x, layers.base2_fourier_features(x, tuple(self.fourier_exponents))],
                          axis=-1)
    h = nn.Conv(self.ch, (3, 3), padding="SAME", kernel_init=layers.default_kernel_init,
                name="conv_in", **kw)(x.astype(self.dtype))
    skips = [h]
    for lvl, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = res(self.ch * mult, f"down_{lvl}_res_{i}")(h, emb, train)
        if lvl in self.attention_levels:
          h = attn(f"down_{lvl}_attn_{i}")(h)
        skips.append(h)
      if lvl != len(self.ch_mult) - 1:
        name = f"down_{lvl}_downsample"
        if self.resblock_updown:
          h = res(h.shape[-1], name, "down")(h, emb, train)
        else:
          h = layers.Downsample(h.shape[-1], self.downsample_padding, name=name, **kw)(h)
        skips.append(h)

    # Middle.
    h = res(h.shape[-1], "mid_res_0")(h, emb, train)
    if self.mid_attention:
      h = attn("mid_attn")(h)
    h = res(h.shape[-1], "mid_res_1")(h, emb, train)

    # Up.
    for lvl in reversed(range(len(self.ch_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
        h = res(self.ch * self.ch_mult[lvl], f"up_{lvl}_res_{i}")(h, emb, train)
        if lvl in self.attention_levels:
          h = attn(f"up_{lvl}_attn_{i}")(h)
      if lvl != 0:
        name = f"up_{lvl}_upsample"
        if self.resblock_updown:
          h = res(h.shape[-1], name, "up")(h, emb, train)
        else:
          h = layers.Upsample(h.shape[-1], name=name, **kw)(h)
    assert not skips

    h = nn.silu(layers.GroupNorm(self.num_groups, self.norm_eps, name="norm_out", **kw)(h))
    h = nn.Conv(self.out_channels, (3, 3), padding="SAME", kernel_init=nn.initializers.zeros,
                name="conv_out", **kw)(h)
    return h.astype(jnp.float32)
