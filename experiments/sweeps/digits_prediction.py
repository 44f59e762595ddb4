"""Digits ablation: prediction target (eps, x0, v) x loss weighting (none, min-SNR), 2 seeds.

  python -m experiments.sweep --config=experiments/configs/digits.py \\
      --sweep=experiments/sweeps/digits_prediction.py --workdir=runs/sweep_prediction

12 runs of 1,000 steps (half the Quickstart's) so that the whole sweep fits about half an hour on
a 2-core CPU. `:short` gives a 40-step smoke version of the same 12 runs.
"""
from experiments.sweep_lib import Sweep, product, sweep


def get_sweep(arg: str | None = None) -> Sweep:
  steps = 40 if arg == "short" else 1000
  return Sweep(
      product(sweep("diffusion.prediction", ["eps", "x0", "v"]),
              sweep("diffusion.weighting", ["none", "min_snr"])),
      seeds=2,
      fixed={"train.num_steps": steps, "train.checkpoint_every": steps // 4,
             "train.log_every": steps // 20, "train.sample_every": 0})
