"""A sweep's results from what is on disk: `results.csv` (one row per run), `results.md` (mean
+/- std over seeds per member, the best per metric in bold) and PNG plots (training loss against
step per run, the final metrics per member with error bars, every member's samples side by side).

Reads `<sweep dir>/sweep.json` (written by `experiments.sweep`) and each run's `eval.json` and
`metrics.jsonl`; `python -m experiments.sweep --report=DIR` calls `write_report(DIR)`.
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Any

import numpy as np

# Metrics in eval.json and whether lower is better (all of these: distances, losses, costs).
METRICS = {
    "digits_fd": "Frechet distance in the digits classifier's features",
    "final_loss": "training loss, mean of the last logged interval",
    "sample_seconds": "wall time of experiments.sample for the evaluation samples (compile included)",
}


def read_runs(sweep_dir: str) -> tuple[dict, list[dict]]:
  """(sweep.json, [eval.json of each run that has one, in sweep order])."""
  with open(os.path.join(sweep_dir, "sweep.json"), encoding="utf-8") as f:
    spec = json.load(f)
  runs = []
  for run in spec["runs"]:
    path = os.path.join(sweep_dir, run["name"], "eval.json")
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        runs.append(json.load(f))
  return spec, runs


def summarise(runs: list[dict]) -> list[dict]:
  """One row per member (group): its varied values and, per metric, (mean, std, n) over seeds.

  std is the sample standard deviation (ddof=1); nan with a single seed.
  """
  groups: dict[str, list[dict]] = {}
  for run in runs:
    groups.setdefault(run["group"], []).append(run)
  rows = []
  for group, members in groups.items():
    stats = {}
    for metric in METRICS:
      values = [m["metrics"][metric] for m in members if m["metrics"].get(metric) is not None]
      if values:
        arr = np.asarray(values, np.float64)
        std = float(arr.std(ddof=1)) if arr.size > 1 else float("nan")
        stats[metric] = (float(arr.mean()), std, int(arr.size))
    rows.append({"group": group, "varied": members[0]["varied"], "stats": stats})
  return rows


def _fmt(mean: float, std: float, n: int) -> str:
  digits = 4 if abs(mean) < 10 else 2
  return f"{mean:.{digits}f}" if n < 2 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_csv(runs: list[dict], path: str) -> None:
  keys = sorted({k for r in runs for k in r["varied"]})
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["run", "member", "seed"] + keys + list(METRICS))
    for r in runs:
      writer.writerow([r["name"], r["group"], r["seed"]]
                      + [json.dumps(r["varied"].get(k)) for k in keys]
                      + [r["metrics"].get(m) for m in METRICS])


def write_markdown(rows: list[dict], path: str, title: str) -> None:
  keys = sorted({k for r in rows for k in r["varied"]})
  metrics = [m for m in METRICS if any(m in r["stats"] for r in rows)]
  best = {m: min((r["stats"][m][0] for r in rows if m in r["stats"]), default=None)
          for m in metrics}
  lines = [f"# {title}", "", "Mean ± standard deviation over seeds (n per cell in the csv); "
           "lower is better for every metric; the best member per metric is in bold.", "",
           "| " + " | ".join(keys + metrics) + " |", "|" + "---|" * (len(keys) + len(metrics))]
  for r in rows:
    cells = [str(r["varied"].get(k)) for k in keys]
    for m in metrics:
      if m not in r["stats"]:
        cells.append("")
        continue
      text = _fmt(*r["stats"][m])
      cells.append(f"**{text}**" if r["stats"][m][0] == best[m] else text)
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "Metrics:"] + [f"- `{m}`: {METRICS[m]}" for m in metrics]
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def _loss_curve(run_dir: str) -> tuple[list[int], list[float]]:
  steps, losses = [], []
  path = os.path.join(run_dir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      for line in f:
        row = json.loads(line)
        if "loss" in row:
          steps.append(int(row["step"]))
          losses.append(float(row["loss"]))
  return steps, losses


def write_plots(sweep_dir: str, runs: list[dict], rows: list[dict]) -> list[str]:
  """loss_vs_step.png, final_metrics.png, samples.png in `sweep_dir`; returns their paths."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  out = []
  groups = [r["group"] for r in rows]
  colors = {g: plt.cm.tab10(i % 10) for i, g in enumerate(groups)}

  fig, ax = plt.subplots(figsize=(8, 5))
  for run in runs:
    steps, losses = _loss_curve(os.path.join(sweep_dir, run["name"]))
    label = run["group"] if run["seed"] == 0 else None
    ax.plot(steps, losses, color=colors[run["group"]], label=label, alpha=0.8)
  ax.set(xlabel="step", ylabel="training loss", yscale="log", title="Training loss per run")
  ax.legend(fontsize=7)
  out.append(os.path.join(sweep_dir, "loss_vs_step.png"))
  fig.tight_layout()
  fig.savefig(out[-1], dpi=100)
  plt.close(fig)

  metrics = [m for m in METRICS if any(m in r["stats"] for r in rows)]
  if metrics:
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 0.4 * len(rows) + 2),
                             squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
      have = [r for r in rows if m in r["stats"]]
      means = [r["stats"][m][0] for r in have]
      errs = [0.0 if math.isnan(r["stats"][m][1]) else r["stats"][m][1] for r in have]
      ax.barh(range(len(have)), means, xerr=errs, color=[colors[r["group"]] for r in have])
      ax.set_yticks(range(len(have)), [r["group"] for r in have], fontsize=7)
      ax.set_title(m, fontsize=9)
    out.append(os.path.join(sweep_dir, "final_metrics.png"))
    fig.tight_layout()
    fig.savefig(out[-1], dpi=100)
    plt.close(fig)

  grids = []
  for group in groups:
    first = next(r for r in runs if r["group"] == group)
    path = os.path.join(sweep_dir, first["name"], "eval_samples.npz")
    if os.path.exists(path):
      with np.load(path) as f:
        grids.append((group, _tile(f["images"][:64])))
  if grids:
    fig, axes = plt.subplots(1, len(grids), figsize=(2.6 * len(grids), 3.0), squeeze=False)
    for ax, (group, grid) in zip(axes[0], grids, strict=True):
      ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255)
      ax.set_title(group.replace("__", "\n"), fontsize=7)
      ax.axis("off")
    out.append(os.path.join(sweep_dir, "samples.png"))
    fig.tight_layout()
    fig.savefig(out[-1], dpi=100)
    plt.close(fig)
  return out


def _tile(images: np.ndarray) -> np.ndarray:
  """uint8 [N, H, W, C] -> one [rows*H, cols*W, C] image, one pixel of padding."""
  n, h, w, c = images.shape
  cols = int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / cols))
  grid = np.full((rows * (h + 1), cols * (w + 1), c), 0, np.uint8)
  for i, img in enumerate(images):
    r, q = divmod(i, cols)
    grid[r * (h + 1):r * (h + 1) + h, q * (w + 1):q * (w + 1) + w] = img
  return grid


def write_report(sweep_dir: str) -> dict[str, Any]:
  """Writes results.csv, results.md and the plots; returns {'rows': ..., 'files': [...]}."""
  spec, runs = read_runs(sweep_dir)
  if not runs:
    raise ValueError(f"No run of the sweep in {sweep_dir} has been evaluated yet (no eval.json).")
  rows = summarise(runs)
  write_csv(runs, os.path.join(sweep_dir, "results.csv"))
  write_markdown(rows, os.path.join(sweep_dir, "results.md"),
                 f"Sweep {os.path.basename(spec['sweep'])} on {os.path.basename(spec['config'])} "
                 f"({len(runs)} of {len(spec['runs'])} runs evaluated)")
  files = [os.path.join(sweep_dir, n) for n in ("results.csv", "results.md")]
  files += write_plots(sweep_dir, runs, rows)
  return {"rows": rows, "files": files}
