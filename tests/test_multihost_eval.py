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

import jax
import numpy as np
import pytest
import training_testlib as tl

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
# 40 samples in 5 shards of 8: process 0 draws shards 0, 2, 4 and process 1 shards 1, 3.
EVAL_ARGS = ["--num_samples=40", "--sampler=ddim", "--steps=5", "--shard_size=8",
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


def _run_processes(commands: list[list[str]], num_devices: int,
                   timeout: int = 600) -> list[subprocess.CompletedProcess]:
  """Runs one command per process at once (process i gets --process_id=i), returns each result."""
  port = _free_port()
  extra = lambda i: ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={len(commands)}",
                      f"--process_id={i}", "--cpu_collectives=gloo"] if len(commands) > 1 else [])
  procs = [subprocess.Popen(cmd + extra(i), env=_env(num_devices), cwd=str(REPO), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for i, cmd in enumerate(commands)]
  results = []
  try:
    for cmd, p in zip(commands, procs, strict=True):
      out, err = p.communicate(timeout=timeout)
      results.append(subprocess.CompletedProcess(cmd, p.returncode, out, err))
  finally:
    for p in procs:   # a process left waiting at a collective after the other failed
      if p.poll() is None:
        p.kill()
        p.wait()
  for r in results:
    assert r.returncode == 0, r.stderr[-3000:]
  return results


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


def test_evaluate_on_two_processes_equals_one_process_and_resumes(random_run, tmp_path):
  one, two = _copy(random_run, tmp_path / "one"), _copy(random_run, tmp_path / "two")
  _run_processes([_evaluate_command(one)], num_devices=2)
  _, single = _results(one)
  runs = _run_processes([_evaluate_command(two)] * 2, num_devices=1)
  path, multi = _results(two)
  assert "wrote" in runs[0].stdout and "wrote" not in runs[1].stdout   # host 0 writes, once
  assert "process 0 writes" in runs[1].stdout
  assert path.with_suffix(".png").exists() and len(list((two / "eval").glob("*.png"))) == 1
  assert (single["process_count"], single["num_devices"]) == (1, 2)
  assert (multi["process_count"], multi["num_devices"], multi["local_devices"]) == (2, 2, 1)
  # Every shard committed, each drawn and featurised by one process with the same per-device
  # program (4 examples per device, keys fold_in(seed, example)) as the one-process run: the
  # same bits, hence the same metrics exactly (the same float64 NumPy on identical features,
  # concatenated in shard order in both runs).
  a, b = _shards(single), _shards(multi)
  assert sorted(b) == [f"shard_{i:06d}.npz" for i in range(5)] and sorted(a) == sorted(b)
  for name in a:
    for key in ("images", "pool", "logits"):
      np.testing.assert_array_equal(a[name][key], b[name][key], err_msg=f"{name} {key}")
  assert len(np.unique(b["shard_000000.npz"]["images"].reshape(8, -1), axis=0)) > 1
  assert multi["metrics"] == single["metrics"]
  # Resume: shards 2 (process 0's) and 3 (process 1's) lost, as in a run killed before it
  # committed them, with a half-written temporary left by the kill; the rerun draws only those
  # two (the others keep their files) and gives the same numbers.
  shard_dir = pathlib.Path(multi["shards"])
  kept = {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("shard_??????.npz")}
  for i in (2, 3):
    (shard_dir / f"shard_{i:06d}.npz").unlink()
    del kept[f"shard_{i:06d}.npz"]
  (shard_dir / "shard_000002.npz.12345.tmp.npz").write_bytes(b"PK\x03\x04 truncated")
  path.unlink()
  runs = _run_processes([_evaluate_command(two)] * 2, num_devices=1)
  assert {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("shard_??????.npz")
          if p.name in kept} == kept
  _, resumed = _results(two)
  for name, arrays in _shards(resumed).items():
    for key in ("images", "pool", "logits"):
      np.testing.assert_array_equal(arrays[key], a[name][key], err_msg=f"{name} {key}")
  assert resumed["metrics"] == single["metrics"]


def test_training_with_eval_on_two_processes(tmp_path):
  """2 processes x 1 device, 8 steps, an evaluation every 4 steps: host 0 samples and scores,
  every host receives the value (a collective the other host waits in) and saves the best
  checkpoint together; the run ends on both hosts with one eval row per evaluation."""
  from diffusion_jax.data import pipeline
  from diffusion_jax.evaluation import digits
  digits.load_classifier()
  data_dir = str(tmp_path / "tfds")
  pipeline.get_dataset_info(tl.tiny_config(data_dir).data)   # the dataset built once, here
  workdir = tmp_path / "run"
  cmd = tl.train_command(str(workdir), data_dir, **{
      "eval.every": 4, "eval.num_samples": 16, "eval.batch_size": 16, "eval.sampler": "ddim",
      "eval.steps": 5, "eval.metric": "digits_fd"}) + ["--compile_cache="]
  runs = _run_processes([cmd, cmd], num_devices=1)
  assert "JAX process 1/2, 1 local devices of 2" in runs[1].stderr
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  evals = [(r["step"], r["eval/digits_fd"]) for r in rows if "eval/digits_fd" in r]
  assert [s for s, _ in evals] == [4, 8] and all(np.isfinite(v) for _, v in evals)
  best = json.loads((workdir / "eval" / "best.json").read_text())
  assert (best["step"], best["value"]) == min(evals, key=lambda sv: (sv[1], sv[0]))
  assert (workdir / "best" / str(best["step"])).exists()
