"""Encode and decode throughput of the SD VAE: diffusion_jax (JAX) against diffusers (PyTorch).

  python benchmarks/bench_vae.py                                   # SD VAE, 256x256, batch 1, CPU
  python benchmarks/bench_vae.py --size 64 --batch 4 --rounds 5
  python benchmarks/bench_vae.py --dtype bfloat16 --batch 16 --no-torch   # an accelerator

Each side runs in its own worker process (one builds the JAX model, the other diffusers'
`AutoencoderKL` with the same configuration; random weights, the values do not change the time).
Both workers are built and warmed up first (JAX compiles there); then the parent asks them in
turn, round after round, to time `--iters` calls, so that both see the same machine load. The
machine's load average is printed before and after, with a warning when it exceeds the core count
(a shared machine: the figures are then under load, not the hardware's numbers).
Output: images/s for encode (images -> posterior mean) and decode (latents -> images) per side.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ('encode', 'decode')


def _jax_worker(args: argparse.Namespace):
  """{op: callable running one `op` call and blocking} for the JAX model."""
  sys.path.insert(0, ROOT)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from diffusion_jax.models import autoencoder, get_autoencoder  # pylint: disable=g-import-not-at-top
  dtype = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
  vae = get_autoencoder(args.preset, dtype=dtype)
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(lambda: autoencoder.init_autoencoder(vae, jax.random.key(0)))
  params = jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype), shapes)
  f = vae.downsampling_factor
  x = jnp.asarray(rng.uniform(-1, 1, (args.batch, args.size, args.size, vae.in_channels)), jnp.float32)
  z = jnp.asarray(rng.standard_normal((args.batch, args.size // f, args.size // f,
                                       vae.latent_channels)), jnp.float32)
  enc = jax.jit(lambda p, x: autoencoder.encode(vae, p, x)).lower(params, x).compile()
  dec = jax.jit(lambda p, z: autoencoder.decode(vae, p, z)).lower(params, z).compile()
  info = f'jax={jax.__version__} backend={jax.default_backend()} device={jax.devices()[0].device_kind}'
  return {'encode': lambda: enc(params, x).block_until_ready(),
          'decode': lambda: dec(params, z).block_until_ready()}, info


def _torch_worker(args: argparse.Namespace):
  """{op: callable} for diffusers' AutoencoderKL of the same configuration (CPU, float32)."""
  sys.path.insert(0, ROOT)
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import AutoencoderKL  # pylint: disable=g-import-not-at-top
  from diffusion_jax.models import get_autoencoder  # pylint: disable=g-import-not-at-top
  if args.threads:
    torch.set_num_threads(args.threads)
  vae = get_autoencoder(args.preset)
  levels = len(vae.block_out_channels)
  model = AutoencoderKL(
      in_channels=vae.in_channels, out_channels=vae.out_channels,
      block_out_channels=tuple(vae.block_out_channels), layers_per_block=vae.layers_per_block,
      latent_channels=vae.latent_channels, norm_num_groups=vae.norm_num_groups,
      down_block_types=('DownEncoderBlock2D',) * levels,
      up_block_types=('UpDecoderBlock2D',) * levels).eval()
  rng = np.random.default_rng(0)
  f = vae.downsampling_factor
  x = torch.from_numpy(rng.uniform(-1, 1, (args.batch, vae.in_channels, args.size, args.size))
                       .astype(np.float32))
  z = torch.from_numpy(rng.standard_normal((args.batch, vae.latent_channels, args.size // f,
                                            args.size // f)).astype(np.float32))

  def encode():
    with torch.inference_mode():
      model.encode(x).latent_dist.mean.mul(vae.scaling_factor)

  def decode():
    with torch.inference_mode():
      model.decode(z / vae.scaling_factor)
  return {'encode': encode, 'decode': decode}, f'torch={torch.__version__} threads={torch.get_num_threads()}'


def worker(args: argparse.Namespace) -> None:
  """Build, warm up, print 'ready <info>'; then for each 'run' line print the median seconds per op."""
  fns, info = (_jax_worker if args.worker == 'jax' else _torch_worker)(args)
  for fn in fns.values():
    fn()
  print('ready ' + info, flush=True)
  for line in sys.stdin:
    if line.strip() != 'run':
      break
    result = {}
    for op, fn in fns.items():
      times = []
      for _ in range(args.iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
      result[op] = statistics.median(times)
    print(json.dumps(result), flush=True)


def _load_line(when: str) -> tuple[str, bool]:
  load = os.getloadavg()
  cores = os.cpu_count() or 1
  shared = load[0] > cores
  note = f'  <- above {cores} cores: a SHARED machine, figures are under load' if shared else ''
  return f'load average {when}: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} ({cores} cores){note}', shared


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--preset', default='sd_vae')
  parser.add_argument('--size', type=int, default=256, help='image side in pixels')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                      help='JAX compute dtype (torch runs float32)')
  parser.add_argument('--rounds', type=int, default=3, help='alternating JAX / torch rounds')
  parser.add_argument('--iters', type=int, default=2, help='calls per op per round')
  parser.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
  parser.add_argument('--no-torch', action='store_true')
  parser.add_argument('--worker', choices=('jax', 'torch'), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(args)
    return

  line, shared_before = _load_line('before')
  print(f'machine: {platform.processor() or platform.machine()!r} cores={os.cpu_count()}')
  print(line, flush=True)
  print(f'{args.preset} {args.size}x{args.size} batch {args.batch}, JAX {args.dtype}, '
        f'{args.rounds} rounds x {args.iters} calls (median)', flush=True)
  argv = sys.argv[1:]
  sides = ['jax'] + ([] if args.no_torch else ['torch'])
  procs = {}
  for side in sides:  # built one after the other: compilation does not overlap the other's timing
    procs[side] = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, '--worker', side],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    ready = procs[side].stdout.readline().strip()
    if not ready.startswith('ready'):
      raise RuntimeError(f'{side} worker failed to start (see its stderr above)')
    print(f'{side} worker: {ready[6:]}', flush=True)
  times = {side: {op: [] for op in OPS} for side in sides}
  for _ in range(args.rounds):
    for side in sides:
      procs[side].stdin.write('run\n')
      procs[side].stdin.flush()
      result = json.loads(procs[side].stdout.readline())
      for op in OPS:
        times[side][op].append(result[op])
  for side in sides:
    procs[side].stdin.write('quit\n')
    procs[side].stdin.close()
    procs[side].wait()
  for op in OPS:
    sec = {side: statistics.median(times[side][op]) for side in sides}
    out = f'{op:6s}: ' + ' | '.join(f'{side} {args.batch / sec[side]:7.2f} img/s '
                                     f'({sec[side] * 1e3:.0f} ms/call)' for side in sides)
    if 'torch' in sec:
      out += f' | jax/torch speed {sec["torch"] / sec["jax"]:.2f}x'
    print(out, flush=True)
  line, shared_after = _load_line('after')
  print(line)
  if shared_before or shared_after:
    print('NOTE: the machine was shared (load above the core count): these are not final numbers.')


if __name__ == '__main__':
  main()
