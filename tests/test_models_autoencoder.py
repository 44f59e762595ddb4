"""AutoencoderKL: exact parameter counts, the posterior, and equality with diffusers' AutoencoderKL
run side by side with random weights (diffusers and original LDM weight layouts, CLI round trip)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import save_file

from diffusion_jax import convert
from diffusion_jax.models import DiagonalGaussian, autoencoder, get_autoencoder
from models_testlib import nchw_to_nhwc, rel_err

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7

# diffusers configs. TINY: 2 levels (f=2), 1 ResBlock per level, 8 groups; its variant has no
# quant convs, no mid attention, 16 latent channels and a shift factor (the SD3 / FLUX.1 layout).
TINY = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TINY_SD3_LIKE = dict(TINY, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                     mid_block_add_attention=False, scaling_factor=1.5, shift_factor=0.06)
# stabilityai/sd-vae-ft-mse config.json (the SD 1.x / 2.x VAE).
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215, sample_size=256)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _shapes(vae):
  return jax.eval_shape(lambda: autoencoder.init_autoencoder(vae, jax.random.key(0)))


@pytest.mark.parametrize("name", ["sd_vae", "sdxl_vae"])
def test_sd_vae_parameter_counts(name):
  # Issue 14 (counted on diffusers' AutoencoderKL with the SD config): the SDXL VAE has the same
  # architecture as SD 1.x / 2.x, only its scaling factor differs.
  shapes = _shapes(get_autoencoder(name))
  assert {k: _count(v) for k, v in shapes.items()} == {
      "encoder": 34_163_592, "decoder": 49_490_179, "quant_conv": 72, "post_quant_conv": 20}
  assert _count(shapes) == 83_653_863


def test_presets_and_bad_arguments():
  assert get_autoencoder("sd_vae").scaling_factor == 0.18215
  assert get_autoencoder("sdxl_vae").scaling_factor == 0.13025
  assert get_autoencoder("sd_vae").shift_factor is None
  vae = get_autoencoder("vae_tiny", block_out_channels=[32, 64, 64])
  assert vae.block_out_channels == (32, 64, 64) and vae.downsampling_factor == 4
  with pytest.raises(ValueError, match="unknown autoencoder name"):
    get_autoencoder("sd_vea")
  with pytest.raises(ValueError, match="unknown override"):
    get_autoencoder("vae_tiny", ch_mult=(1, 2))
  params = _random_flax_params(get_autoencoder("vae_tiny"))
  tiny = get_autoencoder("vae_tiny")
  with pytest.raises(ValueError, match="in_channels=3"):
    tiny.apply({"params": params}, jnp.zeros((1, 8, 8, 1)), method=tiny.encode)
  with pytest.raises(ValueError, match="divisible by the downsampling factor 2"):
    tiny.apply({"params": params}, jnp.zeros((1, 7, 8, 3)), method=tiny.encode)
  with pytest.raises(ValueError, match="latent_channels=4"):
    tiny.apply({"params": params}, jnp.zeros((1, 4, 4, 3)), method=tiny.decode)
  with pytest.raises(ValueError, match="multiples of norm_num_groups"):
    _shapes(get_autoencoder("vae_tiny", block_out_channels=(32, 60)))


def test_diagonal_gaussian_against_float64():
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
  raw_logvar = rng.normal(scale=20.0, size=(3, 2, 2, 4)).astype(np.float32)
  post = DiagonalGaussian.from_moments(jnp.concatenate([mean, raw_logvar], axis=-1))
  logvar = np.clip(raw_logvar.astype(np.float64), -30.0, 20.0)  # diffusers' clamp
  assert (raw_logvar > 20).any() and (raw_logvar < -30).any()  # the clip is exercised
  np.testing.assert_array_equal(post.mean, mean)
  np.testing.assert_allclose(post.logvar, logvar, rtol=0)
  # exp of float32 arguments up to 20: a few ulps of relative error.
  np.testing.assert_allclose(post.std, np.exp(0.5 * logvar), rtol=4 * EPS32)
  np.testing.assert_array_equal(post.mode(), mean)
  kl = 0.5 * np.sum(mean.astype(np.float64) ** 2 + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3))
  np.testing.assert_allclose(post.kl(), kl, rtol=1e-5)  # 16 terms of size up to e^20, float32 sums
  # Sampling: z = mean + std * N(0, 1) from the key; the standardised draw of a big batch has mean 0
  # and std 1 within 5 standard errors (n = 40,000: 5 / sqrt(n) = 0.025).
  small = DiagonalGaussian.from_moments(jnp.asarray(
      rng.normal(size=(100, 10, 10, 8)).astype(np.float32)))
  z = small.sample(jax.random.key(1))
  e = np.asarray((z - small.mean) / small.std)
  assert abs(e.mean()) < 0.025 and abs(e.std() - 1) < 0.025
  np.testing.assert_array_equal(z, small.sample(jax.random.key(1)))
  assert not np.array_equal(z, small.sample(jax.random.key(2)))


# --------------------------------------------------------------------------- side by side


def _randomize_fan_in(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Random weights with activations of order 1 through any depth.

  Weights N(0, 1 / fan_in) (zero-initialised layers included, so every path counts), biases
  N(0, 0.1^2), GroupNorm scales 1 + N(0, 0.1^2).
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim > 1:
        p.copy_(noise / np.sqrt(p[0].numel()))
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.1 * noise)
      else:
        p.copy_(0.1 * noise)
  return model.eval()


def _random_flax_params(vae, seed: int = 0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32),
                      _shapes(vae))


def _reference(model, x: np.ndarray):
  """diffusers: posterior mean, log-variance (NHWC) and the decoder output from the mean."""
  with torch.no_grad():
    post = model.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
    out = model.decode(post.mean).sample
  return nchw_to_nhwc(post.mean), nchw_to_nhwc(post.logvar), nchw_to_nhwc(out)


def _ours(vae, params, x: np.ndarray, z: np.ndarray):
  post = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))(params, x)
  out = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))(params, z)
  return np.asarray(post.mean), np.asarray(post.logvar), np.asarray(out)


def _tolerance(config) -> float:
  """Relative float32 error budget of one pass (max |ours - ref| / max |ref|).

  Both sides compute the same operations in float32 with different summation orders. With
  activations of order 1 (fan-in init, GroupNorm before every conv), each conv adds a rounding
  error of about sqrt(K) * eps relative to its output (K = 9 * C_in terms, errors of random sign),
  and errors add up over the D convolutions on the longest path: tol = D * sqrt(K_max) * eps.
  A wrong layout, padding, group count or missing block gives errors of order 1.
  """
  levels = len(config["block_out_channels"])
  per_level = config["layers_per_block"] + 1  # decoder: one more ResBlock than the encoder
  depth = 2 * (2 + levels * (2 * per_level + 1) + 4)  # convs in both halves, with mid and ends
  k_max = 9 * max(config["block_out_channels"])
  return depth * np.sqrt(k_max) * EPS32


def _check_side_by_side(config, size, seed=0):
  model = _randomize_fan_in(TorchAutoencoderKL(**config), seed)
  vae, params = convert.autoencoder_from_diffusers(model.state_dict(), dict(model.config))
  assert _count(params) == sum(p.numel() for p in model.parameters())
  x = np.random.default_rng(seed).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
  ref = _reference(model, x)
  ours = _ours(vae, params, x, ref[0])
  tol = _tolerance(config)
  for name, a, b in zip(("posterior mean", "posterior logvar", "decoder output"), ours, ref, strict=True):
    assert a.shape == b.shape, name
    assert np.abs(b).max() > 0.1, name  # of order 1: the relative error is meaningful
    assert rel_err(a, b) < tol, (name, rel_err(a, b), tol)
  return vae, params, model


@pytest.mark.parametrize("config", [TINY, TINY_SD3_LIKE], ids=["tiny", "tiny_sd3_like"])
def test_matches_diffusers_tiny(config):
  vae, _, _ = _check_side_by_side(config, size=16)
  assert vae.latent_channels == config["latent_channels"]
  assert vae.use_quant_conv == config.get("use_quant_conv", True)
  assert vae.mid_attention == config.get("mid_block_add_attention", True)
  assert vae.shift_factor == config.get("shift_factor")


@pytest.mark.slow
def test_matches_diffusers_sd_vae_architecture():
  # The full SD VAE (83.7M random parameters) at 32x32 -> 4x4x4 latents.
  vae, _, _ = _check_side_by_side(SD_VAE, size=32, seed=1)
  assert vae.scaling_factor == 0.18215 and vae.block_out_channels == (128, 256, 512, 512)


def _ldm_state_dict(model) -> dict[str, torch.Tensor]:
  """The diffusers weights renamed to the original LDM layout (the layout SD checkpoints use).

  Written from the LDM `Encoder` / `Decoder` source; checked below by diffusers' own LDM importer.
  """
  levels = len(model.config.block_out_channels)
  out = {}
  for key, value in model.state_dict().items():
    k = key
    for old, new in (("down_blocks.", "down."), ("resnets.", "block."), ("downsamplers.0", "downsample"),
                     ("upsamplers.0", "upsample"), ("conv_shortcut", "nin_shortcut"),
                     ("conv_norm_out", "norm_out"), ("mid_block.block.0", "mid.block_1"),
                     ("mid_block.block.1", "mid.block_2"), ("mid_block.attentions.0", "mid.attn_1"),
                     ("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                     ("to_out.0", "proj_out")):
      k = k.replace(old, new)
    if k.startswith("decoder.up_blocks."):
      i = int(k.split(".")[2])
      k = k.replace(f"up_blocks.{i}.", f"up.{levels - 1 - i}.", 1)
    if ".attn_1." in k and k.endswith("weight") and "norm" not in k:
      value = value[:, :, None, None]  # LDM attention projections are 1x1 convs
    out["first_stage_model." + k] = value.clone()
  out["first_stage_model.loss.logvar"] = torch.zeros(())  # LDM training leftovers are skipped
  out["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4)  # the U-Net is ignored
  return out


def test_ldm_layout_matches_diffusers():
  model = _randomize_fan_in(TorchAutoencoderKL(**TINY), seed=3)
  ldm = _ldm_state_dict(model)
  # diffusers' importer of original SD checkpoints reads our LDM dict back to the same weights.
  back = convert_ldm_vae_checkpoint(dict(ldm), dict(model.config))
  want = model.state_dict()
  assert set(back) == set(want)
  assert all(torch.equal(back[k].reshape(want[k].shape), want[k]) for k in want)

  vae, params = convert.autoencoder_from_ldm(ldm, "sd_vae", norm_num_groups=8)
  assert (vae.block_out_channels, vae.layers_per_block, vae.latent_channels) == ((32, 64), 1, 4)
  ref_vae, ref_params = convert.autoencoder_from_diffusers(want, dict(model.config))
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  ref = _reference(model, x)
  for a, b in zip(_ours(vae, params, x, ref[0]), ref, strict=True):
    assert rel_err(a, b) < _tolerance(TINY)
  del ref_vae


def test_cli_diffusers_vae_safetensors_roundtrip(tmp_path):
  model = _randomize_fan_in(TorchAutoencoderKL(**TINY_SD3_LIKE), seed=4)
  weights = tmp_path / "diffusion_pytorch_model.safetensors"
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
  (tmp_path / "config.json").write_text(json.dumps(dict(model.config)))
  out = tmp_path / "ckpt"
  convert.main(["--format", "diffusers_vae", "--weights", str(weights), "--config",
                str(tmp_path / "config.json"), "--out", str(out)])
  spec = json.loads((out / "model.json").read_text())
  assert spec["source"]["format"] == "diffusers_vae"
  vae, params = convert.load_checkpoint(str(out))
  assert (vae.scaling_factor, vae.shift_factor, vae.latent_channels) == (1.5, 0.06, 16)
  x = np.random.default_rng(1).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  ref = _reference(model, x)
  for a, b in zip(_ours(vae, params, x, ref[0]), ref, strict=True):
    assert rel_err(a, b) < _tolerance(TINY_SD3_LIKE)


def test_unsupported_diffusers_configs_raise():
  with pytest.raises(ValueError, match="down_block_types"):
    convert.autoencoder_kwargs_from_diffusers(dict(TINY, down_block_types=("DownBlock2D",) * 2))
  with pytest.raises(ValueError, match="act_fn"):
    convert.autoencoder_kwargs_from_diffusers(dict(TINY, act_fn="gelu"))
  with pytest.raises(ValueError, match="latents_mean"):
    convert.autoencoder_kwargs_from_diffusers(dict(TINY, latents_mean=[0.0] * 4))
  with pytest.raises(ValueError, match="no LDM autoencoder"):
    convert.autoencoder_from_ldm({"model.diffusion_model.x.weight": np.zeros(3)})


# --------------------------------------------------------------------------- precision, helpers


def test_bfloat16_compute_float32_params_and_outputs():
  vae = get_autoencoder("vae_tiny")
  params = _random_flax_params(vae)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  ours32 = _ours(vae, params, x, np.asarray(autoencoder.encode(vae, params, x)))
  vae16 = get_autoencoder("vae_tiny", dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(_shapes(vae16)))
  ours16 = _ours(vae16, params, x, ours32[0])
  for a, b in zip(ours16, ours32, strict=True):
    assert a.dtype == np.float32
    # bfloat16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3); ~20 rounded layers on a
    # path with errors of random sign give about sqrt(20) * 3.9e-3 = 1.7e-2 relative; 5e-2 allows
    # 3x that. A layer computed wrongly under bf16 gives errors of order 1.
    assert rel_err(a, b) < 5e-2
  assert rel_err(ours16[0], ours32[0]) > 0  # bfloat16 was really used


def test_encode_decode_helpers_scale_and_shift():
  vae = get_autoencoder("vae_tiny", scaling_factor=0.5, shift_factor=0.25, latent_channels=2)
  params = _random_flax_params(vae)
  x = np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)
  post = vae.apply({"params": params}, x, method=vae.encode)
  latents = jax.jit(lambda p, x: autoencoder.encode(vae, p, x))(params, x)
  assert latents.shape == (3, 4, 4, 2) and latents.dtype == jnp.float32
  # Same operations, jitted or not: equal up to a rounding or two (XLA may fuse differently).
  assert rel_err(latents, (post.mean - 0.25) * 0.5) < 4 * EPS32
  sampled = autoencoder.encode(vae, params, x, key=jax.random.key(0))
  assert rel_err(sampled, (post.sample(jax.random.key(0)) - 0.25) * 0.5) < 4 * EPS32
  assert rel_err(sampled, latents) > 1e-3  # the key draws from the posterior
  images = jax.jit(lambda p, z: autoencoder.decode(vae, p, z))(params, latents)
  assert images.shape == (3, 8, 8, 3) and images.dtype == jnp.float32
  # latents / 0.5 + 0.25 recovers the mean up to one rounding of each operation.
  direct = vae.apply({"params": params}, post.mean, method=vae.decode)
  np.testing.assert_allclose(images, direct, atol=1e-5 * float(np.abs(direct).max()))
  recon, post2 = vae.apply({"params": params}, x)
  np.testing.assert_array_equal(recon, direct)
  np.testing.assert_array_equal(post2.logvar, post.logvar)


def test_cli_ldm_ckpt_roundtrip(tmp_path):
  # An original-layout .ckpt ({'state_dict': ..., 'global_step': ...}) read with weights_only=True.
  model = _randomize_fan_in(TorchAutoencoderKL(**TINY), seed=5)
  path = tmp_path / "model.ckpt"
  torch.save({"state_dict": _ldm_state_dict(model), "global_step": 7}, path)
  out = tmp_path / "ckpt"
  convert.main(["--format", "ldm_vae", "--weights", str(path), "--preset", "vae_tiny",
                "--out", str(out)])
  spec = json.loads((out / "model.json").read_text())
  assert spec["name"] == "vae_tiny" and spec["overrides"] == {}  # the architecture read back
  vae, params = convert.load_checkpoint(str(out))
  x = np.random.default_rng(2).uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32)
  ref = _reference(model, x)
  for a, b in zip(_ours(vae, params, x, ref[0]), ref, strict=True):
    assert rel_err(a, b) < _tolerance(TINY)
