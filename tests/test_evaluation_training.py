"""In-training evaluation (`config.eval`, `evaluation.hook` wired into the trainer): the eval rows
of metrics.jsonl, the best record, the best checkpoint outside keep_latest pruning, resume.

Tiny digits runs (training_testlib.TINY: 8 steps, T = 20); the digits classifier comes from the
cache as in tests/test_evaluation_digits.py (trained once on first use, seconds).
"""
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import training_testlib as tl
from numerics_testlib import assert_f32_close, reductions_per_call

from diffusion_jax.evaluation import digits
from diffusion_jax.evaluation import hook
from diffusion_jax.training import components
from diffusion_jax.training import default_config
from diffusion_jax.training import restore
from diffusion_jax.training import sampling
from diffusion_jax.training import trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _eval_rows(workdir) -> list[tuple[int, float]]:
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  return [(r["step"], r["eval/digits_fd"]) for r in rows if "eval/digits_fd" in r]


def _config(data_dir, **overrides):
  return tl.tiny_config(data_dir, **{"eval.every": 2, "eval.num_samples": 96,
                                     "eval.batch_size": 48, "eval.metric": "digits_fd",
                                     **overrides})


def test_eval_rows_best_record_and_best_checkpoint(tmp_path, data_dir):
  # Evaluations at 2, 4, 6, 8 (every 2; 8 is also the last step); checkpoints at every
  # evaluation step are kept as snapshots, so each value can be recomputed from outside and the
  # best checkpoint compared with its original.
  workdir = tmp_path / "run"
  config = _config(data_dir, **{"train.snapshot_every": 2, "eval.sampler": "ddim",
                                "eval.steps": 5})
  trainer.train_and_evaluate(config, str(workdir))
  rows = _eval_rows(workdir)
  assert [s for s, _ in rows] == [2, 4, 6, 8]
  # Each value recomputed: the trainer's sample function (trainer._ImageSampler with the eval
  # sampler) on the EMA params of that step's checkpoint, with the evaluation keys
  # fold_in(fold_in(sample key, _EVAL_KEY), batch): the same program on the same inputs gives
  # the same images, and the digits metric (float64 NumPy on identical features) the same value.
  comp = components.build(config, digits.IMAGE_SHAPE)
  key = jax.random.fold_in(jax.random.split(jax.random.PRNGKey(int(config.seed)), 3)[2],
                           trainer._EVAL_KEY)
  fn = trainer._ImageSampler(config, comp, 48, sampler="ddim", steps=5)
  for step, value in rows:
    params = restore.load_for_sampling(workdir, step=step).params
    images = np.concatenate([sampling.to_uint8(fn(params, jax.random.fold_in(key, i)))
                             for i in range(2)])
    assert digits.digits_frechet_distance(images) == value
  best = json.loads((workdir / "eval" / "best.json").read_text())
  values = [v for _, v in rows]
  assert best["value"] == min(values) and best["step"] == rows[int(np.argmin(values))][0]
  assert best["settings"]["sampler"] == "ddim" and best["settings"]["num_samples"] == 96
  assert sorted(int(p.name) for p in (workdir / "best").iterdir()
                if p.name.isdigit()) == [best["step"]]
  loaded = restore.load_for_sampling(workdir, step="best")
  original = restore.load_for_sampling(workdir, step=best["step"])
  assert loaded.step == best["step"] == original.step
  chex.assert_trees_all_equal(loaded.params, original.params)


@pytest.mark.parametrize("overrides", [
    {},   # unconditional digits, the config's sampler
    {"model.num_classes": 10, "sample.guidance_scale": 2.0, "sample.sampler": "ddim",
     "sample.steps": 5},   # guided: the model sees the doubled batch
])
def test_in_training_sampler_spreads_over_the_local_devices(data_dir, overrides):
  # The grids' and evaluations' sampler runs over this host's 8 (test) devices: its images are
  # sharded across all 8, and equal the same sampler pinned to one device up to float32 rounding:
  # the random numbers come from the key whatever the sharding and each example's network
  # evaluation is its own, but a device's batch of 2 instead of 16 may pick kernels that sum in
  # another order, so each of the network's reductions may round differently at every step.
  config = tl.tiny_config(data_dir, **overrides)
  comp = components.build(config, digits.IMAGE_SHAPE)
  params = components.init_state(config, comp, jax.random.PRNGKey(0)).params
  key = jax.random.PRNGKey(7)
  assert jax.local_device_count() == 8
  spread = trainer._ImageSampler(config, comp, 16)(params, key)
  assert len(spread.sharding.device_set) == 8
  assert spread.sharding.shard_shape(spread.shape)[0] == 2
  one = trainer._ImageSampler(config, comp, 16, devices=jax.devices()[:1])(params, key)
  assert len(one.sharding.device_set) == 1
  steps = int(config.sample.get("steps", None) or config.diffusion.num_timesteps)  # evaluations
  x = jnp.zeros((2,) + digits.IMAGE_SHAPE)
  per_call = reductions_per_call(
      lambda p: comp.model.apply({"params": p}, x, jnp.zeros(2), None, train=False), params)
  assert_f32_close(spread, one, ops=steps * per_call)
  # A batch the devices do not divide runs on one device.
  odd = trainer._ImageSampler(config, comp, 3)(params, key)
  assert len(odd.sharding.device_set) == 1 and odd.shape == (3,) + digits.IMAGE_SHAPE


def test_best_checkpoint_survives_pruning_and_resume_compares_with_the_record(
    tmp_path, data_dir, monkeypatch):
  # The metric's values are forced (the mechanism, not the model, is under test): the best
  # (step 4) is neither the first nor the last evaluation; keep_latest=1 prunes checkpoints/4.
  values = iter([5.0, 3.0, 4.0, 6.0])
  monkeypatch.setattr(hook.EvalHook, "__call__",
                      lambda self, images: {"eval/digits_fd": next(values)})
  workdir = tmp_path / "run"
  config = _config(data_dir, **{"train.keep_latest": 1, "eval.num_samples": 4,
                                "eval.batch_size": 4})
  final = trainer.train_and_evaluate(config, str(workdir))
  assert [v for _, v in _eval_rows(workdir)] == [5.0, 3.0, 4.0, 6.0]
  assert json.loads((workdir / "eval" / "best.json").read_text())["step"] == 4
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["8"]
  loaded = restore.load_for_sampling(workdir, step="best")
  assert loaded.step == 4
  with pytest.raises(AssertionError):   # not the final params
    chex.assert_trees_all_equal(loaded.params, final.ema_params["0.9"])

  # Resume for 4 more steps: 3.5 at step 10 does not beat the recorded 3.0 (the record is read
  # back, not restarted); 2.0 at step 12 does, and replaces best/4 by best/12.
  values = iter([3.5, 2.0])
  trainer.train_and_evaluate(_config(data_dir, **{"train.keep_latest": 1, "train.num_steps": 12,
                                                  "eval.num_samples": 4, "eval.batch_size": 4}),
                             str(workdir))
  assert [v for _, v in _eval_rows(workdir)] == [5.0, 3.0, 4.0, 6.0, 3.5, 2.0]
  best = json.loads((workdir / "eval" / "best.json").read_text())
  assert (best["step"], best["value"]) == (12, 2.0)
  assert [p.name for p in (workdir / "best").iterdir() if p.name.isdigit()] == ["12"]
  assert restore.load_for_sampling(workdir, step="best").step == 12

  # Resume with other eval settings (8 samples): values are not comparable with the record, so
  # the first evaluation (step 14) replaces it although 9.0 > 2.0.
  values = iter([9.0])
  trainer.train_and_evaluate(_config(data_dir, **{"train.keep_latest": 1, "train.num_steps": 14,
                                                  "eval.num_samples": 8, "eval.batch_size": 4}),
                             str(workdir))
  best = json.loads((workdir / "eval" / "best.json").read_text())
  assert (best["step"], best["value"], best["settings"]["num_samples"]) == (14, 9.0, 8)
  assert [p.name for p in (workdir / "best").iterdir() if p.name.isdigit()] == ["14"]


def test_bad_eval_settings_are_refused_before_anything_is_written(tmp_path, data_dir):
  with pytest.raises(ValueError, match=r"config\.eval\.metric='is'.*digits_fd"):
    trainer.train_and_evaluate(_config(data_dir, **{"eval.metric": "is"}), str(tmp_path / "a"))
  with pytest.raises(ValueError, match=r"config\.eval\.every=3 must be a multiple"):
    trainer.train_and_evaluate(_config(data_dir, **{"eval.every": 3,
                                                    "train.steps_per_call": 2}),
                               str(tmp_path / "b"))
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
  with pytest.raises(FileNotFoundError, match="best.json"):
    restore.best_checkpoint(tmp_path)


def test_eval_keys_are_declared_once():
  # default_config.py declares config.eval; the hook reads it (no second set of defaults).
  assert not hasattr(hook, "default_config")
  config = default_config.get_config()
  assert config.eval.every == 0
  hook.EvalHook(config.eval)   # the defaults are valid
  # Evaluation settings may change on resume (a record of other settings is replaced).
  from diffusion_jax.training import run_config
  assert all(run_config.may_change(f"eval.{k}") for k in config.eval)


def test_readme_training_command_sets_declared_eval_keys():
  # The README's in-training evaluation line: every --config.eval.* key is declared, its value
  # parses, and the resulting config.eval passes the hook's checks.
  import pathlib
  import re
  from experiments.configs import digits as digits_config
  from experiments.configs import overrides
  readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
  pairs = re.findall(r"--config\.(eval\.\w+)=([^\s`]+)", readme)
  assert ("eval.every", "500") in pairs
  config = digits_config.get_config()
  for path, value in pairs:
    assert overrides.unknown_key_message(config, path) is None, path
    key = path.split(".")[1]
    config.eval[key] = int(value) if key in ("every", "num_samples", "steps", "batch_size") \
        else value
  hook.EvalHook(config.eval)
