"""EDM on the offline digits: the preconditioned denoiser and EDM's loss with the network and
budget of `digits.py` (2,000 steps on a 2-core CPU).

  python -m experiments.train --config=experiments/configs/edm_digits.py --workdir=runs/edm_digits
  python -m experiments.sample --workdir=runs/edm_digits --num_samples=64 --out=runs/edm_digits/s.npz \
      --sampler=heun --steps=18

sigma_data = 0.5, ln(sigma) ~ N(-1.2, 1.2^2) as on CIFAR-10 (the digits' pixel std in [-1, 1]
is about 0.6); the previews use Heun with 18 steps (35 evaluations) on the rho = 7 grid from
sigma_max = 80 to sigma_min = 0.002.
"""
import ml_collections

from experiments.configs import digits


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = digits.get_config()
  c.diffusion.family = "edm"
  c.diffusion.prediction = "x0"    # the EDMNetwork returns D(x; sigma)
  c.sample.sampler = "heun"
  c.sample.kwargs.num_steps = 18
  return c
