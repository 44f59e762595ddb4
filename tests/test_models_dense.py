"""`layers.Dense` / `layers.matmul` (on CPU with K <= N, a custom JVP whose weight gradient uses a
transposed copy of the input; with K > N the plain matmul) against flax's `nn.Dense`
differentiated by JAX: parameters, value, gradients, forward mode (also with one side's tangent
zero), second derivatives, bfloat16 and vmap, for both widths."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numerics_testlib
import pytest

from diffusion_jax.models import get_model, layers
from models_testlib import random_params

B, N, K = 3, 5, 7      # x [B, N, K] -> [B, N, F]; the weight gradient sums B * N = 15 terms
WIDTHS = pytest.mark.parametrize("F", [9, 4], ids=["K<=N, custom JVP", "K>N, plain"])
TOKENS = B * N


def _setup(F, dtype=None):
  x = jax.random.normal(jax.random.key(0), (B, N, K))
  ours, ref = layers.Dense(F, dtype=dtype), nn.Dense(F, dtype=dtype)
  params = ours.init(jax.random.key(1), x)
  return x, params, ours, ref


@WIDTHS
def test_parameters_and_value_are_nn_dense(F):
  x, params, ours, ref = _setup(F)
  ref_params = ref.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref_params)
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  np.testing.assert_array_equal(ours.apply(params, x), ref.apply(params, x))


@WIDTHS
def test_derivatives_match_nn_dense(F):
  """The same products summed in another order: a weight gradient sums B * N products, an input
  gradient F, a second derivative both."""
  x, params, ours, ref = _setup(F)
  cube = lambda m: (lambda p, x: (m.apply(p, x) ** 3).sum())
  for argnums, ops in ((0, TOKENS), (1, F)):
    got = jax.grad(cube(ours), argnums=argnums)(params, x)
    want = jax.grad(cube(ref), argnums=argnums)(params, x)
    for a, d in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      numerics_testlib.assert_f32_close(a, d, ops=2 * ops)
  # forward mode in x, in the kernel, in both
  kernel = params["params"]["kernel"]
  apply = lambda m: (lambda x, k: m.apply({"params": {**params["params"], "kernel": k}}, x))
  for tangents in ((x, jnp.zeros_like(kernel)), (jnp.zeros_like(x), kernel), (x, kernel)):
    got = jax.jvp(apply(ours), (x, kernel), tangents)[1]
    want = jax.jvp(apply(ref), (x, kernel), tangents)[1]
    numerics_testlib.assert_f32_close(got, want, ops=2 * K)
  jvp_x_only = jax.jvp(lambda x: ours.apply(params, x), (x,), (x,))[1]   # kernel tangent symbolic 0
  numerics_testlib.assert_f32_close(jvp_x_only, jax.jvp(lambda x: ref.apply(params, x), (x,), (x,))[1],
                                    ops=K)
  # second derivatives: along the kernel and along x
  def hvp(m, i, primal):
    grad_i = jax.grad(lambda *a: (apply(m)(*a) ** 3).sum(), argnums=i)
    along = lambda v: grad_i(*((v, kernel) if i == 0 else (x, v)))
    return jax.jvp(along, (primal,), (primal,))[1]
  for i, primal in ((1, kernel), (0, x)):
    numerics_testlib.assert_f32_close(hvp(ours, i, primal), hvp(ref, i, primal),
                                      ops=2 * (TOKENS + K + F))


@WIDTHS
def test_bfloat16_and_vmap(F):
  x, params, ours, ref = _setup(F, jnp.bfloat16)
  out = ours.apply(params, x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out, ref.apply(params, x))
  g = jax.grad(lambda p: (ours.apply(p, x).astype(jnp.float32) ** 2).sum())(params)
  g_ref = jax.grad(lambda p: (ref.apply(p, x).astype(jnp.float32) ** 2).sum())(params)
  # bfloat16 products (8 significand bits) summed over B * N tokens in another order
  jax.tree.map(lambda a, d: np.testing.assert_allclose(
      a, d, rtol=0, atol=TOKENS * 2.0 ** -8 * float(np.abs(d).max())), g, g_ref)
  per_example = jax.vmap(lambda xi: ours.apply(params, xi))(x)
  np.testing.assert_array_equal(per_example, out)


@pytest.mark.parametrize("model,with_labels", [("dit_tiny", True), ("unet_tiny", False)])
def test_models_use_it(model, with_labels):
  """The DiT blocks and the U-Net's attention / time embedding / 1x1 convolutions apply
  `layers.matmul` (checked on the jaxpr of the gradient: its custom JVP rule's transposed input)."""
  module = get_model(model)
  size = 16
  channels = module.in_channels if hasattr(module, "in_channels") else 3
  params = random_params(module, (size, size, channels), with_labels=with_labels)
  x = jnp.zeros((2, size, size, channels))
  t = jnp.array([5, 900])
  y = jnp.array([1, 2]) if with_labels else None
  loss = lambda p: module.apply({"params": p}, x, t, y).sum()
  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
  assert "optimization_barrier" in jaxpr


def test_custom_jvp_only_where_the_input_is_narrower():
  x = jnp.ones((4, 6))
  uses_barrier = lambda kernel: "optimization_barrier" in str(jax.make_jaxpr(
      jax.grad(lambda k: layers.matmul(x, k).sum()))(kernel))
  assert uses_barrier(jnp.ones((6, 6))) and uses_barrier(jnp.ones((6, 8)))
  assert not uses_barrier(jnp.ones((6, 5)))
