"""The FID Inception network (the TensorFlow graph of 2015-12-05) in Flax, and its weight import.

FID, KID, precision/recall and IS are defined on this one network: `pool_3` (2048 features after
the global average pool) and the 1008 logits. It differs from torchvision's InceptionV3 the way
pytorch-fid and torch-fidelity port it:
- input: uint8 RGB resized to 299x299 with TensorFlow 1's bilinear resize (align_corners=False,
  no half-pixel offset: source coordinate = destination * in / out), then (x - 128) / 128;
- convolutions without bias followed by batch norm (eps 1e-3, inference statistics) and ReLU;
- the 3x3 average pools inside Mixed_5*/6*/7b do not count the zero padding
  (`count_include_pad=False`), and the pool branch of the last block (Mixed_7c) is a 3x3 *max*
  pool, stride 1, padding 1;
- 1008 classes; the Inception Score's logits are pool_3 @ W without the bias ('logits_unbiased').

`InceptionV3()(images)` takes uint8 (or float in 0..255) [B, H, W, 3] (1 channel is repeated) and
returns {'pool': [B, 2048], 'logits_unbiased': [B, 1008], 'logits': [B, 1008]}.
`params_from_torch(state_dict)` / `load_torch_weights(path)` import pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth` or torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`
(the same key names: `Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`, ...,
`fc.weight`), read with `torch.load(weights_only=True)`.

References: Szegedy et al. 2016, arXiv:1512.00567 (InceptionV3); Heusel et al. 2017,
arXiv:1706.08500 (FID); pytorch-fid `inception.py` and torch-fidelity
`feature_extractor_inceptionv3.py` / `interpolate_compat_tensorflow.py` (the port).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
BN_EPS = 1e-3
Dtype = Any
Pad = Sequence[tuple[int, int]]


def resize_bilinear_tf1(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """TensorFlow 1.x `resize_bilinear(align_corners=False)`: [B, H, W, C] -> [B, size, size, C].

  Destination pixel i samples the source at s = i * (in / out) (no half-pixel offset), between
  floor(s) and min(floor(s) + 1, in - 1); rows are interpolated first along x, then along y,
  in the input's float dtype (coordinates in float32 as torch-fidelity computes them).

  References: TensorFlow `resize_bilinear_op.cc`; torch-fidelity
  `interpolate_bilinear_2d_like_tensorflow1x` (method 'slow').
  """
  def axis_weights(in_size: int):
    coords = jnp.arange(size, dtype=jnp.float32) * jnp.float32(in_size / size)
    lo = coords.astype(jnp.int32)  # Truncation = floor: coordinates are >= 0.
    hi = jnp.minimum(lo + 1, in_size - 1)
    return lo, hi, (coords - lo.astype(jnp.float32)).astype(images.dtype)

  y_lo, y_hi, dy = axis_weights(images.shape[1])
  x_lo, x_hi, dx = axis_weights(images.shape[2])
  dx = dx[None, None, :, None]
  top, bottom = images[:, y_lo], images[:, y_hi]
  top = top[:, :, x_lo] + (top[:, :, x_hi] - top[:, :, x_lo]) * dx
  bottom = bottom[:, :, x_lo] + (bottom[:, :, x_hi] - bottom[:, :, x_lo]) * dx
  return top + (bottom - top) * dy[None, :, None, None]


class BatchNormInference(nn.Module):
  """Batch norm with frozen statistics: (x - mean) / sqrt(var + eps) * scale + bias.

  All four vectors are 'params' (the network is never trained here), as in the TF graph.
  """
  eps: float = BN_EPS
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    mean = self.param("mean", nn.initializers.zeros, (c,))
    var = self.param("var", nn.initializers.ones, (c,))
    return ((x - mean) / jnp.sqrt(var + self.eps) * scale + bias).astype(self.dtype)


class ConvBN(nn.Module):
  """Conv (no bias) -> inference batch norm -> ReLU: the graph's `BasicConv2d`."""
  features: int
  kernel: tuple[int, int] = (1, 1)
  strides: int = 1
  padding: tuple[int, int] = (0, 0)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    (ph, pw), s = self.padding, self.strides
    x = nn.Conv(self.features, self.kernel, strides=(s, s), padding=((ph, ph), (pw, pw)),
                use_bias=False, dtype=self.dtype, name="conv")(x)
    return nn.relu(BatchNormInference(dtype=self.dtype, name="bn")(x))


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  """3x3, stride 1, padding 1, padded zeros not counted (TensorFlow's average pool)."""
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int, pad: int) -> jax.Array:
  return nn.max_pool(x, (3, 3), (stride, stride), ((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
  """Mixed_5b/5c/5d (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""
  pool_features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda name, c, k=(1, 1), p=(0, 0): ConvBN(c, k, 1, p, self.dtype, name=name)
    b1 = conv("branch1x1", 64)(x)
    b5 = conv("branch5x5_2", 64, (5, 5), (2, 2))(conv("branch5x5_1", 48)(x))
    b3 = conv("branch3x3dbl_1", 64)(x)
    b3 = conv("branch3x3dbl_3", 96, (3, 3), (1, 1))(conv("branch3x3dbl_2", 96, (3, 3), (1, 1))(b3))
    bp = conv("branch_pool", self.pool_features)(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = ConvBN(384, (3, 3), 2, dtype=self.dtype, name="branch3x3")(x)
    bd = ConvBN(64, dtype=self.dtype, name="branch3x3dbl_1")(x)
    bd = ConvBN(96, (3, 3), 1, (1, 1), self.dtype, name="branch3x3dbl_2")(bd)
    bd = ConvBN(96, (3, 3), 2, dtype=self.dtype, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e (17x17): 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1."""
  channels_7x7: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.channels_7x7
    row = lambda name, c: ConvBN(c, (1, 7), 1, (0, 3), self.dtype, name=name)
    col = lambda name, c: ConvBN(c, (7, 1), 1, (3, 0), self.dtype, name=name)
    one = lambda name, c: ConvBN(c, dtype=self.dtype, name=name)
    b1 = one("branch1x1", 192)(x)
    b7 = col("branch7x7_3", 192)(row("branch7x7_2", c7)(one("branch7x7_1", c7)(x)))
    bd = col("branch7x7dbl_2", c7)(one("branch7x7dbl_1", c7)(x))
    bd = row("branch7x7dbl_5", 192)(col("branch7x7dbl_4", c7)(row("branch7x7dbl_3", c7)(bd)))
    bp = one("branch_pool", 192)(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = ConvBN(192, dtype=self.dtype, name="branch3x3_1")(x)
    b3 = ConvBN(320, (3, 3), 2, dtype=self.dtype, name="branch3x3_2")(b3)
    b7 = ConvBN(192, dtype=self.dtype, name="branch7x7x3_1")(x)
    b7 = ConvBN(192, (1, 7), 1, (0, 3), self.dtype, name="branch7x7x3_2")(b7)
    b7 = ConvBN(192, (7, 1), 1, (3, 0), self.dtype, name="branch7x7x3_3")(b7)
    b7 = ConvBN(192, (3, 3), 2, dtype=self.dtype, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b / 7c (8x8): 1x1 | 1x1-(1x3 & 3x1) | 1x1-3x3-(1x3 & 3x1) | pool-1x1.

  pool: 'avg' (Mixed_7b, padding not counted) or 'max' (Mixed_7c, as in the TF graph).
  """
  pool: str = "avg"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    one = lambda name, c: ConvBN(c, dtype=self.dtype, name=name)
    split = lambda prefix, y: jnp.concatenate([
        ConvBN(384, (1, 3), 1, (0, 1), self.dtype, name=f"{prefix}a")(y),
        ConvBN(384, (3, 1), 1, (1, 0), self.dtype, name=f"{prefix}b")(y)], axis=-1)
    b1 = one("branch1x1", 320)(x)
    b3 = split("branch3x3_2", one("branch3x3_1", 384)(x))
    bd = ConvBN(384, (3, 3), 1, (1, 1), self.dtype, name="branch3x3dbl_2")(
        one("branch3x3dbl_1", 448)(x))
    bd = split("branch3x3dbl_3", bd)
    pooled = _avg_pool_3x3(x) if self.pool == "avg" else _max_pool_3x3(x, 1, 1)
    bp = one("branch_pool", 192)(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Classifier(nn.Module):
  """The 1008-way linear layer: returns (x @ kernel, x @ kernel + bias), both float32."""

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], NUM_CLASSES))
    bias = self.param("bias", nn.initializers.zeros, (NUM_CLASSES,))
    unbiased = x @ kernel
    return unbiased, unbiased + bias


class InceptionV3(nn.Module):
  """The FID Inception network.

  dtype: the computation dtype (float32 for reported figures; bfloat16 is faster on
  accelerators but not what FID is defined with). Parameters are float32.

  Input: [B, H, W, 3] (or 1 channel, repeated) uint8 or float in 0..255; any H, W (resized).
  Output: {'pool': float32 [B, 2048], 'logits_unbiased': float32 [B, 1008],
  'logits': float32 [B, 1008]}.
  """
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f"images must be [B, H, W, 3] (or 1 channel), got shape {images.shape}.")
    x = images.astype(jnp.float32)
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
      x = resize_bilinear_tf1(x, INPUT_SIZE)
    x = ((x - 128.0) / 128.0).astype(self.dtype)
    d = self.dtype
    x = ConvBN(32, (3, 3), 2, dtype=d, name="Conv2d_1a_3x3")(x)  # 149
    x = ConvBN(32, (3, 3), dtype=d, name="Conv2d_2a_3x3")(x)  # 147
    x = ConvBN(64, (3, 3), padding=(1, 1), dtype=d, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3(x, 2, 0)  # 73
    x = ConvBN(80, dtype=d, name="Conv2d_3b_1x1")(x)
    x = ConvBN(192, (3, 3), dtype=d, name="Conv2d_4a_3x3")(x)  # 71
    x = _max_pool_3x3(x, 2, 0)  # 35
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(pool_features, d, name=name)(x)
    x = InceptionB(d, name="Mixed_6a")(x)  # 17
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, d, name=name)(x)
    x = InceptionD(d, name="Mixed_7a")(x)  # 8
    x = InceptionE("avg", d, name="Mixed_7b")(x)
    x = InceptionE("max", d, name="Mixed_7c")(x)
    pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    unbiased, logits = Classifier(name="fc")(pool)
    return {"pool": pool, "logits_unbiased": unbiased, "logits": logits}


def init_params(rng: jax.Array) -> dict[str, Any]:
  """Parameters of the right shapes (random convs, identity batch norms): for tests/benchmarks."""
  return InceptionV3().init(rng, jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.uint8))["params"]


# torch name -> (Flax leaf name, transform) inside a BasicConv2d / the fc layer.
_BN_LEAVES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_IGNORED_SUFFIXES = ("num_batches_tracked",)
_IGNORED_PREFIXES = ("AuxLogits.",)  # torchvision-layout files may carry the auxiliary head.


def params_from_torch(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Flax params from a FID Inception state dict (pytorch-fid / torch-fidelity key names).

  Conv kernels OIHW -> HWIO; batch norm weight/bias/running_mean/running_var -> scale/bias/
  mean/var; fc.weight [1008, 2048] -> kernel [2048, 1008]. `num_batches_tracked` and an
  `AuxLogits.*` head are ignored; any other unknown, missing or misshapen key raises ValueError.
  """
  template = jax.tree_util.tree_flatten_with_path(
      jax.eval_shape(init_params, jax.random.PRNGKey(0)))[0]
  expected = {tuple(k.key for k in path): leaf.shape for path, leaf in template}
  flat: dict[tuple[str, ...], np.ndarray] = {}
  for key, value in state_dict.items():
    if key.endswith(_IGNORED_SUFFIXES) or key.startswith(_IGNORED_PREFIXES):
      continue
    value = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value,
                       np.float32)
    parts = key.split(".")
    if parts[0] == "fc":
      target = ("fc", "kernel" if parts[1] == "weight" else "bias")
      value = value.T if parts[1] == "weight" else value
    elif parts[-2] == "conv" and parts[-1] == "weight":
      target = (*parts[:-1], "kernel")
      value = value.transpose(2, 3, 1, 0)
    elif parts[-2] == "bn" and parts[-1] in _BN_LEAVES:
      target = (*parts[:-1], _BN_LEAVES[parts[-1]])
    else:
      raise ValueError(f"state_dict has an unknown key {key!r} for the FID Inception network.")
    if target not in expected:
      raise ValueError(f"state_dict key {key!r} has no place in the FID Inception network.")
    if value.shape != expected[target]:
      raise ValueError(f"state_dict[{key!r}] has shape {value.shape}; expected "
                       f"{expected[target]} after conversion.")
    flat[target] = value
  missing = sorted(".".join(k) for k in expected if k not in flat)
  if missing:
    raise ValueError(f"state_dict lacks {len(missing)} FID Inception weights, e.g. {missing[:3]}.")
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return traverse_util.unflatten_dict(flat)


def load_torch_weights(path: str) -> dict[str, Any]:
  """Flax params from `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid) or
  `weights-inception-2015-12-05-6726825d.pth` (torch-fidelity), read with
  `torch.load(weights_only=True)` (no code in the file is run)."""
  import torch  # pylint: disable=g-import-not-at-top
  return params_from_torch(torch.load(path, map_location="cpu", weights_only=True))
