"""U-Net: side by side with diffusers UNet2DModel, zero-init, dtype, remat, dropout, bad input."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from diffusion_jax import convert
from diffusion_jax.models import get_model, init_params
from models_testlib import (DDPM_CIFAR10_CONFIG, SMALL_UNET_CONFIG, SMALL_UNET_CONV_CONFIG,
                            nchw_to_nhwc, random_params, randomize, rel_err)


def _forward(module, params, x, t, y=None, train=False, rng=None):
  fn = jax.jit(lambda p, x, t, y: module.apply({"params": p}, x, t, y, train=train,
                                               rngs={"dropout": rng} if rng is not None else {}))
  return fn(params, x, t, y)


@pytest.mark.parametrize("config,batch,labels", [
    (DDPM_CIFAR10_CONFIG, 2, False),
    (SMALL_UNET_CONFIG, 3, True),
    (SMALL_UNET_CONV_CONFIG, 2, False),
], ids=["ddpm_cifar10", "small_adm_scale_shift_resupdown", "small_conv_resample"])
def test_matches_diffusers_unet2d(config, batch, labels):
  ref_model = randomize(UNet2DModel(**config))
  size, cin = config["sample_size"], config["in_channels"]
  gen = torch.Generator().manual_seed(1)
  x = torch.randn(batch, cin, size, size, generator=gen)
  t = torch.tensor([0, 999, 417][:batch])
  y = torch.tensor([0, 5, 3][:batch]) if labels else None  # 5 = the null class
  with torch.no_grad():
    ref = ref_model(x, t, class_labels=y).sample.numpy()

  module, params = convert.unet_from_diffusers(ref_model.state_dict(), dict(ref_model.config))
  out = _forward(module, params, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t.numpy()),
                 None if y is None else jnp.asarray(y.numpy(), jnp.int32))
  assert out.shape == (batch, size, size, config["out_channels"])
  assert rel_err(np.asarray(out).transpose(0, 3, 1, 2), ref) < 1e-4


def test_ddpm_cifar10_preset_is_the_diffusers_port():
  """The converted google/ddpm-cifar10-32 configuration is exactly the ddpm_cifar10 preset."""
  kwargs = convert.unet_kwargs_from_diffusers(DDPM_CIFAR10_CONFIG)
  preset = get_model("ddpm_cifar10")
  for k, v in kwargs.items():
    if k != "dropout":  # the diffusers config carries no training dropout
      assert getattr(preset, k) == v, k
  assert sum(p.numel() for p in UNet2DModel(**DDPM_CIFAR10_CONFIG).parameters()) == 35_746_307


def test_fresh_unet_zero_init_facts():
  """Output conv, each residual block's last conv and each attention output start at zero."""
  module = get_model("unet_tiny", num_classes=10)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))

  @jax.jit
  def init_and_apply(x):
    params = module.init(jax.random.key(0, impl="rbg"), x, jnp.array([1, 500]))["params"]
    return params, module.apply({"params": params}, x, jnp.array([1, 500]))
  params, out = init_and_apply(x)
  np.testing.assert_array_equal(params["conv_out"]["kernel"], 0)
  np.testing.assert_array_equal(params["conv_out"]["bias"], 0)
  for name, sub in params.items():
    if "_res_" in name:
      np.testing.assert_array_equal(sub["conv2"]["kernel"], 0)
    if "_attn" in name:
      np.testing.assert_array_equal(sub["proj_out"]["kernel"], 0)
  np.testing.assert_array_equal(out, 0)
  assert float(jnp.abs(params["conv_in"]["kernel"]).max()) > 0


def test_ddpm_cifar10_fresh_output_conv_is_zero():
  module = get_model("ddpm_cifar10")
  # Only the output conv is returned, so XLA compiles just its initialiser.
  conv_out = jax.jit(lambda: init_params(module, jax.random.key(0), (32, 32, 3))["conv_out"])()
  chex.assert_shape(conv_out["kernel"], (3, 3, 128, 3))
  np.testing.assert_array_equal(conv_out["kernel"], 0)
  np.testing.assert_array_equal(conv_out["bias"], 0)


@pytest.mark.parametrize("name,size,classes,dtype", [
    ("unet_tiny", 16, 0, jnp.float32), ("unet_tiny", 8, 10, jnp.bfloat16),
    ("unet_digits", 8, 0, jnp.bfloat16), ("unet_digits", 16, 10, jnp.float32)])
def test_small_unet_forward_shapes(name, size, classes, dtype):
  module = get_model(name, num_classes=classes, learn_sigma=True, dtype=dtype)
  cin = module.in_channels
  params = random_params(module, (size, size, cin), classes > 0)
  x = jax.random.normal(jax.random.key(1), (2, size, size, cin))
  t = jnp.array([3.5, 800.0])  # float timesteps are allowed
  y = jnp.array([1, classes], jnp.int32) if classes else None
  out = _forward(module, params, x, t, y)
  chex.assert_shape(out, (2, size, size, 2 * cin))
  assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())
  if classes:  # y=None on a class-conditional model means the null class
    null = jnp.full((2,), classes, jnp.int32)
    chex.assert_trees_all_close(_forward(module, params, x, t, None),
                                _forward(module, params, x, t, null))


def test_bf16_compute_keeps_float32_params_and_tracks_float32():
  f32 = get_model("unet_tiny")
  bf16 = get_model("unet_tiny", dtype=jnp.bfloat16)
  shapes = lambda m: jax.eval_shape(lambda: init_params(m, jax.random.key(0), (8, 8, 3)))
  chex.assert_trees_all_equal_shapes_and_dtypes(shapes(bf16), shapes(f32))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes(bf16)))
  params = random_params(f32, (8, 8, 3))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  t = jnp.array([3, 800])
  assert rel_err(_forward(bf16, params, x, t), np.asarray(_forward(f32, params, x, t))) < 5e-2


def test_remat_same_params_and_gradients():
  kw = dict(ch_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_classes=3)
  plain = get_model("unet_tiny", **kw)
  remat = get_model("unet_tiny", remat=True, **kw)
  shapes = lambda m: jax.eval_shape(lambda: init_params(m, jax.random.key(0), (4, 4, 3), True))
  chex.assert_trees_all_equal_shapes(shapes(remat), shapes(plain))
  params = random_params(plain, (4, 4, 3), True)
  x = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
  t, y = jnp.array([5, 9]), jnp.array([0, 2])

  def grad(module):
    loss = lambda p: jnp.sum(module.apply({"params": p}, x, t, y, train=True) ** 2)
    return jax.jit(jax.grad(loss))(params)
  chex.assert_trees_all_close(grad(remat), grad(plain), rtol=1e-4, atol=1e-5)  # f32 round-off


def test_dropout_only_in_training():
  module = get_model("unet_tiny", dropout=0.5)
  params = random_params(module, (8, 8, 3))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  t = jnp.array([5, 9])
  run = jax.jit(lambda rng, train: module.apply({"params": params}, x, t, train=train,
                                                rngs={"dropout": rng}), static_argnums=1)
  chex.assert_trees_all_equal(run(jax.random.key(1), False), run(jax.random.key(2), False))
  diff = np.abs(np.asarray(run(jax.random.key(1), True)) - np.asarray(run(jax.random.key(2), True)))
  assert diff.max() > 1e-3


@pytest.mark.parametrize("kwargs,x_shape,y,match", [
    ({}, (16, 16, 3), None, "rank 4"),
    ({}, (2, 16, 16, 1), None, "in_channels=3"),
    ({}, (2, 16, 16, 3), np.array([0, 1]), "unconditional"),
    ({}, (2, 15, 15, 3), None, "divisible"),
    ({"num_classes": 3}, (2, 16, 16, 3), np.array([0, 1, 2]), "shape"),
    ({"attention_levels": (5,)}, (2, 16, 16, 3), None, "attention_levels"),
])
def test_bad_input_raises(kwargs, x_shape, y, match):
  module = get_model("unet_tiny", **kwargs)
  x = jnp.zeros(x_shape)
  t = jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda: module.init(jax.random.key(0), x, t, y))


def test_fourier_features_match_the_closed_form_and_widen_only_the_first_conv():
  from diffusion_jax.models import layers  # pylint: disable=g-import-not-at-top
  x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3), minval=-1.0, maxval=1.0)
  feats = np.asarray(layers.base2_fourier_features(x, (6, 7)))
  x64 = np.asarray(x, np.float64)
  expected = np.concatenate([f(2.0 ** n * 2 * np.pi * x64) for n in (6, 7) for f in (np.sin, np.cos)],
                            axis=-1)
  # |argument| <= 2^7 * 2 pi ~ 804: float32 rounding of the argument, 804 * 2^-24 ~ 5e-5, bounds
  # the error of sin / cos (derivative <= 1); 2e-4 leaves room for the argument's two products.
  np.testing.assert_allclose(feats, expected, atol=2e-4)
  plain = get_model("unet_tiny")
  fourier = get_model("unet_tiny", fourier_exponents=(6, 7))
  p_plain, p_fourier = random_params(plain, (8, 8, 3)), random_params(fourier, (8, 8, 3))
  extra = 3 * 3 * (3 * 4) * plain.ch   # conv_in sees 3 + 12 channels instead of 3
  n = lambda p: sum(int(np.size(a)) for a in jax.tree.leaves(p))
  assert n(p_fourier) - n(p_plain) == extra
  out = fourier.apply({"params": p_fourier}, x, jnp.array([3, 7]))
  assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_conv1x1_is_nn_conv_with_the_same_parameters(dtype):
  """layers.Conv1x1 (a matmul over channels) == flax nn.Conv(features, (1, 1)): same parameter
  tree and initial values for a key, same outputs and gradients on the same parameters."""
  from diffusion_jax.models import layers  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 48))
  ours = layers.Conv1x1(32, dtype=dtype)
  conv = nn.Conv(32, (1, 1), kernel_init=layers.default_kernel_init, dtype=dtype)
  p_ours = ours.init(jax.random.key(1), x)["params"]
  p_conv = conv.init(jax.random.key(1), x)["params"]
  chex.assert_trees_all_equal(p_ours, p_conv)
  p = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), p_conv)

  def out_and_grads(module):
    f = lambda p, x: jnp.sum(jnp.sin(module.apply({"params": p}, x).astype(jnp.float32)))
    return module.apply({"params": p}, x), jax.grad(f, argnums=(0, 1))(p, x)
  # Each output is a 48-term dot product of O(1) terms (plus a bias): float32 rounding of the
  # sum is ~sqrt(48) * 2^-24 relative, 1e-5 leaves room for a different summation order; in
  # bfloat16 both round their inputs the same way, then 8 mantissa bits: 2^-8 relative.
  tol = 1e-5 if dtype == jnp.float32 else 2 ** -7
  chex.assert_trees_all_close(out_and_grads(ours), out_and_grads(conv), rtol=tol, atol=tol)
