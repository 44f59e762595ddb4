"""Sampling throughput of ddpm_cifar10: 1000 ancestral steps and 50 DDIM steps, JAX (fused
`lax.scan` samplers) vs diffusers' `DDPMPipeline` / `DDIMPipeline` on the same machine.

  python benchmarks/bench_sampling.py [--batch 2] [--ddpm_steps 100] [--ddim_steps 50]

A small batch is run and the time is reported per image. The ancestral sampler is timed over
`--ddpm_steps` steps (the 1000-step schedule respaced; diffusers: `num_inference_steps`) and
extrapolated linearly to 1000 steps, since every step costs one network evaluation; pass
`--ddpm_steps 1000` to time the full chain. Protocol as bench_models.py (benchmarks/protocol.py).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol


def main() -> None:
  parser = protocol.common_args(argparse.ArgumentParser(description=__doc__), "ddpm_cifar10",
                                rounds=2, iters=1, batch=2)
  parser.add_argument("--ddpm_steps", type=int, default=100)
  parser.add_argument("--ddim_steps", type=int, default=50)
  a = parser.parse_args()
  for task, steps, target in (("ddpm", a.ddpm_steps, 1000), ("ddim", a.ddim_steps, a.ddim_steps)):
    scale = target / steps / a.batch
    per = (f"image at {target} steps" + (f" (extrapolated from {steps} steps)"
                                        if steps != target else ""))
    protocol.compare(task, a.models.split(","), batch=a.batch, iters=a.iters, rounds=a.rounds,
                     steps=steps, dtype=a.dtype, extra_jax=protocol.jax_args(a), torch_side=not a.no_torch,
                     force_ratio=a.force_ratio, huge_pages=a.huge_pages, per=per, scale=scale)


if __name__ == "__main__":
  main()
