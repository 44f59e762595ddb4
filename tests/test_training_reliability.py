"""Run safety without training: checkpoint restore policy, config changes on resume, the workdir
lock, metrics.jsonl after a resume, the loop's helpers and the EMA rule."""
import glob
import json
import logging as pylogging
import os
import subprocess
import sys

from absl import logging
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from diffusion_jax.training import checkpoint
from diffusion_jax.training import console
from diffusion_jax.training import metric_writer
from diffusion_jax.training import progress
from diffusion_jax.training import run_config
from diffusion_jax.training import state as state_lib
from diffusion_jax.training import trainer
from diffusion_jax.training import workdir_lock
import training_testlib as tl


def _tree(scale: float = 1.0, n: int = 4):
  return {"w": np.arange(n, dtype=np.float32) * scale, "b": {"c": np.ones((2, 3), np.int32)}}


def _saved(directory, steps=(1, 2)) -> checkpoint.Checkpointer:
  ck = checkpoint.Checkpointer(directory, keep_latest=5, async_save=False)
  for s in steps:
    ck.save(s, _tree(float(s)), {"examples_seen": s})
  ck.wait()
  return ck


def _truncate_one_array_file(step_dir) -> None:
  files = sorted(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True))
  assert files, os.listdir(os.path.join(step_dir, "state"))
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(3)


class _Warnings(pylogging.Handler):
  def __init__(self):
    super().__init__(pylogging.WARNING)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


@pytest.fixture
def warnings():
  handler = _Warnings()
  logging.get_absl_logger().addHandler(handler)
  yield handler.lines
  logging.get_absl_logger().removeHandler(handler)


# --- checkpoints ------------------------------------------------------------------------------

def test_unreadable_newest_step_is_moved_aside_and_can_be_saved_again(tmp_path, warnings):
  ck = _saved(tmp_path / "ck")
  _truncate_one_array_file(tmp_path / "ck" / "2")
  step, state, data = ck.restore(_tree(), set_aside=True)
  assert step == 1 and data == {"examples_seen": 1}
  np.testing.assert_array_equal(state["w"], _tree(1.0)["w"])   # exact: a byte copy
  moved = glob.glob(str(tmp_path / "ck" / "2.unreadable-*"))
  assert len(moved) == 1 and not (tmp_path / "ck" / "2").exists()
  assert any(os.path.basename(moved[0]) in w and "step 2" in w for w in warnings), warnings
  ck.save(2, _tree(2.0), {"examples_seen": 2})   # before the fix: StepAlreadyExistsError
  ck.wait()
  assert ck.all_steps() == [1, 2]
  assert ck.restore(_tree())[0] == 2
  ck.close()


def test_sampling_style_restore_skips_without_moving(tmp_path):
  ck = _saved(tmp_path / "ck")
  os.remove(tmp_path / "ck" / "2" / "state" / "_METADATA")   # incomplete
  assert ck.restore(_tree())[0] == 1
  assert (tmp_path / "ck" / "2").exists()
  ck.close()


def test_no_readable_checkpoint_is_an_error_not_a_restart(tmp_path):
  ck = _saved(tmp_path / "ck")
  for s in (1, 2):
    _truncate_one_array_file(tmp_path / "ck" / str(s))
  with pytest.raises(checkpoint.NoReadableCheckpointError, match=r"None of the 2 checkpoint"):
    ck.restore(_tree(), set_aside=True)
  assert ck.all_steps() == [1, 2]          # nothing renamed
  ck.close()


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"),
                                   TypeError("a bug"), ValueError("Checkpoint path should be "
                                                                  "absolute. Got runs/x")])
def test_other_restore_errors_stop_the_run(tmp_path, monkeypatch, error):
  ck = _saved(tmp_path / "ck")
  def fail(*args, **kwargs):
    raise error
  monkeypatch.setattr(ocp.CheckpointManager, "restore", fail)
  with pytest.raises(type(error)):   # before the fix: a warning, then step 1 or None
    ck.restore(_tree(), set_aside=True)
  assert ck.all_steps() == [1, 2]
  ck.close()


def test_restore_checks_shapes_dtypes_and_names_the_leaves(tmp_path):
  ck = _saved(tmp_path / "ck", steps=(1,))
  target = {"w": np.zeros(5, np.float32), "b": {"c": np.zeros((2, 3), np.float32)},
            "extra": np.zeros(1)}
  with pytest.raises(checkpoint.CheckpointMismatchError) as e:
    ck.restore(target, set_aside=True)
  msg = str(e.value)
  assert "w: saved (4,) float32, expected (5,) float32" in msg
  assert "b.c: saved (2, 3) int32, expected (2, 3) float32" in msg
  assert "extra: not in the checkpoint" in msg
  assert ck.all_steps() == [1]             # a mismatch is not corruption: nothing moved
  ck.close()


# --- config changes on resume -----------------------------------------------------------------

def _config(**overrides) -> ml_collections.ConfigDict:
  return tl.tiny_config("/data", **overrides)


def test_structural_config_change_is_refused_before_writing(tmp_path):
  run_config.record(_config(), tmp_path)
  before = (tmp_path / "config.json").read_text()
  with pytest.raises(run_config.ConfigChangeError) as e:
    run_config.check_resume(_config(**{"model.ch": 16, "diffusion.num_timesteps": 30,
                                       "optim.name": "adamw", "optim.lr": 1e-4}), tmp_path)
  msg = str(e.value)
  assert "model.ch: 8 -> 16" in msg and "diffusion.num_timesteps: 20 -> 30" in msg
  assert "optim.name: 'adam' -> 'adamw'" in msg and "optim.lr" not in msg
  assert "--workdir" in msg
  assert (tmp_path / "config.json").read_text() == before


def test_harmless_config_changes_are_allowed_and_every_launch_is_kept(tmp_path):
  run_config.record(_config(), tmp_path)
  new = _config(**{"train.num_steps": 50, "optim.lr": 1e-4, "train.log_every": 5,
                   "sample.num_samples": 9})
  diff = run_config.check_resume(new, tmp_path)
  assert set(diff) == {"train.num_steps", "optim.lr", "train.log_every", "sample.num_samples"}
  run_config.record(new, tmp_path)
  history = sorted(os.listdir(tmp_path / "configs"))
  assert len(history) == 2
  first = json.loads((tmp_path / "configs" / history[0]).read_text())
  assert first["train"]["num_steps"] == 8
  assert json.loads((tmp_path / "config.json").read_text())["train"]["num_steps"] == 50


def test_run_without_history_keeps_its_old_config(tmp_path):
  (tmp_path / "config.json").write_text(run_config.to_json(_config()))
  run_config.record(_config(**{"train.num_steps": 50}), tmp_path)
  kept = [json.loads((tmp_path / "configs" / f).read_text())["train"]["num_steps"]
          for f in sorted(os.listdir(tmp_path / "configs"))]
  assert kept == [8, 50]


def test_unlisted_keys_must_match():
  assert run_config.may_change("optim.lr") and run_config.may_change("sample.sampler")
  assert not run_config.may_change("model.ch") and not run_config.may_change("brand.new")


def test_trainer_refuses_config_change_and_keeps_the_config(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  run_config.record(_config(), workdir)
  saved = (workdir / "config.json").read_text()
  with pytest.raises(run_config.ConfigChangeError, match=r"model\.ch: 8 -> 16"):
    trainer.train_and_evaluate(_config(**{"model.ch": 16}), str(workdir))
  assert (workdir / "config.json").read_text() == saved
  assert len(os.listdir(workdir / "configs")) == 1
  assert sorted(os.listdir(workdir)) == ["config.json", "configs"]   # lock released


# --- bad inputs -------------------------------------------------------------------------------

@pytest.mark.parametrize("num_steps", [0, -3])
def test_num_steps_must_be_positive(tmp_path, num_steps):
  with pytest.raises(ValueError, match=rf"config.train.num_steps={num_steps} must be >= 1"):
    trainer.train_and_evaluate(_config(**{"train.num_steps": num_steps}), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_sample_num_samples_must_be_positive():
  from experiments import sample   # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="num_samples must be >= 1, got 0"):
    sample.sample_images(None, 0, seed=0, batch_size=4)


def test_sample_cli_refuses_zero_samples(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "experiments.sample", f"--workdir={tmp_path}",
                         f"--out={tmp_path / 's.npz'}", "--num_samples=0"],
                        env=tl.subprocess_env(1), cwd=tl.REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode != 0
  assert "--num_samples=0: 0 is not a positive integer" in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


# --- the workdir lock -------------------------------------------------------------------------

def test_second_trainer_is_refused_with_the_holder_named(tmp_path):
  with workdir_lock.WorkdirLock(tmp_path):
    with pytest.raises(workdir_lock.WorkdirLockedError,
                       match=rf"pid {os.getpid()} on host .* holds .*\.lock"):
      workdir_lock.WorkdirLock(tmp_path).acquire()
    with pytest.raises(workdir_lock.WorkdirLockedError):
      trainer.train_and_evaluate(_config(), str(tmp_path))
  assert not (tmp_path / ".lock").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, warnings):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  import socket   # pylint: disable=import-outside-toplevel
  (tmp_path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                              "start": "1", "created": "earlier"}))
  with workdir_lock.WorkdirLock(tmp_path):
    holder = json.loads((tmp_path / ".lock").read_text())
    assert holder["pid"] == os.getpid()
  assert any("no longer running" in w and str(dead.pid) in w for w in warnings), warnings
  assert not (tmp_path / ".lock").exists()


def test_lock_of_a_killed_unreaped_process_is_taken_over(tmp_path, warnings):
  """A SIGKILLed trainer whose parent died too can linger as a zombie (kill(pid, 0) succeeds):
  seen in CI after a killed sweep. It holds nothing, so its lock is stale."""
  import socket   # pylint: disable=import-outside-toplevel
  import time   # pylint: disable=import-outside-toplevel
  child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  start = workdir_lock._process_start(child.pid)   # pylint: disable=protected-access
  try:
    child.kill()
    deadline = time.time() + 10       # not waited for: the child stays a zombie
    while workdir_lock._proc_stat(child.pid)[0] != "Z" and time.time() < deadline:  # pylint: disable=protected-access
      time.sleep(0.05)
    assert workdir_lock._proc_stat(child.pid)[0] == "Z"   # pylint: disable=protected-access
    (tmp_path / ".lock").write_text(json.dumps({"pid": child.pid, "host": socket.gethostname(),
                                                "start": start, "created": "earlier"}))
    with workdir_lock.WorkdirLock(tmp_path):
      assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert any("no longer running" in w and str(child.pid) in w for w in warnings), warnings
  finally:
    child.wait()


def test_lock_of_another_host_is_not_taken_over(tmp_path):
  (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "created": "t"}))
  with pytest.raises(workdir_lock.WorkdirLockedError, match="host elsewhere"):
    workdir_lock.WorkdirLock(tmp_path).acquire()


def test_lock_is_released_on_exception(tmp_path):
  with pytest.raises(RuntimeError):
    with workdir_lock.WorkdirLock(tmp_path):
      raise RuntimeError("boom")
  assert not (tmp_path / ".lock").exists()


# --- metrics, helpers, EMA --------------------------------------------------------------------

def test_metrics_rows_past_the_resumed_step_are_dropped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "loss": 1.0} for s in (2, 4, 6, 8)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 1')  # torn last line
  writer = metric_writer.MetricWriter(tmp_path, resume_step=4)
  writer.write_scalars(6, {"loss": 0.5})
  writer.close()
  steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
  assert steps == [2, 4, 6] and writer.dropped == 3


def test_itstime():
  assert [s for s in range(1, 11) if progress.itstime(s, 4, last_step=10)] == [4, 8, 10]
  assert [s for s in range(1, 11) if progress.itstime(s, 0, last_step=10)] == [10]
  assert progress.format_duration(3725) == "1:02:05" and progress.format_duration(np.nan) == "?"


def test_one_ema_rule_for_previews_and_sampling():
  params = {"w": np.zeros(2)}
  ema = {state_lib.ema_key(0.9): {"w": np.ones(2)}, state_lib.ema_key(0.99): {"w": np.full(2, 2.)}}
  state = state_lib.TrainState(step=np.int32(0), params=params, opt_state=(), ema_params=ema)
  pick = lambda *a, **k: float(state_lib.params_for_sampling(state, *a, **k)[0]["w"][0])
  assert pick((0.9, 0.99)) == 1.0 and pick((0.9, 0.99), ema_decay=0.99) == 2.0
  assert pick((0.9, 0.99), use_ema=False) == 0.0
  no_ema = state.replace(ema_params={})
  assert state_lib.params_for_sampling(no_ema, ())[1] == "raw"
  assert state_lib.sampling_params_path((0.9, 0.99)) == ("ema_params", "0.9")
  assert state_lib.sampling_params_path((), use_ema=True) == ("params",)
  with pytest.raises(ValueError, match=r"ema_decay=0.5 was not kept by this run; allowed"):
    state_lib.params_for_sampling(state, (0.9, 0.99), ema_decay=0.5)


def test_restore_and_trainer_use_the_same_ema_rule():
  import inspect   # pylint: disable=import-outside-toplevel
  from diffusion_jax.training import restore   # pylint: disable=import-outside-toplevel
  for module, rule in ((restore, "state_lib.sampling_params_path("),
                       (trainer, "state_lib.params_for_sampling(")):
    src = inspect.getsource(module)
    assert rule in src and "ema_key(" not in src and "ema_params[" not in src, module.__name__


def test_library_info_lines_are_hidden_unless_verbose():
  record = lambda path, level: pylogging.LogRecord("absl", level, path, 1, "m", (), None)
  flt = console._OwnInfoOnly()   # pylint: disable=protected-access
  orbax = "/venv/lib/python3.11/site-packages/orbax/checkpoint/manager.py"
  ours = os.path.join(tl.REPO, "diffusion_jax", "training", "trainer.py")
  assert not flt.filter(record(orbax, pylogging.INFO))
  assert flt.filter(record(orbax, pylogging.WARNING))
  assert flt.filter(record(ours, pylogging.INFO))
  handler = logging.get_absl_handler()
  console.quiet_libraries(0)
  assert console._FILTER in handler.filters   # pylint: disable=protected-access
  console.quiet_libraries(1)
  assert console._FILTER not in handler.filters   # pylint: disable=protected-access


def test_every_entry_point_hides_library_info_lines():
  """Each `python -m experiments.X` whose main goes through absl's app.run calls
  `console.quiet_libraries` in main (the Quickstart's evaluate printed ~20 orbax INFO lines
  without it); tests/test_experiments_train.py checks one command's stderr."""
  import ast   # pylint: disable=import-outside-toplevel
  entry_points = []
  for path in sorted(glob.glob(os.path.join(tl.REPO, "experiments", "*.py"))):
    with open(path) as fh:
      tree = ast.parse(fh.read())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    if not any(ast.unparse(c.func) == "app.run" for c in calls):
      continue
    entry_points.append(os.path.basename(path))
    (main,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    quieted = [c for c in ast.walk(main) if isinstance(c, ast.Call)
               and ast.unparse(c.func) == "console.quiet_libraries"]
    assert quieted, f"experiments/{os.path.basename(path)}: main does not quiet the libraries"
  assert {"train.py", "sample.py", "evaluate.py", "evaluate_bpd.py"} <= set(entry_points)
