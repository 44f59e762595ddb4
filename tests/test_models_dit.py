"""DiT: side by side with diffusers DiTTransformer2DModel and the official layout, zero init."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import hlo_testlib
import numerics_testlib
import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed

from diffusion_jax import convert
from diffusion_jax.models import get_model, layers
from models_testlib import (SMALL_DIT_CONFIG, nchw_to_nhwc, random_params, randomize, rel_err,
                            tie_dit_embedders)


def _reference(seed=0):
  model = randomize(DiTTransformer2DModel(**SMALL_DIT_CONFIG), seed=seed)
  tie_dit_embedders(model)
  gen = torch.Generator().manual_seed(1)
  x = torch.randn(3, 4, 8, 8, generator=gen)
  t = torch.tensor([0, 999, 417])
  y = torch.tensor([3, 10, 0])  # 10 = the null class
  return model, x, t, y


def _run(module, params, x, t, y):
  fn = jax.jit(lambda p, x, t, y: module.apply({"params": p}, x, t, y))
  out = fn(params, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t.numpy()),
           jnp.asarray(y.numpy(), jnp.int32))
  return np.asarray(out).transpose(0, 3, 1, 2)


def test_matches_diffusers_dit_with_tied_embedders():
  model, x, t, y = _reference()
  with torch.no_grad():
    ref = model(x, t, class_labels=y).sample.numpy()
  module, params = convert.dit_from_diffusers(model.state_dict(), dict(model.config))
  assert module.freq_shift == 1.0 and module.learn_sigma and module.num_classes == 10
  assert rel_err(_run(module, params, x, t, y), ref) < 1e-4


def test_matches_official_layout_and_time_embedding():
  """The official checkpoint path, against diffusers' DiT with the official time embedding.

  The official DiT uses freqs exp(-log(1e4) i / half) where the diffusers port divides by
  half - 1; setting the port's `downscale_freq_shift` to 0 makes it the official network.
  """
  model, x, t, y = _reference(seed=5)
  for block in model.transformer_blocks:
    block.norm1.emb.time_proj.downscale_freq_shift = 0
  with torch.no_grad():
    ref = model(x, t, class_labels=y).sample.numpy()
  official = convert.official_dit_from_diffusers_state(model.state_dict())
  official["pos_embed"] = model.pos_embed.pos_embed.numpy()  # [1, N, D], as the .pt holds it
  assert {k.split(".")[0] for k in official} == {
      "x_embedder", "t_embedder", "y_embedder", "blocks", "final_layer", "pos_embed"}
  assert official["blocks.0.attn.qkv.weight"].shape == (3 * 64, 64)
  module, params = convert.dit_from_official(official, num_heads=4)
  assert module.freq_shift == 0.0 and module.depth == 3 and module.patch_size == 2
  assert rel_err(_run(module, params, x, t, y), ref) < 1e-4


def test_untied_diffusers_embedders_are_refused():
  model = randomize(DiTTransformer2DModel(**SMALL_DIT_CONFIG))
  with pytest.raises(ValueError, match="embedder"):
    convert.dit_from_diffusers(model.state_dict(), dict(model.config))


@pytest.mark.parametrize("grid", [2, 4, 16])
def test_pos_embed_matches_diffusers(grid):
  ref = get_2d_sincos_pos_embed(64, grid, base_size=grid, output_type="np")
  np.testing.assert_allclose(layers.sincos_pos_embed_2d(64, grid, grid), ref, atol=1e-6)


def test_pos_embed_rectangular_grid():
  """First half encodes the column only, second half the row only."""
  emb = layers.sincos_pos_embed_2d(32, 3, 5).reshape(3, 5, 32)
  np.testing.assert_array_equal(emb[:, :, :16], np.broadcast_to(emb[:1, :, :16], (3, 5, 16)))
  np.testing.assert_array_equal(emb[:, :, 16:], np.broadcast_to(emb[:, :1, 16:], (3, 5, 16)))
  np.testing.assert_allclose(emb[2, 0, 16:], layers.sincos_pos_embed_2d(32, 3, 1)[2, 16:])


def test_timestep_embedding_closed_forms():
  t = jnp.array([0.0, 1.0, 37.5, 999.0])
  half = 64
  ddpm = np.exp(-np.log(10000) * np.arange(half) / (half - 1))
  dit = np.exp(-np.log(10000) * np.arange(half) / half)
  tt = np.asarray(t, np.float64)[:, None]
  np.testing.assert_allclose(layers.timestep_embedding(t, 128, freq_shift=1),
                             np.concatenate([np.sin(tt * ddpm), np.cos(tt * ddpm)], 1), atol=2e-4)
  np.testing.assert_allclose(
      layers.timestep_embedding(t, 128, flip_sin_to_cos=True, freq_shift=0),
      np.concatenate([np.cos(tt * dit), np.sin(tt * dit)], 1), atol=2e-4)


def test_fresh_dit_returns_exactly_zero():
  module = get_model("dit_tiny")
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))

  @jax.jit
  def init_and_apply(x):
    params = module.init(jax.random.key(0, impl="rbg"), x, jnp.array([3, 700]),
                         jnp.array([1, 10]))["params"]
    return params, module.apply({"params": params}, x, jnp.array([3, 700]), jnp.array([1, 10]))
  params, out = init_and_apply(x)
  chex.assert_shape(out, (2, 8, 8, 6))
  np.testing.assert_array_equal(out, 0)
  for i in range(module.depth):
    np.testing.assert_array_equal(params[f"block_{i}"]["adaLN_modulation"]["kernel"], 0)
  np.testing.assert_array_equal(params["final_linear"]["kernel"], 0)
  assert params["y_embedder"]["embedding"].shape == (11, 64)  # 10 classes + the null row


@pytest.mark.parametrize("kwargs,size,labels,dtype", [
    ({}, 32, True, jnp.bfloat16),  # pixel-space DiT on 32x32x3
    ({"num_classes": 0, "learn_sigma": False, "patch_size": 4}, 16, False, jnp.float32),
    ({"in_channels": 4, "remat": True}, 8, False, jnp.bfloat16),  # labels None -> null class
])
def test_dit_tiny_forward_shapes(kwargs, size, labels, dtype):
  module = get_model("dit_tiny", dtype=dtype, **kwargs)
  cin = module.in_channels
  params = random_params(module, (size, size, cin), labels)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  x = jax.random.normal(jax.random.key(1), (2, size, size, cin))
  y = jnp.array([0, 9]) if labels else None
  out = jax.jit(lambda p: module.apply({"params": p}, x, jnp.array([1.5, 999.0]), y))(params)
  chex.assert_shape(out, (2, size, size, module.out_channels))
  assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())


def test_bf16_dit_tracks_float32():
  f32, bf16 = get_model("dit_tiny"), get_model("dit_tiny", dtype=jnp.bfloat16)
  params = random_params(f32, (8, 8, 3), True)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  args = (x, jnp.array([1, 500]), jnp.array([0, 9]))
  run = lambda m: jax.jit(lambda p: m.apply({"params": p}, *args))(params)
  assert rel_err(run(bf16), np.asarray(run(f32))) < 5e-2


@pytest.mark.parametrize("kwargs,x_shape,y,match", [
    ({}, (8, 8, 3), None, "rank 4"),
    ({}, (2, 8, 8, 4), None, "in_channels=3"),
    ({"num_classes": 0}, (2, 8, 8, 3), np.array([0, 1]), "unconditional"),
    ({"patch_size": 4}, (2, 10, 10, 3), None, "patch_size=4"),
    ({"num_heads": 3}, (2, 8, 8, 3), None, "num_heads"),
])
def test_bad_input_raises(kwargs, x_shape, y, match):
  module = get_model("dit_tiny", **kwargs)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(x_shape),
                                       jnp.zeros((2,), jnp.int32), y))


def _official_init_rule(path: str, shape: tuple[int, ...]) -> tuple[str, float]:
  """(distribution, scale) of a fresh parameter under the official `DiT.initialize_weights`.

  Linear weights xavier-uniform (bound sqrt(6 / (fan_in + fan_out))), the patch embedding as a
  [p*p*C, D] linear, t-embedder MLP and label table N(0, 0.02^2), adaLN modulation and the
  final linear zero, linear biases zero.
  """
  if "adaLN_modulation" in path or "final_linear" in path or path.endswith("bias"):
    return "zero", 0.0
  if path.startswith(("t_embedder", "y_embedder")):
    return "normal", 0.02
  fan_in, fan_out = int(np.prod(shape[:-1])), shape[-1]
  return "uniform", float(np.sqrt(6.0 / (fan_in + fan_out)))


def test_fresh_dit_follows_the_official_initialisation():
  """Each parameter's distribution against the official rule, on the digits-sized DiT.

  The weight-import tests cannot see the initialisation; a training defect from it would only
  show after a run. Standard deviations are checked to 6 standard errors of the estimate (for n
  draws the relative standard error of a sample std is sqrt(0.2 / n) for a uniform law and
  sqrt(0.5 / n) for a normal one), uniform draws must lie within their bound.
  """
  module = get_model("dit_tiny", in_channels=1, hidden_size=128, depth=2, num_heads=4,
                     learn_sigma=False)
  params = jax.jit(lambda k: module.init(k, jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)),
                                         jnp.zeros((1,), jnp.int32)))(jax.random.key(0))["params"]
  seen = set()
  for key_path, leaf in jax.tree_util.tree_leaves_with_path(params):
    path = "/".join(k.key for k in key_path)
    w = np.asarray(leaf, np.float64)
    kind, scale = _official_init_rule(path, w.shape)
    seen.add(kind)
    if kind == "zero":
      np.testing.assert_array_equal(w, 0, err_msg=path)
      continue
    std, rel_se = (scale / np.sqrt(3), np.sqrt(0.2 / w.size)) if kind == "uniform" else (
        scale, np.sqrt(0.5 / w.size))
    assert abs(w.std() / std - 1) < 6 * rel_se, (path, w.std(), std)
    assert abs(w.mean()) < 6 * std / np.sqrt(w.size), (path, w.mean())
    if kind == "uniform":
      assert np.abs(w).max() <= scale, (path, np.abs(w).max(), scale)
  assert seen == {"zero", "normal", "uniform"}
  assert params["x_embedder"]["kernel"].shape == (2, 2, 1, 128)  # bound sqrt(6 / (4 + 128))


def test_tokens_map_back_to_their_own_pixels_on_one_channel_rectangular_inputs():
  """Patchify / unpatchify order: with no blocks (tokens never mix), output pixel (i, j) depends
  on input pixel (i', j') exactly when both lie in the same p x p patch; brute-force mask."""
  p, hgt, wid = 2, 6, 4
  module = get_model("dit_tiny", in_channels=1, depth=0, num_classes=0, learn_sigma=False,
                     patch_size=p)
  params = random_params(module, (hgt, wid, 1), seed=3)
  x = jax.random.normal(jax.random.key(2), (1, hgt, wid, 1))
  jac = jax.jacobian(lambda x: module.apply({"params": params}, x, jnp.array([10])))(x)
  depends = np.abs(np.asarray(jac).reshape(hgt * wid, hgt * wid)) > 0
  rows, cols = np.divmod(np.arange(hgt * wid), wid)
  patch = (rows // p) * (wid // p) + cols // p
  np.testing.assert_array_equal(depends, patch[:, None] == patch[None, :])


def _dit_loss_grad(module, x, t, y):
  loss = lambda p: jnp.mean(jnp.square(module.apply({"params": p}, x, t, y)[..., :3] - x))
  return jax.jit(jax.value_and_grad(loss))


def test_scanned_blocks_match_unrolled_blocks():
  """`scan_blocks=True` (the CPU default) is the same network as the unrolled loop: outputs and
  gradients.

  Both evaluate the same operations in the same order per block; only XLA's fusion of the
  elementwise parts differs, so they agree to float32 rounding (a few ulps per op over ~30 ops
  per block x 3 blocks, relative to values of order 1): 1e-5.
  """
  scanned = get_model("dit_tiny", depth=3, scan_blocks=True)
  unrolled = get_model("dit_tiny", depth=3, scan_blocks=False)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  t, y = jnp.array([3, 700]), jnp.array([1, 10])
  params = random_params(scanned, (8, 8, 3), with_labels=True, std=0.2)
  assert jax.tree.structure(params) == jax.tree.structure(
      random_params(unrolled, (8, 8, 3), with_labels=True))
  out_s = scanned.apply({"params": params}, x, t, y)
  out_u = unrolled.apply({"params": params}, x, t, y)
  assert rel_err(np.asarray(out_s), np.asarray(out_u)) < 1e-5
  (l_s, g_s), (l_u, g_u) = (_dit_loss_grad(m, x, t, y)(params) for m in (scanned, unrolled))
  assert abs(float(l_s) - float(l_u)) <= 1e-5 * abs(float(l_u))
  for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_u), strict=True):
    assert rel_err(np.asarray(a), np.asarray(b)) < 1e-5


def test_gradient_fusions_do_not_grow_with_depth():
  """Regression guard for issue 12: unrolled, XLA:CPU fused each block's residual cotangent
  with every later block's, so fusions (and the gradient's cost) grew with depth; with the
  blocks scanned the largest fusion is one block's work whatever the depth. Checked on the
  compiled HLO (no timing). Slack 10 %: the scan's own bookkeeping, not a per-block term."""
  x = jnp.zeros((2, 8, 8, 3))
  t, y = jnp.array([3, 700]), jnp.array([1, 10])
  sizes = []
  for depth in (2, 6):
    module = get_model("dit_tiny", depth=depth, scan_blocks=True)
    params = jax.eval_shape(lambda m=module: m.init(jax.random.PRNGKey(0), x, t, y)["params"])
    compiled = _dit_loss_grad(module, x, t, y).lower(params).compile()
    sizes.append(hlo_testlib.largest_fusion(compiled.as_text()))
  assert sizes[1] <= 1.1 * sizes[0], sizes


def test_attention_implementation_choice():
  """On CPU the default attention is the 'einsum' kernel (the same program: identical outputs,
  scanned and unrolled); jax.nn's 'xla' kernel agrees to float32 rounding. The kernels can differ
  only in the order of attention's sums (16 tokens, head_dim 16); each block carries such a
  difference through matmuls of up to 256 terms (the MLP), so 2 blocks x 2 x 64 = 256 roundings
  bound it (measured: 0, the forward arithmetic is the same); an unknown name, or 'cudnn' without
  a GPU, is a ValueError naming the choices."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  t, y = jnp.array([3, 700]), jnp.array([1, 10])
  default = get_model("dit_tiny", depth=2)
  params = random_params(default, (8, 8, 3), with_labels=True, std=0.2)
  for scan in (True, False):
    out = default.clone(scan_blocks=scan).apply({"params": params}, x, t, y)
    einsum = get_model("dit_tiny", depth=2, scan_blocks=scan, attention="einsum")
    np.testing.assert_array_equal(np.asarray(einsum.apply({"params": params}, x, t, y)),
                                  np.asarray(out))
    xla = get_model("dit_tiny", depth=2, scan_blocks=scan, attention="xla")
    numerics_testlib.assert_f32_close(xla.apply({"params": params}, x, t, y), out,
                                      ops=2 * 2 * 64)
  with pytest.raises(ValueError, match="one of .*'cudnn'.*got 'flash'"):
    get_model("dit_tiny", depth=2, attention="flash").apply({"params": params}, x, t, y)
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="'cudnn' needs a GPU"):
      get_model("dit_tiny", depth=2, attention="cudnn").apply({"params": params}, x, t, y)
