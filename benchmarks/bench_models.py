"""Forward-pass time of ddpm_cifar10 and DiT-S/2, JAX vs diffusers PyTorch on the same machine.

  python benchmarks/bench_models.py [--models ddpm_cifar10,DiT-S/2] [--batch 8] [--rounds 3]

Protocol (benchmarks/protocol.py): each side in its own process, alternated JAX, PyTorch, JAX,
...; load average printed before and after; min / median / max of all timed calls; compile time
beside the step time; no ratio when the machine was loaded (1-min load > 0.5 x cores) or the
load moved by > 0.5 during the run. Workloads: benchmarks/workloads.py.
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
  protocol.compare("forward", a.models.split(","), batch=a.batch, iters=a.iters, rounds=a.rounds,
                   dtype=a.dtype, extra_jax=protocol.jax_args(a), torch_side=not a.no_torch,
                   force_ratio=a.force_ratio, huge_pages=a.huge_pages)


if __name__ == "__main__":
  main()
