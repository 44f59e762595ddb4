"""The command line under the run-safety rules: a second trainer on a busy workdir is refused,
the terminal shows the header / compile time / progress / checkpoints and no library INFO
chatter, and experiments.sample shows progress."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import training_testlib as tl

pytestmark = pytest.mark.slow

# INFO lines may come only from these modules of the project (absl prefix "I... file.py:N]").
OWN_MODULES = {"train.py", "trainer.py", "checkpoint.py", "run_config.py", "workdir_lock.py",
               "metric_writer.py", "paths.py"}


def test_busy_workdir_terminal_output_and_sampling_progress(tmp_path):
  data_dir, workdir = str(tmp_path / "tfds"), str(tmp_path / "run")
  cmd = tl.train_command(workdir, data_dir, **{"train.num_steps": 4000,
                                                "train.checkpoint_every": 2000,
                                                "train.log_every": 10})
  env = tl.subprocess_env(1)
  first = subprocess.Popen(cmd, env=env, cwd=tl.REPO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  t0 = time.time()
  while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):  # training has started
    assert first.poll() is None and time.time() - t0 < 600, first.stderr.read()[-3000:]
    time.sleep(0.1)
  second = subprocess.run(cmd, env=env, cwd=tl.REPO, capture_output=True, text=True, timeout=600)
  first.send_signal(signal.SIGTERM)
  _, err = first.communicate(timeout=300)

  assert second.returncode == 2, second.stderr[-3000:]
  assert f"Another trainer is using this workdir: pid {first.pid} on host" in second.stderr
  assert first.returncode == 143, err[-3000:]
  assert not os.path.exists(os.path.join(workdir, ".lock"))

  assert re.search(r"Model unet_digits: [\d,]+ parameters \| data digits, images 8x8x1", err)
  assert f"workdir {workdir}" in err
  assert re.search(r"Compiled and ran the first 1 step\(s\) in [\d.]+ s", err)
  assert re.search(r"step \d+/4000 \| loss .* ETA \d+:\d\d:\d\d", err)
  assert "Checkpoint at step" in err
  sources = set(re.findall(r"^I\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\]", err, re.M))
  assert sources and sources <= OWN_MODULES, sources   # no orbax / TFDS INFO chatter

  out = str(tmp_path / "s.npz")
  sample = subprocess.run([sys.executable, "-m", "experiments.sample", f"--workdir={workdir}",
                           "--num_samples=6", "--batch_size=3", f"--out={out}"],
                          env=env, cwd=tl.REPO, capture_output=True, text=True, timeout=600)
  assert sample.returncode == 0, sample.stderr[-3000:]
  assert "2/2" in sample.stderr, sample.stderr[-3000:]   # a progress bar over the 2 batches
