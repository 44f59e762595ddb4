"""experiments.train as a subprocess: exact resume after SIGKILL, SIGTERM checkpoint, multi-host
(2 processes x 4 CPU devices == 1 process x 8 devices), and experiments.sample determinism."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import training_testlib as tl

from diffusion_jax import host_memory
from experiments import huge_pages

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
  with open(_stderr_path(workdir), "w") as f:
    f.write(proc.stderr)
  return workdir


def _stderr_path(workdir: str) -> str:
  """Where the reference run's stderr (its log) is kept: beside, not in, its workdir."""
  return workdir.rstrip(os.sep) + ".stderr.txt"


def test_sigkill_mid_run_then_rerun_resumes_exactly(tmp_path, data_dir, reference_run):
  workdir = str(tmp_path / "killed")
  cmd = tl.train_command(workdir, data_dir, **LONG)
  env = tl.subprocess_env(8)
  proc = subprocess.Popen(cmd, env=env, cwd=tl.REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  # Killed as soon as the first checkpoint (step 3) exists: 9 steps and 3 saves remain. (A kill
  # 1 s after checkpoint 6 came after the run had finished on an idle machine.)
  _wait_for_checkpoint(proc, workdir, 3)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  # The run really was cut mid-way: its lock is left behind and step 12 was never saved.
  assert os.path.exists(os.path.join(workdir, ".lock"))
  assert not os.path.exists(os.path.join(workdir, "checkpoints", "12"))
  rerun = _run(cmd, env)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "Resumed from" in rerun.stderr
  assert "is no longer running" in rerun.stderr          # the killed run's lock, taken over
  steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert steps == sorted(set(steps)) and steps[-1] == 12, steps   # one row per step
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


def test_keep_host_memory_trains_the_same_bits(tmp_path, data_dir, reference_run):
  """--keep_host_memory changes where buffers live, not what is computed: the run's final state
  equals the reference run's bit for bit."""
  workdir = str(tmp_path / "kept")
  proc = _run(tl.train_command(workdir, data_dir, **LONG) + ["--keep_host_memory"],
              tl.subprocess_env(8))
  assert proc.returncode == 0, proc.stderr[-3000:]
  if host_memory._glibc() is not None:
    assert "freed host memory is kept in the process" in proc.stderr + proc.stdout
  (step, kept), (ref_step, ref) = tl.read_state(workdir), tl.read_state(reference_run)
  assert step == ref_step == LONG["train.num_steps"]
  assert tl.max_abs_diff(kept, ref) == 0.0


def test_huge_pages_change_no_bit_and_the_log_says_which(tmp_path, data_dir, reference_run):
  """The reference run restarted itself with the huge-page tunable (the default, where the
  machine allows it); a run with --nohuge_pages did not, and ends in the same state bit for
  bit."""
  workdir = str(tmp_path / "no_huge_pages")
  proc = _run(tl.train_command(workdir, data_dir, **LONG) + ["--nohuge_pages"],
              tl.subprocess_env(8))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Transparent huge pages for host buffers: off (--nohuge_pages)" in proc.stderr
  with open(_stderr_path(reference_run)) as f:
    reference_log = f.read()
  expected = ("on (GLIBC_TUNABLES has" if huge_pages.unavailable_reason() is None
              else "unavailable: ")
  assert f"Transparent huge pages for host buffers: {expected}" in reference_log
  (step, plain), (ref_step, ref) = tl.read_state(workdir), tl.read_state(reference_run)
  assert step == ref_step == LONG["train.num_steps"]
  assert tl.max_abs_diff(plain, ref) == 0.0


def test_two_processes_of_4_devices_equal_one_process_of_8(tmp_path, data_dir, reference_run):
  workdir = str(tmp_path / "multihost")
  port = _free_port()
  # No persistent compilation cache here: process 1's cache key differs from process 0's, so a
  # warm cache lets process 0 skip compiling and wait at the first collective for more than
  # gloo's 30 s context-initialisation deadline while process 1 compiles (seen under load).
  env = {k: v for k, v in tl.subprocess_env(4).items() if k != "JAX_COMPILATION_CACHE_DIR"}
  procs = []
  for pid in range(2):
    cmd = tl.train_command(workdir, data_dir, **LONG) + [
        f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={pid}",
        "--cpu_collectives=gloo", "--compile_cache="]
    procs.append(subprocess.Popen(cmd, env=env, cwd=tl.REPO,
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


# --- the sampling and evaluation commands' flags, on tiny runs made here ------------------------

@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, data_dir):
  """{'uncond': workdir, 'cond': workdir}: 8-step tiny digits runs (the second class-conditional,
  10 classes), trained in-process."""
  from diffusion_jax.training import trainer
  runs = {}
  for name, extra in (("uncond", {}), ("cond", {"model.num_classes": 10})):
    workdir = str(tmp_path_factory.mktemp(name))
    trainer.train_and_evaluate(tl.tiny_config(data_dir, **extra), workdir)
    runs[name] = workdir
  return runs


def _sample(workdir, out, *flags_):
  proc = _run([sys.executable, "-m", "experiments.sample", f"--workdir={workdir}",
               "--num_samples=4", f"--out={out}", "--seed=0", *flags_], tl.subprocess_env(1))
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(out) as f:
    return f["images"], f["labels"]


def test_sample_command_flags(tmp_path, tiny_runs, monkeypatch):
  """--sampler/--steps/--eta/--guidance_scale/--labels/--use_ema/--seed/--batch_size (and
  --timesteps, --thresholding, --variance) reach the
  run loader and the sampler exactly as given (experiments.sample's main, flags parsed by absl,
  the library calls spied on); then the same command as a subprocess writes the images and the
  labels. (Whether each argument changes the images is tested on a network whose output shows
  it, in test_samplers_cli.py: an 8-step model's samples are clipped to 0/255 whatever the
  label.)"""
  from absl import flags

  from experiments import sample, sampling_lib
  seen = {}
  real_make, real_load = sampling_lib.make_generator, sample.restore.load_for_sampling

  def spy_make(*args, **kwargs):
    seen["generate"] = dict(kwargs)
    draw = real_make(*args, **kwargs)

    def spy_draw(num_samples, labels=None, *rest, **kw):
      seen["generate"].update(num_samples=num_samples, labels=labels)
      return draw(num_samples, labels, *rest, **kw)
    return spy_draw

  def spy_load(workdir, **kwargs):
    seen["load"] = (workdir, kwargs)
    return real_load(workdir, **kwargs)

  monkeypatch.setattr(sampling_lib, "make_generator", spy_make)
  monkeypatch.setattr(sample.restore, "load_for_sampling", spy_load)
  out = tmp_path / "s.npz"
  argv = ["sample", f"--workdir={tiny_runs['cond']}", "--num_samples=4", f"--out={out}",
          "--sampler=ddim", "--steps=5", "--eta=0.5", "--guidance_scale=2.5", "--labels=7,1",
          "--use_ema=false", "--seed=3", "--batch_size=2", "--thresholding=clip",
          "--variance=fixed_large"]
  before = set(flags.FLAGS)
  sample.define_flags()   # as `python -m experiments.sample` does; removed again below
  try:
    flags.FLAGS(argv)
    sample.main([])
  finally:
    flags.FLAGS.unparse_flags()
    for name in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, name)
  assert seen["load"] == (tiny_runs["cond"], {"use_ema": False, "step": None})
  kw = seen["generate"]
  assert (kw["sampler"], kw["steps"], kw["eta"], kw["guidance_scale"]) == ("ddim", 5, 0.5, 2.5)
  assert (kw["seed"], kw["batch_size"], kw["num_samples"], kw["num_classes"]) == (3, 2, 4, 10)
  assert (kw["thresholding"], kw["variance"]) == ("clip", "fixed_large")
  np.testing.assert_array_equal(kw["labels"], [7, 1, 7, 1])
  with np.load(out) as f:
    assert f["images"].shape == (4, 8, 8, 1)
    np.testing.assert_array_equal(f["labels"], [7, 1, 7, 1])
  # The command itself, as a user runs it.
  images, labels = _sample(tiny_runs["cond"], tmp_path / "cli.npz", *argv[4:])
  assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, [7, 1, 7, 1])
  # Unconditional runs write label -1 and refuse labels.
  _, labels = _sample(tiny_runs["uncond"], tmp_path / "u.npz", "--sampler=heun", "--steps=3")
  np.testing.assert_array_equal(labels, [-1] * 4)
  proc = _run([sys.executable, "-m", "experiments.sample", f"--workdir={tiny_runs['uncond']}",
               "--num_samples=4", f"--out={tmp_path / 'bad.npz'}", "--labels=3"],
              tl.subprocess_env(1))
  assert proc.returncode != 0


def _bpd(workdir, *flags_):
  proc = _run([sys.executable, "-m", "experiments.evaluate_bpd", f"--workdir={workdir}",
               "--batch_size=8", "--num_batches=1", *flags_], tl.subprocess_env(1))
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Restoring the run logs orbax's INFO lines, which the command hides (console.quiet_libraries).
  assert "checkpoint_manager.py" not in proc.stderr, proc.stderr[-3000:]
  import re
  found = re.search(r"(\w+) bits/dim = ([0-9.]+) over (\d+) examples \((EMA|raw) params\)",
                    proc.stdout)
  assert found, proc.stdout
  return found.group(1), float(found.group(2)), int(found.group(3)), found.group(4)


def test_evaluate_bpd_command_flags(tiny_runs):
  """--method, --ode_steps, --batch_size, --num_batches, --split, --use_ema and --seed reach the
  evaluation; a class-conditional run is refused with a message."""
  vlb = _bpd(tiny_runs["uncond"], "--method=vlb", "--split=test")
  assert vlb[0] == "vlb" and vlb[2] == 8 and vlb[3] == "EMA" and 0 < vlb[1] < 100
  assert _bpd(tiny_runs["uncond"], "--method=vlb", "--split=test") == vlb      # deterministic
  assert _bpd(tiny_runs["uncond"], "--method=vlb", "--split=test", "--seed=1")[1] != vlb[1]
  assert _bpd(tiny_runs["uncond"], "--method=vlb", "--split=train")[1] != vlb[1]
  raw = _bpd(tiny_runs["uncond"], "--method=vlb", "--split=test", "--use_ema=false")
  assert raw[3] == "raw" and raw[1] != vlb[1]
  ode = _bpd(tiny_runs["uncond"], "--method=ode", "--ode_steps=3", "--split=test")
  assert ode[0] == "ode" and ode[2] == 8 and np.isfinite(ode[1])
  assert _bpd(tiny_runs["uncond"], "--method=ode", "--ode_steps=4", "--split=test")[1] != ode[1]
  proc = _run([sys.executable, "-m", "experiments.evaluate_bpd", f"--workdir={tiny_runs['cond']}",
               "--batch_size=8", "--num_batches=1"], tl.subprocess_env(1))
  assert proc.returncode != 0 and "class-conditional" in proc.stderr
