"""Gradient time of the text transformer, blocks scanned (`scan_blocks=True`) vs unrolled.

  python benchmarks/bench_text_scan.py --model text_small --batch 2 --seq_len 128 --rounds 2

One gradient of the masked-diffusion NELBO (the training loss, `masked.nelbo`, mean over the
batch) with respect to every parameter, under `jit`; each side in its own process, alternated
(`protocol.alternate`), min / median / max over the timed calls, compile time beside it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import protocol  # noqa: E402


def child(model: str, scan: bool, batch: int, seq_len: int, iters: int) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from diffusion_jax import masked, models  # pylint: disable=g-import-not-at-top
  module = models.get_model(model, scan_blocks=scan)
  params = models.init_params(module, jax.random.key(0), (seq_len,))
  vocab = module.vocab_size
  tokens = jax.random.randint(jax.random.key(1), (batch, seq_len), 0, vocab)
  key = jax.random.key(2)
  schedule = masked.linear()

  def loss(p):
    model_fn = lambda z, t: module.apply({"params": p}, z, t)
    return jnp.mean(masked.nelbo(model_fn, schedule, tokens, key, mask_id=vocab))

  grad = jax.jit(jax.grad(loss))
  t0 = time.perf_counter()
  jax.block_until_ready(grad(params))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(grad(params))
    times.append(time.perf_counter() - t0)
  protocol.emit({"compile_s": compile_s, "times_s": times})


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="text_small")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--child", choices=["scanned", "unrolled"])
  args = parser.parse_args()
  if args.child:
    child(args.model, args.child == "scanned", args.batch, args.seq_len, args.iters)
    return
  print(protocol.machine_line())
  before = protocol.print_load("before")
  argv = lambda side: [os.path.abspath(__file__), "--child", side, "--model", args.model,
                       "--batch", str(args.batch), "--seq_len", str(args.seq_len),
                       "--iters", str(args.iters)]
  results = protocol.alternate({side: argv(side) for side in ("scanned", "unrolled")},
                               args.rounds)
  after = protocol.print_load("after")
  for side, runs in results.items():
    compile_s = ", ".join(f"{r['compile_s']:.1f}" for r in runs)
    print(f"{args.model} gradient, batch {args.batch} x {args.seq_len} tokens, {side}: "
          f"{protocol.fmt_ms(protocol.all_times(runs))}, compile "
          f"{compile_s} s")
  print(protocol.ratio_line("scanned over unrolled", protocol.all_times(results["scanned"]),
                            protocol.all_times(results["unrolled"]),
                            protocol.load_verdict(before, after), force=True))


if __name__ == "__main__":
  main()
