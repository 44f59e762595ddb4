"""Sweeps: expansion and names, errors before anything runs, the results table equal to the
runs' own files, and (slow) a sweep killed mid-way and rerun ends with the uninterrupted table.
"""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import training_testlib as tl
from experiments import sweep_lib as sl
from experiments import sweep_report


def test_product_zip_seeds_expand_in_order():
  spec = sl.Sweep(sl.product(sl.sweep("diffusion.prediction", ["eps", "x0", "v"]),
                             sl.zip_(sl.sweep("optim.lr", [1e-3, 2e-3]),
                                     sl.sweep("optim.warmup_steps", [10, 20]))),
                  seeds=2, fixed={"train.num_steps": 5})
  runs = sl.expand(spec)
  assert len(runs) == 3 * 2 * 2
  assert runs[0].name == "prediction-eps__lr-0.001__warmup-steps-10__seed0"
  assert runs[1].name == "prediction-eps__lr-0.001__warmup-steps-10__seed1"
  assert runs[2].name == "prediction-eps__lr-0.002__warmup-steps-20__seed0"
  assert dict(runs[-1].overrides) == {"train.num_steps": 5, "diffusion.prediction": "v",
                                      "optim.lr": 2e-3, "optim.warmup_steps": 20, "seed": 1}
  assert len({r.name for r in runs}) == len(runs)
  assert runs[0].group == runs[1].group != runs[2].group


def test_ambiguous_short_keys_keep_their_section():
  runs = sl.expand(sl.Sweep(sl.product(sl.sweep("model.dropout", [0.0]),
                                       sl.sweep("data.dropout", [0.1]))))
  assert runs[0].name == "model.dropout-0__data.dropout-0.1__seed0"


@pytest.mark.parametrize("make, message", [
    (lambda: sl.product(sl.sweep("a.b", [1]), []), "empty axis"),
    (lambda: sl.sweep("a.b", []), "empty"),
    (lambda: sl.zip_(sl.sweep("a.b", [1, 2]), sl.sweep("a.c", [1])), "equal length"),
    (lambda: sl.product(sl.sweep("a.b", [1]), sl.sweep("a.b", [2])), "more than one axis"),
    (lambda: sl.expand(sl.Sweep(sl.sweep("a.b", [1, 1]))), "are the same"),
    (lambda: sl.expand(sl.Sweep(sl.sweep("a.b", [1]), seeds=0)), "positive integer"),
    (lambda: sl.expand(sl.Sweep([])), "no members"),
])
def test_malformed_sweeps_are_clear_errors(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_unknown_key_and_bad_type_name_the_run_before_anything_runs():
  config = sl.load_config(os.path.join(tl.REPO, "experiments/configs/digits.py"))
  with pytest.raises(ValueError, match=r"unknown config key 'diffusion.predicton'.*"
                                       r"diffusion.prediction"):
    sl.validate(sl.expand(sl.Sweep(sl.sweep("diffusion.predicton", ["v"]))), config)
  with pytest.raises(ValueError, match="train.num_steps.*cannot take"):
    sl.validate(sl.expand(sl.Sweep(sl.sweep("train.num_steps", ["many"]))), config)
  sl.validate(sl.expand(sl.Sweep(sl.sweep("diffusion.prediction", ["v"]))), config)


def test_emit_commands_prints_one_line_per_run_and_runs_nothing(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.sweep", "--config=experiments/configs/digits.py",
       "--sweep=experiments/sweeps/digits_prediction.py", f"--workdir={tmp_path / 'sw'}",
       "--emit=commands"], cwd=tl.REPO, env=tl.subprocess_env(1), capture_output=True,
      text=True, check=True)
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 12 and all("-m experiments.train" in line for line in lines)
  assert not (tmp_path / "sw").exists()


def _fake_run(sweep_dir, name, group, seed, varied, metrics, losses):
  run_dir = sweep_dir / name
  run_dir.mkdir(parents=True)
  (run_dir / "eval.json").write_text(json.dumps(
      {"name": name, "group": group, "seed": seed, "varied": varied, "overrides": varied,
       "metrics": metrics}))
  (run_dir / "metrics.jsonl").write_text("".join(
      json.dumps({"step": 10 * (i + 1), "loss": v}) + "\n" for i, v in enumerate(losses)))
  rng = np.random.default_rng(seed)
  np.savez(run_dir / "eval_samples.npz", images=rng.integers(0, 256, (16, 8, 8, 1), np.uint8))


def test_report_numbers_equal_the_runs_files(tmp_path):
  runs = [("p-eps__seed0", "p-eps", 0, {"diffusion.prediction": "eps"}, 10.0, 0.5),
          ("p-eps__seed1", "p-eps", 1, {"diffusion.prediction": "eps"}, 14.0, 0.7),
          ("p-v__seed0", "p-v", 0, {"diffusion.prediction": "v"}, 9.0, 0.4),
          ("p-v__seed1", "p-v", 1, {"diffusion.prediction": "v"}, 12.0, 0.2)]
  for name, group, seed, varied, fd, loss in runs:
    _fake_run(tmp_path, name, group, seed, varied,
              {"digits_fd": fd, "final_loss": loss, "sample_seconds": 1.0}, [1.0, loss])
  (tmp_path / "sweep.json").write_text(json.dumps(
      {"config": "digits.py", "sweep": "s.py", "runs": [{"name": r[0]} for r in runs]}))
  report = sweep_report.write_report(str(tmp_path))
  with open(tmp_path / "results.csv", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert [(r["run"], float(r["digits_fd"]), float(r["final_loss"])) for r in rows] == \
      [(r[0], r[4], r[5]) for r in runs]
  by_group = {r["group"]: r["stats"] for r in report["rows"]}
  # Mean and sample std (ddof=1) over the two seeds, computed here independently.
  assert by_group["p-eps"]["digits_fd"] == (12.0, pytest.approx(np.sqrt(8.0)), 2)
  assert by_group["p-v"]["final_loss"][0] == pytest.approx(0.3)
  md = (tmp_path / "results.md").read_text()
  assert "**10.50 ± 2.12**" in md         # p-v has the best (lowest) FD: 10.5 +- sqrt(4.5)
  assert "12.00 ± 2.83" in md
  for name in ("loss_vs_step.png", "final_metrics.png", "samples.png"):
    assert (tmp_path / name).stat().st_size > 1000


def _tiny_sweep_file(path, data_dir):
  fixed = {**{k: v for k, v in tl.TINY.items()}, "data.data_dir": data_dir}
  path.write_text(
      "from experiments.sweep_lib import Sweep, sweep\n"
      f"def get_sweep(arg=None):\n"
      f"  return Sweep(sweep('diffusion.prediction', ['eps', 'v', 'x0']), seeds=1, "
      f"fixed={fixed!r})\n")


def _sweep_cmd(sweep_file, workdir):
  return [sys.executable, "-m", "experiments.sweep", "--config=experiments/configs/digits.py",
          f"--sweep={sweep_file}", f"--workdir={workdir}", "--num_eval_samples=64"]


def _metric_columns(sweep_dir):
  with open(os.path.join(sweep_dir, "results.csv"), encoding="utf-8") as f:
    return [(r["run"], r["digits_fd"], r["final_loss"]) for r in csv.DictReader(f)]


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_uninterrupted_table(tmp_path):
  data_dir = str(tmp_path / "tfds")
  sweep_file = tmp_path / "tiny_sweep.py"
  _tiny_sweep_file(sweep_file, data_dir)
  env = tl.subprocess_env(1)
  full, killed = tmp_path / "full", tmp_path / "killed"
  subprocess.run(_sweep_cmd(sweep_file, full), cwd=tl.REPO, env=env, check=True,
                 capture_output=True)

  proc = subprocess.Popen(_sweep_cmd(sweep_file, killed), cwd=tl.REPO, env=env,
                          start_new_session=True, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  first = killed / "prediction-eps__seed0"
  second_ckpt = killed / "prediction-v__seed0" / "checkpoints"
  deadline = time.time() + 600
  while not (second_ckpt.exists() and any(second_ckpt.iterdir())) and time.time() < deadline:
    assert proc.poll() is None, "the sweep ended before it could be killed"
    time.sleep(0.2)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  assert (first / "eval.json").exists() and not (killed / "results.csv").exists()
  finished = {p: p.stat().st_mtime_ns for p in (first / "eval.json", first / "train.log")}

  rerun = subprocess.run(_sweep_cmd(sweep_file, killed), cwd=tl.REPO, env=env, check=True,
                         capture_output=True, text=True)
  assert "1 already finished" in rerun.stdout
  assert {p: p.stat().st_mtime_ns for p in finished} == finished   # not retrained
  assert _metric_columns(killed) == _metric_columns(full)
