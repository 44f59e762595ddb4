"""Sampling throughput: fused `lax.scan` samplers against a Python loop of jitted steps.

  python -m benchmarks.bench_samplers                      # small conv net, T = 1000, + U-Net
  python -m benchmarks.bench_samplers --unet_steps=0       # small net only
  python -m benchmarks.bench_samplers --batch=64 --unet_batch=8 --unet_steps=50

Prints the machine, then for each model: images/s and network evaluations (NFE)/s of the fused
1000-step DDPM sampler and of the same steps driven from Python (one jitted step per call), and
their ratio; compile time and XLA's memory estimate of the fused sampler for T = 1000 vs T = 10;
DPM-Solver++ (20 steps) time against the 1000-step sampler. All ratios come from one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

import diffusion_jax as dj
from diffusion_jax import models
from diffusion_jax import reverse
from diffusion_jax import rng as rng_lib
from diffusion_jax.samplers import base


class SmallConv(nn.Module):
  """A small conv net (dispatch-bound): 3 convs of `width` channels with a time embedding."""
  width: int = 16

  @nn.compact
  def __call__(self, x, t):
    emb = nn.Dense(self.width)(jnp.sin(t.astype(jnp.float32)[:, None] / 100.0 * jnp.arange(1, 9)))
    h = nn.swish(nn.Conv(self.width, (3, 3))(x) + emb[:, None, None, :])
    h = nn.swish(nn.Conv(self.width, (3, 3))(h))
    return nn.Conv(x.shape[-1], (3, 3))(h)


def machine() -> str:
  return (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} backend={jax.default_backend()} devices={jax.devices()}")


def timed(fn, *args, repeats: int = 2) -> float:
  """Best wall time of fn(*args) (already compiled) over `repeats` runs."""
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def fused_ddpm(apply, schedule, shape):
  return jax.jit(lambda params, key: dj.sample(lambda x, t: apply(params, x, t), schedule, shape,
                                               key, thresholding="clip"))


def loop_ddpm(apply, schedule, shape):
  """The same ancestral steps (same noise streams) driven by a Python loop of a jitted step."""
  num_steps = schedule.num_timesteps

  @jax.jit
  def step(params, x, keys, t_scalar):
    t = jnp.full((shape[0],), t_scalar, jnp.int32)
    noise = base.step_noise(keys, t_scalar, shape)
    x_prev, _ = reverse.p_sample(schedule, apply(params, x, t), x, t, None, noise=noise)
    return x_prev

  def run(params, key):
    keys = rng_lib.example_keys(key, shape[0])
    x = base.initial_noise(keys, shape, num_steps, None)
    for t in range(num_steps - 1, -1, -1):
      x = step(params, x, keys, jnp.int32(t))
    return x

  return run


def dpm_solver(apply, schedule, shape, steps):
  respaced, timesteps = dj.respace(schedule, f"linspace{steps}")
  sampler = dj.get_sampler("dpm_solver++")
  fn = jax.jit(lambda params, key, s, ts: sampler(lambda x, t: apply(params, x, t), s, shape, key,
                                                   timesteps=ts))
  return lambda params, key: fn(params, key, respaced, timesteps)


def compile_stats(apply, params, num_timesteps, shape):
  schedule, _ = dj.respace(dj.get_schedule("linear", 1000), num_timesteps)
  start = time.perf_counter()
  compiled = fused_ddpm(apply, schedule, shape).lower(params, jax.random.key(0)).compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  temp = getattr(memory, "temp_size_in_bytes", float("nan")) if memory is not None else float("nan")
  return seconds, temp


def bench_model(name, module, params_shape, batch, steps, dpm_steps, apply_kwargs=None):
  apply_kwargs = apply_kwargs or {}
  shape = (batch,) + params_shape
  x = jnp.zeros(shape)
  t = jnp.zeros((batch,), jnp.int32)
  params = module.init(jax.random.key(0), x, t, **apply_kwargs)
  apply = lambda p, x, t: module.apply(p, x, t, **apply_kwargs)
  schedule = dj.get_schedule("linear", 1000)
  if steps < 1000:   # a shorter respaced ancestral chain when 1000 U-Net steps are too slow here
    schedule, _ = dj.respace(schedule, steps)
  key = jax.random.key(1)
  fused, loop = fused_ddpm(apply, schedule, shape), loop_ddpm(apply, schedule, shape)
  jax.block_until_ready(fused(params, key))
  jax.block_until_ready(loop(params, key))
  t_fused, t_loop = timed(fused, params, key), timed(loop, params, key)
  n = schedule.num_timesteps
  print(f"[{name}] batch {batch}, {n} ancestral steps")
  print(f"  fused scan : {batch / t_fused:9.2f} images/s  {n * batch / t_fused:10.1f} NFE/s "
        f"({t_fused:.3f} s)")
  print(f"  python loop: {batch / t_loop:9.2f} images/s  {n * batch / t_loop:10.1f} NFE/s "
        f"({t_loop:.3f} s)")
  print(f"  fused / loop speed-up: {t_loop / t_fused:.2f}x")
  if dpm_steps:
    dpm = dpm_solver(apply, dj.get_schedule("linear", 1000), shape, dpm_steps)
    jax.block_until_ready(dpm(params, key))
    t_dpm = timed(dpm, params, key)
    per_step_ratio = (t_dpm / dpm_steps) / (t_fused / n)
    print(f"  dpm_solver++ {dpm_steps} steps: {t_dpm:.3f} s = {t_dpm / t_fused:.4f} of the "
          f"{n}-step sampler (step count ratio {dpm_steps / n:.4f}; time per step ratio "
          f"{per_step_ratio:.2f})")
  return params, apply


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--unet_batch", type=int, default=2)
  parser.add_argument("--unet_steps", type=int, default=10,
                      help="ancestral steps for the ddpm_cifar10 U-Net (0 skips it)")
  parser.add_argument("--dpm_steps", type=int, default=20)
  args = parser.parse_args()
  print(machine())

  small = SmallConv()
  params, apply = bench_model("small conv (3 x 16ch, 8x8x1)", small, (8, 8, 1), args.batch, 1000,
                              args.dpm_steps)
  shape = (args.batch, 8, 8, 1)
  (c1000, m1000), (c10, m10) = (compile_stats(apply, params, n, shape) for n in (1000, 10))
  print(f"  fused compile time T=1000: {c1000:.2f} s, T=10: {c10:.2f} s (ratio {c1000 / c10:.2f}); "
        f"XLA temp memory T=1000: {m1000 / 2**20:.2f} MiB, T=10: {m10 / 2**20:.2f} MiB")

  if args.unet_steps:
    unet = models.get_model("ddpm_cifar10")
    bench_model("ddpm_cifar10 U-Net (35.7M params, 32x32x3)", unet, (32, 32, 3), args.unet_batch,
                args.unet_steps, 0, apply_kwargs=dict(train=False))


if __name__ == "__main__":
  main()
