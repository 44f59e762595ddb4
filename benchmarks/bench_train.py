"""Train-step time of ddpm_cifar10 and DiT-S/2, JAX vs diffusers PyTorch on the same machine.

  python benchmarks/bench_train.py [--models ddpm_cifar10,DiT-S/2] [--batch 8] [--rounds 3]

The step is what a notebook user writes: `get_model` + `dj.training_loss` (eps / MSE, linear
T = 1000) + `optax.adam` under `jax.jit`, against the same loss on diffusers' `UNet2DModel` /
`DiTTransformer2DModel` (DiT-S/2 on 32x32x4 latents, no learned sigma) + `torch.optim.Adam`.
Protocol as bench_models.py (benchmarks/protocol.py). The trainer's own step (EMA, clipping,
pmap) is benchmarked by `python -m experiments.train` logs (steps/s).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol


def main() -> None:
  parser = protocol.common_args(argparse.ArgumentParser(description=__doc__),
                                "ddpm_cifar10,DiT-S/2")
  a = parser.parse_args()
  protocol.compare("train", a.models.split(","), batch=a.batch, iters=a.iters, rounds=a.rounds,
                   dtype=a.dtype, extra_jax=protocol.jax_args(a), torch_side=not a.no_torch,
                   force_ratio=a.force_ratio, huge_pages=a.huge_pages)


if __name__ == "__main__":
  main()
