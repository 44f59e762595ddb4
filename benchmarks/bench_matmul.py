"""Matmul rate of JAX (XLA:CPU or the GPU) and PyTorch on this machine, float32 and bfloat16.

  python benchmarks/bench_matmul.py [--n 2048] [--dtypes float32,bfloat16] [--rounds 2]

An [n, n] @ [n, n] product, FLOP/s = 2 n^3 / the median call, each side in its own process,
alternated (benchmarks/protocol.py). What it showed on this project's CPU (AVX-512 BF16, no AMX):
PyTorch's bfloat16 matmul runs at about twice JAX's float32 rate, JAX's bfloat16 matmul below
its float32 one, which bounds every bfloat16 comparison of the two (benchmarks/README.md).
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol  # noqa: E402


def jax_rate(n: int, dtype: str, iters: int) -> list[float]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  dt = jnp.dtype(dtype)
  a = jax.random.normal(jax.random.key(0), (n, n), dt)
  b = jax.random.normal(jax.random.key(1), (n, n), dt)
  matmul = jax.jit(lambda a, b: a @ b).lower(a, b).compile()
  return protocol.timed(lambda: matmul(a, b).block_until_ready(), iters)


def torch_rate(n: int, dtype: str, iters: int) -> list[float]:
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(protocol.cores())
  device = "cuda" if torch.cuda.is_available() else "cpu"
  dt = getattr(torch, dtype)
  a = torch.randn(n, n, dtype=dt, device=device)
  b = torch.randn(n, n, dtype=dt, device=device)

  def call():
    a @ b
    if device == "cuda":
      torch.cuda.synchronize()
  return protocol.timed(call, iters)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--n", type=int, default=2048)
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--side", choices=("jax", "torch"), help="(internal) run one side and print it")
  p.add_argument("--dtype", default="float32", help="(internal) the side's dtype")
  a = p.parse_args()
  if a.side:
    times = (jax_rate if a.side == "jax" else torch_rate)(a.n, a.dtype, a.iters)
    protocol.emit({"compile_s": float("nan"), "times_s": times})
    return
  print(protocol.machine_line(), flush=True)
  for dtype in a.dtypes.split(","):
    me = [os.path.join("benchmarks", "bench_matmul.py"), f"--n={a.n}", f"--iters={a.iters}",
          f"--dtype={dtype}"]
    print(f"\n[{a.n}, {a.n}] @ [{a.n}, {a.n}] {dtype}, {a.rounds} alternated rounds x {a.iters} "
          "calls", flush=True)
    before = protocol.print_load("before")
    res = protocol.alternate({"jax": me + ["--side=jax"], "pytorch": me + ["--side=torch"]},
                             a.rounds, verbose=False)
    after = protocol.print_load("after")
    verdict = protocol.load_verdict(before, after)
    for side, results in res.items():
      rate = 2.0 * a.n ** 3 / statistics.median(protocol.all_times(results)) / 1e12
      print(f"  {side:8s} {rate:.3f} TFLOP/s (median call)"
            + (f"  [UNDER LOAD: {verdict}]" if verdict else ""), flush=True)


if __name__ == "__main__":
  main()
