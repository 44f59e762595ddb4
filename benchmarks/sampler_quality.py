"""Sample quality against network evaluations on a trained digits run, every sampler.

  python -m benchmarks.sampler_quality --workdir=runs/digits --num_samples=500 \\
      --png=docs/sampler_quality.png --json=docs/sampler_quality.json

Each sampler runs on its default grid (`samplers.grids`) with the most steps whose network
evaluations (NFE) fit 5, 10, 20 and 50, plus the full T-step ancestral chain as the baseline;
every sampler uses the default x0 policy ('clip', a pixel model); 'heun_churn' is EDM's
stochastic sampler (Heun with S_churn = 40). Runs of every `diffusion.family` work (a VDM or
EDM run is sampled as the T-step VP model of `training.families`). Quality is the digits Frechet
distance of `diffusion_jax.evaluation.digits` (lower is better) against `real_floor()`, the
distance of real held-out digits. Writes a Markdown table to stdout and a PNG plot (matplotlib
if installed, else drawn with PIL).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable, Sequence

import numpy as np

from diffusion_jax.samplers import grids

# 'heun_churn' is EDM's stochastic sampler: Heun on the rho = 7 grid with S_churn = CHURN.
SAMPLER_NAMES = ("ddpm", "ddim", "dpm_solver++", "euler", "heun", "heun_churn")
CHURN = 40.0
BUDGETS = (5, 10, 20, 50)
Metric = Callable[[np.ndarray], float]


def draw(loaded, name: str, steps: int, num_samples: int, seed: int,
         batch_size: int) -> np.ndarray:
  """float32 samples [N, H, W, C] of a run with the sampler's defaults and the run's settings
  ('heun_churn': 'heun' with s_churn = CHURN)."""
  from experiments import sampling_lib
  churn = CHURN if name == "heun_churn" else 0.0
  generator = sampling_lib.make_run_generator(loaded, seed=seed,
                                              batch_size=min(batch_size, num_samples),
                                              sampler=_sampler(name), steps=steps, s_churn=churn)
  return generator(num_samples)


def _sampler(name: str) -> str:
  return "heun" if name == "heun_churn" else name


def measure(loaded, metric: Metric, *, num_samples: int = 500, seed: int = 0,
            budgets: Sequence[int] = BUDGETS, names: Sequence[str] = SAMPLER_NAMES,
            batch_size: int = 500, log: Callable[[str], None] = print) -> list[dict]:
  """One row per (sampler, budget), the T-step ancestral baseline first: sampler, steps, nfe,
  fd, lo / hi (range of the float samples), seconds (wall, compile included).

  Args:
    loaded: `training.restore.Loaded` (an unconditional digits run).
    metric: uint8 images [N, 8, 8, 1] -> Frechet distance.
    num_samples, seed, batch_size: as `experiments.sample`.
    budgets: NFE budgets.
    names: samplers to run.
    log: called with each row as JSON.
  """
  from diffusion_jax.training import sampling
  runs = [("ddpm", loaded.schedule.num_timesteps)]
  runs += [(name, grids.steps_within(_sampler(name), nfe)) for name in names for nfe in budgets]
  rows = []
  for name, steps in runs:
    start = time.perf_counter()
    floats = draw(loaded, name, steps, num_samples, seed, batch_size)
    seconds = time.perf_counter() - start
    row = dict(sampler=name, steps=steps, nfe=grids.network_evaluations(_sampler(name), steps),
               fd=round(float(metric(sampling.to_uint8(floats))), 2),
               lo=round(float(floats.min()), 4), hi=round(float(floats.max()), 4),
               seconds=round(seconds, 1))
    rows.append(row)
    log(json.dumps(row))
  return rows


def markdown(rows: Sequence[dict], floor: float | None = None) -> str:
  """The README table: one line per sampler, FD at each NFE budget (actual NFE in brackets when
  it differs)."""
  baseline = rows[0]
  budgets = sorted({b for b in BUDGETS})
  lines = ["| sampler (default grid) | " + " | ".join(f"{b} NFE" for b in budgets) + " |",
           "|---|" + "---|" * len(budgets)]
  for name in dict.fromkeys(r["sampler"] for r in rows[1:]):
    cells = []
    for budget, row in zip(budgets, [r for r in rows[1:] if r["sampler"] == name], strict=True):
      note = "" if row["nfe"] == budget else f" ({row['nfe']})"
      cells.append(f"{row['fd']:.1f}{note}")
    lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
  lines.append(f"| `ddpm`, all {baseline['steps']} steps | {baseline['fd']:.1f} "
               f"({baseline['nfe']} NFE) |" + " |" * (len(budgets) - 1))
  if floor is not None:
    lines.append(f"| real held-out digits | {floor:.1f} |" + " |" * (len(budgets) - 1))
  return "\n".join(lines)


COLORS = {"ddpm": (31, 119, 180), "ddim": (255, 127, 14), "dpm_solver++": (44, 160, 44),
          "euler": (214, 39, 40), "heun": (148, 103, 189), "heun_churn": (140, 86, 75)}


def plot(rows: Sequence[dict], path: str, floor: float | None = None) -> None:
  """A PNG of Frechet distance (log) against NFE (log), one line per sampler, the T-step
  baseline and the real-data floor as horizontal lines."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
  except ImportError:
    return _plot_pil(rows, path, floor)
  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  for name in dict.fromkeys(r["sampler"] for r in rows[1:]):
    pts = [(r["nfe"], r["fd"]) for r in rows[1:] if r["sampler"] == name]
    ax.plot(*zip(*pts, strict=True), "o-", label=name, color=np.array(COLORS[name]) / 255)
  ax.axhline(rows[0]["fd"], color="k", ls="--", label=f"ddpm, {rows[0]['nfe']} NFE")
  if floor is not None:
    ax.axhline(floor, color="grey", ls=":", label="real held-out digits")
  ax.set(xscale="log", yscale="log", xlabel="network evaluations",
         ylabel="digits Frechet distance (lower is better)")
  ax.set_xticks(BUDGETS, [str(b) for b in BUDGETS])
  ax.set_xticks([], minor=True)
  ticks = [t for t in (50, 60, 70, 80, 100, 120, 150, 200, 300) if
           min(r["fd"] for r in rows) * 0.7 <= t <= max(r["fd"] for r in rows) * 1.3]
  ax.set_yticks(ticks, [str(t) for t in ticks])
  ax.set_yticks([], minor=True)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)


def _plot_pil(rows: Sequence[dict], path: str, floor: float | None) -> None:
  from PIL import Image, ImageDraw
  width, height, left, right, top, bottom = 640, 420, 60, 150, 20, 45
  image = Image.new("RGB", (width, height), "white")
  pen = ImageDraw.Draw(image)
  values = [r["fd"] for r in rows] + ([floor] if floor else [])
  y_lo, y_hi = np.log10(min(values)) - 0.05, np.log10(max(values)) + 0.05
  x_lo, x_hi = np.log10(4), np.log10(60)

  def xy(nfe, fd):
    x = left + (np.log10(nfe) - x_lo) / (x_hi - x_lo) * (width - left - right)
    y = top + (y_hi - np.log10(fd)) / (y_hi - y_lo) * (height - top - bottom)
    return float(x), float(y)

  pen.rectangle([left, top, width - right, height - bottom], outline="black")
  for nfe in BUDGETS:
    x, _ = xy(nfe, 10 ** y_lo)
    pen.line([x, height - bottom, x, height - bottom + 4], fill="black")
    pen.text((x - 6, height - bottom + 6), str(nfe), fill="black")
  for exponent in range(int(np.floor(y_lo)), int(np.ceil(y_hi)) + 1):
    for mantissa in (1, 2, 5):
      value = mantissa * 10.0 ** exponent
      if y_lo <= np.log10(value) <= y_hi:
        _, y = xy(10, value)
        pen.line([left - 4, y, left, y], fill="black")
        pen.text((5, y - 6), f"{value:g}", fill="black")
  pen.text((left + 120, height - 18), "network evaluations (log)", fill="black")
  pen.text((5, 2), "digits Frechet distance (log), lower is better", fill="black")
  legend_y = top + 5
  for name in dict.fromkeys(r["sampler"] for r in rows[1:]):
    pts = [xy(r["nfe"], r["fd"]) for r in rows[1:] if r["sampler"] == name]
    pen.line(pts, fill=COLORS[name], width=2)
    for x, y in pts:
      pen.ellipse([x - 3, y - 3, x + 3, y + 3], fill=COLORS[name])
    pen.line([width - right + 10, legend_y + 6, width - right + 30, legend_y + 6],
             fill=COLORS[name], width=2)
    pen.text((width - right + 35, legend_y), name, fill="black")
    legend_y += 16
  for value, label, color in ((rows[0]["fd"], f"ddpm {rows[0]['nfe']} NFE", (0, 0, 0)),
                              (floor, "real digits", (128, 128, 128))):
    if value is None:
      continue
    _, y = xy(10, value)
    for x in range(left, width - right, 8):
      pen.line([x, y, x + 4, y], fill=color)
    pen.line([width - right + 10, legend_y + 6, width - right + 30, legend_y + 6], fill=color)
    pen.text((width - right + 35, legend_y), label, fill="black")
    legend_y += 16
  image.save(path)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--replot", default=None, help="Only redraw the PNG from this JSON.")
  parser.add_argument("--workdir", default=None)
  parser.add_argument("--num_samples", type=int, default=500)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batch_size", type=int, default=500)
  parser.add_argument("--samplers", default=",".join(SAMPLER_NAMES),
                      help="Comma-separated subset of " + ", ".join(SAMPLER_NAMES) + ".")
  parser.add_argument("--png", default=None)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  if args.replot:
    with open(args.replot) as f:
      saved = json.load(f)
    print(markdown(saved["rows"], saved["real_floor"]))
    plot(saved["rows"], args.png, saved["real_floor"])
    return
  from diffusion_jax.evaluation.digits import digits_frechet_distance
  from diffusion_jax.evaluation.digits import real_floor
  from diffusion_jax.training import restore
  loaded = restore.load_for_sampling(args.workdir, use_ema=True)
  rows = measure(loaded, digits_frechet_distance, num_samples=args.num_samples, seed=args.seed,
                 batch_size=args.batch_size,
                 names=[n for n in args.samplers.split(",") if n])
  floor = float(real_floor())
  print(markdown(rows, floor))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"rows": rows, "real_floor": floor, "num_samples": args.num_samples,
                 "seed": args.seed}, f, indent=1)
  if args.png:
    plot(rows, args.png, floor)


if __name__ == "__main__":
  main()
