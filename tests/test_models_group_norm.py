"""`layers.group_norm` (channel sums first, flax's per-group derivatives) and `layers.GroupNorm`
against flax's `nn.GroupNorm`: value, gradient, JVP and a second derivative, in float64 (the
same arithmetic up to summation order) and float32 (rounding bounds), and the parameter layout.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numerics_testlib
import pytest

from diffusion_jax.models import layers

SHAPE, GROUPS = (2, 4, 6, 64), 16          # [B, H, W, C]; 4 channels per group
GROUP_SIZE = 4 * 6 * 64 // GROUPS          # 96 values per statistic
EPS64 = float(np.finfo(np.float64).eps)


def _inputs(dtype, constant_group=False):
  rng = np.random.default_rng(0)
  x = 2.0 * rng.standard_normal(SHAPE) + 0.5        # a mean the variance must not absorb
  if constant_group:
    # variance 0 exactly in any summation order (0.5 and 0.25 and their sums are exact), so
    # both sides take the max(0, var) clamp and epsilon alone sets the scale
    x[1, ..., 8:12] = 0.5
  scale = 1.0 + 0.1 * rng.standard_normal(SHAPE[-1])
  bias = 0.1 * rng.standard_normal(SHAPE[-1])
  cotangent = rng.standard_normal(SHAPE)
  tangents = (rng.standard_normal(SHAPE), 0.1 * rng.standard_normal(SHAPE[-1]),
              0.1 * rng.standard_normal(SHAPE[-1]))
  cast = lambda a: jnp.asarray(a, dtype)
  return (cast(x), cast(scale), cast(bias)), cast(cotangent), tuple(map(cast, tangents))


def _flax(dtype):
  module = nn.GroupNorm(num_groups=GROUPS, epsilon=1e-6, dtype=dtype, param_dtype=dtype)
  return lambda x, s, b: module.apply({"params": {"scale": s, "bias": b}}, x)


def _ours(x, s, b):
  return layers.group_norm(x, s, b, GROUPS, 1e-6)


def _derivatives(fn, primals, cotangent, tangents):
  """value, d<fn, cotangent>/d(x, scale, bias), the JVP, and d/dx of <grad_x, cotangent> along
  the x tangent (a second derivative)."""
  value = fn(*primals)
  grads = jax.grad(lambda *p: (fn(*p) * cotangent).sum(), argnums=(0, 1, 2))(*primals)
  jvp = jax.jvp(fn, primals, tangents)[1]
  grad_x = lambda x: jax.grad(lambda x: (fn(x, *primals[1:]) * cotangent).sum())(x)
  second = jax.jvp(grad_x, primals[:1], tangents[:1])[1]
  return (value,) + tuple(grads) + (jvp, second)


NAMES = ("value", "grad x", "grad scale", "grad bias", "jvp", "second derivative")


@pytest.mark.parametrize("constant_group", [False, True], ids=["random", "a constant group"])
def test_matches_flax_in_float64(constant_group):
  """Same formula, other summation order: each sum of n = 96 terms rounds differently by at most
  n float64 ulps of its magnitude; a few such sums chain into each output."""
  with jax.enable_x64(True):
    primals, cotangent, tangents = _inputs(jnp.float64, constant_group)
    ours = _derivatives(_ours, primals, cotangent, tangents)
    ref = _derivatives(_flax(jnp.float64), primals, cotangent, tangents)
  for name, a, d in zip(NAMES, ours, ref, strict=True):
    d = np.asarray(d)
    # a parameter's gradient also sums B * H * W = 48 products
    ops = 4 * GROUP_SIZE + (48 if name in ("grad scale", "grad bias") else 0)
    np.testing.assert_allclose(np.asarray(a), d, rtol=0, atol=ops * EPS64 * float(np.abs(d).max()),
                               err_msg=name)


def test_matches_flax_in_float32():
  """The value sums in another order (2 sums of 96 terms: E[x] and E[x^2]); derivatives use
  flax's own per-group arithmetic, so they agree to a few operations' rounding."""
  primals, cotangent, tangents = _inputs(jnp.float32)
  ours = _derivatives(_ours, primals, cotangent, tangents)
  ref = _derivatives(_flax(jnp.float32), primals, cotangent, tangents)
  numerics_testlib.assert_f32_close(ours[0], ref[0], ops=2 * GROUP_SIZE, err_msg="value")
  for name, a, d in zip(NAMES[1:], ours[1:], ref[1:], strict=True):
    # A parameter's gradient sums B * H * W = 48 products whose rounding the value's carries.
    ops = 2 * GROUP_SIZE + (48 if name in ("grad scale", "grad bias") else 0)
    numerics_testlib.assert_f32_close(a, d, ops=ops, err_msg=name)


def test_module_has_flax_parameter_layout_and_output():
  """layers.GroupNorm's parameters are those of a flax nn.GroupNorm named "norm" (checkpoints
  and weight imports rely on it), and it computes the same function in float32 whatever dtype."""
  x = jax.random.normal(jax.random.key(0), SHAPE)
  ours = layers.GroupNorm(GROUPS, 1e-6, dtype=jnp.bfloat16)
  params = ours.init(jax.random.key(1), x)["params"]
  flax_params = nn.GroupNorm(num_groups=GROUPS, epsilon=1e-6).init(jax.random.key(1), x)["params"]
  assert jax.tree.map(jnp.shape, params) == {"norm": jax.tree.map(jnp.shape, flax_params)}
  np.testing.assert_array_equal(params["norm"]["scale"], flax_params["scale"])
  np.testing.assert_array_equal(params["norm"]["bias"], flax_params["bias"])
  out = ours.apply({"params": params}, x)
  assert out.dtype == jnp.bfloat16
  ref = nn.GroupNorm(num_groups=GROUPS, epsilon=1e-6).apply({"params": params["norm"]}, x)
  # one bfloat16 rounding of outputs of magnitude a few units
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=2.0 ** -8, atol=2.0 ** -8)


def test_rejects_channels_not_divisible_by_groups():
  x = jnp.ones((1, 2, 2, 6))
  with pytest.raises(ValueError, match="num_groups=4 must divide the channel count 6"):
    layers.group_norm(x, jnp.ones(6), jnp.zeros(6), 4, 1e-6)
  with pytest.raises(ValueError, match="num_groups=4 must divide the channel count 6"):
    layers.GroupNorm(4).init(jax.random.key(0), x)
