"""Diffusion Transformer (DiT) with adaLN-Zero blocks, in flax.linen.

The image [B, H, W, C] is cut into p x p patches by a stride-p conv, a fixed 2-D sine-cosine
positional embedding is added (a constant computed from the input size, not a parameter), and
`depth` blocks modulated by c = t_emb + y_emb follow; the final adaLN layer maps each token back to
a p x p x out_channels patch.

Parameter names mirror the official checkpoint (`x_embedder`, `t_embedder_0/2`, `y_embedder`,
`block_N/{attn_qkv, attn_proj, mlp_fc1, mlp_fc2, adaLN_modulation}`,
`final_adaLN_modulation`, `final_linear`); `diffusion_jax.convert` maps them.

References:
  Peebles, Xie 2023, "Scalable Diffusion Models with Transformers", arXiv:2212.09748, Sec. 3.2,
  Fig. 3 and the official `models.py`.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import layers

Dtype = Any
xavier = nn.initializers.xavier_uniform()
# Xavier-uniform over the conv kernel viewed as a [p*p*C, D] matrix, as the official code does.
patch_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2),
                                              out_axis=-1)


def _layer_norm(x: jax.Array, eps: float) -> jax.Array:
  """LayerNorm without affine parameters, statistics in float32."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


class KVCache(NamedTuple):
  """Keys and values of one block's attention for positions [0, S): [B, S, heads, head_dim]."""
  k: jax.Array
  v: jax.Array


class DiTBlock(nn.Module):
  """adaLN-Zero transformer block.

  x = x + g1 * Attn(LN(x) * (1 + s1) + b1); x = x + g2 * MLP(LN(x) * (1 + s2) + b2), with
  (b1, s1, g1, b2, s2, g2) = Linear(SiLU(c)) zero-initialised, so the block starts as identity.

  For sequences (the text transformer): `rope_base` > 0 applies rotary position embeddings to
  queries and keys at `positions`, `causal` lets token i attend to tokens <= i only, and a
  `KVCache` makes the call one decoding step: the keys and values of x (at `positions`) are
  written into the cache at those positions, attention runs over the cache (causal), and the
  call returns (x, updated cache). `attention` picks the attention kernel (`layers.attention`).

  Args:
    x: [B, N, D] tokens; c: [B, D] conditioning; positions: [N] int positions (default 0..N-1);
    cache: a `KVCache` of length S >= max(positions) + 1, or None.
  Returns:
    [B, N, D], or ([B, N, D], KVCache) when a cache is given.
  References: DiT Sec. 3.2 "adaLN-Zero block"; official `DiTBlock`.
  """
  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-6
  rope_base: float = 0.0
  causal: bool = False
  attention: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array, positions: jax.Array | None = None,
               cache: KVCache | None = None):
    b, n, d = x.shape
    dense = lambda width, name, init=xavier: layers.Dense(
        width, kernel_init=init, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    mod = dense(6 * d, "adaLN_modulation", nn.initializers.zeros)(nn.silu(c))
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)

    h = _modulate(_layer_norm(x, self.norm_eps), shift1, scale1)
    head_dim = d // self.num_heads
    qkv = dense(3 * d, "attn_qkv")(h).reshape(b, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if positions is None:
      positions = jnp.arange(n)
    if self.rope_base > 0:
      q = layers.rotary_embedding(q, positions, self.rope_base)
      k = layers.rotary_embedding(k, positions, self.rope_base)
    key_positions = positions
    if cache is not None:
      start = positions[0]
      k = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), start, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), start, axis=1)
      cache = KVCache(k, v)
      key_positions = jnp.arange(k.shape[1])
    mask = None
    if self.causal or cache is not None:
      mask = (key_positions[None, :] <= positions[:, None])[None, None]
    h = layers.attention(q, k.astype(q.dtype), v.astype(q.dtype), mask,
                         implementation=self.attention).reshape(b, n, d)
    x = x + gate1[:, None, :] * dense(d, "attn_proj")(h)

    h = _modulate(_layer_norm(x, self.norm_eps), shift2, scale2)
    h = nn.gelu(dense(int(d * self.mlp_ratio), "mlp_fc1")(h), approximate=True)
    x = x + gate2[:, None, :] * dense(d, "mlp_fc2")(h)
    return x if cache is None else (x, cache)


class DiT(nn.Module):
  """Class-conditional (or unconditional) Diffusion Transformer.

  Call: `apply({'params': p}, x, t, y=None, train=False, rngs={'dropout': key})` with
  x [B, H, W, in_channels], t [B] int or float, y [B] int32 labels or None (None on a
  class-conditional model means the null class `num_classes`). Returns [B, H, W, out_channels]
  float32 with out_channels = 2 * in_channels under `learn_sigma`.

  Attributes:
    in_channels: input channels (4 for Stable Diffusion VAE latents, 3 for pixels).
    patch_size: p; H and W must be multiples of p.
    hidden_size, depth, num_heads, mlp_ratio: transformer width, blocks, heads, MLP expansion.
    num_classes: size of the label table without the null row (0: unconditional, no table).
    learn_sigma: double the output channels for a learned variance.
    freq_shift: sinusoidal time-embedding denominator shift (0 = official DiT, half;
      1 = the diffusers DiT port, half - 1).
    norm_eps: LayerNorm epsilon (1e-6 in DiT).
    remat: rematerialise each block in the backward pass.
    scan_blocks: True applies the blocks as one `lax.scan` (same parameters and outputs up to
      float32 rounding, gradient cost linear in depth on XLA:CPU, one block compiled); False
      unrolls them; None (default) picks the backend's faster form: scanned on CPU, unrolled
      elsewhere (`layers.blocks_scanned`).
    attention: the attention kernel, `layers.attention`'s implementation: None (the backend's
      fastest: 'einsum' on CPU, cuDNN's fused kernel on a GPU where it applies, else 'xla'),
      'einsum', 'xla' or 'cudnn' (GPU, bfloat16).
    dtype: computation dtype; param_dtype: parameter dtype.
  """
  in_channels: int = 4
  patch_size: int = 2
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  learn_sigma: bool = True
  freq_shift: float = 0.0
  norm_eps: float = 1e-6
  remat: bool = False
  scan_blocks: bool | None = None
  attention: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  def _blocks(self, h: jax.Array, c: jax.Array) -> jax.Array:
    """The `depth` blocks, [B, N, D] -> [B, N, D]; parameters stay `block_0` ... `block_{depth-1}`.

    At init (and unscanned: `layers.blocks_scanned`) the blocks run one after the other,
    creating their parameters; scanned they run as one `lax.scan` over the blocks' stacked
    parameters (`layers.scan_blocks`, which says why).
    """
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype, "attention": self.attention}
    args = (self.hidden_size, self.num_heads, self.mlp_ratio, self.norm_eps)
    if self.is_initializing() or not layers.blocks_scanned(self.scan_blocks) or self.depth == 0:
      block_cls = nn.remat(DiTBlock) if self.remat else DiTBlock
      for i in range(self.depth):
        h = block_cls(*args, name=f"block_{i}", **kw)(h, c)
      return h
    return layers.scan_blocks(DiTBlock(*args, parent=None, **kw), self.variables["params"],
                              self.depth, h, c, remat=self.remat)

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    t = layers.check_inputs(x, t, y, in_channels=self.in_channels, num_classes=self.num_classes)
    b, hgt, wid, _ = x.shape
    p, d = self.patch_size, self.hidden_size
    if hgt % p or wid % p:
      raise ValueError(f"patch_size={p} must divide the image size {(hgt, wid)}")
    if d % self.num_heads or d % 4:
      raise ValueError(f"hidden_size={d} must be divisible by num_heads={self.num_heads} and 4")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gh, gw = hgt // p, wid // p

    h = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", kernel_init=patch_init,
                name="x_embedder", **kw)(x.astype(self.dtype))
    pos = layers.sincos_pos_embed_2d(d, gh, gw)
    h = h.reshape(b, gh * gw, d) + jnp.asarray(pos, jnp.float32).astype(self.dtype)

    temb = layers.timestep_embedding(t, 256, flip_sin_to_cos=True, freq_shift=self.freq_shift)
    normal = nn.initializers.normal(0.02)
    c = layers.Dense(d, kernel_init=normal, name="t_embedder_0", **kw)(temb.astype(self.dtype))
    c = layers.Dense(d, kernel_init=normal, name="t_embedder_2", **kw)(nn.silu(c))
    if self.num_classes > 0:
      if y is None:
        y = jnp.full((b,), self.num_classes, jnp.int32)
      c = c + nn.Embed(self.num_classes + 1, d, embedding_init=normal, name="y_embedder", **kw)(y)

    h = self._blocks(h, c)

    zeros = nn.initializers.zeros
    mod = layers.Dense(2 * d, kernel_init=zeros, name="final_adaLN_modulation", **kw)(nn.silu(c))
    shift, scale = jnp.split(mod, 2, axis=-1)
    h = _modulate(_layer_norm(h, self.norm_eps), shift, scale)
    h = layers.Dense(p * p * self.out_channels, kernel_init=zeros, name="final_linear", **kw)(h)
    h = h.reshape(b, gh, gw, p, p, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
    return h.reshape(b, hgt, wid, self.out_channels).astype(jnp.float32)
