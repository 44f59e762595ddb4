"""VDM on the offline digits: the continuous-time VLB with a learned schedule, the network and
budget of `digits.py` (2,000 steps on a 2-core CPU), for the likelihood table.

  python -m experiments.train --config=experiments/configs/vdm_digits.py --workdir=runs/vdm_digits
  python -m experiments.evaluate_bpd --workdir=runs/vdm_digits
  python -m experiments.sample --workdir=runs/vdm_digits --num_samples=64 --out=runs/vdm_digits/s.npz

Trained in bits/dim (diffusion + prior + 8-bit reconstruction terms, antithetic times);
sampled by ancestral sampling in the learned gamma at T = 250 (`training.families`).
"""
import ml_collections

from experiments.configs import digits


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = digits.get_config()
  c.diffusion.family = "vdm"
  c.diffusion.prediction = "eps"
  c.vdm.gamma = "learned"          # VDM's monotonic network, end points -13.3 and 5 at first
  return c
