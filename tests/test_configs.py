"""The configs: one declaration of every key (diffusion_jax/training/default_config.py), each
experiment config built and checked (ddpm_cifar10 against the published values of REFERENCE.md), one
training step of each at a tiny size, backbone swaps and RGB folders by overrides alone, the
unknown-key error, the one variance rule, and a light `import diffusion_jax`."""
import dataclasses
import importlib
import inspect
import json
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

import training_testlib as tl
from diffusion_jax import _checks
from diffusion_jax import losses
from diffusion_jax import models
from diffusion_jax import reverse
from diffusion_jax import schedules
from diffusion_jax.data import options as data_options
from diffusion_jax.training import components
from diffusion_jax.training import default_config
from diffusion_jax.training import sampling
from diffusion_jax.training import trainer
from experiments.configs import overrides

# Every experiment config, as `--config=experiments/configs/<file>.py[:arg]` names it.
CONFIGS = ("digits", "ddpm_cifar10", "dit_cifar10", "dit_cifar10:DiT-B/4", "tpu:digits",
           "tpu:ddpm_cifar10", "tpu:dit_cifar10", "vdm_digits", "edm_digits", "vdm_cifar10",
           "edm_cifar10")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def load(spec: str) -> ml_collections.ConfigDict:
  name, _, arg = spec.partition(":")
  return importlib.import_module(f"experiments.configs.{name}").get_config(arg or None)


def flat_keys(config, prefix=""):
  out = {}
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict) and k != "kwargs":
      out.update(flat_keys(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


# --------------------------------------------------------------------------- declarations

def test_default_declares_every_constructor_argument():
  """Model, data, diffusion (schedule + loss) and optimizer arguments each have a key, so each
  can be set from the command line."""
  config = default_config.get_config()
  model_keys = set(config.model) - {"name"}
  for cls in {cls for cls, _ in models.PRESETS.values()}:
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    assert fields <= model_keys, (cls.__name__, sorted(fields - model_keys))
  # Data: the same keys and defaults as DataOptions (the data library's own declaration).
  declared = {f.name: f.default for f in dataclasses.fields(data_options.DataOptions)}
  assert set(config.data) == set(declared)
  for key, value in config.data.items():
    if key not in ("name", "data_dir"):
      assert value == declared[key], key
  loss_args = {p.name for p in inspect.signature(losses.training_loss).parameters.values()
               if p.kind == p.KEYWORD_ONLY} - {"t", "noise"}
  assert loss_args == set(components.LOSS_KEYS) and loss_args <= set(config.diffusion)
  for name, factory in schedules.BETA_SCHEDULES.items():
    assert set(inspect.signature(factory).parameters) - {"num_timesteps"} <= \
        set(config.diffusion.schedule_kwargs), name


@pytest.mark.parametrize("spec", CONFIGS)
def test_each_config_has_exactly_the_default_keys(spec):
  config = load(spec)
  assert set(flat_keys(config)) == set(flat_keys(default_config.get_config()))
  model = components.build_model(config.model, (32, 32, 3))
  assert models.count_params(model, (32, 32, 3)) > 0


def test_ddpm_cifar10_is_the_published_recipe():
  """REFERENCE.md, DDPM (Ho et al. 2020) CIFAR-10."""
  c = load("ddpm_cifar10")
  model = components.build_model(c.model, (32, 32, 3))
  assert models.count_params(model, (32, 32, 3)) == 35_746_307
  assert model.dropout == 0.1 and model.num_classes == 0 and not model.learn_sigma
  schedule = components.build_schedule(c.diffusion)
  # Independent float64 reference: betas linear from 1e-4 to 0.02 over T = 1000; float32 storage
  # gives at most half an ulp of 0.02 (~1e-9) of error.
  np.testing.assert_allclose(np.asarray(schedule.betas, np.float64),
                             np.linspace(1e-4, 0.02, 1000), rtol=0, atol=2e-9)
  assert (c.diffusion.prediction, c.diffusion.loss_type, c.diffusion.weighting) == \
      ("eps", "mse", "none")
  assert sampling.sampling_variance(c) == "fixed_large"
  assert (c.optim.name, c.optim.lr, c.optim.warmup_steps, c.optim.decay, c.optim.grad_clip,
          c.optim.weight_decay, c.optim.accumulate) == ("adam", 2e-4, 5000, "constant", 1.0, 0.0, 1)
  _, lr_fn = components.optim.make_optimizer(c.optim, c.train.num_steps)
  # Linear warmup 0 -> 2e-4 over 5000 steps, then constant (float32 arithmetic in optax).
  np.testing.assert_allclose([float(lr_fn(s)) for s in (0, 2500, 5000, 799_999)],
                             [0.0, 1e-4, 2e-4, 2e-4], rtol=1e-6)
  assert (c.train.batch_size, c.train.num_steps, tuple(c.train.ema_decays)) == \
      (128, 800_000, (0.9999,))
  assert (c.data.name, c.data.image_size, c.data.random_flip) == ("cifar10", 32, True)


def test_dit_cifar10_is_the_dit_recipe_on_cifar():
  """REFERENCE.md, DiT: AdamW lr 1e-4, no weight decay, no warmup, batch 256, EMA 0.9999,
  learned sigma with the hybrid loss; here class-conditional on CIFAR-10's 10 classes."""
  c = load("dit_cifar10")
  model = components.build_model(c.model, (32, 32, 3))
  assert isinstance(model, models.DiT)
  assert (model.patch_size, model.hidden_size, model.depth, model.in_channels,
          model.num_classes, model.learn_sigma) == (2, 384, 12, 3, 10, True)
  assert (c.optim.name, c.optim.lr, c.optim.weight_decay, c.optim.warmup_steps) == \
      ("adamw", 1e-4, 0.0, 0)
  assert (c.train.batch_size, tuple(c.train.ema_decays)) == (256, (0.9999,))
  assert (c.diffusion.loss_type, sampling.sampling_variance(c)) == ("hybrid", "learned_range")


def test_vdm_and_edm_cifar10_are_the_authors_recipes():
  """google-research/vdm configs/cifar10.py and NVlabs/edm train.py (docs/likelihood_table.md
  lists the values): the family, its schedule / preconditioning, the optimizer and run length."""
  c = load("vdm_cifar10")
  assert (c.diffusion.family, c.diffusion.prediction, c.vdm.gamma_min, c.vdm.gamma_max,
          c.vdm.antithetic, c.vdm.num_steps) == ("vdm", "eps", -13.3, 5.0, True, 0)
  assert (c.model.ch, tuple(c.model.ch_mult), c.model.num_res_blocks, c.model.dropout,
          tuple(c.model.attention_levels), c.model.mid_attention) == (128, (1,), 32, 0.1, (),
                                                                      True)
  assert (c.optim.name, c.optim.lr, c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay,
          c.optim.warmup_steps, c.optim.decay) == ("adamw", 2e-4, 0.9, 0.99, 1e-8, 0.01, 100,
                                                   "constant")
  assert (c.train.batch_size, c.train.num_steps, tuple(c.train.ema_decays)) == \
      (128, 10_000_000, (0.9999,))
  c = load("edm_cifar10")
  assert (c.diffusion.family, c.diffusion.prediction, c.edm.precond, c.edm.sigma_data,
          c.edm.p_mean, c.edm.p_std, c.edm.sigma_min, c.edm.sigma_max) == \
      ("edm", "x0", "edm", 0.5, -1.2, 1.2, 0.002, 80.0)
  assert (c.model.ch, tuple(c.model.ch_mult), c.model.num_res_blocks, c.model.dropout) == \
      (128, (2, 2, 2), 4, 0.13)
  # 200 Mimg at batch 512; lr ramp-up over 10 Mimg; EMA half-life 0.5 Mimg per step of 512.
  assert (c.optim.lr, c.optim.warmup_steps, c.optim.grad_clip, c.train.batch_size,
          c.train.num_steps) == (1e-3, 10_000_000 // 512, 0.0, 512, 200_000_000 // 512)
  assert c.train.ema_decays[0] == pytest.approx(0.5 ** (512 / 500_000), abs=5e-6)
  assert (c.sample.sampler, c.sample.kwargs.num_steps) == ("heun", 18)


# Overrides that make any config train one step on the offline digits in seconds.
def tiny(spec: str, data_dir: str) -> ml_collections.ConfigDict:
  c = load(spec)
  c.data.name, c.data.data_dir, c.data.image_size, c.data.random_flip = "digits", data_dir, 8, False
  if isinstance(components.build_model(c.model, (8, 8, 1)), models.DiT):
    c.model.update(hidden_size=32, depth=1, num_heads=2)
  else:
    c.model.update(ch=8, num_groups=4, ch_mult=(1,), num_res_blocks=1, attention_levels=(0,))
  c.diffusion.num_timesteps = 100   # the linear schedule rescaled to T < 50 has betas >= 1
  k = c.train.steps_per_call
  c.train.update(num_steps=k, batch_size=8, checkpoint_every=k, log_every=k, sample_every=0)
  c.sample.num_samples = 2
  c.optim.warmup_steps = min(c.optim.warmup_steps, 1)
  return c


@pytest.mark.slow  # 7 compiled train steps and samplers: ~2 min on 2 loaded cores
@pytest.mark.parametrize("spec", CONFIGS)
def test_one_training_step_of_each_config(spec, tmp_path, data_dir):
  c = tiny(spec, data_dir)
  state = trainer.train_and_evaluate(c, str(tmp_path / "run"))
  assert int(state.step) == c.train.num_steps
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
  assert (tmp_path / "run" / "samples" / f"step_{c.train.num_steps:07d}.png").exists()


# --------------------------------------------------------------------------- models by override

def test_backbone_swap_by_overrides_alone(caplog):
  """digits.py + model.name=DiT-S/2 + patch_size=1: the U-Net keys of digits.py are not passed
  to the DiT (a warning names them); in_channels follows the data."""
  c = load("digits")
  c.model.name, c.model.patch_size = "DiT-S/2", 1
  with caplog.at_level("WARNING"):
    model = components.build_model(c.model, (8, 8, 1))
  assert isinstance(model, models.DiT)
  assert (model.patch_size, model.in_channels, model.num_classes, model.learn_sigma,
          model.hidden_size) == (1, 1, 0, False, 384)
  assert "model.ch=32" in caplog.text
  # The other way round: a DiT key on a U-Net is ignored too.
  c = load("digits")
  c.model.patch_size = 4
  assert isinstance(components.build_model(c.model, (8, 8, 1)), models.UNet)


def test_a_key_no_model_takes_names_the_fields():
  c = load("digits").model.to_dict()
  c["widht"] = 3
  with pytest.raises(ValueError, match=r"'widht'.*allowed: \[.*'ch'"):
    components.build_model(c, (8, 8, 1))
  with pytest.raises(ValueError, match="model.name='unet_digit'.*did you mean 'unet_digits'"):
    components.build_model({**load("digits").model, "name": "unet_digit"}, (8, 8, 1))
  bad = load("digits")
  bad.diffusion.schedule_kwargs.beta_start = 1e-3   # a 'linear' argument on 'cosine'
  with pytest.raises(ValueError, match="beta_start.*'max_beta', 's'"):
    components.build_schedule(bad.diffusion)


def test_in_channels_follows_the_data_unless_set():
  c = load("digits")
  assert components.build_model(c.model, (8, 8, 3)).in_channels == 3
  c.model.in_channels = 1
  with pytest.raises(ValueError, match="model.in_channels=1 but the data has 3"):
    components.build(c, (8, 8, 3))


@pytest.mark.slow  # a subprocess training
def test_rgb_folder_trains_from_digits_with_data_overrides_only(tmp_path):
  """experiments.train --config=digits.py plus --config.data.* overrides: the model follows the
  data's 3 channels without a model override."""
  folder = tmp_path / "images"
  rs = np.random.RandomState(0)
  for cls in ("a", "b"):
    (folder / cls).mkdir(parents=True)
    for i in range(8):
      Image.fromarray(rs.randint(0, 255, (12, 10, 3), dtype=np.uint8)).save(folder / cls / f"{i}.png")
  workdir = tmp_path / "run"
  r = subprocess.run(
      tl.train_command(str(workdir), str(tmp_path / "tfds"), **{"train.num_steps": 2}) +
      ["--config.data.name=folder", f"--config.data.folder={folder}", "--config.data.channels=3"],
      env=tl.subprocess_env(1), cwd=tl.REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  info = json.loads((workdir / "dataset_info.json").read_text())
  assert info["image_shape"] == [8, 8, 3] and info["num_classes"] == 2
  assert (workdir / "samples" / "step_0000002.png").exists()


# --------------------------------------------------------------------------- command line

def test_unknown_key_message_names_the_nearest_keys():
  c = load("digits")
  assert overrides.unknown_key_message(c, "model.learn_sigma") is None
  msg = overrides.unknown_key_message(c, "model.learn_sigm")
  assert "--config.model.learn_sigm" in msg and "--config.model.learn_sigma" in msg
  msg = overrides.unknown_key_message(c, "optimm.lr")
  assert "--config.optim" in msg
  assert overrides._override_paths(["p", "--config=x.py", "--config.a.b=1", "--noconfig.c",
                                    "--workdir=w"], "config") == ["a.b", "c"]


def _run(args, **kw):
  env = tl.subprocess_env(1)
  return subprocess.run([sys.executable, "-m"] + args, env=env, cwd=tl.REPO, capture_output=True,
                        text=True, timeout=300, **kw)


def test_unknown_override_on_the_command_line_is_one_clear_line(tmp_path):
  r = _run(["experiments.train", "--config=experiments/configs/digits.py",
            f"--workdir={tmp_path}", "--config.model.learn_sigm=True"])
  assert r.returncode == 1
  assert "Unknown config key --config.model.learn_sigm" in r.stderr
  assert "--config.model.learn_sigma" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow  # trains a 33M-parameter DiT-S/2 for one step
def test_dit_swap_on_the_command_line(tmp_path, data_dir):
  r = _run(["experiments.train", "--config=experiments/configs/digits.py",
            f"--workdir={tmp_path / 'run'}", "--config.model.name=DiT-S/2",
            "--config.model.patch_size=1", f"--config.data.data_dir={data_dir}",
            "--config.train.num_steps=1", "--config.train.batch_size=8",
            "--config.sample.num_samples=2", "--config.diffusion.num_timesteps=10"])
  assert r.returncode == 0, r.stderr[-3000:]
  model = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
  assert (model["name"], model["patch_size"]) == ("DiT-S/2", 1)


@pytest.mark.slow  # two subprocess trainings
def test_learned_sigma_run_trains_previews_and_samples(tmp_path, data_dir):
  """model.learn_sigma + hybrid loss + learned_range: the preview at the end and
  experiments.sample both use the run's learned variance (the preview used to fail)."""
  workdir = tmp_path / "run"
  r = subprocess.run(tl.train_command(str(workdir), data_dir, **{
      "model.learn_sigma": True, "diffusion.loss_type": "hybrid",
      "diffusion.variance": "learned_range", "train.num_steps": 4}),
      env=tl.subprocess_env(1), cwd=tl.REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert (workdir / "samples" / "step_0000004.png").exists()
  out = tmp_path / "s.npz"
  for extra in ([], ["--variance=fixed_large"]):
    # fixed_large on a learned-sigma model fails loudly (the output has 2C channels).
    r = _run(["experiments.sample", f"--workdir={workdir}", f"--out={out}", "--num_samples=2",
              "--steps=5"] + extra)
    if extra:
      assert r.returncode != 0 and "variance='fixed_large' needs a model output" in r.stderr
    else:
      assert r.returncode == 0, r.stderr[-3000:]
      assert np.load(out)["images"].shape == (2, 8, 8, 1)


# --------------------------------------------------------------------------- variance, imports

def test_one_variance_rule():
  assert reverse.resolve_variance(None, "hybrid") == "learned_range"
  assert reverse.resolve_variance(None, "mse") == "fixed_small"
  assert reverse.resolve_variance("fixed_large", "mse") == "fixed_large"
  with pytest.raises(ValueError, match="variance='fixed'"):
    reverse.resolve_variance("fixed", "mse")
  c = load("digits")
  assert sampling.sampling_variance(c) == "fixed_small"
  c.diffusion.loss_type = "hybrid"
  assert sampling.sampling_variance(c) == "learned_range"          # follows the run
  c.diffusion.variance = "learned"
  assert sampling.sampling_variance(c) == "learned"
  c.sample.variance = "learned_range"
  assert sampling.sampling_variance(c) == "learned_range"          # told otherwise by config
  assert sampling.sampling_variance(c, "fixed_large") == "fixed_large"  # ... or by the caller


def test_check_choice_and_keys():
  assert _checks.check_choice("sampler", "ddim", ("ddpm", "ddim")) == "ddim"
  with pytest.raises(ValueError, match=r"Unknown sampler='dim' \(did you mean 'ddim'"):
    _checks.check_choice("sampler", "dim", ("ddpm", "ddim"))
  with pytest.raises(ValueError, match=r"Unknown key\(s\) for the thing: 'b'; allowed: \['a'\]"):
    _checks.check_keys("the thing", ["a", "b"], ["a"])


def test_import_diffusion_jax_is_light():
  """The pure API imports neither TFDS, grain nor orbax; they load with dj.data / dj.training."""
  code = ("import sys, diffusion_jax as dj\n"
          "heavy = ('tensorflow_datasets', 'grain', 'orbax', 'tensorflow')\n"
          "def loaded(): return sorted({m.split('.')[0] for m in sys.modules} & set(heavy))\n"
          "print(loaded())\n"
          "dj.q_sample, dj.get_model\n"
          "print(loaded())\n"
          "dj.make_train_iterator, dj.training.load_for_sampling\n"
          "print(loaded())\n")
  r = subprocess.run([sys.executable, "-c", code], env=tl.subprocess_env(1), capture_output=True,
                     text=True, timeout=120, cwd=tl.REPO)
  assert r.returncode == 0, r.stderr
  first, second, third = r.stdout.split("\n")[:3]
  assert first == second == "[]"
  assert "tensorflow_datasets" in third and "grain" in third and "orbax" in third
