"""experiments/evaluate.py: reference files, resumable shards, device-count invariance.

Fast tests drive `run_shards` with a cheap deterministic sampler (example i's image comes from
its own seed, as the real samplers' fold_in(key, i)) and the real digits feature net, pmapped over
the 8 fake devices of conftest. Slow tests run the command on the Quickstart's digits model:
SIGKILLed and rerun, and on 1 vs 8 fake devices in subprocesses.
"""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from diffusion_jax.evaluation import features as features_lib
from diffusion_jax.evaluation import metrics
from diffusion_jax.evaluation import reference as reference_lib
from experiments import evaluate

REPO = pathlib.Path(__file__).resolve().parents[1]


def _fake_samples(start: int, count: int) -> np.ndarray:
  """uint8 [count, 8, 8, 1]: example i depends on i alone (like fold_in(key, i))."""
  return np.stack([np.random.default_rng(i).integers(0, 256, (8, 8, 1)).astype(np.uint8)
                   for i in range(start, start + count)])


@pytest.fixture(scope="module")
def digits_net():
  return features_lib.get_feature_net("digits")


def test_statistics_round_trip_pytorch_fid_layout(tmp_path):
  rng = np.random.default_rng(0)
  mu, sigma = metrics.feature_statistics(rng.normal(size=(50, 4)))
  path = str(tmp_path / "stats.npz")
  reference_lib.save_statistics(path, mu, sigma)
  with np.load(path) as data:  # What pytorch-fid reads: f['mu'][:], f['sigma'][:].
    assert sorted(data.files) == ["mu", "sigma"]
    np.testing.assert_array_equal(data["mu"], mu)
  loaded = reference_lib.load_reference(path)
  np.testing.assert_array_equal(loaded.sigma, sigma)
  assert loaded.images is None and loaded.features is None


def test_adm_reference_batch_layouts(tmp_path):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (6, 8, 8, 3)).astype(np.uint8)
  mu, sigma = np.zeros(3), np.eye(3)
  np.savez(tmp_path / "adm.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=mu, sigma_s=sigma)
  loaded = reference_lib.load_reference(str(tmp_path / "adm.npz"))
  np.testing.assert_array_equal(loaded.images, images)
  np.testing.assert_array_equal(loaded.mu, mu)
  np.savez(tmp_path / "images_only.npz", arr_0=images)
  assert reference_lib.load_reference(str(tmp_path / "images_only.npz")).mu.size == 0
  np.savez(tmp_path / "bad.npz", features=images)
  with pytest.raises(ValueError, match="expected 'mu' and 'sigma'"):
    reference_lib.load_reference(str(tmp_path / "bad.npz"))
  with pytest.raises(ValueError, match="does not exist"):
    reference_lib.load_reference(str(tmp_path / "missing.npz"))


def test_features_identical_on_1_and_8_devices(digits_net):
  images = _fake_samples(0, 45)
  one = evaluate.make_feature_fn(digits_net, jax.devices()[:1], per_device_batch=4)(images)
  eight = evaluate.make_feature_fn(digits_net, jax.devices()[:8], per_device_batch=4)(images)
  assert len(jax.devices()) >= 8
  for key in ("pool", "logits"):
    np.testing.assert_array_equal(one[key], eight[key])  # Same per-device program: same bits.


def _run(tmp_path, name, sample_fn, feature_fn, **kw):
  settings = {"test": 1}
  return evaluate.run_shards(sample_fn, feature_fn, num_samples=70, shard_size=16,
                             shard_dir=str(tmp_path / name), shard_settings=settings,
                             progress=False, **kw)


def test_interrupted_run_resumes_to_the_same_numbers(tmp_path, digits_net):
  feature_fn = evaluate.make_feature_fn(digits_net, jax.devices(), per_device_batch=2)
  full = _run(tmp_path, "full", _fake_samples, feature_fn)
  calls = []

  def dies_after_two_shards(start, count):
    if len(calls) == 2:
      raise KeyboardInterrupt("killed")
    calls.append(start)
    return _fake_samples(start, count)

  with pytest.raises(KeyboardInterrupt):
    _run(tmp_path, "resumed", dies_after_two_shards, feature_fn)
  assert sorted(os.listdir(tmp_path / "resumed")) == ["settings.json", "shard_000000.npz",
                                                      "shard_000001.npz"]
  redone = []
  resumed = _run(tmp_path, "resumed", lambda s, c: redone.append(s) or _fake_samples(s, c),
                 feature_fn)
  assert redone == [32, 48, 64]  # Only the missing shards were drawn.
  for key in ("pool", "logits", "images"):
    np.testing.assert_array_equal(resumed[key], full[key])
  assert len(full["pool"]) == 70 and full["images"].shape == (64, 8, 8, 1)
  ref = reference_lib.from_features(feature_fn(_fake_samples(1000, 80))["pool"])
  stats = lambda out: metrics.all_metrics(out["pool"], ref.mu, ref.sigma,
                                          fake_logits=out["logits"], ref=ref.features)
  assert stats(resumed) == stats(full)


def test_shards_refuse_other_settings(tmp_path, digits_net):
  feature_fn = evaluate.make_feature_fn(digits_net, jax.devices(), per_device_batch=2)
  evaluate.run_shards(_fake_samples, feature_fn, num_samples=4, shard_size=4,
                      shard_dir=str(tmp_path), shard_settings={"seed": 0}, progress=False)
  with pytest.raises(ValueError, match="other settings"):
    evaluate.run_shards(_fake_samples, feature_fn, num_samples=4, shard_size=4,
                        shard_dir=str(tmp_path), shard_settings={"seed": 1}, progress=False)


# --- The command on a trained digits model (slow). ---------------------------------------------

ARGS = ["--num_samples=96", "--sampler=ddim", "--steps=10", "--shard_size=16",
        "--per_device_batch=2", "--ref=digits"]


def _command(workdir, devices: int, extra=()):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return dict(args=[sys.executable, "-m", "experiments.evaluate", f"--workdir={workdir}", *ARGS,
                    *extra], cwd=str(REPO), env=env)


def _results(workdir):
  (path,) = pathlib.Path(workdir, "eval").glob("*-ddim-10.json")
  return json.loads(path.read_text())


@pytest.fixture
def run_copy(quickstart_run, tmp_path):
  """A copy of the Quickstart's workdir per use (evaluate writes into DIR/eval)."""
  def make(name):
    target = tmp_path / name
    shutil.copytree(quickstart_run.workdir, target, ignore=shutil.ignore_patterns("eval"))
    return target
  return make


@pytest.mark.slow
@pytest.mark.xdist_group("quickstart")
def test_command_on_1_and_8_devices_gives_identical_numbers(run_copy):
  one, eight = run_copy("one"), run_copy("eight")
  subprocess.run(**_command(one, 1), check=True, capture_output=True, timeout=1800)
  subprocess.run(**_command(eight, 8), check=True, capture_output=True, timeout=1800)
  a, b = _results(one), _results(eight)
  assert (a["num_devices"], b["num_devices"]) == (1, 8)
  assert a["metrics"] == b["metrics"]
  for shard in sorted(pathlib.Path(a["shards"]).glob("shard_*.npz")):
    other = pathlib.Path(b["shards"]) / shard.name
    with np.load(shard) as x, np.load(other) as y:
      for key in ("images", "pool", "logits"):
        np.testing.assert_array_equal(x[key], y[key])
  assert list(pathlib.Path(one, "eval").glob("*-ddim-10.png"))  # The sample grid.


@pytest.mark.slow
@pytest.mark.xdist_group("quickstart")
def test_command_killed_and_rerun_gives_the_same_numbers(run_copy):
  whole, killed = run_copy("whole"), run_copy("killed")
  subprocess.run(**_command(whole, 2), check=True, capture_output=True, timeout=1800)
  process = subprocess.Popen(**_command(killed, 2), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 1200
  while time.time() < deadline and not list(pathlib.Path(killed, "eval").glob("shards-*/shard_*.npz")):
    assert process.poll() is None, "evaluate ended before it could be killed"
    time.sleep(0.2)
  process.send_signal(signal.SIGKILL)
  process.wait()
  shards = list(pathlib.Path(killed, "eval").glob("shards-*/shard_*.npz"))
  assert 1 <= len(shards) < 96 // 16, "the kill must land mid-way"
  subprocess.run(**_command(killed, 2), check=True, capture_output=True, timeout=1800)
  assert _results(killed)["metrics"] == _results(whole)["metrics"]


def test_in_training_hook(tmp_path):
  from diffusion_jax.data import load_split_as_numpy
  from diffusion_jax.evaluation import digits, hook
  from diffusion_jax.training import default_config
  config = default_config.get_config().eval
  config.every = 100
  h = hook.EvalHook(config, "ddpm")
  assert [h.due(s, 250) for s in (0, 50, 100, 200, 250)] == [False, False, True, True, True]
  train = load_split_as_numpy({"name": "digits", "image_size": 8}, "train")["image"][:300]
  scalars = h(train)
  assert scalars == {"eval/digits_fd": digits.digits_frechet_distance(train)}
  value = scalars["eval/digits_fd"]
  assert hook.read_best(tmp_path) is None and hook.is_new_best(None, value, h.settings)
  hook.write_best(tmp_path, 100, value, h.settings)
  record = hook.read_best(tmp_path)
  assert (record["step"], record["value"], record["metric"]) == (100, value, "digits_fd")
  assert not hook.is_new_best(record, value + 1, h.settings)
  assert not hook.is_new_best(record, value, h.settings)      # a tie keeps the earlier step
  assert hook.is_new_best(record, value - 1, h.settings)
  # A record made with other settings (here 1000 samples) is not comparable: replaced.
  assert hook.is_new_best(record, value + 1, dict(h.settings, num_samples=1000))
  config.metric = "fid"
  with pytest.raises(ValueError, match="inception_weights"):
    hook.EvalHook(config)
  config.metric = "is"
  with pytest.raises(ValueError, match=r"Unknown config\.eval\.metric='is'; allowed"):
    hook.EvalHook(config)


def test_build_reference_dataset_digits_and_adm_images(tmp_path, digits_net):
  from diffusion_jax.data import load_split_as_numpy
  from diffusion_jax.evaluation import digits
  feature_fn = evaluate.make_feature_fn(digits_net, jax.devices(), per_device_batch=8)
  data_config = {"name": "digits", "image_size": 8}
  # --ref=dataset on the digits test split and --ref=digits are the same reference.
  by_dataset, info = evaluate.build_reference("dataset", feature_fn, "digits", data_config,
                                              "test", str(tmp_path))
  by_name, info_digits = evaluate.build_reference("digits", feature_fn, "digits", None, "train",
                                                  str(tmp_path))
  np.testing.assert_array_equal(by_dataset.features, by_name.features)
  assert info["num_reference"] == 297 and info_digits["real_floor"] == digits.real_floor()
  # The same statistics as the library's digits path (batched differently: float32 round-off).
  np.testing.assert_allclose(by_name.mu, digits.reference_statistics("test")[0],
                             rtol=1e-5, atol=1e-5)
  # An ADM-style batch holding only images: features computed here.
  test_images = load_split_as_numpy(data_config, "test")["image"]
  np.savez(tmp_path / "adm.npz", arr_0=test_images)
  from_file, _ = evaluate.build_reference(str(tmp_path / "adm.npz"), feature_fn, "digits", None,
                                          "train", str(tmp_path))
  np.testing.assert_array_equal(from_file.mu, by_name.mu)
  # --save_ref writes pytorch-fid's layout, read back unchanged.
  reference_lib.save_statistics(str(tmp_path / "ref.npz"), by_name.mu, by_name.sigma)
  np.testing.assert_array_equal(reference_lib.load_reference(str(tmp_path / "ref.npz")).sigma,
                                by_name.sigma)


# A digits-sized diffusers U-Net (8x8x1, two levels), random weights: converted to a run workdir.
DIGITS_UNET = dict(
    sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4,
    attention_head_dim=8, downsample_padding=1, flip_sin_to_cos=False, freq_shift=1,
    norm_eps=1e-6)
CONVERTED_ARGS = ["--num_samples=96", "--sampler=ddim", "--steps=5", "--shard_size=48",
                  "--per_device_batch=8", "--ref=digits", "--checkpoint=latest"]


@pytest.mark.slow   # conversion, then the command in a subprocess (compiles the U-Net sampler)
def test_command_on_converted_diffusers_weights(tmp_path):
  """`python -m diffusion_jax.convert` output is a run workdir that `experiments.evaluate`
  evaluates end to end: the results json holds the settings, its images are the converted
  model's (drawn again here in-process: same keys and per-device program, same bits), and its
  digits FD is the digits metric of those images."""
  from diffusers import UNet2DModel
  from models_testlib import randomize
  from safetensors.torch import save_file

  from diffusion_jax import convert
  from diffusion_jax.evaluation import digits
  from diffusion_jax.training import restore, sampling
  from experiments import sampling_lib
  model = randomize(UNet2DModel(**DIGITS_UNET))
  weights = tmp_path / "diffusion_pytorch_model.safetensors"
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
  (tmp_path / "config.json").write_text(json.dumps(dict(model.config)))
  out = tmp_path / "converted"
  convert.main(["--format", "diffusers_unet", "--weights", str(weights), "--config",
                str(tmp_path / "config.json"), "--out", str(out), "--num_timesteps", "50"])
  command = _command(out, 2)
  command["args"] = command["args"][:4] + CONVERTED_ARGS
  proc = subprocess.run(**command, capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (path,) = pathlib.Path(out, "eval").glob("0-ddim-5.json")
  results = json.loads(path.read_text())
  settings = results["settings"]
  assert (settings["step"], settings["sampler"], settings["steps"], settings["num_samples"],
          settings["features"], settings["ref"], settings["checkpoint"]) == (
              0, "ddim", 5, 96, "digits", "digits", "latest")
  assert settings["workdir"] == str(out) and results["num_devices"] == 2
  assert path.with_suffix(".png").exists()
  shards = sorted(pathlib.Path(results["shards"]).glob("shard_*.npz"))
  images = np.concatenate([np.load(s)["images"] for s in shards])
  loaded = restore.load_for_sampling(out)
  draw = sampling_lib.make_run_generator(loaded, seed=0, batch_size=16, devices=jax.devices()[:2],
                                         sampler="ddim", steps="5")
  np.testing.assert_array_equal(sampling.to_uint8(draw(96)), images)
  # The same features up to float32 batching (the digits net's matmuls blocked differently:
  # ~1e-6 relative per feature, test_features_shape_and_batching); the distance, a smooth
  # function of the 64 means and covariances, moves by about as much relative to its size.
  np.testing.assert_allclose(results["metrics"]["frechet_distance"], digits.digits_frechet_distance(images),
                             rtol=1e-4)
  assert results["reference"]["real_floor"] == digits.real_floor()
