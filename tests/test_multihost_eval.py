"""Evaluation across processes (`jax.distributed` on CPU, gloo collectives, two local processes):
`experiments.evaluate` on 2 processes x 1 device gives the shards and metrics of 1 process x 2
devices, writes its results once and resumes from the shards left behind; a 2-process training
with the in-training evaluation (`config.eval.every`) evaluates on host 0 without deadlocking.

Slow: every run is a subprocess that imports JAX and compiles (no persistent compilation cache
in the two-process runs: see test_experiments_train.py's multi-host test).
"""
import json
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import training_testlib as tl

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
# 400 samples in 50 shards of 8: process 0 draws the even shards, process 1 the odd ones. With 5
# DDIM steps a compiled shard took milliseconds (17 of 50 committed when the kill landed, under
# load), so on an idle machine the kill could land after the last one; 100 steps make a shard
# ~20x longer than the 20 ms polling interval of the kill, at the same compile cost (one scan).
NUM_SHARDS = 50
EVAL_ARGS = [f"--num_samples={8 * NUM_SHARDS}", "--sampler=ddim", "--steps=100", "--shard_size=8",
             "--per_device_batch=4", "--ref=digits", "--compile_cache="]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(num_devices: int) -> dict:
  # The compilation cache off: a warm cache lets one process reach the first collective long
  # before the other (see test_two_processes_of_4_devices_equal_one_process_of_8).
  env = {k: v for k, v in tl.subprocess_env(num_devices).items()
         if k != "JAX_COMPILATION_CACHE_DIR"}
  env["PYTHONPATH"] = str(REPO)
  return env


def _start_processes(commands: list[list[str]], num_devices: int,
                     quiet: bool = False) -> list[subprocess.Popen]:
  """Starts one command per process at once (several: --process_id=i, a shared coordinator)."""
  port = _free_port()
  extra = lambda i: ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={len(commands)}",
                      f"--process_id={i}", "--cpu_collectives=gloo"] if len(commands) > 1 else [])
  pipe = subprocess.DEVNULL if quiet else subprocess.PIPE
  return [subprocess.Popen(cmd + extra(i), env=_env(num_devices), cwd=str(REPO), text=True,
                           stdout=pipe, stderr=pipe) for i, cmd in enumerate(commands)]


def _finish(procs: list[subprocess.Popen], timeout: int = 600,
            check: bool = True) -> list[subprocess.CompletedProcess]:
  """Waits for every process (check: each must exit 0)."""
  results = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=timeout)
      results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
  finally:
    for p in procs:   # a process left waiting at a collective after the other failed
      if p.poll() is None:
        p.kill()
        p.wait()
  for r in results:
    assert r.returncode == 0 or not check, r.stderr[-3000:]
  return results


def _run_processes(commands: list[list[str]], num_devices: int) -> list[subprocess.CompletedProcess]:
  return _finish(_start_processes(commands, num_devices))


def _mtimes(shard_dir: pathlib.Path) -> dict[str, int]:
  return {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("shard_??????.npz")}


@pytest.fixture(scope="module")
def random_run(tmp_path_factory) -> pathlib.Path:
  """A digits-sized run workdir holding a random-weight tiny U-Net (training_testlib.TINY's
  model, every parameter drawn at random so that no output layer is zero), T = 20 cosine."""
  from diffusion_jax import convert, models
  from diffusion_jax.evaluation import digits
  from diffusion_jax.training import components
  digits.load_classifier()     # cached once here rather than trained by two processes at once
  model = components.build_model(tl.tiny_config("unused").model, (8, 8, 1))
  params = models.init_params(model, jax.random.PRNGKey(0), (8, 8, 1), False)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape, x.dtype)
                                     for k, x in zip(keys, leaves, strict=True)])
  workdir = tmp_path_factory.mktemp("random_run") / "run"
  convert.write_run(str(workdir), model, params, (8, 8, 1),
                    diffusion={"schedule": "cosine", "num_timesteps": 20})
  return workdir


def _copy(run: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
  import shutil
  shutil.copytree(run, target)
  return target


def _evaluate_command(workdir: pathlib.Path) -> list[str]:
  return [sys.executable, "-m", "experiments.evaluate", f"--workdir={workdir}", *EVAL_ARGS]


def _results(workdir: pathlib.Path) -> tuple[pathlib.Path, dict]:
  (path,) = (workdir / "eval").glob("*.json")     # one results file (reference-*.npz beside)
  return path, json.loads(path.read_text())


def _shards(results: dict) -> dict[str, dict[str, np.ndarray]]:
  out = {}
  for path in sorted(pathlib.Path(results["shards"]).glob("shard_??????.npz")):
    with np.load(path) as data:
      out[path.name] = {key: data[key] for key in data.files}
  return out


def test_evaluate_on_two_processes_killed_and_rerun_equals_one_process(random_run, tmp_path):
  one, two = _copy(random_run, tmp_path / "one"), _copy(random_run, tmp_path / "two")
  _run_processes([_evaluate_command(one)], num_devices=2)
  _, single = _results(one)
  # Both processes SIGKILLed as soon as one shard is committed (50 shards in all: the kill
  # lands mid-way, before the results exist), then the same command rerun on both.
  shard_dir = two / "eval" / pathlib.Path(single["shards"]).name   # same settings, same name
  procs = _start_processes([_evaluate_command(two)] * 2, num_devices=1, quiet=True)
  try:
    deadline = time.time() + 600
    while not list(shard_dir.glob("shard_??????.npz")):
      assert all(p.poll() is None for p in procs), "evaluate ended before it could be killed"
      assert time.time() < deadline, "no shard committed in 600 s"
      time.sleep(0.02)
  finally:
    for p in procs:
      p.kill()
      p.wait()
  before = _mtimes(shard_dir)
  print(f"killed with {len(before)} of {NUM_SHARDS} shards committed")
  assert 1 <= len(before) < NUM_SHARDS, f"the kill must land mid-way: {sorted(before)}"
  assert not list((two / "eval").glob("*.json"))
  runs = _finish(_start_processes([_evaluate_command(two)] * 2, num_devices=1))
  path, multi = _results(two)
  assert "wrote" in runs[0].stdout and "wrote" not in runs[1].stdout   # host 0 writes, once
  assert "process 0 writes" in runs[1].stdout
  assert path.with_suffix(".png").exists() and len(list((two / "eval").glob("*.png"))) == 1
  assert (single["process_count"], single["num_devices"]) == (1, 2)
  assert (multi["process_count"], multi["num_devices"], multi["local_devices"]) == (2, 2, 1)
  # The shards committed before the kill were kept, not drawn again.
  assert {name: mtime for name, mtime in _mtimes(shard_dir).items() if name in before} == before
  # Every shard committed, each drawn and featurised by one process with the same per-device
  # program (4 examples per device, keys fold_in(seed, example)) as the one-process run: the
  # same bits, hence the same metrics exactly (the same float64 NumPy on identical features,
  # concatenated in shard order in both runs).
  a, b = _shards(single), _shards(multi)
  assert sorted(b) == [f"shard_{i:06d}.npz" for i in range(NUM_SHARDS)] and sorted(a) == sorted(b)
  for name in a:
    for key in ("images", "pool", "logits"):
      np.testing.assert_array_equal(a[name][key], b[name][key], err_msg=f"{name} {key}")
  assert len(np.unique(b["shard_000000.npz"]["images"].reshape(8, -1), axis=0)) > 1
  assert multi["metrics"] == single["metrics"]


def _train_with_eval_command(tmp_path) -> tuple[list[str], pathlib.Path]:
  from diffusion_jax.data import pipeline
  from diffusion_jax.evaluation import digits
  digits.load_classifier()
  data_dir = str(tmp_path / "tfds")
  pipeline.get_dataset_info(tl.tiny_config(data_dir).data)   # the dataset built once, here
  workdir = tmp_path / "run"
  cmd = tl.train_command(str(workdir), data_dir, **{
      "eval.every": 4, "eval.num_samples": 16, "eval.batch_size": 16, "eval.sampler": "ddim",
      "eval.steps": 5, "eval.metric": "digits_fd"}) + ["--compile_cache="]
  return cmd, workdir


def test_training_with_eval_on_two_processes(tmp_path):
  """2 processes x 1 device, 8 steps, an evaluation every 4 steps: host 0 samples and scores,
  every host receives the value (a collective the other host waits in) and saves the best
  checkpoint together; the run ends on both hosts with one eval row per evaluation."""
  cmd, workdir = _train_with_eval_command(tmp_path)
  runs = _run_processes([cmd, cmd], num_devices=1)
  assert "JAX process 1/2, 1 local devices of 2" in runs[1].stderr
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  evals = [(r["step"], r["eval/digits_fd"]) for r in rows if "eval/digits_fd" in r]
  assert [s for s, _ in evals] == [4, 8] and all(np.isfinite(v) for _, v in evals)
  best = json.loads((workdir / "eval" / "best.json").read_text())
  assert (best["step"], best["value"]) == min(evals, key=lambda sv: (sv[1], sv[0]))
  assert (workdir / "best" / str(best["step"])).exists()


# The trainer with the evaluation's scoring made to raise on host 0 (host 1 never scores).
_FAILING_EVAL = """
import runpy, jax
from diffusion_jax.evaluation import hook
def fail(self, images):
  assert jax.process_index() == 0, "only host 0 evaluates"
  raise ValueError("injected evaluation failure")
hook.EvalHook.__call__ = fail
runpy.run_module("experiments.train", run_name="__main__", alter_sys=True)
"""


def test_training_eval_failing_on_host0_stops_every_host(tmp_path):
  """An evaluation that raises on host 0 must not leave host 1 waiting for it forever (it
  did: host 1 sat in the value's broadcast while host 0 waited for it at exit)."""
  cmd, _ = _train_with_eval_command(tmp_path)
  cmd = [sys.executable, "-c", _FAILING_EVAL] + cmd[3:]
  runs = _finish(_start_processes([cmd, cmd], num_devices=1), timeout=600, check=False)
  assert runs[0].returncode != 0 and "injected evaluation failure" in runs[0].stderr
  assert runs[1].returncode != 0 and "failed on host 0" in runs[1].stderr, runs[1].stderr[-3000:]
