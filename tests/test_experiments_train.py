"""experiments.train as a subprocess: exact resume after SIGKILL, SIGTERM checkpoint, multi-host
(2 processes x 4 CPU devices == 1 process x 8 devices), and experiments.sample determinism."""
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import training_testlib as tl

pytestmark = pytest.mark.slow
LONG = {"train.num_steps": 12, "train.checkpoint_every": 3}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _run(cmd, env, timeout=600):
  proc = subprocess.run(cmd, env=env, cwd=tl.REPO, capture_output=True, text=True, timeout=timeout)
  return proc


def _wait_for_checkpoint(proc, workdir, step, timeout=600):
  path = os.path.join(workdir, "checkpoints", str(step))
  t0 = time.time()
  while not os.path.exists(path):
    if proc.poll() is not None:
      raise AssertionError(f"run ended (rc={proc.returncode}) before checkpoint {step}: "
                           f"{proc.stderr.read()[-3000:]}")
    if time.time() - t0 > timeout:
      raise AssertionError(f"no checkpoint {step} after {timeout} s")
    time.sleep(0.05)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp("ref"))
  proc = _run(tl.train_command(workdir, data_dir, **LONG), tl.subprocess_env(8))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def test_sigkill_mid_run_then_rerun_resumes_exactly(tmp_path, data_dir, reference_run):
  workdir = str(tmp_path / "killed")
  cmd = tl.train_command(workdir, data_dir, **LONG)
  env = tl.subprocess_env(8)
  proc = subprocess.Popen(cmd, env=env, cwd=tl.REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  _wait_for_checkpoint(proc, workdir, 6)
  time.sleep(1.0)                      # mid-way between checkpoints 6 and 9
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  rerun = _run(cmd, env)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "Resumed from" in rerun.stderr
  step_a, a = tl.read_state(reference_run)
  step_b, b = tl.read_state(workdir)
  assert step_a == step_b == 12
  diff = tl.max_abs_diff(a, b)
  print(f"max |params/EMA/opt_state difference| after SIGKILL + resume: {diff:.3g}")
  assert diff == 0.0


def test_sigterm_writes_a_checkpoint_and_exits_143(tmp_path, data_dir):
  workdir = str(tmp_path / "term")
  cmd = tl.train_command(workdir, data_dir, **{"train.num_steps": 400,
                                                "train.checkpoint_every": 200})
  proc = subprocess.Popen(cmd, env=tl.subprocess_env(8), cwd=tl.REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  t0 = time.time()
  while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):  # training has started
    assert proc.poll() is None and time.time() - t0 < 600, "run did not start"
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-3000:]
  step, _ = tl.read_state(workdir)
  assert 2 <= step < 400 and f"saved a checkpoint at step {step}" in err


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_of_4_devices_equal_one_process_of_8(tmp_path, data_dir, reference_run):
  workdir = str(tmp_path / "multihost")
  port = _free_port()
  procs = []
  for pid in range(2):
    cmd = tl.train_command(workdir, data_dir, **LONG) + [
        f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={pid}",
        "--cpu_collectives=gloo"]
    procs.append(subprocess.Popen(cmd, env=tl.subprocess_env(4), cwd=tl.REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
  errs = [p.communicate(timeout=900)[1] for p in procs]
  for p, e in zip(procs, errs, strict=True):
    assert p.returncode == 0, e[-3000:]
  assert "JAX process 1/2, 4 local devices of 8" in errs[1]
  _, a = tl.read_state(reference_run)
  _, b = tl.read_state(workdir)
  diff = tl.max_abs_diff(a.params, b.params)
  print(f"max |params difference| 2 hosts x 4 devices vs 1 host x 8 devices: {diff:.3g}")
  # Same data, keys and formulas; only the cross-device gradient sum runs in another order (gloo
  # between processes vs XLA in one), so rounding only. Each kind of state (params, each EMA,
  # Adam's mu and nu) is compared with its own magnitude (nu ~1e-8, which the former absolute
  # 1e-5 could never see). Bound: a psum of 8 shards rounds ~3 times and Adam ~20 operations per
  # step, 12 steps: 12 x 23 ~ 280 ulps of the group's largest value.
  rel = tl.group_relative_diffs(a, b)
  print("per-group relative differences:", {k: f"{v:.3g}" for k, v in rel.items()})
  for group, value in rel.items():
    assert value <= 12 * 23 * np.finfo(np.float32).eps, (group, value)


def test_sample_same_seed_same_images(tmp_path, reference_run):
  outs = []
  for i, bs in enumerate((6, 4)):
    out = str(tmp_path / f"s{i}.npz")
    proc = _run([sys.executable, "-m", "experiments.sample", f"--workdir={reference_run}",
                 "--num_samples=6", f"--out={out}", "--seed=3", f"--batch_size={bs}"],
                tl.subprocess_env(1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs.append(np.load(out)["images"])
    assert os.path.exists(out[:-4] + ".png")
  assert outs[0].shape == (6, 8, 8, 1) and outs[0].dtype == np.uint8
  np.testing.assert_array_equal(outs[0], outs[1])
