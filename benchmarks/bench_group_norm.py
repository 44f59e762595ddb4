"""GroupNorm + SiLU at every place one ddpm_cifar10 forward pass uses it: the library's
`layers.group_norm`, flax's `nn.GroupNorm` and PyTorch's, forward and gradient.

  python benchmarks/bench_group_norm.py [--batch 8] [--rounds 3] [--iters 5]

The shapes are read off the model (every `layers.GroupNorm` call of one ddpm_cifar10 forward
pass at batch `--batch`, 32 groups, float32). The timed call runs all of them once: `forward`
silu(norm(x)) for each, `grad` the gradient of sum(silu(norm(x)) * w) with respect to x, scale
and bias. Sides, each in its own process, alternated (benchmarks/protocol.py):
  library  `layers.group_norm` (channel sums first; flax's per-group arithmetic for derivatives)
  flax     `flax.linen.GroupNorm` (statistics reduced over each group's strided slice)
  pytorch  `torch.nn.functional.group_norm` on NCHW (its native layout).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol  # noqa: E402

SIDES = ("library", "flax", "pytorch")
MODES = ("forward", "grad")
GROUPS, EPSILON = 32, 1e-6


def norm_shapes(batch: int) -> list[tuple[int, ...]]:
  """The NHWC input shape of every GroupNorm call in one ddpm_cifar10 forward pass."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp

  import diffusion_jax as dj
  from diffusion_jax.models import layers
  module = dj.get_model("ddpm_cifar10", dropout=0.0)
  shapes = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, layers.GroupNorm) and context.method_name == "__call__":
      shapes.append(tuple(args[0].shape))
    return next_fun(*args, **kwargs)
  x, t = jnp.zeros((batch, 32, 32, 3)), jnp.zeros((batch,), jnp.int32)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda: module.init(jax.random.key(0), x, t))
  return shapes


def jax_times(side: str, mode: str, shapes, iters: int) -> list[float]:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp

  from diffusion_jax.models import layers
  keys = jax.random.split(jax.random.key(0), 2 * len(shapes))
  xs = [jax.random.normal(keys[2 * i], s) for i, s in enumerate(shapes)]
  ws = [jax.random.normal(keys[2 * i + 1], s) for i, s in enumerate(shapes)]
  params = [(jnp.ones(s[-1]), jnp.zeros(s[-1])) for s in shapes]

  def norm(x, scale, bias):
    if side == "library":
      return layers.group_norm(x, scale, bias, GROUPS, EPSILON)
    module = nn.GroupNorm(num_groups=GROUPS, epsilon=EPSILON)
    return module.apply({"params": {"scale": scale, "bias": bias}}, x)

  def forward(xs, params):
    return [jax.nn.silu(norm(x, *p)) for x, p in zip(xs, params, strict=True)]

  def loss(xs, params):
    return sum((y * w).sum() for y, w in zip(forward(xs, params), ws, strict=True))
  fn = forward if mode == "forward" else jax.grad(loss, argnums=(0, 1))
  compiled = jax.jit(fn).lower(xs, params).compile()
  return protocol.timed(lambda: jax.block_until_ready(compiled(xs, params)), iters)


def torch_times(mode: str, shapes, iters: int) -> list[float]:
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(protocol.cores())
  nchw = [(b, c, h, w) for b, h, w, c in shapes]
  xs = [torch.randn(s, requires_grad=mode == "grad") for s in nchw]
  ws = [torch.randn(s) for s in nchw]
  params = [(torch.ones(s[1], requires_grad=mode == "grad"),
             torch.zeros(s[1], requires_grad=mode == "grad")) for s in nchw]
  norm = lambda x, p: torch.nn.functional.silu(
      torch.nn.functional.group_norm(x, GROUPS, p[0], p[1], EPSILON))

  def call():
    if mode == "forward":
      with torch.no_grad():
        return [norm(x, p) for x, p in zip(xs, params, strict=True)]
    for t in xs + [q for p in params for q in p]:
      t.grad = None
    sum((norm(x, p) * w).sum() for x, p, w in zip(xs, params, ws, strict=True)).backward()
  call()   # the first call (allocations) is not timed
  return protocol.timed(call, iters)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--modes", default="forward,grad", help="forward and/or grad")
  p.add_argument("--side", choices=SIDES, help="(internal) run one side and print it")
  a = p.parse_args()
  modes = a.modes.split(",")
  if any(m not in MODES for m in modes):
    raise ValueError(f"--modes must be a comma-separated subset of {MODES}, got {a.modes!r}")
  shapes = norm_shapes(a.batch)
  if a.side:
    times = {m: (torch_times(m, shapes, a.iters) if a.side == "pytorch"
                 else jax_times(a.side, m, shapes, a.iters)) for m in modes}
    protocol.emit({"compile_s": float("nan"), "times_s": [], **{m: times[m] for m in modes}})
    return
  print(protocol.machine_line(), flush=True)
  print(f"\nGroupNorm + SiLU, the {len(shapes)} calls of one ddpm_cifar10 forward pass at batch "
        f"{a.batch} (float32), {a.rounds} alternated rounds x {a.iters} calls", flush=True)
  me = [os.path.join("benchmarks", "bench_group_norm.py"), f"--batch={a.batch}",
        f"--iters={a.iters}", f"--modes={a.modes}"]
  before = protocol.print_load("before")
  res = protocol.alternate({side: me + [f"--side={side}"] for side in SIDES}, a.rounds,
                           verbose=False)
  after = protocol.print_load("after")
  verdict = protocol.load_verdict(before, after)
  for mode in modes:
    times = {side: protocol.all_times(results, mode) for side, results in res.items()}
    print(f"\n{mode}:")
    for side in SIDES:
      print(f"  {side:8s} {protocol.fmt_ms(times[side])} per call", flush=True)
    for side in ("flax", "pytorch"):
      print(protocol.ratio_line(f"library vs {side} ({side} time / library time)",
                                times["library"], times[side], verdict), flush=True)


if __name__ == "__main__":
  main()
