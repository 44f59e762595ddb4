"""Digits Frechet distance of the predictor-corrector sampler (score_sde) on a trained run.

  python -m benchmarks.pc_quality --workdir=runs/digits --num_samples=500 --md=docs/pc_sampler_quality.md

Rows: the T-step ancestral chain (the baseline, same seed), then `pc` (VP SDE on the model's own
levels, reverse-diffusion predictor, one Langevin corrector step, snr 0.16, batch norms) at
50 / 125 / 250 steps, and the predictor alone at 250 steps; network evaluations (NFE) from
`samplers.grids.network_evaluations`. Every sampler uses the default x0 policy ('clip').
"""

from __future__ import annotations

import argparse
import json
import time

from diffusion_jax.samplers import grids

# (label, sampler, steps, static settings, corrector steps)
RUNS = (
    ("ddpm (ancestral)", "ddpm", None, {}, 0),
    ("pc: reverse diffusion + 1 Langevin", "pc", 50, {}, 1),
    ("pc: reverse diffusion + 1 Langevin", "pc", 125, {}, 1),
    ("pc: reverse diffusion + 1 Langevin", "pc", 250, {}, 1),
    ("pc: reverse diffusion alone", "pc", 250, {"corrector": "none"}, 0),
)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--num_samples", type=int, default=500)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--snr", type=float, default=0.16)
  parser.add_argument("--rows", default=None, help="indices into RUNS to run, e.g. '1,3' "
                      "(default: all)")
  parser.add_argument("--md", default=None, help="write the Markdown rows here")
  args = parser.parse_args()

  from diffusion_jax.evaluation import digits
  from diffusion_jax.training import restore
  from diffusion_jax.training import sampling
  from experiments import sampling_lib
  loaded = restore.load_for_sampling(args.workdir, use_ema=True)
  apply_fn = lambda p, x, t, y: loaded.model.apply({"params": p}, x, t, y, train=False)
  rows = []
  chosen = RUNS if args.rows is None else [RUNS[int(i)] for i in args.rows.split(",")]
  for label, name, steps, static, corrector_steps in chosen:
    steps = loaded.schedule.num_timesteps if steps is None else steps
    start = time.perf_counter()
    floats = sampling_lib.generate(
        apply_fn, loaded.params, loaded.schedule, loaded.image_shape,
        num_samples=args.num_samples, seed=args.seed, batch_size=args.num_samples, sampler=name,
        steps=steps, snr=args.snr, corrector_steps=max(corrector_steps, 1), static=static,
        prediction=loaded.config.diffusion.prediction,
        variance=sampling.sampling_variance(loaded.config), progress=False)
    seconds = time.perf_counter() - start
    nfe = (grids.network_evaluations(name, steps, corrector_steps) if name == "pc"
           else grids.network_evaluations(name, steps))
    row = dict(label=label, sampler=name, steps=steps, nfe=nfe,
               fd=round(float(digits.digits_frechet_distance(sampling.to_uint8(floats))), 2),
               lo=round(float(floats.min()), 4), hi=round(float(floats.max()), 4),
               seconds=round(seconds, 1))
    rows.append(row)
    print(json.dumps(row), flush=True)
  lines = ["| sampler | steps | NFE | digits FD (500 samples, seed %d) | sample range |" % args.seed,
           "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['label']} | {r['steps']} | {r['nfe']} | {r['fd']:.1f} | "
                 f"[{r['lo']:.2f}, {r['hi']:.2f}] |")
  lines.append(f"| real held-out digits | | | {digits.real_floor():.1f} | |")
  table = "\n".join(lines)
  print(table)
  if args.md:
    with open(args.md, "w") as f:
      f.write(table + "\n")


if __name__ == "__main__":
  main()
