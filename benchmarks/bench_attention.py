"""Softmax attention's forward pass and gradient: JAX's two kernels and PyTorch's, at one shape.

  python benchmarks/bench_attention.py [--shape 8,256,6,64] [--rounds 3] [--iters 9]

The timed call is the gradient of sum(attention(q, k, v) * w) with respect to q, k and v (one
forward and one backward pass), float32, no mask. Sides, each in its own process, alternated
(benchmarks/protocol.py):
  einsum   `layers.attention(implementation='einsum')` (the library's CPU default: a custom JVP
           rule from the kept probabilities, transposed by JAX);
  xla      `jax.nn.dot_product_attention(implementation='xla')` differentiated by JAX;
  pytorch  `torch.nn.functional.scaled_dot_product_attention` (its fused CPU kernel).
The default shape, [batch, tokens, heads, head_dim] = [8, 256, 6, 64], is one DiT-S/2 block's
attention at batch 8.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol  # noqa: E402

SIDES = ("einsum", "xla", "pytorch")


def jax_times(kernel: str, shape: tuple[int, ...], iters: int) -> list[float]:
  import jax  # pylint: disable=g-import-not-at-top

  from diffusion_jax.models import layers
  q, k, v, w = (jax.random.normal(key, shape) for key in jax.random.split(jax.random.key(0), 4))
  loss = lambda q, k, v: (layers.attention(q, k, v, implementation=kernel) * w).sum()
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
  return protocol.timed(lambda: jax.block_until_ready(grad(q, k, v)), iters)


def torch_times(shape: tuple[int, ...], iters: int) -> list[float]:
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(protocol.cores())
  b, n, heads, head_dim = shape
  q, k, v = (torch.randn(b, heads, n, head_dim, requires_grad=True) for _ in range(3))
  w = torch.randn(b, heads, n, head_dim)

  def call():
    for x in (q, k, v):
      x.grad = None
    (torch.nn.functional.scaled_dot_product_attention(q, k, v) * w).sum().backward()
  call()   # the first call (allocations) is not timed
  return protocol.timed(call, iters)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", default="8,256,6,64", help="batch,tokens,heads,head_dim")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--iters", type=int, default=9)
  p.add_argument("--side", choices=SIDES, help="(internal) run one side and print it")
  a = p.parse_args()
  shape = tuple(int(s) for s in a.shape.split(","))
  if len(shape) != 4:
    raise ValueError(f"--shape must be batch,tokens,heads,head_dim, got {a.shape!r}")
  if a.side:
    times = (torch_times(shape, a.iters) if a.side == "pytorch"
             else jax_times(a.side, shape, a.iters))
    protocol.emit({"compile_s": float("nan"), "times_s": times})
    return
  print(protocol.machine_line(), flush=True)
  me = [os.path.join("benchmarks", "bench_attention.py"), f"--shape={a.shape}",
        f"--iters={a.iters}"]
  print(f"\nattention gradient, q k v [{a.shape}] float32, {a.rounds} alternated rounds x "
        f"{a.iters} calls", flush=True)
  before = protocol.print_load("before")
  res = protocol.alternate({side: me + [f"--side={side}"] for side in SIDES}, a.rounds,
                           verbose=False)
  after = protocol.print_load("after")
  verdict = protocol.load_verdict(before, after)
  times = {side: protocol.all_times(results) for side, results in res.items()}
  for side in SIDES:
    print(f"  {side:8s} {protocol.fmt_ms(times[side])} per call", flush=True)
  for side in ("xla", "pytorch"):
    print(protocol.ratio_line(f"einsum vs {side} ({side} time / einsum time)", times["einsum"],
                              times[side], verdict), flush=True)


if __name__ == "__main__":
  main()
