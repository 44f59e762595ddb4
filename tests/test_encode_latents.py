"""experiments.encode_latents: latents equal the autoencoder's, resumption gives the same bytes, and
1 vs 8 devices give the same latents."""
import os

import jax
import numpy as np
import pytest

from diffusion_jax.data import latents as latent_format
from diffusion_jax.data import load_split_as_numpy, to_float
from diffusion_jax.models import autoencoder, get_autoencoder
from experiments import encode_latents

# Digits (8x8x1, offline), the first 300 training images, 4 shards of 80 / 80 / 80 / 60.
DATA = dict(name="digits", split="train[:300]")
SHARD = 80


@pytest.fixture(scope="module")
def vae_and_params():
  vae = get_autoencoder("vae_tiny", in_channels=1, out_channels=1, scaling_factor=0.5,
                        shift_factor=0.1)
  shapes = jax.eval_shape(lambda: autoencoder.init_autoencoder(vae, jax.random.key(0)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  return vae, params


def _encode(vae, params, out, **kw):
  return encode_latents.encode_dataset(vae, params, {"name": "vae_tiny"}, dict(DATA), str(out),
                                       batch_size=16, shard_size=SHARD, progress=False, **kw)


def _shard_bytes(meta, out):
  return [open(meta.shard_path(str(out), k), "rb").read() for k in range(meta.num_shards)]


def test_latents_flips_and_labels(vae_and_params, tmp_path):
  vae, params = vae_and_params
  meta = _encode(vae, params, tmp_path, flip=True)
  assert (meta.num_examples, meta.num_shards, meta.latent_shape) == (300, 4, (4, 4, 4))
  source = latent_format.LatentSource(str(tmp_path))
  idx = np.array([0, 79, 80, 299, 5])
  got, labels = source.read(idx)
  data = load_split_as_numpy(DATA)
  np.testing.assert_array_equal(labels, data["label"][idx])
  x = to_float(data["image"][idx])
  post = vae.apply({"params": params}, x, method=vae.encode)
  # The same float32 computation, batched differently (32 per call vs these 5): a few roundings.
  scale = float(np.abs(post.mean).max())
  np.testing.assert_allclose(got["mean"], (post.mean - 0.1) * 0.5, atol=1e-5 * scale)
  np.testing.assert_allclose(got["std"], post.std * 0.5, rtol=1e-5)
  flipped = vae.apply({"params": params}, x[:, :, ::-1], method=vae.encode)
  np.testing.assert_allclose(got["mean_flip"], (flipped.mean - 0.1) * 0.5, atol=1e-5 * scale)
  assert np.abs(got["mean_flip"] - got["mean"]).max() > 1e-3  # really the flipped images


def test_resume_after_an_interruption_gives_identical_shards(vae_and_params, tmp_path):
  vae, params = vae_and_params
  whole = _encode(vae, params, tmp_path / "whole")
  part = tmp_path / "part"
  _encode(vae, params, part, max_shards=2)  # "killed" after two shards
  with open(whole.shard_path(str(part), 3) + ".tmp", "wb") as f:
    f.write(b"half a shard")  # a shard cut off mid-write is never taken as done
  with pytest.raises(FileNotFoundError, match="2 of 4 shards missing"):
    latent_format.LatentSource(str(part))
  before = os.path.getmtime(whole.shard_path(str(part), 0))
  _encode(vae, params, part)
  assert os.path.getmtime(whole.shard_path(str(part), 0)) == before  # finished shards kept
  assert _shard_bytes(whole, part) == _shard_bytes(whole, tmp_path / "whole")
  with pytest.raises(ValueError, match="different encoding"):
    _encode(vae, params, part, flip=True)


def test_one_vs_eight_devices(vae_and_params, tmp_path):
  vae, params = vae_and_params
  assert len(jax.local_devices()) == 8  # tests/conftest.py
  one = _encode(vae, params, tmp_path / "one", devices=jax.local_devices()[:1])
  _encode(vae, params, tmp_path / "eight", devices=jax.local_devices())
  a, la = latent_format.LatentSource(str(tmp_path / "one")).read(np.arange(300))
  b, lb = latent_format.LatentSource(str(tmp_path / "eight")).read(np.arange(300))
  np.testing.assert_array_equal(la, lb)
  for f in one.fields:
    np.testing.assert_array_equal(a[f], b[f])


def test_bad_arguments(vae_and_params, tmp_path):
  vae, params = vae_and_params
  with pytest.raises(ValueError, match="channels"):
    _encode(get_autoencoder("vae_tiny"), params, tmp_path)
  with pytest.raises(ValueError, match="batch_size"):
    encode_latents.encode_dataset(vae, params, {}, dict(DATA), str(tmp_path), batch_size=0)


@pytest.mark.slow
def test_cli(vae_and_params, tmp_path):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from diffusion_jax import convert  # pylint: disable=import-outside-toplevel
  vae, params = vae_and_params
  convert.save_checkpoint(str(tmp_path / "vae"), vae, params, {"format": "test"})
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, "-m", "experiments.encode_latents", f'--vae={tmp_path / "vae"}',
         "--data.split=train[:50]", "--shard_size=20", "--batch_size=8", f'--out={tmp_path / "z"}']
  subprocess.run(cmd, check=True, cwd=root, env={**os.environ, "PYTHONPATH": root})
  meta = latent_format.read_meta(str(tmp_path / "z"))
  assert (meta.num_examples, meta.num_shards, meta.scaling_factor) == (50, 3, 0.5)
  assert meta.vae["overrides"]["in_channels"] == 1  # model.json of the autoencoder
  got, _ = latent_format.LatentSource(str(tmp_path / "z")).read(np.arange(50))
  ours = _encode(vae, params, tmp_path / "direct")  # 300 examples; the first 50 are the same
  want, _ = latent_format.LatentSource(str(tmp_path / "direct")).read(np.arange(50))
  np.testing.assert_allclose(got["mean"], want["mean"], atol=1e-5 * np.abs(want["mean"]).max())
  del ours
