"""Forward-pass throughput of the model presets, against diffusers (PyTorch) in the same run.

  python benchmarks/bench_models.py --batch 8                      # CPU: ddpm_cifar10 + DiT-S/2
  python benchmarks/bench_models.py --models DiT-XL/2 --batch 64 --dtype bfloat16 --no-torch  # GPU

Prints the machine, then images/s per model; with torch (default on CPU) the diffusers
`UNet2DModel` / `DiTTransformer2DModel` of the same configuration is timed in alternating rounds
with the JAX model (so both see the same machine load), and the ratio JAX / torch is printed.
On an accelerator it also prints achieved TFLOP/s (XLA's cost analysis of the compiled forward)
against a measured bf16 matmul peak.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from diffusion_jax.models import get_model  # noqa: E402

IMAGE = {'ddpm_cifar10': (32, 3), 'ddpm_256': (256, 3), 'unet_digits': (16, 1)}


def machine() -> str:
  devs = jax.devices()
  return (f'processor={platform.processor() or platform.machine()!r} cores={os.cpu_count()} '
          f'jax={jax.__version__} backend={jax.default_backend()} '
          f'devices={len(devs)}x{devs[0].device_kind}')


def _time(fn, iters: int) -> float:
  """Median seconds of one call over `iters` calls (after the caller's warm-up)."""
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def jax_forward(name: str, batch: int, dtype):
  """(callable running one forward and blocking, flops of one forward or None, params)."""
  module = get_model(name, dtype=dtype)
  size, cin = IMAGE.get(name, (32, module.in_channels))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, size, size, cin)), jnp.float32)
  t = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
  y = jnp.asarray(rng.integers(0, module.num_classes, batch), jnp.int32) if module.num_classes \
      else None
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x, t, y))
  # Random params without compiling the initializer (the values do not change the timing).
  params = jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype),
                        shapes)
  fwd = jax.jit(lambda p, x, t, y: module.apply(p, x, t, y))
  compiled = fwd.lower(params, x, t, y).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', 0.0)) if cost else None
  run = lambda: compiled(params, x, t, y).block_until_ready()
  run()
  return run, flops, params


def torch_forward(name: str, batch: int):
  """The diffusers model of the same configuration (random weights), or None if not available."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(2)
  rng = np.random.default_rng(0)
  if name == 'ddpm_cifar10':
    from diffusers import UNet2DModel  # pylint: disable=g-import-not-at-top
    model = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, attention_head_dim=None,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'),
        up_block_types=('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
        downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, layers_per_block=2,
        norm_eps=1e-6, norm_num_groups=32).eval()
    x = torch.from_numpy(rng.standard_normal((batch, 3, 32, 32)).astype(np.float32))
    kwargs = {}
  elif name.startswith('DiT-'):
    from diffusers import DiTTransformer2DModel  # pylint: disable=g-import-not-at-top
    module = get_model(name)
    model = DiTTransformer2DModel(
        num_attention_heads=module.num_heads,
        attention_head_dim=module.hidden_size // module.num_heads, in_channels=4, out_channels=8,
        num_layers=module.depth, sample_size=32, patch_size=module.patch_size,
        num_embeds_ada_norm=1000, norm_eps=1e-6).eval()
    x = torch.from_numpy(rng.standard_normal((batch, 4, 32, 32)).astype(np.float32))
    kwargs = {'class_labels': torch.from_numpy(rng.integers(0, 1000, batch))}
  else:
    return None
  t = torch.from_numpy(rng.integers(0, 1000, batch))

  def run():
    with torch.inference_mode():
      model(x, t, **kwargs)
  run()
  return run


def matmul_peak(dtype) -> float:
  """Measured FLOP/s of a large square matmul in `dtype` (the card's practical peak)."""
  n = 8192
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  sec = _time(lambda: f(a).block_until_ready(), 20)
  return 2 * n ** 3 / sec


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--models', default='ddpm_cifar10,DiT-S/2')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--rounds', type=int, default=3, help='alternating JAX / torch rounds')
  parser.add_argument('--iters', type=int, default=3, help='calls per round')
  parser.add_argument('--no-torch', action='store_true')
  args = parser.parse_args()
  dtype = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
  print(machine())
  if not args.no_torch:
    import torch  # pylint: disable=g-import-not-at-top
    print(f'torch={torch.__version__} threads=2 (torch.set_num_threads)')
  accel = jax.default_backend() != 'cpu'
  peak = matmul_peak(dtype) if accel else None
  if peak:
    print(f'measured {args.dtype} matmul peak (8192^3): {peak / 1e12:.1f} TFLOP/s')
  for name in args.models.split(','):
    run_jax, flops, _ = jax_forward(name, args.batch, dtype)
    run_torch = None if args.no_torch else torch_forward(name, args.batch)
    jax_t, torch_t = [], []
    for _ in range(args.rounds):
      jax_t.append(_time(run_jax, args.iters))
      if run_torch is not None:
        torch_t.append(_time(run_torch, args.iters))
    sec = statistics.median(jax_t)
    line = (f'{name:13s} batch {args.batch} {args.dtype}: jax {args.batch / sec:8.1f} img/s '
            f'({sec * 1e3:.1f} ms/forward)')
    if torch_t:
      tsec = statistics.median(torch_t)
      line += (f' | torch {args.batch / tsec:8.1f} img/s '
               f'| ratio jax/torch {tsec / sec:.2f}x')
    if flops and accel:
      line += f' | {flops / sec / 1e12:.1f} TFLOP/s ({flops / sec / peak:.0%} of matmul peak)'
    if flops:
      line += f' | {flops / args.batch / 1e9:.2f} GFLOP/img (XLA count)'
    print(line, flush=True)


if __name__ == '__main__':
  main()
