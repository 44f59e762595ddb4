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

from diffusion_jax import data as data_lib
from diffusion_jax.data import latents as latent_format
from diffusion_jax.models import autoencoder, count_params, get_autoencoder
from diffusion_jax.training import components
from diffusion_jax.training import latent_decoder
from diffusion_jax.training import run_config
from experiments import encode_latents
from experiments.configs import default
from experiments.configs import dit_xl2_imagenet256
from experiments.configs import latent_digits

DATA = dict(name='digits', split='train[:200]')


def _random_params(vae, seed=0):
  shapes = jax.eval_shape(lambda: autoencoder.init_autoencoder(vae, jax.random.key(0)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


@pytest.fixture(scope='module')
def encoded(tmp_path_factory):
  """(vae, params, autoencoder dir, latents dir): random vae_digits weights, 200 digits, flips."""
  from diffusion_jax import convert
  root = tmp_path_factory.mktemp('latents')
  vae = get_autoencoder('vae_digits', scaling_factor=0.7)
  params = _random_params(vae)
  convert.save_checkpoint(str(root / 'vae'), vae, params, {'test': True}, preset='vae_digits')
  spec = json.loads((root / 'vae' / 'model.json').read_text())
  encode_latents.encode_dataset(vae, params, spec, dict(DATA), str(root / 'lat'), batch_size=32,
                                shard_size=64, flip=True, progress=False)
  return vae, params, str(root / 'vae'), str(root / 'lat')


def _data_config(lat, **kw):
  return dict(name='latents', latents_dir=lat, split='train[:200]', **kw)


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
  assert batch['image'].shape == (2, 25, 4, 4, 2) and batch['image'].dtype == np.float32
  np.testing.assert_array_equal(batch['image'].reshape(50, 4, 4, 2), stored['mean'][:50])
  np.testing.assert_array_equal(batch['label'].reshape(50), labels[:50])
  # Samples: (z - mean) / std is standard normal over 4 epochs x 200 examples x 32 values:
  # its mean and variance are within 5 standard errors (1 / sqrt(25600), sqrt(2 / 25600)).
  it = data_lib.make_train_iterator(_data_config(lat, shuffle=False), global_batch_size=200,
                                    seed=3, process_index=0, process_count=1, num_local_devices=1)
  eps = np.stack([(next(it)['image'][0] - stored['mean']) / stored['std'] for _ in range(4)])
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
    whole = next(one)['image'].reshape(40, 4, 4, 2)
    parts = [next(t)['image'].reshape(20, 4, 4, 2) for t in two]
    np.testing.assert_array_equal(whole[0::2], parts[0])   # host h takes positions p % 2 == h
    np.testing.assert_array_equal(whole[1::2], parts[1])
  state = one.get_state()
  resumed = data_lib.make_train_iterator(cfg, global_batch_size=40, seed=5, process_index=0,
                                         process_count=1, num_local_devices=1)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)['image'], next(one)['image'])


def test_random_flips_take_the_flipped_images_latents(encoded):
  _, _, _, lat = encoded
  stored, _ = latent_format.LatentSource(lat).read(np.arange(200))
  it = data_lib.make_train_iterator(
      _data_config(lat, random_flip=True, latent_sample=False, shuffle=False),
      global_batch_size=200, seed=1, process_index=0, process_count=1, num_local_devices=1)
  got = next(it)['image'][0]
  flips = data_lib.pipeline.flip_mask(1, np.arange(200))
  assert 50 < flips.sum() < 150
  np.testing.assert_array_equal(got[flips], stored['mean_flip'][flips])
  np.testing.assert_array_equal(got[~flips], stored['mean'][~flips])


def test_latent_data_errors(encoded, tmp_path):
  vae, params, _, lat = encoded
  with pytest.raises(ValueError, match='latents_dir must be set'):
    data_lib.get_dataset_info({'name': 'latents'})
  with pytest.raises(ValueError, match="holds the latents of split 'train\\[:200\\]'"):
    data_lib.get_dataset_info(dict(name='latents', latents_dir=lat, split='test'))
  encode_latents.encode_dataset(vae, params, {'name': 'vae_digits'}, dict(DATA),
                                str(tmp_path / 'noflip'), batch_size=32, shard_size=256,
                                progress=False)
  with pytest.raises(ValueError, match='random_flip=True needs latents of flipped images'):
    data_lib.make_train_iterator(_data_config(str(tmp_path / 'noflip'), random_flip=True),
                                 global_batch_size=8, seed=0, process_index=0, process_count=1,
                                 num_local_devices=1)
  with pytest.raises(TypeError, match='not uint8 images'):
    data_lib.load_split_as_numpy(_data_config(lat))


def test_decoder_batches_give_the_autoencoders_images(encoded):
  vae, params, ae_dir, lat = encoded
  config = default.get_config()
  config.data.update(_data_config(lat))
  config.autoencoder.workdir = ae_dir
  config.autoencoder.decode_batch_size = 8
  dec = latent_decoder.load_decoder(config)
  assert dec.batch_size == 8 and dec.image_shape((4, 4, 2)) == (8, 8, 1)
  z = np.random.default_rng(0).standard_normal((19, 4, 4, 2)).astype(np.float32)  # 8 + 8 + 3
  got = dec(z)
  want = np.asarray(autoencoder.decode(vae, params, z))
  assert got.shape == (19, 8, 8, 1) and got.dtype == np.float32
  # The same float32 network on another batch size: a few roundings per output (conv sums of
  # ~600 terms of magnitude <= max |x|), far below the images' own scale.
  np.testing.assert_allclose(got, want, atol=1e-5 * max(1.0, np.abs(want).max()))
  images = latent_decoder.to_images(z, dec)
  assert images.dtype == np.uint8 and images.shape == (19, 8, 8, 1)
  assert latent_decoder.to_images(np.zeros((2, 8, 8, 1)), None).shape == (2, 8, 8, 1)
  with pytest.raises(ValueError, match='latent_channels=2'):
    dec(np.zeros((2, 4, 4, 3), np.float32))


def test_latent_run_needs_the_autoencoder_that_encoded_it(encoded, tmp_path):
  from diffusion_jax import convert
  _, _, _, lat = encoded
  config = default.get_config()
  config.data.update(_data_config(lat))
  with pytest.raises(ValueError, match='needs config.autoencoder.workdir'):
    latent_decoder.load_decoder(config)
  other = get_autoencoder('vae_digits', scaling_factor=0.5)
  convert.save_checkpoint(str(tmp_path / 'other'), other, _random_params(other), preset='vae_digits')
  config.autoencoder.workdir = str(tmp_path / 'other')
  with pytest.raises(ValueError, match='decoding would not invert the encoding'):
    latent_decoder.load_decoder(config)
  pixels = default.get_config()
  assert latent_decoder.load_decoder(pixels) is None


def test_autoencoder_and_latents_are_fixed_for_the_life_of_a_run():
  for key in ('data.latents_dir', 'data.latent_sample', 'autoencoder.workdir'):
    assert not run_config.may_change(key), key
  assert run_config.may_change('autoencoder.decode_batch_size')


def test_dit_xl2_imagenet256_config_is_the_papers():
  """REFERENCE.md, DiT: AdamW lr 1e-4, no weight decay, no warmup, batch 256, EMA 0.9999, learned
  sigma, linear T = 1000, 250 sampling steps, guidance 1.5; SD-VAE latents 32x32x4."""
  c = dit_xl2_imagenet256.get_config()
  assert (c.optim.name, c.optim.lr, c.optim.weight_decay, c.optim.warmup_steps,
          c.optim.decay) == ('adamw', 1e-4, 0.0, 0, 'constant')
  assert (c.train.batch_size, tuple(c.train.ema_decays), c.train.label_dropout) == \
      (256, (0.9999,), 0.1)
  assert (c.diffusion.schedule, c.diffusion.num_timesteps, c.diffusion.prediction,
          c.diffusion.loss_type, c.diffusion.variance) == \
      ('linear', 1000, 'eps', 'hybrid', 'learned_range')
  assert (c.sample.sampler, c.sample.steps, c.sample.guidance_scale, c.sample.clip_denoised) == \
      ('ddpm', 250, 1.5, False)
  assert c.data.name == 'latents' and c.data.random_flip and c.autoencoder.workdir
  model = components.build_model(c.model, (32, 32, 4))
  # 675,129,632 for the official code, which counts its fixed positional embedding (256 x 1152).
  assert count_params(model, (1, 32, 32, 4), True) == 675_129_632 - 256 * 1152
  assert get_autoencoder('sd_vae').scaling_factor == 0.18215


def test_latent_configs_declare_only_default_keys():
  def keys(c, prefix=''):
    out = set()
    for k, v in c.items():
      if hasattr(v, 'items') and k != 'kwargs':
        out |= keys(v, f'{prefix}{k}.')
      else:
        out.add(prefix + k)
    return out
  declared = keys(default.get_config())
  for config in (latent_digits.get_config(), dit_xl2_imagenet256.get_config()):
    assert keys(config) == declared


# --------------------------------------------------------------------------- end to end (slow)

sys.path.insert(0, os.path.dirname(__file__))
