"""Weight import: files on disk -> CLI -> orbax checkpoint -> the same outputs as the PyTorch model."""
import argparse
import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel, UNet2DModel
from safetensors.torch import save_file

from diffusion_jax import convert
from models_testlib import (SMALL_DIT_CONFIG, SMALL_UNET_CONV_CONFIG, nchw_to_nhwc, randomize,
                            rel_err, tie_dit_embedders)


def _apply(module, params, x, t, y=None):
  out = jax.jit(lambda p: module.apply({"params": p}, x, t, y))(params)
  return np.asarray(out).transpose(0, 3, 1, 2)


def _diffusers_unet_files(tmp_path):
  """A random small diffusers UNet2DModel and its safetensors / config.json files in tmp_path."""
  model = randomize(UNet2DModel(**SMALL_UNET_CONV_CONFIG))
  weights = tmp_path / "diffusion_pytorch_model.safetensors"
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
  config = tmp_path / "config.json"
  config.write_text(json.dumps(dict(model.config)))
  return model, weights, config


def test_cli_diffusers_unet_safetensors_roundtrip(tmp_path):
  model, weights, config = _diffusers_unet_files(tmp_path)
  out = tmp_path / "ckpt"
  convert.main(["--format", "diffusers_unet", "--weights", str(weights), "--config", str(config),
                "--out", str(out)])

  config = json.loads((out / "config.json").read_text())
  assert config["model"]["name"] == "ddpm_cifar10" and config["model"]["in_channels"] == 1
  assert config["diffusion"]["variance"] == "fixed_large"
  assert json.loads((out / "source.json").read_text())["format"] == "diffusers_unet"
  assert json.loads((out / "dataset_info.json").read_text())["image_shape"] == [16, 16, 1]
  assert (out / "checkpoints" / "0" / "state").is_dir()  # the trainer's layout, step 0
  module, params = convert.load_checkpoint(str(out))
  x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
  t = torch.tensor([10, 900])
  with torch.no_grad():
    ref = model(x, t).sample.numpy()
  ours = _apply(module, params, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t.numpy()))
  assert rel_err(ours, ref) < 1e-4


def test_cli_official_dit_pt_roundtrip(tmp_path):
  model = randomize(DiTTransformer2DModel(**SMALL_DIT_CONFIG), seed=2)
  tie_dit_embedders(model)
  for block in model.transformer_blocks:  # the official time embedding (see test_models_dit)
    block.norm1.emb.time_proj.downscale_freq_shift = 0
  official = convert.official_dit_from_diffusers_state(model.state_dict())
  official["pos_embed"] = model.pos_embed.pos_embed.numpy()
  path = tmp_path / "DiT-tiny.pt"
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in official.items()}, path)
  out = tmp_path / "ckpt"
  convert.main(["--format", "dit_official", "--weights", str(path), "--num_heads", "4",
                "--out", str(out)])
  module, params = convert.load_checkpoint(str(out))
  assert (module.depth, module.hidden_size, module.num_heads) == (3, 64, 4)
  x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
  t, y = torch.tensor([10, 900]), torch.tensor([2, 10])
  with torch.no_grad():
    ref = model(x, t, class_labels=y).sample.numpy()
  ours = _apply(module, params, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t.numpy()),
                jnp.asarray(y.numpy(), jnp.int32))
  assert rel_err(ours, ref) < 1e-4


def test_cli_diffusers_dit_bin_roundtrip(tmp_path):
  """--format diffusers_dit from a .bin state dict and its config.json, then the outputs equal
  diffusers' DiTTransformer2DModel on the same input (relative error: float32 rounding of a
  3-block transformer, the same bound as the other formats)."""
  model = randomize(DiTTransformer2DModel(**SMALL_DIT_CONFIG), seed=3)
  tie_dit_embedders(model)
  weights = tmp_path / "diffusion_pytorch_model.bin"
  torch.save(model.state_dict(), weights)
  config = tmp_path / "config.json"
  config.write_text(json.dumps(dict(model.config)))
  out = tmp_path / "ckpt"
  convert.main(["--format", "diffusers_dit", "--weights", str(weights), "--config", str(config),
                "--out", str(out)])
  source = json.loads((out / "source.json").read_text())
  assert source["format"] == "diffusers_dit" and source["weights"] == weights.name
  assert (out / "checkpoints" / "0" / "state").is_dir()  # the trainer's layout, step 0
  module, params = convert.load_checkpoint(str(out))
  assert (module.depth, module.hidden_size, module.num_heads) == (3, 64, 4)
  x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
  t, y = torch.tensor([3, 700]), torch.tensor([1, 10])
  with torch.no_grad():
    ref = model(x, t, class_labels=y).sample.numpy()
  ours = _apply(module, params, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t.numpy()),
                jnp.asarray(y.numpy(), jnp.int32))
  assert rel_err(ours, ref) < 1e-4
  with pytest.raises(SystemExit):          # diffusers formats need their config.json
    convert.main(["--format", "diffusers_dit", "--weights", str(weights), "--out", str(out)])


def test_checkpoint_spec_of_a_preset_has_no_overrides(tmp_path):
  from diffusion_jax.models import get_model
  from models_testlib import random_params
  module = get_model("dit_tiny")
  params = random_params(module, (8, 8, 3), True)
  convert.write_run(str(tmp_path), module, params, (8, 8, 3))
  model = json.loads((tmp_path / "config.json").read_text())["model"]
  assert model["name"] == "dit_tiny" and all(v is None for k, v in model.items() if k != "name")
  loaded, restored = convert.load_checkpoint(str(tmp_path), dtype=jnp.bfloat16)
  assert loaded.dtype == jnp.bfloat16
  jax.tree.map(np.testing.assert_array_equal, restored, params)


def test_pos_embed_mismatch_is_refused():
  model = randomize(DiTTransformer2DModel(**SMALL_DIT_CONFIG))
  tie_dit_embedders(model)
  official = convert.official_dit_from_diffusers_state(model.state_dict())
  official["pos_embed"] = np.zeros((1, 16, 64), np.float32)
  with pytest.raises(ValueError, match="pos_embed"):
    convert.dit_from_official(official, num_heads=4)


@pytest.mark.parametrize("change,match", [
    ({"time_embedding_type": "fourier"}, "time_embedding_type"),
    ({"down_block_types": ("AttnDownBlock2D", "DownBlock2D", "DownBlock2D")}, "same levels"),
    ({"resnet_time_scale_shift": "scale_shift"}, "attn_norm_num_groups"),
    ({"out_channels": 3}, "out_channels"),
])
def test_unsupported_unet_configs_are_refused(change, match):
  with pytest.raises(ValueError, match=match):
    convert.unet_kwargs_from_diffusers({**SMALL_UNET_CONV_CONFIG, **change})


def test_missing_and_extra_keys_are_reported():
  model = randomize(UNet2DModel(**SMALL_UNET_CONV_CONFIG))
  sd = dict(model.state_dict())
  del sd["conv_in.bias"]
  with pytest.raises(ValueError, match="missing"):
    convert.unet_from_diffusers(sd, dict(model.config))


def test_load_state_dict_refuses_pickled_objects(tmp_path):
  path = tmp_path / "evil.pt"
  # Training checkpoints of the official code carry an argparse.Namespace: not a tensor, refused.
  torch.save({"w": torch.zeros(2), "args": argparse.Namespace(lr=1e-4)}, path)
  with pytest.raises(pickle.UnpicklingError, match="Weights only"):
    convert.load_state_dict(str(path))


@pytest.mark.slow  # ~40 s: conversion, then a subprocess that compiles the sampler
def test_converted_weights_sample_through_experiments_sample(tmp_path):
  """A converted U-Net is a run workdir: `experiments.sample` reads it, and the params it loads
  are the converted ones, bit for bit (no optimizer is built or read)."""
  import os
  import subprocess
  import sys
  from diffusion_jax.training import restore
  model, weights, config = _diffusers_unet_files(tmp_path)
  out = tmp_path / "run"
  convert.main(["--format", "diffusers_unet", "--weights", str(weights), "--config", str(config),
                "--out", str(out), "--num_timesteps", "50"])
  _, direct = convert.unet_from_diffusers(model.state_dict(), dict(model.config))
  loaded = restore.load_for_sampling(str(out))
  assert loaded.step == 0 and loaded.image_shape == (16, 16, 1) and loaded.num_classes == 0
  assert loaded.schedule.num_timesteps == 50
  jax.tree.map(np.testing.assert_array_equal, loaded.params, direct)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  npz = tmp_path / "samples.npz"
  subprocess.run([sys.executable, "-m", "experiments.sample", f"--workdir={out}", f"--out={npz}",
                  "--num_samples=3", "--steps=5", "--batch_size=3"], check=True, env=env, cwd=repo,
                 timeout=300)
  images = np.load(npz)["images"]
  assert images.shape == (3, 16, 16, 1) and images.dtype == np.uint8


def test_a_schedule_that_cannot_be_built_is_refused_before_writing(tmp_path):
  # DDPM's linear schedule rescaled to 20 steps has beta_end = 0.02 * 1000 / 20 = 1: no reader
  # could load such a run, so the converter refuses it and writes nothing.
  model, weights, config = _diffusers_unet_files(tmp_path)
  out = tmp_path / "run"
  with pytest.raises(ValueError, match="num_timesteps=20"):
    convert.main(["--format", "diffusers_unet", "--weights", str(weights), "--config",
                  str(config), "--out", str(out), "--num_timesteps", "20"])
  assert not out.exists()
