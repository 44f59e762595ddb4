"""Run an ablation sweep: every member of a sweep file trained, evaluated and tabulated.

  python -m experiments.sweep --config=experiments/configs/digits.py \\
      --sweep=experiments/sweeps/digits_prediction.py --workdir=runs/sweep --parallel=1
  python -m experiments.sweep ... --emit=commands     # one launch line per run, nothing runs
  python -m experiments.sweep --report=runs/sweep     # rebuild the tables and plots from disk

Each run trains in `<workdir>/<member name>/` (its own `experiments.train` process) and is then
evaluated: the training loss of the last logged interval, `--num_eval_samples` samples drawn by
`experiments.sample` (with their wall time) and, on digits data, the Frechet distance in the
digits classifier's features. A run with an `eval.json` is finished and skipped on a rerun; an
unfinished one resumes from its checkpoints (the trainer resumes exactly), so a killed sweep
rerun with the same command ends with the same table. The sweep file and every run are checked
(unknown keys, wrong types, duplicates, empty axes) before anything runs.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time

from absl import app
from absl import flags

from diffusion_jax.training import console
from experiments import paths
from experiments import sweep_lib
from experiments import sweep_report

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags, defined only when run as a program (never at import, so importing
  this module beside another entry point cannot collide)."""
  flags.DEFINE_string("config", None, "Base training config file (path[:arg]).")
  flags.DEFINE_string("sweep", None, "Sweep file (path[:arg]) defining get_sweep().")
  flags.DEFINE_string("workdir", None, "Directory of the sweep: one sub-directory per run.")
  flags.DEFINE_integer("parallel", 1, "Runs trained at the same time on this machine.")
  flags.DEFINE_enum("emit", None, ["commands"], "Print the launch commands instead of running.")
  flags.DEFINE_string("report", None, "Only rebuild results and plots of this sweep directory.")
  flags.DEFINE_integer("num_eval_samples", 500, "Samples drawn to evaluate each run.")


def _absolute_with_arg(spec: str) -> str:
  """'path[:arg]' with the path made absolute and the config argument kept."""
  path, sep, arg = spec.partition(":")
  return paths.absolute(path) + sep + arg


class _Children:
  """The child processes of the sweep, terminated together on SIGTERM/SIGINT."""

  def __init__(self):
    self._procs: set[subprocess.Popen] = set()
    self._lock = threading.Lock()
    self.stopping = False

  def run(self, argv: list[str], log_path: str) -> int:
    with open(log_path, "a", encoding="utf-8") as log:
      with self._lock:
        if self.stopping:
          return 143
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self._procs.add(proc)
      try:
        return proc.wait()
      finally:
        with self._lock:
          self._procs.discard(proc)

  def terminate(self, *unused) -> None:
    with self._lock:
      self.stopping = True
      for proc in self._procs:
        proc.terminate()


def _final_loss(run_dir: str) -> float | None:
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  last = None
  with open(path, encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      last = row.get("loss", last)
  return last


def evaluate_run(run: sweep_lib.Run, run_dir: str, data_name: str, children: _Children,
                 num_samples: int) -> dict | None:
  """Samples and scores a trained run; writes and returns its eval.json (None if stopped)."""
  out = os.path.join(run_dir, "eval_samples.npz")
  t0 = time.perf_counter()
  rc = children.run([sys.executable, "-m", "experiments.sample", f"--workdir={run_dir}",
                     f"--num_samples={num_samples}", f"--out={out}", "--seed=0"],
                    os.path.join(run_dir, "sample.log"))
  seconds = time.perf_counter() - t0
  if rc != 0:
    if children.stopping:
      return None
    raise RuntimeError(f"Sampling run {run.name} failed (exit {rc}); see "
                       f"{os.path.join(run_dir, 'sample.log')}.")
  metrics = {"final_loss": _final_loss(run_dir), "sample_seconds": seconds}
  if data_name == "digits":
    import numpy as np  # pylint: disable=import-outside-toplevel
    from diffusion_jax.evaluation import digits  # pylint: disable=import-outside-toplevel
    with np.load(out) as f:
      metrics["digits_fd"] = float(digits.digits_frechet_distance(f["images"]))
  result = {"name": run.name, "group": run.group, "seed": run.seed,
            "varied": dict(run.varied), "overrides": dict(run.overrides), "metrics": metrics}
  tmp = os.path.join(run_dir, "eval.json.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  os.replace(tmp, os.path.join(run_dir, "eval.json"))
  return result


def run_sweep(config_path: str, sweep_path: str, workdir: str, parallel: int,
              num_samples: int) -> None:
  """Trains and evaluates every unfinished run, `parallel` at a time, then writes the report."""
  config = sweep_lib.load_config(config_path)
  runs = sweep_lib.expand(sweep_lib.load_sweep(sweep_path))
  sweep_lib.validate(runs, config)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "sweep.json"), "w", encoding="utf-8") as f:
    json.dump({"config": config_path, "sweep": sweep_path,
               "runs": [{"name": r.name, "overrides": dict(r.overrides)} for r in runs]},
              f, indent=2, default=str)
  children = _Children()
  signal.signal(signal.SIGTERM, children.terminate)
  signal.signal(signal.SIGINT, children.terminate)
  todo = [r for r in runs if not os.path.exists(os.path.join(workdir, r.name, "eval.json"))]
  print(f"Sweep: {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to do "
        f"({parallel} at a time) in {workdir}", flush=True)

  def one(run: sweep_lib.Run) -> str:
    run_dir = os.path.join(workdir, run.name)
    os.makedirs(run_dir, exist_ok=True)
    t0 = time.perf_counter()
    rc = children.run(sweep_lib.train_command(run, config_path, run_dir),
                      os.path.join(run_dir, "train.log"))
    if rc != 0:
      if children.stopping:
        return f"{run.name}: stopped"
      raise RuntimeError(f"Training run {run.name} failed (exit {rc}); see "
                         f"{os.path.join(run_dir, 'train.log')}.")
    result = evaluate_run(run, run_dir, config.data.name, children, num_samples)
    if result is None:
      return f"{run.name}: stopped"
    shown = ", ".join(f"{k} {v:.4g}" for k, v in result["metrics"].items() if v is not None)
    return f"{run.name}: {shown} ({time.perf_counter() - t0:.0f} s)"

  failures = []
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
    futures = {pool.submit(one, r): r for r in todo}
    for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
      try:
        print(f"[{i}/{len(todo)}] {future.result()}", flush=True)
      except RuntimeError as e:
        failures.append(str(e))
        print(f"[{i}/{len(todo)}] FAILED: {e}", flush=True)
  if children.stopping:
    print("Stopped; rerun the same command to continue.", flush=True)
    sys.exit(143)
  report = sweep_report.write_report(workdir)
  print("Wrote " + ", ".join(report["files"]), flush=True)
  if failures:
    sys.exit(1)


def main(argv):
  del argv
  console.quiet_libraries(FLAGS.verbosity)
  if FLAGS.report:
    report = sweep_report.write_report(paths.absolute(FLAGS.report))
    print("Wrote " + ", ".join(report["files"]))
    return
  for name in ("config", "sweep", "workdir"):
    if not getattr(FLAGS, name):
      raise app.UsageError(f"--{name} is required (or give --report=DIR).")
  if FLAGS.parallel < 1 or FLAGS.num_eval_samples < 1:
    raise app.UsageError("--parallel and --num_eval_samples must be >= 1.")
  config_path = _absolute_with_arg(FLAGS.config)
  sweep_path = _absolute_with_arg(FLAGS.sweep)
  workdir = paths.absolute(FLAGS.workdir)
  if FLAGS.emit == "commands":
    config = sweep_lib.load_config(config_path)
    runs = sweep_lib.expand(sweep_lib.load_sweep(sweep_path))
    sweep_lib.validate(runs, config)
    for run in runs:
      print(sweep_lib.shell_line(sweep_lib.train_command(
          run, config_path, os.path.join(workdir, run.name), python="python")))
    return
  run_sweep(config_path, sweep_path, workdir, FLAGS.parallel, FLAGS.num_eval_samples)


if __name__ == "__main__":
  define_flags()
  app.run(main)
