"""Encode and decode throughput of the SD VAE: diffusion_jax (JAX) against diffusers (PyTorch).

  python benchmarks/bench_vae.py                                   # SD VAE, 256x256, batch 1, CPU
  python benchmarks/bench_vae.py --size 64 --batch 4 --rounds 5
  python benchmarks/bench_vae.py --dtype bfloat16 --batch 16 --no-torch   # an accelerator

Each side runs in its own worker process (one builds the JAX model, the other diffusers'
`AutoencoderKL` with the same configuration; random weights, the values do not change the time).
Both workers are built and warmed up first (JAX compiles there); then the parent asks them in
turn, round after round, to time `--iters` calls, so that both see the same machine load.
Protocol (`protocol.py`): the load average before and after; min / median / max over all timed
calls; build + first-call time (JAX: compilation) beside them; no ratio when the machine was
loaded (1-min load above 0.5 x cores or moving by more than 0.5; `--force_ratio` prints it
marked UNDER LOAD).
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
OPS = ("encode", "decode")


def _jax_worker(args: argparse.Namespace):
  """{op: callable running one `op` call and blocking} for the JAX model."""
  sys.path.insert(0, ROOT)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from diffusion_jax.models import autoencoder, get_autoencoder  # pylint: disable=g-import-not-at-top
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
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
  info = f"jax={jax.__version__} backend={jax.default_backend()} device={jax.devices()[0].device_kind}"
  return {"encode": lambda: enc(params, x).block_until_ready(),
          "decode": lambda: dec(params, z).block_until_ready()}, info


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
      down_block_types=("DownEncoderBlock2D",) * levels,
      up_block_types=("UpDecoderBlock2D",) * levels).eval()
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
  return {"encode": encode, "decode": decode}, f"torch={torch.__version__} threads={torch.get_num_threads()}"


def worker(args: argparse.Namespace) -> None:
  """Build, warm up, print 'ready {json: info, build + first-call seconds}'; then for each 'run'
  line print {op: [seconds of each of --iters calls]}."""
  t0 = time.perf_counter()
  fns, info = (_jax_worker if args.worker == "jax" else _torch_worker)(args)
  first = {}
  for op, fn in fns.items():  # JAX compiles in _jax_worker: its time is in the first op's figure
    fn()
    first[op] = time.perf_counter() - t0
    t0 = time.perf_counter()
  print("ready " + json.dumps({"info": info, "first_s": first}), flush=True)
  for line in sys.stdin:
    if line.strip() != "run":
      break
    result = {}
    for op, fn in fns.items():
      times = []
      for _ in range(args.iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
      result[op] = times
    print(json.dumps(result), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="sd_vae")
  parser.add_argument("--size", type=int, default=256, help="image side in pixels")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="JAX compute dtype (torch runs float32)")
  parser.add_argument("--rounds", type=int, default=3, help="alternating JAX / torch rounds")
  parser.add_argument("--iters", type=int, default=2, help="calls per op per round")
  parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--force_ratio", action="store_true",
                      help="print the ratio even when the load check fails (marked UNDER LOAD)")
  parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(args)
    return

  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import protocol  # pylint: disable=g-import-not-at-top
  print(f"machine: {platform.processor() or platform.machine()!r} cores={protocol.cores()}")
  before = protocol.print_load("before")
  print(f"{args.preset} {args.size}x{args.size} batch {args.batch}, JAX {args.dtype}, "
        f"{args.rounds} alternated rounds x {args.iters} calls", flush=True)
  argv = [a for a in sys.argv[1:] if a != "--force_ratio"]
  sides = ["jax"] + ([] if args.no_torch else ["torch"])
  procs, first = {}, {}
  for side in sides:  # built one after the other: compilation does not overlap the other's timing
    procs[side] = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, "--worker", side],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    ready = procs[side].stdout.readline().strip()
    if not ready.startswith("ready"):
      raise RuntimeError(f"{side} worker failed to start (see its stderr above)")
    meta = json.loads(ready[6:])
    first[side] = meta["first_s"]
    print(f'{side} worker: {meta["info"]}; build + first call: '
          + ", ".join(f"{op} {sec:.1f} s" for op, sec in meta["first_s"].items()), flush=True)
  times = {side: {op: [] for op in OPS} for side in sides}
  for _ in range(args.rounds):
    for side in sides:
      procs[side].stdin.write("run\n")
      procs[side].stdin.flush()
      result = json.loads(procs[side].stdout.readline())
      for op in OPS:
        times[side][op].extend(result[op])
  for side in sides:
    procs[side].stdin.write("quit\n")
    procs[side].stdin.close()
    procs[side].wait()
  after = protocol.print_load("after")
  verdict = protocol.load_verdict(before, after)
  for op in OPS:
    for side in sides:
      med = statistics.median(times[side][op])
      print(f"{op:6s} {side:5s}: {args.batch / med:8.2f} img/s (median); "
            f"{protocol.fmt_ms(times[side][op])} per call of {args.batch}", flush=True)
    if "torch" in sides:
      print(protocol.ratio_line(f"{op} JAX vs PyTorch (PyTorch time / JAX time)",
                                times["jax"][op], times["torch"][op], verdict, args.force_ratio))
  if verdict:
    print(f"NOTE: {verdict}: the machine was shared, these are not final numbers.")


if __name__ == "__main__":
  main()
