"""Building blocks shared by the U-Net, the DiT and the text transformer.

All blocks take NHWC (or [B, N, D] token) inputs, keep parameters in `param_dtype` (float32) and
compute in `dtype` (bfloat16 on accelerators). Normalisation statistics and softmax are computed in
float32 whatever `dtype` is.

References:
  Ho, Jain, Abbeel 2020 (DDPM), arXiv:2006.11239, Appendix B;
  Nichol, Dhariwal 2021 (improved DDPM), arXiv:2102.09672; Dhariwal, Nichol 2021 (ADM),
  arXiv:2105.05233, Sec. 3; Peebles, Xie 2023 (DiT), arXiv:2212.09748, Sec. 3.2.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.custom_derivatives import SymbolicZero
import numpy as np

Dtype = Any
# The name under which `attention`'s 'einsum' kernel marks its softmax probabilities.
ATTENTION_PROBS = "attention_probs"
# What scanned transformer blocks keep for the backward pass: the matmul outputs and the attention
# probabilities; the other elementwise parts (LayerNorm, modulation, GELU) are recomputed, which
# was ~10 % faster on XLA:CPU than writing all of them into the scan's stacked buffers
# (benchmarks/README.md). Same values.
SCAN_SAVE_POLICY = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_saveable,
    jax.checkpoint_policies.save_only_these_names(ATTENTION_PROBS))
default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
RESAMPLE_MODES = ("none", "up", "down")


def timestep_embedding(t: jax.Array, dim: int, *, flip_sin_to_cos: bool = False,
                       freq_shift: float = 1.0, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps, computed in float32.

  freqs_i = exp(-log(max_period) * i / (half - freq_shift)), i = 0..half-1, half = dim // 2;
  emb = [sin(t * freqs), cos(t * freqs)] (or cos first with `flip_sin_to_cos`), zero-padded to
  `dim` when odd. DDPM: freq_shift=1, sin first; DiT / ADM: freq_shift=0, cos first.

  Args:
    t: [B] int or float timesteps.
    dim: embedding width.
  Returns:
    [B, dim] float32.
  References: DDPM code `get_timestep_embedding`; DiT `TimestepEmbedder.timestep_embedding`.
  """
  half = dim // 2
  if half - freq_shift <= 0:
    raise ValueError(f"dim={dim} too small for freq_shift={freq_shift}")
  freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / (half - freq_shift))
  args = t.astype(jnp.float32)[:, None] * jnp.asarray(freqs, jnp.float32)[None, :]
  first, second = (jnp.cos(args), jnp.sin(args)) if flip_sin_to_cos else (jnp.sin(args), jnp.cos(args))
  emb = jnp.concatenate([first, second], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """Fixed 2-D sine-cosine positional embedding, in NumPy float64 (a constant, not a parameter).

  The first dim/2 channels encode the column index, the last dim/2 the row index, each as
  [sin(pos * omega), cos(pos * omega)] with omega_k = 10000^(-k / (dim/4)), as the official DiT
  (MAE) code does (its meshgrid puts the w coordinate first).

  Returns:
    [grid_h * grid_w, dim] float64, tokens in row-major (h, w) order.
  References: DiT `models.py` get_2d_sincos_pos_embed; MAE (He et al. 2022).
  """
  if dim % 4:
    raise ValueError(f"dim must be divisible by 4 for the 2-D sin-cos embedding, got {dim}")
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

  def one_d(pos: np.ndarray) -> np.ndarray:
    out = pos.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64),
                           indexing="ij")
  return np.concatenate([one_d(cols), one_d(rows)], axis=1)


ATTENTION_IMPLEMENTATIONS = (None, "einsum", "xla", "cudnn")
# What masked-out logits become: jax.nn.dot_product_attention's value, so both kernels agree on
# fully masked rows (a uniform softmax).
_MASKED_LOGIT = -0.7 * float(np.finfo(np.float32).max)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
              implementation: str | None = None) -> jax.Array:
  """Softmax attention, q [B, N, heads, head_dim], k, v [B, S, heads, head_dim] -> [B, N, heads,
  head_dim], scale head_dim ** -0.5; mask: None or bool broadcastable to [B, heads, N, S] (True:
  may attend). Logits and softmax in float32 whatever the inputs' dtype.

  implementation:
    None: the backend's fastest measured kernel: 'einsum' on CPU; on a GPU cuDNN's fused kernel
      where it takes the inputs (bfloat16 / float16, no mask, a head_dim cuDNN supports; it
      checks when traced), else 'xla'; 'xla' on other backends. On an H100 cuDNN made the
      DiT-XL/2 bfloat16 train step 1.20x (blocks unrolled) to 1.24x (scanned) faster than 'xla'
      (benchmarks/README.md).
    'einsum': two einsums around a float32 softmax, with a hand-written derivative
      (`_einsum_attention`); on XLA:CPU its gradient is ~2x faster than 'xla''s
      (benchmarks/README.md).
    'xla', 'cudnn': `jax.nn.dot_product_attention` with that implementation; 'cudnn' is cuDNN's
      fused kernel (a GPU, bfloat16 / float16 inputs, head_dim a multiple of 8 up to 128).
  """
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got "
                     f"{implementation!r}")
  if implementation == "cudnn" and jax.default_backend() != "gpu":
    raise ValueError(f"attention implementation 'cudnn' needs a GPU; the backend is "
                     f"{jax.default_backend()!r} (use None, 'einsum' or 'xla')")
  if implementation is None:
    backend = jax.default_backend()
    if backend == "cpu":
      return _einsum_attention(q, k, v, mask)
    if backend == "gpu":
      return _cudnn_or_xla_attention(q, k, v, mask)
    implementation = "xla"
  if implementation == "einsum":
    return _einsum_attention(q, k, v, mask)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def _cudnn_or_xla_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                            mask: jax.Array | None) -> jax.Array:
  """`attention` through cuDNN's fused kernel where it takes these inputs, else through jax.nn's
  'xla' form. cuDNN needs bfloat16 / float16 (here also no mask: the library's masks are
  general boolean arrays) and checks the rest (device, cuDNN version, head_dim) when traced,
  raising if it cannot run them; those inputs take the 'xla' form, which computes the same
  function."""
  if mask is None and q.dtype in (jnp.bfloat16, jnp.float16):
    try:
      return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    except (RuntimeError, NotImplementedError, ValueError):
      pass
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def blocks_scanned(scan_blocks: bool | None) -> bool:
  """Whether a model's transformer blocks run as one `lax.scan` (`scan_blocks`) or unrolled.

  scan_blocks: True / False as asked; None (the models' default) picks the backend's faster form,
  measured: scanned on CPU, where unrolled blocks made XLA:CPU's gradient cost grow with depth
  squared (`scan_blocks`' docstring); unrolled elsewhere, since on an H100 the scan's per-block
  copies of saved activations took 14 % of the DiT-XL/2 bfloat16 train step and unrolled it ran
  1.39x faster (benchmarks/README.md). Parameters are the same either way.
  """
  if scan_blocks is None:
    return jax.default_backend() == "cpu"
  return bool(scan_blocks)


def _logits(q: jax.Array, k: jax.Array, mask: jax.Array | None) -> jax.Array:
  """q k^T * scale in float32 [B, heads, N, S], masked-out entries at `_MASKED_LOGIT`."""
  logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
  logits = logits * jnp.float32(q.shape[-1] ** -0.5)
  return logits if mask is None else jnp.where(mask, logits, _MASKED_LOGIT)


def _softmax_probs(q: jax.Array, k: jax.Array, mask: jax.Array | None) -> jax.Array:
  """softmax(q k^T * scale) over the keys, float32 [B, heads, N, S]."""
  logits = _logits(q, k, mask)
  unnormalised = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
  return unnormalised / unnormalised.sum(-1, keepdims=True)


@jax.custom_jvp
def _einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                      mask: jax.Array | None) -> jax.Array:
  """`attention`'s 'einsum' kernel: softmax(q k^T / sqrt(head_dim)) v, with a custom JVP rule
  (below) that JAX transposes for the backward pass, so forward mode (`jax.jvp`, e.g. the ODE
  likelihood's trace estimate) works as well as `jax.grad`.

  Undifferentiated, the output is normalised after the value matmul, (exp(S - max) V) / rowsum:
  written as softmax then matmul, XLA:CPU put both matmuls and the softmax into one YNNPACK
  fusion that ran ~5x slower than the pieces (the DiT-S/2 forward pass took 612 ms against 335
  ms now; benchmarks/README.md)."""
  logits = _logits(q, k, mask)
  unnormalised = jnp.exp(logits - logits.max(-1, keepdims=True))
  out = jnp.einsum("bnts,bsnh->btnh", unnormalised.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  row_sums = unnormalised.sum(-1).transpose(0, 2, 1)[..., None]     # [B, N, heads, 1]
  return (out / row_sums).astype(v.dtype)


@_einsum_attention.defjvp
def _einsum_attention_jvp(primals, tangents):
  """Tangent from the kept probabilities P (marked `ATTENTION_PROBS` for `jax.checkpoint`
  policies): dS = (dq k^T + q dk^T) / sqrt(head_dim), dP = P * (dS - rowsum(P * dS)),
  d_out = dP v + P dv. Differentiating through the softmax's max, exp and division instead
  (jax.nn's kernel) made the gradient ~2x slower on XLA:CPU (benchmarks/README.md)."""
  q, k, v, mask = primals
  d_q, d_k, d_v, _ = tangents
  probs = checkpoint_name(_softmax_probs(q, k, mask), ATTENTION_PROBS)
  out = jnp.einsum("bnts,bsnh->btnh", probs.astype(v.dtype), v)
  d_logits = (jnp.einsum("btnh,bsnh->bnts", d_q, k, preferred_element_type=jnp.float32)
              + jnp.einsum("btnh,bsnh->bnts", q, d_k, preferred_element_type=jnp.float32))
  d_logits = d_logits * jnp.float32(q.shape[-1] ** -0.5)
  if mask is not None:   # masked logits are constants (a fully masked row has nonzero probs)
    d_logits = jnp.where(mask, d_logits, 0.0)
  d_probs = probs * (d_logits - jnp.sum(probs * d_logits, axis=-1, keepdims=True))
  d_out = (jnp.einsum("bnts,bsnh->btnh", d_probs.astype(v.dtype), v)
           + jnp.einsum("bnts,bsnh->btnh", probs.astype(v.dtype), d_v))
  return out, d_out


def rotary_embedding(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary position embedding of queries or keys x [B, N, heads, head_dim] at positions [N].

  Channel pairs (i, i + head_dim / 2) are rotated by the angle position * base^(-2i / head_dim),
  so q . k depends on the positions only through their difference. Computed in float32.
  References: Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding",
  eq. 34 (the half-split pairing of GPT-NeoX / LLaMA).
  """
  head_dim = x.shape[-1]
  if head_dim % 2:
    raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
  half = head_dim // 2
  freqs = np.exp(-math.log(base) * np.arange(half, dtype=np.float64) * 2.0 / head_dim)
  angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(freqs, jnp.float32)[None, :]
  cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]     # [N, 1, half]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return out.astype(x.dtype)


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int,
               epsilon: float) -> jax.Array:
  """GroupNorm (Wu & He, arXiv:1803.08494) of channels-last x, computed in x's dtype.

  Args:
    x: [B, ..., C]; statistics over the middle axes and each group of C / num_groups channels.
    scale, bias: [C].
  Returns:
    [B, ..., C]: (x - mean) * (rsqrt(var + epsilon) * scale) + bias with var = max(0, E[x^2] -
    E[x]^2), the arithmetic of flax's `nn.GroupNorm` (its default use_fast_variance).

  The value sums each statistic over the middle axes first (channels contiguous), then over each
  group of those channel sums: XLA:CPU runs that several times faster than reducing each
  group's strided slice of x, as flax does (`benchmarks/bench_group_norm.py`). Derivatives, in
  forward and reverse mode, are those of flax's per-group reductions (a custom JVP): XLA:CPU
  differentiates that form faster than the channel-sums one.
  """
  c = x.shape[-1]
  if c % num_groups:
    raise ValueError(f"num_groups={num_groups} must divide the channel count {c}")
  return _group_norm(num_groups, epsilon, x, scale, bias)


def _group_stats_normalize(x, mean, var, scale, bias, epsilon):
  """x [B, ..., C] normalised with per-group mean and var [B, G], then scaled and shifted."""
  b, c = x.shape[0], x.shape[-1]
  per_channel = lambda g: jnp.repeat(g, c // g.shape[-1], axis=-1).reshape(
      (b,) + (1,) * (x.ndim - 2) + (c,))
  var = jnp.maximum(var, 0.0)
  return (x - per_channel(mean)) * (per_channel(lax.rsqrt(var + epsilon)) * scale) + bias


def _group_norm_by_groups(num_groups, epsilon, x, scale, bias):
  """`group_norm` with its statistics reduced over [B, ..., G, C / G] (flax's form)."""
  grouped = x.reshape(x.shape[:-1] + (num_groups, x.shape[-1] // num_groups))
  axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
  mean = grouped.mean(axes)
  return _group_stats_normalize(x, mean, (grouped * grouped).mean(axes) - mean * mean, scale,
                                bias, epsilon)


def _group_norm_channel_sums(num_groups, epsilon, x, scale, bias):
  """`group_norm` with its statistics summed over the middle axes, then over the groups."""
  b, c = x.shape[0], x.shape[-1]
  count = math.prod(x.shape[1:-1]) * (c // num_groups)
  group_mean = lambda v: v.sum(tuple(range(1, x.ndim - 1))).reshape(
      b, num_groups, c // num_groups).sum(-1) / count
  mean = group_mean(x)
  return _group_stats_normalize(x, mean, group_mean(x * x) - mean * mean, scale, bias, epsilon)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _group_norm(num_groups, epsilon, x, scale, bias):
  return _group_norm_channel_sums(num_groups, epsilon, x, scale, bias)


@_group_norm.defjvp
def _group_norm_jvp(num_groups, epsilon, primals, tangents):
  return jax.jvp(functools.partial(_group_norm_by_groups, num_groups, epsilon), primals, tangents)


class _NormParams(nn.Module):
  """A normalisation layer's scale (ones) and bias (zeros), [features] each, under the names
  flax's normalisation layers give them."""
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: int) -> tuple[jax.Array, jax.Array]:
    scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
    return scale, self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)


class GroupNorm(nn.Module):
  """GroupNorm over NHWC (`group_norm`) with statistics in float32; output cast to `dtype`.

  Parameters {"norm": {"scale", "bias"}}: the layout of a flax `nn.GroupNorm` named "norm",
  which checkpoints and the weight import use.
  """
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale, bias = _NormParams(self.param_dtype, name="norm")(x.shape[-1])
    f32 = lambda a: a.astype(jnp.float32)   # group_norm checks that num_groups divides C
    return group_norm(f32(x), f32(scale), f32(bias), self.num_groups,
                      self.epsilon).astype(self.dtype)


def _resample(x: jax.Array, mode: str) -> jax.Array:
  """Parameter-free 2x nearest upsampling or 2x2 average pooling (NHWC)."""
  if mode == "up":
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  if mode == "down":
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  return x


def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [..., K] @ kernel [K, N] -> [..., N], as `nn.Dense` computes it, with a weight gradient
  that XLA:CPU runs at its matmul rate.

  The weight gradient x^T g contracts the token axis, the major axis of both operands. XLA:CPU
  then transposes the larger operand (often the output gradient g) and runs the dot outside
  YNNPACK, at roughly half the matmul rate. On CPU, when x is at most as wide as the output
  (K <= N: its transposed copy is the smaller one), the derivative here is a custom JVP that
  uses a transposed copy of x (kept as it is by `lax.optimization_barrier`): the weight gradient
  becomes a plain [K, M] @ [M, N] matmul. Values and derivatives are the same dots in another
  layout (equal to float32 rounding). With K > N (e.g. a transformer's second MLP layer) and on
  other backends it is the plain matmul (benchmarks/README.md, "The weight gradient").
  """
  if jax.default_backend() != "cpu" or x.shape[-1] > kernel.shape[-1]:
    return jnp.dot(x, kernel)
  return _matmul_transposed_input(x, kernel)


@jax.custom_jvp
def _matmul_transposed_input(x, kernel):
  return jnp.dot(x, kernel)


def _matmul_transposed_input_jvp(primals, tangents):
  x, kernel = primals
  dx, dkernel = tangents
  out = jnp.dot(x, kernel)
  d_out = jnp.zeros_like(out)
  if not isinstance(dx, SymbolicZero):
    d_out = d_out + jnp.dot(dx, kernel)
  if not isinstance(dkernel, SymbolicZero):
    x_t = lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)            # [K, M]
    # out[m, n] = sum_k x_t[k, m] dkernel[k, n]; its transpose in dkernel is x_t @ g
    d_out = d_out + jnp.einsum("km,kn->mn", x_t, dkernel).reshape(out.shape)
  return out, d_out


_matmul_transposed_input.defjvp(_matmul_transposed_input_jvp, symbolic_zeros=True)


class Dense(nn.Module):
  """`nn.Dense` (the same parameters, initialisers, dtype promotion and result) computed by
  `matmul`, whose weight gradient is faster on CPU: [..., C_in] -> [..., features]."""
  features: int
  use_bias: bool = True
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = matmul(x, kernel)
    return y if bias is None else y + bias


class Conv1x1(nn.Module):
  """A 1x1 convolution computed as a matmul over channels: [..., C_in] -> [..., features].

  Parameters are `nn.Conv(features, (1, 1))`'s (kernel [1, 1, C_in, features], bias [features],
  the same initialisation), so weights and checkpoints are interchangeable with it. XLA:CPU runs
  the matmul and its gradients faster than the equivalent convolution (measured by
  `benchmarks/bench_conv_layers.py`; figures in benchmarks/README.md).
  """
  features: int
  kernel_init: Any = default_kernel_init
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return matmul(x, kernel[0, 0]) + bias


class ResBlock(nn.Module):
  """Residual block conditioned on an embedding (DDPM / ADM / BigGAN style).

  h = conv1(resample(act(norm1(x)))); h = norm2(h + W e) or norm2(h) * (1 + s) + b (scale-shift);
  h = conv2(dropout(act(h))); out = resample(x) [1x1 conv if channels change] + h.

  Without an embedding (emb=None: the autoencoder's blocks) there is no `temb_proj` and
  h = norm2(h).

  Args:
    x: [B, H, W, C_in]; emb: [B, E] (not yet passed through the activation) or None.
  Returns:
    [B, H', W', out_channels] with H' = 2H / H / H/2 for resample 'up' / 'none' / 'down'.
  References: DDPM `resnet_block`; ADM `ResBlock` (use_scale_shift_norm, up/down); LDM
    (arXiv:2112.10752) autoencoder `ResnetBlock` with temb_channels=0.
  """
  out_channels: int
  num_groups: int = 32
  epsilon: float = 1e-6
  dropout: float = 0.0
  scale_shift: bool = False
  resample: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array | None, train: bool = False) -> jax.Array:
    if self.resample not in RESAMPLE_MODES:
      raise ValueError(f"resample must be one of {RESAMPLE_MODES}, got {self.resample!r}")
    if emb is None and self.scale_shift:
      raise ValueError("scale_shift=True needs an embedding emb (got emb=None)")
    conv = lambda c, name, init=default_kernel_init: nn.Conv(
        c, (3, 3), padding="SAME", dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=init, name=name)
    norm = lambda name: GroupNorm(self.num_groups, self.epsilon, self.dtype, self.param_dtype,
                                  name=name)
    h = nn.silu(norm("norm1")(x))
    h = _resample(h, self.resample)
    skip = _resample(x.astype(self.dtype), self.resample)
    h = conv(self.out_channels, "conv1")(h)
    if emb is None:
      h = norm("norm2")(h)
    else:
      width = 2 * self.out_channels if self.scale_shift else self.out_channels
      e = Dense(width, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=default_kernel_init, name="temb_proj")(nn.silu(emb.astype(self.dtype)))
      e = e[:, None, None, :]
      if self.scale_shift:
        scale, shift = jnp.split(e, 2, axis=-1)
        h = norm("norm2")(h) * (1 + scale) + shift
      else:
        h = norm("norm2")(h + e)
    h = nn.silu(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv(self.out_channels, "conv2", nn.initializers.zeros)(h)
    if skip.shape[-1] != self.out_channels:
      skip = Conv1x1(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="skip")(skip)
    return skip + h


class AttnBlock(nn.Module):
  """Multi-head self-attention over the pixels of a feature map, with a residual connection.

  out = x + proj_out(attention(q, k, v)), with q, k, v = Dense(GroupNorm(x)) split into heads.

  Args:
    x: [B, H, W, C]; `head_dim` None means one head of width C; `attention` the kernel
      (`attention`'s implementation).
  Returns:
    [B, H, W, C].
  References: DDPM `attn_block`; ADM `AttentionBlock`.
  """
  head_dim: int | None = None
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    head_dim = c if self.head_dim is None else self.head_dim
    if c % head_dim:
      raise ValueError(f"head_dim={head_dim} must divide the channel count {c}")
    heads = c // head_dim
    h = GroupNorm(self.num_groups, self.epsilon, self.dtype, self.param_dtype, name="norm")(x)
    h = h.reshape(b, hgt * wid, c)
    dense = lambda name, init=default_kernel_init: Dense(
        c, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=init, name=name)
    q, k, v = (dense(n)(h).reshape(b, hgt * wid, heads, head_dim) for n in ("q", "k", "v"))
    h = attention(q, k, v, implementation=self.attention).reshape(b, hgt * wid, c)
    h = dense("proj_out", nn.initializers.zeros)(h)
    return x.astype(self.dtype) + h.reshape(b, hgt, wid, c)


class Downsample(nn.Module):
  """2x downsampling by a strided 3x3 conv.

  padding 'asymmetric' pads (0, 1) on each spatial axis (TF 'SAME', as the DDPM release and the
  diffusers port with downsample_padding=0); 'symmetric' pads (1, 1) (ADM, diffusers default).
  """
  channels: int
  padding: str = "asymmetric"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pads = {"asymmetric": ((0, 1), (0, 1)), "symmetric": ((1, 1), (1, 1))}
    if self.padding not in pads:
      raise ValueError(f"padding must be one of {tuple(pads)}, got {self.padding!r}")
    return nn.Conv(self.channels, (3, 3), strides=(2, 2), padding=pads[self.padding],
                   dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=default_kernel_init, name="conv")(x)


class Upsample(nn.Module):
  """2x nearest-neighbour upsampling followed by a 3x3 conv."""
  channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Conv(self.channels, (3, 3), padding="SAME", dtype=self.dtype,
                   param_dtype=self.param_dtype, kernel_init=default_kernel_init,
                   name="conv")(_resample(x, "up"))


def base2_fourier_features(x: jax.Array, exponents: tuple[int, ...]) -> jax.Array:
  """VDM's Fourier features of the input: [B, ..., C] -> [B, ..., 2 K C] for K exponents.

  For each exponent n (in order) the channels of sin(2^n 2 pi x), then of cos(2^n 2 pi x); with
  data on a 1/255 grid (x in [-1, 1]) exponents 6 and 7 resolve the finest intensity steps.

  References: Kingma et al. 2021 (VDM), appendix C; google-research/vdm `Base2FourierFeatures`.
  """
  parts = []
  for n in exponents:
    h = (2.0 ** n) * 2.0 * jnp.pi * x.astype(jnp.float32)
    parts += [jnp.sin(h), jnp.cos(h)]
  return jnp.concatenate(parts, axis=-1).astype(x.dtype)


def check_inputs(x: jax.Array, t: jax.Array, y: jax.Array | None, *, in_channels: int,
                 num_classes: int) -> jax.Array:
  """Validate static shapes of a model call; returns t broadcast to [B].

  Raises ValueError for a non-4-D x, a channel count other than `in_channels`, a t that is not a
  scalar or [B], labels given to an unconditional model, or labels not of shape [B].
  """
  if x.ndim != 4:
    raise ValueError(f"x must be [B, H, W, C] (rank 4), got shape {x.shape}")
  if x.shape[-1] != in_channels:
    raise ValueError(f"x has {x.shape[-1]} channels, the model expects in_channels={in_channels}"
                     " (inputs are NHWC)")
  t = jnp.asarray(t)
  if t.ndim == 0:
    t = jnp.broadcast_to(t, (x.shape[0],))
  if t.shape != (x.shape[0],):
    raise ValueError(f"t must be a scalar or of shape [B]=({x.shape[0]},), got {t.shape}")
  if y is not None:
    if num_classes <= 0:
      raise ValueError("labels y were given to an unconditional model (num_classes=0)")
    if jnp.shape(y) != (x.shape[0],):
      raise ValueError(f"y must be of shape [B]=({x.shape[0]},), got {jnp.shape(y)}")
  return t


def scan_blocks(block: nn.Module, params: Mapping[str, Any], depth: int, h: jax.Array, *args: Any,
                per_block: Any = None, remat: bool = False) -> Any:
  """Applies `depth` blocks of one architecture as a single `lax.scan` over their stacked
  parameters `params['block_0']` ... `params['block_{depth-1}']` (the tree an unrolled loop of
  blocks named `block_i` creates, so checkpoints are the same either way).

  Block i computes `block.apply({'params': params['block_i']}, h, *args)`, or with `per_block`
  (a pytree whose leaves have a leading axis of size depth, e.g. stacked KV caches)
  `block.apply(..., h, *args, per_block[i])`, which must return (h, new per_block[i]).
  The body runs under `jax.checkpoint`: with `remat` nothing is saved for the backward pass,
  else the matmul outputs (`SCAN_SAVE_POLICY`).

  Why: the loop body is a separate XLA computation, so the compiler cannot fuse the elementwise
  residual stream (or its cotangent) across blocks; unrolled, XLA:CPU re-computed the whole
  cotangent chain inside each block's backward fusions and the gradient cost grew with depth
  squared (benchmarks/README.md). One block is compiled instead of `depth`.

  Args:
    block: an unbound module (`parent=None`) of the blocks' architecture.
    params: the parent's parameters (holding the `block_i` subtrees).
    depth: number of blocks (>= 1).
    h: the carried activations, e.g. [B, N, D].
    args: the same extra arguments for every block (conditioning, positions).
  Returns:
    h after the last block, or (h, stacked new per_block) with `per_block`.
  """
  if depth < 1:
    raise ValueError(f"scan_blocks needs depth >= 1, got {depth}")
  stacked = jax.tree.map(lambda *p: jnp.stack(p), *(params[f"block_{i}"] for i in range(depth)))

  def body(carry: jax.Array, xs: tuple[Any, Any]) -> tuple[jax.Array, Any]:
    p, extra = xs
    if per_block is None:
      return block.apply({"params": p}, carry, *args), None
    return block.apply({"params": p}, carry, *args, extra)

  body = jax.checkpoint(body) if remat else jax.checkpoint(body, policy=SCAN_SAVE_POLICY)
  h, ys = jax.lax.scan(body, h, (stacked, per_block))
  return h if per_block is None else (h, ys)
