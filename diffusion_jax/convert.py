"""Published PyTorch weights -> `diffusion_jax.models` parameters, and a CLI writing an orbax checkpoint.

Five source formats:
  * `diffusers_unet`: a diffusers `UNet2DModel` state dict (`diffusion_pytorch_model.safetensors`
    or `.bin`) plus its `config.json` (as `google/ddpm-cifar10-32`, `google/ddpm-celebahq-256`).
  * `dit_official`: the official DiT checkpoint (`DiT-XL-2-256x256.pt`: keys `x_embedder.*`,
    `t_embedder.*`, `y_embedder.*`, `blocks.N.*`, `final_layer.*`, `pos_embed`).
  * `diffusers_dit`: a diffusers `DiTTransformer2DModel` state dict plus its `config.json`. The
    diffusers port keeps one timestep/label embedder per block (identical copies in the published
    weights) and uses a time-embedding denominator of half - 1 where the official code uses half;
    the converted model sets `freq_shift=1` to reproduce the port exactly.
  * `diffusers_vae`: a diffusers `AutoencoderKL` state dict plus its `config.json` (the Stable
    Diffusion VAE, `stabilityai/sd-vae-ft-mse`, `vae/` of an SD repository); scaling and shift
    factors are read from the config.
  * `ldm_vae`: the original latent-diffusion / Stable Diffusion layout (`first_stage_model.encoder.
    down.0.block.0...` in a full SD `.ckpt` / `.safetensors`, or `encoder.*` in a standalone VAE
    file); the architecture is read from the tensor shapes, the scaling factor from `--preset`
    (an autoencoder preset, default sd_vae).

Files are read with safetensors or `torch.load(..., weights_only=True)`: nothing is unpickled
beyond tensors.

CLI: writes OUT as a run workdir, like the trainer's (`config.json` from
`diffusion_jax/training/default_config.py` with the converted model and the release's diffusion
settings, `dataset_info.json`, `checkpoints/0/{state, data}`, plus `source.json`), so that
`python -m experiments.sample --workdir=OUT` samples from it:

  python -m diffusion_jax.convert --format diffusers_unet \
      --weights ddpm-cifar10-32/diffusion_pytorch_model.safetensors \
      --config ddpm-cifar10-32/config.json --out /tmp/ddpm_cifar10_ckpt
  python -m diffusion_jax.convert --format dit_official --weights DiT-XL-2-256x256.pt \
      --preset DiT-XL/2 --out /tmp/dit_xl2_ckpt
  python -m diffusion_jax.convert --format diffusers_vae \
      --weights sd-vae-ft-mse/diffusion_pytorch_model.safetensors \
      --config sd-vae-ft-mse/config.json --out /tmp/sd_vae_ckpt

Load it back with `load_checkpoint(OUT) -> (module, params)` or
`training.restore.load_for_sampling(OUT)` (the same reader). An autoencoder is a component, not
a diffusion run: its directory holds `model.json` (preset and overrides) and an orbax step 0 of
`{'params': params}`, read by the same `load_checkpoint`.

References: diffusers `UNet2DModel` / `DiTTransformer2DModel` / `AutoencoderKL` (v0.42); DiT
official `models.py`; LDM `ldm/modules/diffusionmodules/model.py` (Encoder / Decoder).
"""
from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from diffusion_jax.models import layers
from diffusion_jax.models import autoencoder
from diffusion_jax.models.registry import (AUTOENCODER_PRESETS, PRESETS, get_autoencoder, get_model,
                                           init_params)
from diffusion_jax.training import components
from diffusion_jax.training import default_config
from diffusion_jax.training import restore
from diffusion_jax.training import state as state_lib

StateDict = Mapping[str, np.ndarray]
FORMATS = ("diffusers_unet", "dit_official", "diffusers_dit", "diffusers_vae", "ldm_vae")


# --------------------------------------------------------------------------- file loading

def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Tensors of a `.safetensors` file or a `.pt` / `.bin` file (torch, weights_only=True).

  A DiT `.pt` holding {'model': ..., 'ema': ...} gives its 'ema' weights (as the official sampler);
  an LDM `.ckpt` holding {'state_dict': ..., 'global_step': ...} gives its 'state_dict'.
  Returns name -> float32 NumPy array.
  """
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    sd = load_file(path)
  else:
    import torch  # pylint: disable=g-import-not-at-top
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "ema" in sd and isinstance(sd["ema"], dict):
      sd = sd["ema"]
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):  # an LDM / SD .ckpt
      sd = sd["state_dict"]
    sd = {k: v.float().numpy() for k, v in sd.items()}
  return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def _to_numpy(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
  out = {}
  for k, v in sd.items():
    if hasattr(v, "detach"):
      v = v.detach().float().cpu().numpy()
    out[k] = np.asarray(v, np.float32)
  return out


# --------------------------------------------------------------------------- shared machinery

def _leaf(module_path: str, torch_leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """Torch parameter -> (flax leaf name, array in flax layout)."""
  if torch_leaf == "bias":
    return "bias", value
  if torch_leaf != "weight":
    raise ValueError(f"unexpected parameter {module_path}.{torch_leaf}")
  last = module_path.split("/")[-1]
  if last == "norm":
    return "scale", value
  if last in ("class_embed", "y_embedder"):
    return "embedding", value
  if value.ndim == 4:  # conv [O, I, kh, kw] -> [kh, kw, I, O]
    return "kernel", value.transpose(2, 3, 1, 0)
  if value.ndim == 2:  # linear [O, I] -> [I, O]
    return "kernel", value.T
  raise ValueError(f"unexpected weight shape {value.shape} for {module_path}")


def _build(sd: StateDict, rename: Callable[[str], str | None], module: nn.Module,
           input_shape: tuple[int, ...], abstract: Any = None) -> dict[str, Any]:
  """Rename every torch key, convert layouts and check the result against the module's shapes.

  `rename` maps a torch module path ('down_blocks.0.resnets.1.conv1') to a flax module path
  ('down_0_res_1/conv1'), or None to skip the key. Raises ValueError on any unmapped, missing or
  mis-shaped parameter. `abstract` (the module's parameter shapes) defaults to those of a
  denoiser initialised on `input_shape`.
  """
  flat = {}
  for key, value in sd.items():
    mod, _, leaf = key.rpartition(".")
    target = rename(mod)
    if target is None:
      continue
    name, arr = _leaf(target, leaf, value)
    flat[tuple(target.split("/")) + (name,)] = arr
  if abstract is None:
    abstract = jax.eval_shape(lambda: init_params(module, jax.random.key(0), input_shape,
                                                  getattr(module, "num_classes", 0) > 0))
  want = traverse_util.flatten_dict(abstract)
  missing = sorted("/".join(k) for k in set(want) - set(flat))
  extra = sorted("/".join(k) for k in set(flat) - set(want))
  if missing or extra:
    raise ValueError(f"parameter mismatch: missing {missing[:8]}, unexpected {extra[:8]}")
  for k, v in want.items():
    if flat[k].shape != v.shape:
      raise ValueError(f'shape mismatch at {"/".join(k)}: {flat[k].shape} vs {v.shape}')
  return traverse_util.unflatten_dict({k: np.ascontiguousarray(v) for k, v in flat.items()})


# --------------------------------------------------------------------------- U-Net (diffusers)

def unet_kwargs_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
  """diffusers `UNet2DModel` config -> `UNet` constructor arguments.

  Supports the DDPM / ADM subset: positional time embedding, (Attn)DownBlock2D / (Attn)UpBlock2D /
  ResnetDownsampleBlock2D / ResnetUpsampleBlock2D, 'default' or 'scale_shift' time conditioning,
  a class table (`num_class_embeds` = num_classes + 1, the last row being the null class).
  Raises ValueError on anything else.
  """
  c = dict(config)
  def need(key, allowed, default):
    if c.get(key, default) not in allowed:
      raise ValueError(f"unsupported diffusers config {key}={c.get(key)!r}; supported: {allowed}")
  need("time_embedding_type", ("positional",), "positional")
  need("act_fn", ("silu", "swish"), "silu")
  need("center_input_sample", (False,), False)
  need("mid_block_scale_factor", (1, 1.0), 1)
  need("mid_block_type", ("UNetMidBlock2D",), "UNetMidBlock2D")
  need("class_embed_type", (None,), None)
  need("resnet_time_scale_shift", ("default", "scale_shift"), "default")
  chans = tuple(c["block_out_channels"])
  down, up = tuple(c["down_block_types"]), tuple(c["up_block_types"])
  ch = chans[0]
  if any(x % ch for x in chans):
    raise ValueError(f"block_out_channels {chans} must be multiples of the first")
  down_attn = [i for i, b in enumerate(down) if b.startswith("Attn")]
  up_attn = [len(up) - 1 - i for i, b in enumerate(up) if b.startswith("Attn")]
  if sorted(down_attn) != sorted(up_attn):
    raise ValueError(f"attention on the way down {down} and up {up} must be at the same levels")
  resnet_down = c.get("downsample_type", "conv") == "resnet"
  resnet_up = c.get("upsample_type", "conv") == "resnet"
  for b in down:
    if b not in ("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D"):
      raise ValueError(f"unsupported down block {b}")
    if (b == "ResnetDownsampleBlock2D") != resnet_down and b != "AttnDownBlock2D":
      raise ValueError(f'down block {b} does not match downsample_type={c.get("downsample_type")}')
  for b in up:
    if b not in ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"):
      raise ValueError(f"unsupported up block {b}")
    if (b == "ResnetUpsampleBlock2D") != resnet_up and b != "AttnUpBlock2D":
      raise ValueError(f'up block {b} does not match upsample_type={c.get("upsample_type")}')
  if resnet_down != resnet_up:
    raise ValueError("downsample_type and upsample_type must both be resnet or both conv")
  groups = c.get("norm_num_groups", 32)
  scale_shift = c.get("resnet_time_scale_shift", "default") == "scale_shift"
  attn_groups = c.get("attn_norm_num_groups")
  if scale_shift and c.get("add_attention", True) and attn_groups is None:
    raise ValueError("scale_shift without attn_norm_num_groups gives a mid attention without "
                     "GroupNorm in diffusers; set attn_norm_num_groups to norm_num_groups")
  if attn_groups not in (None, groups):
    raise ValueError(f"attn_norm_num_groups={attn_groups} must equal norm_num_groups={groups}")
  if c.get("downsample_padding", 1) not in (0, 1):
    raise ValueError(f'downsample_padding must be 0 or 1, got {c.get("downsample_padding")}')
  in_ch, out_ch = c.get("in_channels", 3), c.get("out_channels", 3)
  if out_ch not in (in_ch, 2 * in_ch):
    raise ValueError(f"out_channels={out_ch} must be in_channels or 2 * in_channels ({in_ch})")
  num_class_embeds = c.get("num_class_embeds")
  time_embed_dim = c.get("time_embedding_dim") or 4 * ch
  return dict(
      in_channels=in_ch, ch=ch, ch_mult=tuple(x // ch for x in chans),
      num_res_blocks=c.get("layers_per_block", 2), attention_levels=tuple(sorted(down_attn)),
      head_dim=c.get("attention_head_dim", 8), dropout=float(c.get("dropout", 0.0)),
      num_groups=groups, norm_eps=float(c.get("norm_eps", 1e-5)), scale_shift=scale_shift,
      resblock_updown=resnet_down,
      downsample_padding="asymmetric" if c.get("downsample_padding", 1) == 0 else "symmetric",
      mid_attention=bool(c.get("add_attention", True)),
      time_embed_dim=None if time_embed_dim == 4 * ch else time_embed_dim,
      time_flip_sin_to_cos=bool(c.get("flip_sin_to_cos", True)),
      time_freq_shift=float(c.get("freq_shift", 0)),
      num_classes=num_class_embeds - 1 if num_class_embeds else 0,
      learn_sigma=out_ch == 2 * in_ch)


def _unet_rename(num_levels: int) -> Callable[[str], str | None]:
  sub = {"group_norm": "norm/norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
         "norm1": "norm1/norm", "norm2": "norm2/norm", "conv1": "conv1", "conv2": "conv2",
         "time_emb_proj": "temb_proj", "conv_shortcut": "skip", "conv": "conv"}
  top = {"conv_in": "conv_in", "time_embedding.linear_1": "time_embed_1",
         "time_embedding.linear_2": "time_embed_2", "class_embedding": "class_embed",
         "conv_norm_out": "norm_out/norm", "conv_out": "conv_out"}
  pattern = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)"
                       r"\.(\d+)\.(.+)")
  mid = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")

  def rename(path: str) -> str:
    if path in top:
      return top[path]
    if m := pattern.fullmatch(path):
      kind, blk, part, idx, rest = m.groups()
      lvl = int(blk) if kind == "down_blocks" else num_levels - 1 - int(blk)
      prefix = "down" if kind == "down_blocks" else "up"
      name = {"resnets": f"res_{idx}", "attentions": f"attn_{idx}", "downsamplers": "downsample",
              "upsamplers": "upsample"}[part]
      return f"{prefix}_{lvl}_{name}/{sub[rest]}"
    if m := mid.fullmatch(path):
      part, idx, rest = m.groups()
      name = f"mid_res_{idx}" if part == "resnets" else "mid_attn"
      return f"{name}/{sub[rest]}"
    raise ValueError(f"unexpected diffusers UNet2DModel key {path!r}")
  return rename


def unet_from_diffusers(state_dict: Mapping[str, Any], config: Mapping[str, Any],
                        **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
  """diffusers `UNet2DModel` (state dict + config) -> (`UNet` module, params).

  overrides (e.g. dtype, remat, dropout) are applied on top of the converted configuration.
  """
  kwargs = {**unet_kwargs_from_diffusers(config), **overrides}
  module = get_model("ddpm_cifar10", **kwargs)
  size = 2 ** (len(module.ch_mult) - 1)
  params = _build(_to_numpy(state_dict), _unet_rename(len(module.ch_mult)), module,
                  (size, size, module.in_channels))
  return module, params


# --------------------------------------------------------------------------- DiT

_DIT_OFFICIAL = {"x_embedder.proj": "x_embedder", "t_embedder.mlp.0": "t_embedder_0",
                 "t_embedder.mlp.2": "t_embedder_2", "y_embedder.embedding_table": "y_embedder",
                 "final_layer.adaLN_modulation.1": "final_adaLN_modulation",
                 "final_layer.linear": "final_linear"}
_DIT_BLOCK = {"attn.qkv": "attn_qkv", "attn.proj": "attn_proj", "mlp.fc1": "mlp_fc1",
              "mlp.fc2": "mlp_fc2", "adaLN_modulation.1": "adaLN_modulation"}


def _dit_rename(path: str) -> str | None:
  if path == "":  # the 'pos_embed' buffer: checked, not converted
    return None
  if path in _DIT_OFFICIAL:
    return _DIT_OFFICIAL[path]
  if m := re.fullmatch(r"blocks\.(\d+)\.(.+)", path):
    if m.group(2) in _DIT_BLOCK:
      return f"block_{m.group(1)}/{_DIT_BLOCK[m.group(2)]}"
  raise ValueError(f"unexpected official DiT key {path!r}")


def dit_from_official(state_dict: Mapping[str, Any], num_heads: int,
                      **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
  """Official DiT checkpoint -> (`DiT` module, params).

  Depth, width, patch size, channels, classes and learned sigma are read from the tensor shapes;
  `num_heads` is not in the weights and must be given (S: 6, B: 12, L: 16, XL: 16). If the
  checkpoint has `pos_embed`, it is checked against the fixed sin-cos table the module computes.
  """
  sd = _to_numpy(state_dict)
  patch_w = sd["x_embedder.proj.weight"]
  hidden, in_ch, p, _ = patch_w.shape
  depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
  out_ch = sd["final_layer.linear.weight"].shape[0] // (p * p)
  if out_ch not in (in_ch, 2 * in_ch):
    raise ValueError(f"final layer gives {out_ch} channels for in_channels={in_ch}")
  table = sd.get("y_embedder.embedding_table.weight")
  kwargs = dict(in_channels=in_ch, patch_size=p, hidden_size=hidden, depth=depth,
                num_heads=num_heads, num_classes=0 if table is None else table.shape[0] - 1,
                learn_sigma=out_ch == 2 * in_ch, freq_shift=0.0, norm_eps=1e-6)
  module = get_model("DiT-XL/2", **{**kwargs, **overrides})
  if "pos_embed" in sd:
    pos = sd["pos_embed"].reshape(-1, hidden)
    grid = int(round(np.sqrt(pos.shape[0])))
    ours = layers.sincos_pos_embed_2d(hidden, grid, grid)
    if grid * grid != pos.shape[0] or not np.allclose(pos, ours, atol=1e-5):
      raise ValueError("pos_embed in the checkpoint is not the fixed 2-D sin-cos embedding")
  params = _build(sd, _dit_rename, module, (p, p, in_ch))
  return module, params


def official_dit_from_diffusers_state(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Re-key a diffusers `DiTTransformer2DModel` state dict in the official DiT layout.

  Uses block 0's timestep/label embedder after checking every block holds the same one (the
  official model has a single shared embedder). `pos_embed` is not included.
  """
  sd = _to_numpy(sd)
  emb = "transformer_blocks.{}.norm1.emb."
  depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
  shared = {k[len(emb.format(0)):]: v for k, v in sd.items() if k.startswith(emb.format(0))}
  for i in range(1, depth):
    for k, v in shared.items():
      if not np.array_equal(sd[emb.format(i) + k], v):
        raise ValueError(f"block {i} has its own embedder ({k}) unlike block 0: the official / "
                         "diffusion_jax DiT shares one; tie the per-block embedders first")
  out = {
      "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
      "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
      "t_embedder.mlp.0.weight": shared["timestep_embedder.linear_1.weight"],
      "t_embedder.mlp.0.bias": shared["timestep_embedder.linear_1.bias"],
      "t_embedder.mlp.2.weight": shared["timestep_embedder.linear_2.weight"],
      "t_embedder.mlp.2.bias": shared["timestep_embedder.linear_2.bias"],
      "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
      "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
      "final_layer.linear.weight": sd["proj_out_2.weight"],
      "final_layer.linear.bias": sd["proj_out_2.bias"],
  }
  if "class_embedder.embedding_table.weight" in shared:
    out["y_embedder.embedding_table.weight"] = shared["class_embedder.embedding_table.weight"]
  for i in range(depth):
    b = f"transformer_blocks.{i}."
    for leaf in ("weight", "bias"):
      out[f"blocks.{i}.attn.qkv.{leaf}"] = np.concatenate(
          [sd[f"{b}attn1.to_{n}.{leaf}"] for n in "qkv"], axis=0)
      out[f"blocks.{i}.attn.proj.{leaf}"] = sd[f"{b}attn1.to_out.0.{leaf}"]
      out[f"blocks.{i}.mlp.fc1.{leaf}"] = sd[f"{b}ff.net.0.proj.{leaf}"]
      out[f"blocks.{i}.mlp.fc2.{leaf}"] = sd[f"{b}ff.net.2.{leaf}"]
      out[f"blocks.{i}.adaLN_modulation.1.{leaf}"] = sd[f"{b}norm1.linear.{leaf}"]
  return out


def dit_from_diffusers(state_dict: Mapping[str, Any], config: Mapping[str, Any],
                       **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
  """diffusers `DiTTransformer2DModel` (state dict + config) -> (`DiT` module, params).

  The module gets `freq_shift=1` (the port's time embedding). The port's MLP LayerNorm uses the
  config's `norm_eps` while its attention LayerNorm and the official code use 1e-6, so only
  norm_eps=1e-6 is accepted.
  """
  c = dict(config)
  if float(c.get("norm_eps", 1e-5)) != 1e-6:
    raise ValueError(f'norm_eps={c.get("norm_eps", 1e-5)} unsupported: the DiT LayerNorms use 1e-6')
  if c.get("activation_fn", "gelu-approximate") != "gelu-approximate" or not c.get(
      "attention_bias", True) or c.get("norm_elementwise_affine", False):
    raise ValueError("only the published DiT block (tanh GELU, qkv bias, no LN affine) is supported")
  kw = {"freq_shift": 1.0, **overrides}
  return dit_from_official(official_dit_from_diffusers_state(state_dict),
                           num_heads=c.get("num_attention_heads", 16), **kw)


# --------------------------------------------------------------------------- autoencoder (VAE)

def autoencoder_kwargs_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
  """diffusers `AutoencoderKL` config -> `AutoencoderKL` constructor arguments.

  Supports DownEncoderBlock2D / UpDecoderBlock2D blocks with SiLU (every published SD / SDXL /
  SD3 / FLUX.1 VAE). Raises ValueError on anything else (per-channel latents_mean / latents_std
  included: the helpers here apply one scalar scale and shift).
  """
  c = dict(config)
  chans = tuple(c.get("block_out_channels", (64,)))
  down = tuple(c.get("down_block_types", ("DownEncoderBlock2D",)))
  up = tuple(c.get("up_block_types", ("UpDecoderBlock2D",)))
  if set(down) != {"DownEncoderBlock2D"} or len(down) != len(chans):
    raise ValueError(f"down_block_types must be {len(chans)} x DownEncoderBlock2D, got {down}")
  if set(up) != {"UpDecoderBlock2D"} or len(up) != len(chans):
    raise ValueError(f"up_block_types must be {len(chans)} x UpDecoderBlock2D, got {up}")
  if c.get("act_fn", "silu") not in ("silu", "swish"):
    raise ValueError(f'unsupported diffusers config act_fn={c.get("act_fn")!r}; supported: silu')
  if c.get("latents_mean") is not None or c.get("latents_std") is not None:
    raise ValueError("per-channel latents_mean / latents_std are not supported")
  shift = c.get("shift_factor")
  return dict(in_channels=c.get("in_channels", 3), out_channels=c.get("out_channels", 3),
              block_out_channels=chans, layers_per_block=c.get("layers_per_block", 1),
              latent_channels=c.get("latent_channels", 4),
              norm_num_groups=c.get("norm_num_groups", 32),
              mid_attention=bool(c.get("mid_block_add_attention", True)),
              use_quant_conv=bool(c.get("use_quant_conv", True)),
              use_post_quant_conv=bool(c.get("use_post_quant_conv", True)),
              scaling_factor=float(c.get("scaling_factor", 0.18215)),
              shift_factor=None if shift is None else float(shift))


_VAE_PARTS = {"norm1": "norm1/norm", "norm2": "norm2/norm", "conv1": "conv1", "conv2": "conv2",
              "conv_shortcut": "skip", "nin_shortcut": "skip", "conv": "conv",
              "group_norm": "norm/norm", "norm": "norm/norm", "to_q": "q", "to_k": "k", "to_v": "v",
              "to_out.0": "proj_out", "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out",
              "q": "q", "k": "k", "v": "v", "proj_out": "proj_out"}
_RESAMPLERS = {"downsamplers.0": "downsample", "upsamplers.0": "upsample",
               "downsample": "downsample", "upsample": "upsample"}
_VAE_TOP = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out/norm",
            "norm_out": "norm_out/norm"}


def _vae_rename(num_levels: int, ldm: bool) -> Callable[[str], str | None]:
  """Torch module path of a diffusers (or, `ldm`, original LDM) AutoencoderKL -> flax path.

  diffusers: `encoder.down_blocks.i.resnets.j`, `decoder.up_blocks.i` (i = 0 the deepest level),
  `*.mid_block.{resnets.0, attentions.0, resnets.1}`; LDM: `encoder.down.i.block.j`,
  `decoder.up.level.block.j` (level 0 the full resolution), `*.mid.{block_1, attn_1, block_2}`.
  Old diffusers attention names (query / key / value / proj_attn) are accepted.
  """
  if ldm:
    block = re.compile(r"(encoder|decoder)\.(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)"
                       r"\.(.+)")
    mid = re.compile(r"(encoder|decoder)\.mid\.(block_1|attn_1|block_2)\.(.+)")
  else:
    block = re.compile(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\."
                       r"(resnets\.(\d+)|downsamplers\.0|upsamplers\.0)\.(.+)")
    mid = re.compile(r"(encoder|decoder)\.mid_block\.(resnets\.0|attentions\.0|resnets\.1)\.(.+)")
  mid_names = {"block_1": "mid_res_0", "attn_1": "mid_attn", "block_2": "mid_res_1",
               "resnets.0": "mid_res_0", "attentions.0": "mid_attn", "resnets.1": "mid_res_1"}

  def rename(path: str) -> str | None:
    if path in ("quant_conv", "post_quant_conv"):
      return path
    half, _, rest = path.partition(".")
    if half in ("encoder", "decoder") and rest in _VAE_TOP:
      return f"{half}/{_VAE_TOP[rest]}"
    if m := block.fullmatch(path):
      half, _, idx, part, res_idx, leaf = m.groups()
      lvl = int(idx)
      if half == "decoder" and not ldm:
        lvl = num_levels - 1 - lvl
      prefix = "down" if half == "encoder" else "up"
      name = f"res_{res_idx}" if res_idx is not None else _RESAMPLERS[part]
      if leaf in _VAE_PARTS:
        return f"{half}/{prefix}_{lvl}_{name}/{_VAE_PARTS[leaf]}"
    if m := mid.fullmatch(path):
      half, part, leaf = m.groups()
      if leaf in _VAE_PARTS:
        return f"{half}/{mid_names[part]}/{_VAE_PARTS[leaf]}"
    raise ValueError(f'unexpected {"LDM" if ldm else "diffusers"} AutoencoderKL key {path!r}')
  return rename


def _convert_vae(sd: dict[str, np.ndarray], kwargs: Mapping[str, Any], ldm: bool,
                 overrides: Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
  module = get_autoencoder("sd_vae", **{**kwargs, **overrides})
  # 1x1 convolutions used as linear maps (LDM attention q, k, v, proj_out) -> [O, I].
  sd = {k: (v[:, :, 0, 0] if ".attn_1." in k and v.ndim == 4 else v) for k, v in sd.items()}
  abstract = jax.eval_shape(lambda: autoencoder.init_autoencoder(module, jax.random.key(0)))
  params = _build(sd, _vae_rename(len(module.block_out_channels), ldm), module, (), abstract)
  return module, params


def autoencoder_from_diffusers(state_dict: Mapping[str, Any], config: Mapping[str, Any],
                               **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
  """diffusers `AutoencoderKL` (state dict + config) -> (`AutoencoderKL` module, params).

  overrides (e.g. dtype) are applied on top of the converted configuration.
  """
  return _convert_vae(_to_numpy(state_dict), autoencoder_kwargs_from_diffusers(config), False,
                      overrides)


def autoencoder_from_ldm(state_dict: Mapping[str, Any], preset: str = "sd_vae",
                         **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
  """Original LDM / Stable Diffusion first-stage weights -> (`AutoencoderKL` module, params).

  Takes the `first_stage_model.*` tensors of a full SD checkpoint, or a standalone VAE state dict
  (`encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`; a `loss.*` discriminator is
  ignored). Widths, blocks per level and channel counts are read from the shapes; norm groups,
  scaling and shift factors come from the autoencoder `preset` (not stored in the weights).
  """
  sd = _to_numpy(state_dict)
  prefix = "first_stage_model."
  if any(k.startswith(prefix) for k in sd):
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
  sd = {k: v for k, v in sd.items() if k.split(".")[0] in
        ("encoder", "decoder", "quant_conv", "post_quant_conv")}
  if "encoder.conv_in.weight" not in sd or "decoder.conv_in.weight" not in sd:
    raise ValueError("no LDM autoencoder in the state dict (need encoder.* and decoder.* keys, "
                     "optionally under first_stage_model.)")
  if preset not in AUTOENCODER_PRESETS:
    raise ValueError(f'unknown autoencoder preset {preset!r}; known: {", ".join(AUTOENCODER_PRESETS)}')
  levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
  chans = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels))
  per_level = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block."))
  kwargs = dict(AUTOENCODER_PRESETS[preset][1], block_out_channels=chans, layers_per_block=per_level,
                in_channels=sd["encoder.conv_in.weight"].shape[1],
                out_channels=sd["decoder.conv_out.weight"].shape[0],
                latent_channels=sd["decoder.conv_in.weight"].shape[1],
                mid_attention="encoder.mid.attn_1.q.weight" in sd,
                use_quant_conv="quant_conv.weight" in sd,
                use_post_quant_conv="post_quant_conv.weight" in sd)
  return _convert_vae(sd, kwargs, True, overrides)


# --------------------------------------------------------------------------- checkpoints

def _model_spec(module: nn.Module, preset: str | None = None) -> dict[str, Any]:
  """{'name', 'overrides'}: `preset` (default: the closest preset) and the fields that differ
  from it (JSON-able)."""
  name = preset or {"UNet": "ddpm_cifar10", "DiT": "DiT-XL/2",
                    "AutoencoderKL": "sd_vae"}[type(module).__name__]
  for cand, (cls, kw) in {**PRESETS, **AUTOENCODER_PRESETS}.items():
    if preset is None and cls is type(module) and all(getattr(module, k) == v
                                                      for k, v in kw.items()):
      name = cand
      break
  base = _preset(name)
  overrides = {}
  for f in base.__dataclass_fields__:
    if f in ("parent", "name"):
      continue
    v = getattr(module, f)
    if v != getattr(base, f):
      overrides[f] = list(v) if isinstance(v, tuple) else v
  if "dtype" in overrides or "param_dtype" in overrides:
    raise ValueError("write checkpoints from float32 modules (set dtype when loading)")
  return {"name": name, "overrides": overrides}


def _preset(name: str, **overrides: Any) -> nn.Module:
  """A denoiser (`get_model`) or autoencoder (`get_autoencoder`) preset by name."""
  make = get_autoencoder if name in AUTOENCODER_PRESETS else get_model
  return make(name, **overrides)


def save_checkpoint(out_dir: str, module: nn.Module, params: Any,
                    source: Mapping[str, Any] | None = None, preset: str | None = None) -> None:
  """Write an autoencoder (a component, not a diffusion run): `out_dir/model.json` and an orbax
  CheckpointManager step 0 holding {'params': params}. Denoisers are written by `write_run`.
  preset: the preset model.json names (the fields that differ from it are its overrides);
  default: the closest preset."""
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "model.json"), "w") as f:
    json.dump({**_model_spec(module, preset), "source": dict(source or {})}, f, indent=2)
  mngr = ocp.CheckpointManager(out_dir)
  mngr.save(0, args=ocp.args.StandardSave({"params": params}), force=True)
  mngr.wait_until_finished()
  mngr.close()


def _image_shape(module: nn.Module, image_size: int | None) -> tuple[int, int, int]:
  if not image_size:
    raise ValueError("the image size is not in the weights: give --image_size (the side of the "
                     "square images the model was trained on; for a latent DiT, the latent side)")
  return (int(image_size), int(image_size), int(module.in_channels))


def default_diffusion(module: nn.Module) -> dict[str, Any]:
  """The diffusion settings of the published DDPM / DiT releases: T = 1000 linear betas, eps
  prediction; a learned-sigma model samples with 'learned_range' (trained with the hybrid loss),
  the others with 'fixed_large' (the DDPM CIFAR-10 choice)."""
  learned = bool(module.learn_sigma)
  return {"schedule": "linear", "num_timesteps": 1000, "prediction": "eps",
          "loss_type": "hybrid" if learned else "mse",
          "variance": "learned_range" if learned else "fixed_large"}


def write_run(out_dir: str, module: nn.Module, params: Any, image_shape: tuple[int, int, int], *,
              diffusion: Mapping[str, Any] | None = None,
              source: Mapping[str, Any] | None = None,
              autoencoder_dir: str | None = None) -> None:
  """Write `out_dir` as a run workdir that `experiments.sample` and `load_for_sampling` read.

  `config.json`: `training/default_config.py` with the model (closest preset and the fields
  that differ from it) and `diffusion` (default: `default_diffusion(module)`);
  `dataset_info.json`: image_shape [H, W, C] and the model's num_classes;
  `checkpoints/0/{state, data}` in the trainer's layout, the state holding `step`, `params` and
  `ema_params` (the published weights under the config's EMA decay too, since releases publish
  EMA weights; no optimizer state, so the directory is for sampling and evaluation);
  `source.json`: where the weights came from.
  autoencoder_dir: for a latent model (DiT-XL/2 on SD-VAE latents), the autoencoder directory
  (`save_checkpoint`) whose decoder turns its samples into images: written as
  `autoencoder.workdir` (absolute), with `sample.clip_denoised=False` (latents are unbounded).
  """
  out_dir = os.path.abspath(out_dir)
  if autoencoder_dir is not None:
    autoencoder_dir = os.path.abspath(autoencoder_dir)
    with open(os.path.join(autoencoder_dir, "model.json")) as f:
      spec_ae = json.load(f)
    vae = _preset(spec_ae["name"], **spec_ae["overrides"])
    if not isinstance(vae, autoencoder.AutoencoderKL) or vae.latent_channels != image_shape[-1]:
      raise ValueError(f'autoencoder_dir={autoencoder_dir} must hold an autoencoder with '
                       f'latent_channels={image_shape[-1]} (the model\'s input channels), got '
                       f'{type(vae).__name__} {getattr(vae, "latent_channels", None)}')
  spec = _model_spec(module)
  config = default_config.get_config()
  config.model.name = spec["name"]
  for key, value in spec["overrides"].items():
    config.model[key] = tuple(value) if isinstance(value, list) else value
  for key, value in {**default_diffusion(module), **dict(diffusion or {})}.items():
    config.diffusion[key] = value
  config.data.name = str((source or {}).get("dataset") or "unknown")
  config.data.image_size = int(image_shape[0])
  if autoencoder_dir is not None:
    config.autoencoder.workdir = autoencoder_dir
    config.sample.clip_denoised = False
  # The schedule the readers will build (a ValueError now, before anything is written, rather
  # than a workdir that no sampler can load).
  components.build_schedule(config.diffusion)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  with open(os.path.join(out_dir, "dataset_info.json"), "w") as f:
    json.dump({"image_shape": [int(s) for s in image_shape],
               "num_classes": int(getattr(module, "num_classes", 0) or 0)}, f)
  with open(os.path.join(out_dir, "source.json"), "w") as f:
    json.dump(dict(source or {}), f, indent=2)
  params = jax.tree.map(np.asarray, params)
  ema = {state_lib.ema_key(d): params for d in config.train.ema_decays}
  state = {"step": np.zeros((), np.int32), "params": params, "ema_params": ema}
  mngr = ocp.CheckpointManager(os.path.join(out_dir, "checkpoints"),
                               options=ocp.CheckpointManagerOptions(create=True),
                               item_names=("state", "data"))
  mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                       data=ocp.args.JsonSave({})), force=True)
  mngr.wait_until_finished()
  mngr.close()


def load_checkpoint(out_dir: str, **overrides: Any) -> tuple[nn.Module, Any]:
  """(module with `overrides` applied, params) of a directory written here or by the trainer:
  an autoencoder (`save_checkpoint`: model.json + params) or a run workdir (`write_run`'s or a
  trainer's, read by `training.restore.load_for_sampling`: EMA params)."""
  out_dir = os.path.abspath(out_dir)
  spec_path = os.path.join(out_dir, "model.json")
  if not os.path.exists(spec_path):
    loaded = restore.load_for_sampling(out_dir)
    return loaded.model.clone(**overrides), loaded.params
  with open(spec_path) as f:
    spec = json.load(f)
  module = _preset(spec["name"], **{**spec["overrides"], **overrides})
  mngr = ocp.CheckpointManager(out_dir)
  restored = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore())
  mngr.close()
  return module, restored["params"]


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m diffusion_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--format", required=True, choices=FORMATS)
  parser.add_argument("--weights", required=True, help=".safetensors, .bin or .pt file")
  parser.add_argument("--config", help="diffusers config.json (diffusers_* formats)")
  parser.add_argument("--preset", help="DiT preset giving num_heads for dit_official (DiT-XL/2); "
                      "autoencoder preset giving the scaling factor for ldm_vae (default sd_vae)")
  parser.add_argument("--num_heads", type=int, help="heads for dit_official without --preset")
  parser.add_argument("--out", required=True, help="output run directory")
  parser.add_argument("--image_size", type=int,
                      help="side of the square images (default: from the config or pos_embed)")
  parser.add_argument("--dataset", help="data.name written to config.json (e.g. cifar10)")
  parser.add_argument("--schedule", help="diffusion.schedule (default linear)")
  parser.add_argument("--num_timesteps", type=int, help="diffusion.num_timesteps (default 1000)")
  parser.add_argument("--prediction", help="diffusion.prediction (default eps)")
  parser.add_argument("--variance", help="diffusion.variance (default learned_range for a "
                      "learned-sigma model, else fixed_large)")
  parser.add_argument("--autoencoder", help="a latent model's autoencoder directory (converted "
                      "with --format diffusers_vae / ldm_vae): samples are decoded by it")
  args = parser.parse_args(argv)
  image_size = args.image_size
  sd = load_state_dict(args.weights)
  if args.format == "dit_official":
    if args.preset is not None:
      dits = [n for n, (cls, _) in PRESETS.items() if cls.__name__ == "DiT"]
      if args.preset not in dits:
        parser.error(f'unknown DiT --preset {args.preset!r}; known: {", ".join(dits)}')
      heads = PRESETS[args.preset][1]["num_heads"]
    elif args.num_heads is not None:
      heads = args.num_heads
    else:
      parser.error("dit_official needs --preset or --num_heads")
    module, params = dit_from_official(sd, num_heads=heads)
    if not image_size and "pos_embed" in sd:
      image_size = int(round(np.sqrt(sd["pos_embed"].size // module.hidden_size))) * \
          module.patch_size
  elif args.format == "ldm_vae":
    preset = args.preset or "sd_vae"
    if preset not in AUTOENCODER_PRESETS:
      parser.error(f'unknown autoencoder --preset {preset!r}; known: {", ".join(AUTOENCODER_PRESETS)}')
    module, params = autoencoder_from_ldm(sd, preset)
  else:
    if not args.config:
      parser.error(f"--config is required for --format {args.format}")
    with open(args.config) as f:
      config = json.load(f)
    convert = {"diffusers_unet": unet_from_diffusers, "diffusers_dit": dit_from_diffusers,
               "diffusers_vae": autoencoder_from_diffusers}[args.format]
    module, params = convert(sd, config)
    size = config.get("sample_size")
    if not image_size and size:
      image_size = int(size[0] if isinstance(size, (list, tuple)) else size)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  source = {"format": args.format, "weights": os.path.basename(args.weights)}
  if isinstance(module, autoencoder.AutoencoderKL):
    save_checkpoint(args.out, module, params, source)
    print(f'wrote {args.out}: AutoencoderKL {_model_spec(module)["name"]}, {n:,} params')
    return
  diffusion = {k: getattr(args, k) for k in ("schedule", "num_timesteps", "prediction", "variance")
               if getattr(args, k) is not None}
  write_run(args.out, module, params, _image_shape(module, image_size), diffusion=diffusion,
            source={**source, "dataset": args.dataset}, autoencoder_dir=args.autoencoder)
  print(f'wrote {args.out}: {type(module).__name__} {_model_spec(module)["name"]}, {n:,} params; '
        f'sample with: python -m experiments.sample --workdir={args.out} --out=samples.npz')


if __name__ == "__main__":
  main()
