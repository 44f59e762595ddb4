"""Latent diffusion: latents as training data (posterior samples, flips, errors), the one decoder
of samples (batched = unbatched, the autoencoder check), the DiT-XL/2 ImageNet config against
the paper, and (slow) the CPU latent path end to end: autoencoder -> encode -> train -> sample
-> decode -> quality."""
import json
import os
import sys

import jax
import numpy as np
import pytest

from numerics_testlib import assert_f32_close
from diffusion_jax import data as data_lib
from diffusion_jax.data import latents as latent_format
from diffusion_jax.models import autoencoder, count_params, get_autoencoder
from diffusion_jax.training import components
from diffusion_jax.training import default_config
from diffusion_jax.training import latent_decoder
from diffusion_jax.training import run_config
from experiments import encode_latents
from experiments.configs import dit_xl2_imagenet256
from experiments.configs import latent_digits

DATA = dict(name="digits", split="train[:200]")


def _random_params(vae, seed=0):
  shapes = jax.eval_shape(lambda: autoencoder.init_autoencoder(vae, jax.random.key(0)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
  """(vae, params, autoencoder dir, latents dir): random vae_digits weights, 200 digits, flips."""
  from diffusion_jax import convert
  root = tmp_path_factory.mktemp("latents")
  vae = get_autoencoder("vae_digits", scaling_factor=0.7)
  params = _random_params(vae)
  convert.save_checkpoint(str(root / "vae"), vae, params, {"test": True}, preset="vae_digits")
  spec = json.loads((root / "vae" / "model.json").read_text())
  encode_latents.encode_dataset(vae, params, spec, dict(DATA), str(root / "lat"), batch_size=32,
                                shard_size=64, flip=True, progress=False)
  return vae, params, str(root / "vae"), str(root / "lat")


def _data_config(lat, **kw):
  return dict(name="latents", latents_dir=lat, split="train[:200]", **kw)


def test_latent_batches_are_the_stored_means_or_posterior_samples(encoded):
  _, _, _, lat = encoded
  stored, labels = latent_format.LatentSource(lat).read(np.arange(200))
  info = data_lib.get_dataset_info(_data_config(lat))
  assert info == data_lib.DatasetInfo((4, 4, 2), 10, 200)
  # Means: the stored bytes, in stream order (no shuffle), labels too.
  it = data_lib.make_train_iterator(_data_config(lat, latent_sample=False, shuffle=False),
                                    global_batch_size=50, seed=3, process_index=0,
                                    process_count=1, num_local_devices=2)
  batch = next(it)
  assert batch["image"].shape == (2, 25, 4, 4, 2) and batch["image"].dtype == np.float32
  np.testing.assert_array_equal(batch["image"].reshape(50, 4, 4, 2), stored["mean"][:50])
  np.testing.assert_array_equal(batch["label"].reshape(50), labels[:50])
  # Samples: (z - mean) / std is standard normal over 4 epochs x 200 examples x 32 values:
  # its mean and variance are within 5 standard errors (1 / sqrt(25600), sqrt(2 / 25600)).
  it = data_lib.make_train_iterator(_data_config(lat, shuffle=False), global_batch_size=200,
                                    seed=3, process_index=0, process_count=1, num_local_devices=1)
  eps = np.stack([(next(it)["image"][0] - stored["mean"]) / stored["std"] for _ in range(4)])
  n = eps.size
  assert abs(eps.mean()) < 5 / np.sqrt(n) and abs(eps.var() - 1) < 5 * np.sqrt(2 / n)
  assert np.abs(eps[0] - eps[1]).min() > 0   # fresh noise each epoch (stream position)


def test_latent_samples_depend_on_seed_and_position_only(encoded):
  _, _, _, lat = encoded
  cfg = _data_config(lat, random_flip=True)
  one = data_lib.make_train_iterator(cfg, global_batch_size=40, seed=5, process_index=0,
                                     process_count=1, num_local_devices=1)
  two = [data_lib.make_train_iterator(cfg, global_batch_size=40, seed=5, process_index=h,
                                      process_count=2, num_local_devices=2) for h in range(2)]
  for _ in range(3):
    whole = next(one)["image"].reshape(40, 4, 4, 2)
    parts = [next(t)["image"].reshape(20, 4, 4, 2) for t in two]
    np.testing.assert_array_equal(whole[0::2], parts[0])   # host h takes positions p % 2 == h
    np.testing.assert_array_equal(whole[1::2], parts[1])
  state = one.get_state()
  resumed = data_lib.make_train_iterator(cfg, global_batch_size=40, seed=5, process_index=0,
                                         process_count=1, num_local_devices=1)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["image"], next(one)["image"])


def test_random_flips_take_the_flipped_images_latents(encoded):
  _, _, _, lat = encoded
  stored, _ = latent_format.LatentSource(lat).read(np.arange(200))
  it = data_lib.make_train_iterator(
      _data_config(lat, random_flip=True, latent_sample=False, shuffle=False),
      global_batch_size=200, seed=1, process_index=0, process_count=1, num_local_devices=1)
  got = next(it)["image"][0]
  flips = data_lib.pipeline.flip_mask(1, np.arange(200))
  assert 50 < flips.sum() < 150
  np.testing.assert_array_equal(got[flips], stored["mean_flip"][flips])
  np.testing.assert_array_equal(got[~flips], stored["mean"][~flips])


def test_latent_data_errors(encoded, tmp_path):
  vae, params, _, lat = encoded
  with pytest.raises(ValueError, match="latents_dir must be set"):
    data_lib.get_dataset_info({"name": "latents"})
  with pytest.raises(ValueError, match="holds the latents of split 'train\\[:200\\]'"):
    data_lib.get_dataset_info(dict(name="latents", latents_dir=lat, split="test"))
  encode_latents.encode_dataset(vae, params, {"name": "vae_digits"}, dict(DATA),
                                str(tmp_path / "noflip"), batch_size=32, shard_size=256,
                                progress=False)
  with pytest.raises(ValueError, match="random_flip=True needs latents of flipped images"):
    data_lib.make_train_iterator(_data_config(str(tmp_path / "noflip"), random_flip=True),
                                 global_batch_size=8, seed=0, process_index=0, process_count=1,
                                 num_local_devices=1)
  with pytest.raises(TypeError, match="not uint8 images"):
    data_lib.load_split_as_numpy(_data_config(lat))


def test_decoder_batches_give_the_autoencoders_images(encoded):
  vae, params, ae_dir, lat = encoded
  config = default_config.get_config()
  config.data.update(_data_config(lat))
  config.autoencoder.workdir = ae_dir
  config.autoencoder.decode_batch_size = 8
  dec = latent_decoder.load_decoder(config)
  assert dec.batch_size == 8 and dec.image_shape((4, 4, 2)) == (8, 8, 1)
  z = np.random.default_rng(0).standard_normal((19, 4, 4, 2)).astype(np.float32)  # 8 + 8 + 3
  got = dec(z)
  want = np.asarray(autoencoder.decode(vae, params, z))
  assert got.shape == (19, 8, 8, 1) and got.dtype == np.float32
  # The same float32 network at another batch size (8 per call over the devices vs 19 at once):
  # the decoder is a chain of ~28 layers (conv_in, mid ResBlock-attention-ResBlock, 2 levels x 2
  # ResBlocks of GroupNorm + 2 convs, upsample, norm_out, conv_out), each with ~3 operations
  # whose reductions the compiler may block differently: 84 float32 roundings.
  assert_f32_close(got, want, ops=84)
  images = latent_decoder.to_images(z, dec)
  assert images.dtype == np.uint8 and images.shape == (19, 8, 8, 1)
  assert latent_decoder.to_images(np.zeros((2, 8, 8, 1)), None).shape == (2, 8, 8, 1)
  with pytest.raises(ValueError, match="latent_channels=2"):
    dec(np.zeros((2, 4, 4, 3), np.float32))


def test_latent_run_needs_the_autoencoder_that_encoded_it(encoded, tmp_path):
  from diffusion_jax import convert
  _, _, _, lat = encoded
  config = default_config.get_config()
  config.data.update(_data_config(lat))
  with pytest.raises(ValueError, match="needs config.autoencoder.workdir"):
    latent_decoder.load_decoder(config)
  other = get_autoencoder("vae_digits", scaling_factor=0.5)
  convert.save_checkpoint(str(tmp_path / "other"), other, _random_params(other), preset="vae_digits")
  config.autoencoder.workdir = str(tmp_path / "other")
  with pytest.raises(ValueError, match="decoding would not invert the encoding"):
    latent_decoder.load_decoder(config)
  pixels = default_config.get_config()
  assert latent_decoder.load_decoder(pixels) is None


def test_autoencoder_and_latents_are_fixed_for_the_life_of_a_run():
  for key in ("data.latents_dir", "data.latent_sample", "autoencoder.workdir"):
    assert not run_config.may_change(key), key
  assert run_config.may_change("autoencoder.decode_batch_size")


def test_dit_xl2_imagenet256_config_is_the_papers():
  """REFERENCE.md, DiT: AdamW lr 1e-4, no weight decay, no warmup, batch 256, EMA 0.9999, learned
  sigma, linear T = 1000, 250 sampling steps, guidance 1.5; SD-VAE latents 32x32x4."""
  c = dit_xl2_imagenet256.get_config()
  assert (c.optim.name, c.optim.lr, c.optim.weight_decay, c.optim.warmup_steps,
          c.optim.decay) == ("adamw", 1e-4, 0.0, 0, "constant")
  assert (c.train.batch_size, tuple(c.train.ema_decays), c.train.label_dropout) == \
      (256, (0.9999,), 0.1)
  assert (c.diffusion.schedule, c.diffusion.num_timesteps, c.diffusion.prediction,
          c.diffusion.loss_type, c.diffusion.variance) == \
      ("linear", 1000, "eps", "hybrid", "learned_range")
  assert (c.sample.sampler, c.sample.steps, c.sample.guidance_scale, c.sample.clip_denoised) == \
      ("ddpm", 250, 1.5, False)
  assert c.data.name == "latents" and c.data.random_flip and c.autoencoder.workdir
  model = components.build_model(c.model, (32, 32, 4))
  # 675,129,632 for the official code, which counts its fixed positional embedding (256 x 1152).
  assert count_params(model, (1, 32, 32, 4), True) == 675_129_632 - 256 * 1152
  assert get_autoencoder("sd_vae").scaling_factor == 0.18215


def test_latent_configs_declare_only_default_keys():
  def keys(c, prefix=""):
    out = set()
    for k, v in c.items():
      if hasattr(v, "items") and k != "kwargs":
        out |= keys(v, f"{prefix}{k}.")
      else:
        out.add(prefix + k)
    return out
  declared = keys(default_config.get_config())
  for config in (latent_digits.get_config(), dit_xl2_imagenet256.get_config()):
    assert keys(config) == declared


def test_preview_sampling_follows_sample_steps_and_guidance_scale():
  """The trainer's previews (`sampling.sample_from_config`) honour sample.steps (respaced on the sampler's
  grid) and sample.guidance_scale (classifier-free guidance with the null label num_classes)."""
  from diffusion_jax import samplers
  from diffusion_jax.models import get_model, init_params
  from diffusion_jax.training import sampling
  config = default_config.get_config()
  config.diffusion.update(dict(num_timesteps=50, loss_type="hybrid", variance="learned_range"))
  config.sample.update(dict(steps=5, guidance_scale=1.5))
  model = get_model("dit_tiny", in_channels=2)
  params = init_params(model, jax.random.key(1), (4, 4, 2), True)
  params = jax.tree.map(lambda p: p + 0.05 * np.asarray(jax.random.normal(jax.random.key(2),
                                                                          p.shape)), params)
  schedule = components.build_schedule(config.diffusion)
  labels = np.array([1, 4, 9], np.int32)
  key = jax.random.key(3)
  got = sampling.sample_from_config(config, model, schedule, params, key, 3, (4, 4, 2), labels)
  plan = samplers.plan("ddpm", schedule, 5)
  sampler = samplers.get_sampler("ddpm", prediction="eps", variance="learned_range",
                                 clip_denoised=True, **plan.static)
  guided = samplers.classifier_free_guidance(
      lambda x, t, y: model.apply({"params": params}, x, t, y, train=False), labels, 1.5,
      null_label=10)
  want = sampler(guided, plan.schedule, (3, 4, 4, 2), key, **plan.per_call)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  config.sample.guidance_scale = 1.0
  plain = sampling.sample_from_config(config, model, schedule, params, key, 3, (4, 4, 2), labels)
  assert np.abs(np.asarray(plain) - np.asarray(got)).max() > 1e-3


def test_converted_latent_dit_samples_images_through_its_autoencoder(tmp_path):
  """The published-weights path at a tiny size: a class-conditional learned-sigma DiT on 4x4x4
  latents written by `convert.write_run(..., autoencoder_dir=...)` (what `convert --autoencoder`
  does), sampled by `experiments.sample` with guidance and respaced steps: the images are the
  autoencoder's decoding of the sampled latents."""
  from diffusion_jax import convert
  from diffusion_jax.models import get_model, init_params
  from diffusion_jax.training import restore
  from experiments import sample, sampling_lib
  vae = get_autoencoder("vae_tiny", scaling_factor=0.5)
  convert.save_checkpoint(str(tmp_path / "vae"), vae, _random_params(vae), preset="vae_tiny")
  dit = get_model("dit_tiny", in_channels=4)
  params = init_params(dit, jax.random.key(1), (4, 4, 4), True)
  params = jax.tree.map(lambda p: p + 0.02 * np.asarray(jax.random.normal(
      jax.random.key(2), p.shape)), params)   # leave the zero-initialised identity blocks
  convert.write_run(str(tmp_path / "dit"), dit, params, (4, 4, 4),
                    autoencoder_dir=str(tmp_path / "vae"))
  loaded = restore.load_for_sampling(str(tmp_path / "dit"))
  assert loaded.config.autoencoder.workdir == str(tmp_path / "vae")
  assert not loaded.config.sample.clip_denoised
  labels = np.array([3, 7, 1], np.int32)
  images = sample.sample_images(loaded, 3, seed=0, batch_size=3, labels=labels, steps=5,
                                guidance_scale=1.5)
  assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
  apply_fn = lambda p, x, t, y: loaded.model.apply({"params": p}, x, t, y, train=False)
  z = sampling_lib.generate(apply_fn, loaded.params, loaded.schedule, (4, 4, 4), num_samples=3,
                            batch_size=3, labels=labels, num_classes=10, steps=5,
                            guidance_scale=1.5, variance="learned_range", thresholding="none",
                            progress=False)
  vae_loaded, vae_params = convert.load_checkpoint(str(tmp_path / "vae"))
  want = np.asarray(autoencoder.decode(vae_loaded, vae_params, z))
  want = np.rint((np.clip(want, -1, 1) + 1) * 127.5)
  # The same float32 decoder at another batch size: values agree to rounding, so a uint8 may
  # differ by one where a value lies at a rounding boundary.
  assert np.abs(images.astype(int) - want).max() <= 1
  with pytest.raises(ValueError, match="latent_channels=3"):
    convert.write_run(str(tmp_path / "bad"), get_model("dit_tiny"), params, (4, 4, 3),
                      autoencoder_dir=str(tmp_path / "vae"))


# --------------------------------------------------------------------------- end to end (slow)

import shared_runs  # noqa: E402
import training_testlib as tl  # noqa: E402

# The end-to-end run: sizes for an idle 2-core CPU in well under 3 minutes.
E2E_AE_STEPS = 400
E2E_STEPS = 1000
E2E_SAMPLES = 200


def _run(*args: str) -> str:
  import subprocess
  proc = subprocess.run([sys.executable, "-m", *args], env=tl.subprocess_env(1), cwd=tl.REPO,
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.fixture(scope="session")
def latent_digits_run(tmp_path_factory):
  """The README's CPU latent path, as a user runs it (4 commands, one CPU device): the small
  autoencoder trained briefly, digits encoded once, the latent U-Net (`latent_digits.py`)
  trained for half its steps, 200 samples drawn (DDIM, 50 steps) and decoded. Shared through
  `shared_runs.run_once`."""
  def build(root):
    ae, lat, run = str(root / "vae"), str(root / "latents"), str(root / "run")
    tfds = f'--data.data_dir={root / "tfds"}'
    _run("experiments.train_autoencoder", f"--out={ae}", f"--steps={E2E_AE_STEPS}", tfds)
    _run("experiments.encode_latents", f"--vae={ae}", "--data.name=digits", "--data.image_size=8",
         tfds, f"--out={lat}")
    # Half the config's 2,000 steps, and EMA 0.99 (horizon 100 steps) for the shorter run.
    _run("experiments.train", "--config=experiments/configs/latent_digits.py", f"--workdir={run}",
         f"--config.data.latents_dir={lat}", f"--config.autoencoder.workdir={ae}",
         f"--config.train.num_steps={E2E_STEPS}", f"--config.train.checkpoint_every={E2E_STEPS}",
         "--config.train.ema_decays=(0.99,)", "--config.sample.num_samples=16")
    _run("experiments.sample", f"--workdir={run}", f"--num_samples={E2E_SAMPLES}",
         f'--out={root / "samples.npz"}', "--sampler=ddim", "--steps=50")
    return {"autoencoder": ae, "latents": lat, "run": run, "samples": str(root / "samples.npz")}

  return shared_runs.run_once(tmp_path_factory, "latent_digits_shared", build)[1]


@pytest.mark.slow
def test_small_autoencoder_reconstructs_held_out_digits(latent_digits_run):
  """Thresholds chosen before training it: the reconstruction error must be under a tenth of the
  held-out pixels' variance (0.58 on [-1, 1]: 90% of it explained), and the reconstructions'
  Frechet distance to the held-out digits under a quarter of the real floor (held-out vs
  training digits, 68): reconstructions are much closer to their originals than other real
  digits are."""
  spec = json.loads(open(os.path.join(latent_digits_run["autoencoder"], "model.json")).read())
  rec = spec["source"]["reconstruction"]
  assert spec["name"] == "vae_digits" and spec["overrides"]["scaling_factor"] > 0
  assert rec["mse"] < 0.1 * 0.58, rec
  assert rec["digits_fd"] < 0.25 * rec["digits_real_floor"], rec
  meta = latent_format.read_meta(latent_digits_run["latents"])
  assert (meta.num_examples, meta.latent_shape) == (1500, (4, 4, 2))
  means, _ = latent_format.LatentSource(latent_digits_run["latents"]).read(np.arange(1500))
  # Scaled to unit variance over the training split by construction (float32 sums of 24,000).
  np.testing.assert_allclose(means["mean"].std(), 1.0, rtol=1e-4)


@pytest.mark.slow
def test_latent_run_samples_decode_to_digits(latent_digits_run):
  """experiments.sample decodes: uint8 [200, 8, 8, 1] images. Quality, with thresholds decided
  before this run was measured: the digits Frechet distance to the held-out digits must be at
  most half that of decoding plain N(0, I) latents (what a sampler that learned nothing gives,
  through the same decoder) and at most 3x the real-vs-real floor (~68; the pixel-space digits
  DiT scores 156 and the U-Net 84-89 with 500 samples after 2,000 steps, README)."""
  from diffusion_jax import convert
  from diffusion_jax.evaluation import digits
  images = np.load(latent_digits_run["samples"])["images"]
  assert images.shape == (E2E_SAMPLES, 8, 8, 1) and images.dtype == np.uint8
  assert images.min() < 40 and images.max() > 215   # dark background, bright strokes
  vae, params = convert.load_checkpoint(latent_digits_run["autoencoder"])
  decoder = latent_decoder.LatentDecoder(vae, params, E2E_SAMPLES, jax.local_devices()[:1])
  prior = np.random.default_rng(0).standard_normal((E2E_SAMPLES, 4, 4, 2)).astype(np.float32)
  fd_prior = digits.digits_frechet_distance(latent_decoder.to_images(prior, decoder))
  fd = digits.digits_frechet_distance(images)
  floor = digits.real_floor()
  print(f"latent digits: FD {fd:.1f}, decoded N(0, I) {fd_prior:.1f}, real floor {floor:.1f}")
  assert fd <= 0.5 * fd_prior and fd <= 3 * floor, (fd, fd_prior, floor)
  png = os.path.join(os.path.dirname(latent_digits_run["run"]), "run", "samples",
                     f"step_{E2E_STEPS:07d}.png")
  assert os.path.exists(png)   # the trainer's preview, decoded


class _StepJitted(Exception):
  pass


@pytest.mark.parametrize("convolutions", ["xla", "ynnpack"])
def test_autoencoder_train_step_takes_the_cpu_convolutions(tmp_path, monkeypatch, convolutions):
  # experiments.train_autoencoder's --cpu_convolutions becomes its train step's compiler options
  # (tests/test_xla_cpu.py checks what they compile to); the run stops once the step is jitted.
  import jax
  from diffusion_jax import xla_cpu
  from experiments import train_autoencoder
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  real_jit, seen = jax.jit, {}

  def spy(fun, **kwargs):
    if getattr(fun, "__name__", "") == "step":
      seen["options"] = kwargs.get("compiler_options")
      raise _StepJitted
    return real_jit(fun, **kwargs)

  monkeypatch.setattr(jax, "jit", spy)
  with pytest.raises(_StepJitted):
    train_autoencoder.train({"name": "digits", "split": "train", "eval_split": "test"},
                            str(tmp_path / "vae"), steps=2, batch_size=8,
                            cpu_convolutions=convolutions)
  expected = ({xla_cpu.FLAG_NAME: xla_cpu.WITHOUT_CONVOLUTIONS} if convolutions == "xla"
              else None)
  assert seen == {"options": expected}
