"""The trainer in-process: resume, SIGTERM, injected NaN, indivisible batch, image folder."""
import json
import os
import signal

import chex
import numpy as np
import pytest
from PIL import Image

from diffusion_jax.training import trainer
import training_testlib as tl


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
