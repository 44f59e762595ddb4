"""The trainer in-process: resume, SIGTERM, injected NaN, indivisible batch, image folder."""
import json
import os
import signal

import chex
import numpy as np
import pytest
import training_testlib as tl
from numerics_testlib import f32_tol
from PIL import Image

from diffusion_jax.training import trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _wrap_iterator(monkeypatch, on_batch):
  """Makes the trainer's data iterator call on_batch(k, batch) -> batch for the k-th batch."""
  from diffusion_jax import data
  real = data.make_train_iterator

  class Wrapped:
    def __init__(self, it):
      self.it, self.k = it, 0

    def __next__(self):
      batch = on_batch(self.k, next(self.it))
      self.k += 1
      return batch

    def get_state(self):
      return self.it.get_state()

    def set_state(self, s):
      self.it.set_state(s)

  monkeypatch.setattr(data, "make_train_iterator", lambda *a, **k: Wrapped(real(*a, **k)))


def test_uninterrupted_vs_sigterm_then_resume(tmp_path, data_dir, monkeypatch):
  """SIGTERM after the 3rd batch writes a checkpoint at step 3; rerunning finishes with the same
  state as an uninterrupted run (exact resume in-process)."""
  full = trainer.train_and_evaluate(tl.tiny_config(data_dir), str(tmp_path / "full"))
  assert int(full.step) == 8
  assert os.path.exists(tmp_path / "full" / "samples" / "step_0000008.png")
  lines = open(tmp_path / "full" / "metrics.jsonl").read().strip().splitlines()
  assert len(lines) == 4 and '"images_per_sec"' in lines[-1]

  def term_after_third(k, batch):
    if k == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch
  _wrap_iterator(monkeypatch, term_after_third)
  workdir = str(tmp_path / "preempted")
  with pytest.raises(trainer.Preempted, match="step 3"):
    trainer.train_and_evaluate(tl.tiny_config(data_dir), workdir)
  assert tl.read_state(workdir)[0] == 3
  assert not os.path.exists(os.path.join(workdir, ".lock"))   # released on SIGTERM
  monkeypatch.undo()
  resumed = trainer.train_and_evaluate(tl.tiny_config(data_dir), workdir)
  chex.assert_trees_all_equal(resumed, full)


def test_sigterm_skips_the_sample_grid_and_evaluation_due_at_that_step(tmp_path, data_dir,
                                                                     monkeypatch):
  """SIGTERM during step 2, at which a sample grid and an evaluation are due: the checkpoint at
  step 2 is written and neither runs (the grace period before SIGKILL is for the checkpoint)."""
  from diffusion_jax.evaluation import hook
  evaluated = []
  monkeypatch.setattr(hook.EvalHook, "__call__",
                      lambda self, images: evaluated.append(len(images)) or {"eval/digits_fd": 1.0})

  def term_in_second(k, batch):
    if k == 1:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch
  _wrap_iterator(monkeypatch, term_in_second)
  config = tl.tiny_config(data_dir, **{"train.sample_every": 2, "eval.every": 2,
                                       "eval.num_samples": 4, "eval.batch_size": 4,
                                       "eval.metric": "digits_fd"})
  workdir = tmp_path / "run"
  with pytest.raises(trainer.Preempted, match="step 2"):
    trainer.train_and_evaluate(config, str(workdir))
  assert tl.read_state(str(workdir))[0] == 2
  assert not (workdir / "samples").exists() and evaluated == []
  # Without the signal, the same run samples and evaluates at step 2.
  monkeypatch.undo()
  monkeypatch.setattr(hook.EvalHook, "__call__",
                      lambda self, images: evaluated.append(len(images)) or {"eval/digits_fd": 1.0})
  trainer.train_and_evaluate(tl.tiny_config(data_dir, **{
      "train.num_steps": 2, "train.sample_every": 2, "eval.every": 2, "eval.num_samples": 4,
      "eval.batch_size": 4, "eval.metric": "digits_fd"}), str(tmp_path / "plain"))
  assert (tmp_path / "plain" / "samples" / "step_0000002.png").exists() and evaluated == [4]


def test_corrupt_newest_checkpoint_is_set_aside_and_the_rerun_completes(tmp_path, data_dir):
  """Truncated array files in the newest checkpoint (4): the rerun resumes from 2, keeps the
  broken step as 4.unreadable-<time>, saves 4 again and ends with the same state as the first
  run; metrics.jsonl keeps one row per step."""
  workdir = tmp_path / "run"
  config = tl.tiny_config(data_dir, **{"train.num_steps": 4})
  trainer.train_and_evaluate(config, str(workdir))
  _, first = tl.read_state(str(workdir))
  for path in (workdir / "checkpoints" / "4" / "state").rglob("d/*"):
    with open(path, "r+b") as f:
      f.truncate(3)
  resumed = trainer.train_and_evaluate(config, str(workdir))
  assert int(resumed.step) == 4
  assert len(list((workdir / "checkpoints").glob("4.unreadable-*"))) == 1
  at, state = tl.read_state(str(workdir))
  assert at == 4
  chex.assert_trees_all_equal(state, first)   # exact: same data, keys and program from step 2
  steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
  assert steps == [2, 4]
  assert len(os.listdir(workdir / "configs")) == 2


def test_nan_stops_with_message_and_keeps_last_checkpoint(tmp_path, data_dir, monkeypatch):
  def poison_fifth(k, batch):
    if k == 4:
      batch = dict(batch, image=np.full_like(batch["image"], np.nan))
    return batch
  _wrap_iterator(monkeypatch, poison_fifth)
  workdir = str(tmp_path / "nan")
  with pytest.raises(trainer.NonFiniteError, match=r"Non-finite loss or gradient at step 5.*"
                     r"last good checkpoint is kept: step 4"):
    trainer.train_and_evaluate(tl.tiny_config(data_dir), workdir)
  step, state = tl.read_state(workdir)
  assert step == 4
  assert all(np.all(np.isfinite(x)) for x in __import__("jax").tree.leaves(state))


def test_indivisible_batch_size_is_a_clear_error(tmp_path, data_dir):
  with pytest.raises(ValueError, match=r"batch_size=12 must be a positive multiple of the "
                     r"number of devices \(8"):
    trainer.train_and_evaluate(tl.tiny_config(data_dir, **{"train.batch_size": 12}),
                               str(tmp_path / "w"))


class _StepBuilt(Exception):
  pass


_XLA_CONVOLUTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                     "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@pytest.mark.parametrize("parallel_mode,convolutions,expected", [
    ("shard_map", "xla", _XLA_CONVOLUTIONS),
    ("shard_map", "ynnpack", None),
    ("pmap", "xla", _XLA_CONVOLUTIONS),
])
def test_cpu_convolutions_reach_the_parallel_step(tmp_path, data_dir, monkeypatch, parallel_mode,
                                                   convolutions, expected):
  # train.cpu_convolutions becomes the step's compiler options (tests/test_xla_cpu.py checks
  # what they compile to, and that pmap cannot take them); the run stops once the step is built.
  from diffusion_jax.training import parallel
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  seen = {}

  def spy(step_fn, mode, **kwargs):
    seen.update(mode=mode, options=kwargs.get("compiler_options"))
    raise _StepBuilt

  monkeypatch.setattr(parallel, "make_parallel_step", spy)
  config = tl.tiny_config(data_dir, **{"train.parallel": parallel_mode,
                                       "train.cpu_convolutions": convolutions})
  with pytest.raises(_StepBuilt):
    trainer.train_and_evaluate(config, str(tmp_path / "w"))
  assert seen == {"mode": parallel_mode, "options": expected}


def test_bad_cpu_convolutions_is_a_clear_error(tmp_path, data_dir):
  with pytest.raises(ValueError, match=r"train.cpu_convolutions must be one of \('xla', "
                     r"'ynnpack'\), got 'eigen'"):
    trainer.train_and_evaluate(tl.tiny_config(data_dir, **{"train.cpu_convolutions": "eigen"}),
                               str(tmp_path / "w"))


def test_image_folder_trains_end_to_end(tmp_path):
  folder = tmp_path / "images"
  rs = np.random.RandomState(0)
  for c in ("cats", "dogs"):
    (folder / c).mkdir(parents=True)
    for i in range(12):
      size = (rs.randint(10, 30), rs.randint(10, 30))
      Image.fromarray(rs.randint(0, 255, size + (3,), dtype=np.uint8)).save(folder / c / f"{i}.png")
  config = tl.tiny_config(str(tmp_path / "tfds"), **{
      "train.num_steps": 2, "model.in_channels": 3, "train.checkpoint_every": 2})
  config.data.name = "folder"
  config.data.folder = str(folder)
  config.data.image_size = 8
  workdir = str(tmp_path / "run")
  state = trainer.train_and_evaluate(config, workdir)
  assert int(state.step) == 2
  assert os.path.exists(os.path.join(workdir, "samples", "step_0000002.png"))
  assert tl.read_state(workdir)[0] == 2


def _read_tb_scalars(tb_dir) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} from the event files under tb_dir, read with the TFRecord framing
  (uint64 length, masked CRC32C of it, payload, masked CRC32C of the payload: both checked) and
  the Event protobuf; no TensorBoard writer code involved."""
  import struct

  from tensorboardX.crc32c import crc32c
  from tensorboardX.proto import event_pb2

  def masked(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

  scalars: dict[str, list[tuple[int, float]]] = {}
  files = sorted(p for p in tb_dir.iterdir() if p.name.startswith("events.out.tfevents"))
  assert files, f"no event file in {tb_dir}"
  for path in files:
    data, pos = path.read_bytes(), 0
    while pos < len(data):
      header = data[pos:pos + 8]
      (length,) = struct.unpack("<Q", header)
      assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked(header), path
      payload = data[pos + 12:pos + 12 + length]
      assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == masked(payload)
      pos += 16 + length
      event = event_pb2.Event.FromString(payload)
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


@pytest.mark.slow       # one tiny training run: ~35 s of CPU
def test_adamw_bfloat16_retention_and_tensorboard(tmp_path, data_dir, monkeypatch):
  """One tiny run with optim.name=adamw, train.compute_dtype=bfloat16, keep_latest=1 and
  snapshot_every=4 (checkpoints every 2 steps of 8): the settings reach the optimizer and the
  step, the retained checkpoints are exactly the snapshots {4, 8} plus the newest (8), and the
  TensorBoard event files hold the logged losses, equal to metrics.jsonl's."""
  import json

  from diffusion_jax.training import optim
  from diffusion_jax.training import step as step_lib
  seen = {}
  real_opt, real_step = optim.make_optimizer, step_lib.make_train_step

  def spy_opt(cfg, num_steps):
    seen["optim"] = (cfg["name"], float(cfg["weight_decay"]))
    return real_opt(cfg, num_steps)

  def spy_step(*args, **kwargs):
    config = kwargs.get("config", args[4] if len(args) > 4 else None)
    seen["compute_dtype"] = config.compute_dtype
    return real_step(*args, **kwargs)

  monkeypatch.setattr(optim, "make_optimizer", spy_opt)
  monkeypatch.setattr(step_lib, "make_train_step", spy_step)
  config = tl.tiny_config(data_dir, **{
      "optim.name": "adamw", "optim.weight_decay": 0.1, "train.compute_dtype": "bfloat16",
      "train.keep_latest": 1, "train.snapshot_every": 4})
  workdir = tmp_path / "run"
  state = trainer.train_and_evaluate(config, str(workdir))
  assert int(state.step) == 8
  assert seen == {"optim": ("adamw", 0.1), "compute_dtype": "bfloat16"}
  kept = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert kept == [4, 8], kept
  scalars = _read_tb_scalars(workdir / "tb")
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  logged = [(r["step"], r["loss"]) for r in rows if "loss" in r]
  assert logged and [s for s, _ in scalars["train/loss"]] == [s for s, _ in logged]
  np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [v for _, v in logged],
                             rtol=f32_tol(1))        # stored as float32 in the event
