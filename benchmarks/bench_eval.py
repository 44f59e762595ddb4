"""Evaluation cost: FID Inception feature throughput beside the sampling cost of 50k samples.

  python -m benchmarks.bench_eval                          # CPU defaults (small batches)
  python -m benchmarks.bench_eval --batch=256 --unet_batch=256 --dtypes=float32,bfloat16  # GPU

Prints the machine and load, then: Inception feature images/s (32x32 inputs resized to 299, the
CIFAR-10 case; random weights: the speed does not depend on their values) for each --dtypes;
the ddpm_cifar10 U-Net's fused sampler rate (NFE/s at --unet_batch, measured over --unet_steps
respaced ancestral steps), and from it the time of 50,000 samples at 1000 steps and at 50 DDIM
steps (EXTRAPOLATED from that measured rate: one network evaluation per image per step), and
of their 50,000 Inception feature passes (extrapolated from the measured feature rate).
"""
from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

import diffusion_jax as dj
from benchmarks.bench_samplers import fused_ddpm, machine, timed
from diffusion_jax import models
from diffusion_jax.evaluation import inception

NUM_SAMPLES = 50_000


def inception_rate(batch: int, dtype) -> float:
  """Images/s of the Inception features (pool and logits) on 32x32x3 uint8 inputs."""
  params = inception.init_params(jax.random.PRNGKey(0))
  net = inception.InceptionV3(dtype=dtype)
  fn = jax.jit(lambda p, x: net.apply({"params": p}, x))
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), np.uint8))
  jax.block_until_ready(fn(params, images))
  return batch / timed(fn, params, images)


def unet_nfe_rate(batch: int, steps: int) -> float:
  """Image-NFE/s (images x network evaluations per second) of the fused ddpm_cifar10 sampler."""
  unet = models.get_model("ddpm_cifar10")
  shape = (batch, 32, 32, 3)
  params = unet.init(jax.random.key(0), jnp.zeros(shape), jnp.zeros((batch,), jnp.int32),
                     train=False)
  apply = lambda p, x, t: unet.apply(p, x, t, train=False)
  schedule, _ = dj.respace(dj.get_schedule("linear", 1000), steps)
  fn = fused_ddpm(apply, schedule, shape)
  key = jax.random.key(1)
  jax.block_until_ready(fn(params, key))
  return batch * steps / timed(fn, params, key)


def hours(seconds: float) -> str:
  return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8, help="Inception batch")
  parser.add_argument("--dtypes", default="float32", help="Inception compute dtypes, comma-separated")
  parser.add_argument("--unet_batch", type=int, default=4)
  parser.add_argument("--unet_steps", type=int, default=4, help="0 skips the sampler")
  args = parser.parse_args()
  print(machine())
  print(f"load average before: {os.getloadavg()}")
  feature_rate = None
  for name in args.dtypes.split(","):
    rate = inception_rate(args.batch, jnp.dtype(name))
    feature_rate = feature_rate or rate
    print(f"Inception features ({name}, batch {args.batch}, 32x32 -> 299): {rate:.2f} images/s; "
          f"50k images: {hours(NUM_SAMPLES / rate)}")
  if args.unet_steps:
    nfe = unet_nfe_rate(args.unet_batch, args.unet_steps)
    print(f"ddpm_cifar10 fused sampler (batch {args.unet_batch}, measured over "
          f"{args.unet_steps} steps): {nfe:.2f} image-NFE/s")
    for steps, what in ((1000, "DDPM 1000 steps"), (50, "DDIM 50 steps")):
      sampling = NUM_SAMPLES * steps / nfe
      print(f"  50k samples, {what}: {hours(sampling)} (extrapolated from the measured rate); "
            f"features add {hours(NUM_SAMPLES / feature_rate)} = "
            f"{100 * (NUM_SAMPLES / feature_rate) / sampling:.2f}% of the sampling time")
  print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
  main()
