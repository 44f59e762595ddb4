"""Every convolution of the ddpm_cifar10 U-Net, JAX vs PyTorch, forward and both gradients.

  python benchmarks/bench_conv_layers.py [--batch 8] [--rounds 3] [--iters 5] [--convolutions ynnpack|xla]

Where the U-Net's train step loses to PyTorch, op by op. The convolutions are read out of the
model itself: the jaxpr of `get_model('ddpm_cifar10').apply` is walked for
`conv_general_dilated` (and for the 1x1 convolutions that `layers.Conv1x1` computes as matmuls
over channels), and each distinct (input, kernel, stride, padding) is timed once and weighted by
how often the network uses it. Per convolution and side:
- forward: the convolution;
- kernel gradient: d(loss)/d(kernel) given the output's cotangent (JAX: `jax.vjp`'s kernel part
  under `jit`; PyTorch: `aten.convolution_backward` with only the weight output);
- input gradient: the same for d(loss)/d(input).
PyTorch runs the same shapes in NCHW with `torch.set_num_threads(cores)` (oneDNN), asymmetric
padding applied with `F.pad` first, as diffusers does for its stride-2 convolutions (the pad is
timed with the forward). A third side, JAX with the 1x1 convolutions as `lax` convolutions
(flax `nn.Conv`'s form), measures what computing them as matmuls gains.
Protocol: benchmarks/protocol.py (each side in its own process,
alternated; load printed before and after; no ratio under load). Each side prints, per shape,
the median over all timed calls; the totals are sums of medians x uses per forward pass.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import protocol

KINDS = ("forward", "kernel_grad", "input_grad")


def unet_convolutions(batch: int) -> list[dict]:
  """The distinct convolutions of ddpm_cifar10's forward pass on [batch, 32, 32, 3], with counts.

  Each entry: lhs [N, H, W, C] and rhs [kh, kw, I, O] shapes (NHWC / HWIO), strides, explicit
  padding ((lo, hi), (lo, hi)) and `uses` (how many times the forward pass applies it).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp

  import diffusion_jax as dj
  from jax.extend import core as jax_core

  module = dj.get_model("ddpm_cifar10", dropout=0.0)
  x = jnp.zeros((batch, 32, 32, 3))
  t = jnp.zeros((batch,), jnp.int32)
  params = jax.eval_shape(lambda: module.init(jax.random.key(0), x, t))["params"]
  jaxpr = jax.make_jaxpr(lambda p: module.apply({"params": p}, x, t))(params)
  found: collections.Counter = collections.Counter()

  def walk(jp) -> None:
    for eqn in jp.eqns:
      if eqn.primitive.name == "dot_general" and [v.aval.ndim for v in eqn.invars] == [4, 2]:
        # layers.Conv1x1: a 1x1 convolution computed as a matmul over channels.
        (lhs_contract, rhs_contract), _ = eqn.params["dimension_numbers"]
        lhs, rhs = (v.aval.shape for v in eqn.invars)
        if tuple(lhs_contract) == (3,) and tuple(rhs_contract) == (0,):
          found[(tuple(lhs), (1, 1) + tuple(rhs), (1, 1), ((0, 0), (0, 0)))] += 1
      if eqn.primitive.name == "conv_general_dilated":
        lhs, rhs = (v.aval.shape for v in eqn.invars)
        dn = eqn.params["dimension_numbers"]
        if (dn.lhs_spec, dn.rhs_spec, dn.out_spec) != ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)):
          raise ValueError(f"expected NHWC / HWIO convolutions, got {dn}")
        if eqn.params["feature_group_count"] != 1 or any(
            d != 1 for d in tuple(eqn.params["lhs_dilation"]) + tuple(eqn.params["rhs_dilation"])):
          raise ValueError("grouped or dilated convolutions are not benchmarked")
        found[(tuple(lhs), tuple(rhs), tuple(eqn.params["window_strides"]),
               tuple(tuple(p) for p in eqn.params["padding"]))] += 1
      for sub in jax_core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jaxpr.jaxpr)
  return [{"lhs": k[0], "rhs": k[1], "strides": k[2], "padding": k[3], "uses": n}
          for k, n in sorted(found.items(), key=lambda kv: (-kv[0][0][1], kv[0][1]))]


def _median_ms(fn, iters: int) -> float:
  return 1e3 * statistics.median(protocol.timed(fn, iters))


def is_pointwise(c: dict) -> bool:
  return tuple(c["rhs"][:2]) == (1, 1) and tuple(c["strides"]) == (1, 1)


def jax_side(convs: list[dict], iters: int, pointwise: str) -> dict:
  """pointwise: 'matmul' times 1x1 convolutions as the model computes them (layers.Conv1x1),
  'conv' as `lax.conv_general_dilated` (flax nn.Conv's form)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import numpy as np
  from jax import lax

  rng = np.random.default_rng(0)
  out = []
  for c in convs:
    def conv(x, w, c=c):
      if pointwise == "matmul" and is_pointwise(c):
        return jnp.einsum("...c,cf->...f", x, w[0, 0])
      return lax.conv_general_dilated(x, w, c["strides"], c["padding"],
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x = jax.device_put(rng.standard_normal(c["lhs"], np.float32))
    w = jax.device_put(0.05 * rng.standard_normal(c["rhs"], np.float32))
    y = jax.eval_shape(conv, x, w)
    g = jax.device_put(rng.standard_normal(y.shape, np.float32))
    fns = {"forward": (jax.jit(conv), (x, w)),
           "kernel_grad": (jax.jit(lambda x, w, g, f=conv: jax.vjp(f, x, w)[1](g)[1]), (x, w, g)),
           "input_grad": (jax.jit(lambda x, w, g, f=conv: jax.vjp(f, x, w)[1](g)[0]), (x, w, g))}
    row = {}
    for kind, (f, args) in fns.items():
      compiled = f.lower(*args).compile()
      row[kind] = _median_ms(lambda compiled=compiled, args=args:
                             jax.block_until_ready(compiled(*args)), iters)
    out.append(row)
  return {"compile_s": 0.0, "times_s": [], "per_conv_ms": out}


def torch_side(convs: list[dict], iters: int, threads: int) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F

  torch.set_num_threads(threads)
  gen = torch.Generator().manual_seed(0)
  out = []
  for c in convs:
    n, h, w_, cin = c["lhs"]
    kh, kw, _, cout = c["rhs"]
    (pt, pb), (pl, pr) = c["padding"]
    symmetric = pt == pb and pl == pr
    x = torch.randn(n, cin, h, w_, generator=gen)
    w = 0.05 * torch.randn(cout, cin, kh, kw, generator=gen)
    pad = [pt, pl] if symmetric else [0, 0]

    def padded(x, symmetric=symmetric, pads=(pl, pr, pt, pb)):
      return x if symmetric else F.pad(x, pads)
    xp = padded(x)
    with torch.no_grad():
      y = F.conv2d(xp, w, stride=c["strides"], padding=pad)
    g = torch.randn(y.shape, generator=gen)

    def backward(mask, xp=xp, w=w, g=g, c=c, pad=pad):
      torch.ops.aten.convolution_backward(g, xp, w, None, list(c["strides"]), pad, [1, 1], False,
                                          [0, 0], 1, mask)

    def forward(x=x, w=w, c=c, pad=pad, padded=padded):
      F.conv2d(padded(x), w, stride=c["strides"], padding=pad)
    with torch.no_grad():
      out.append({"forward": _median_ms(forward, iters),
                  "kernel_grad": _median_ms(lambda: backward([False, True, False]), iters),
                  "input_grad": _median_ms(lambda: backward([True, False, False]), iters)})
  return {"compile_s": 0.0, "times_s": [], "per_conv_ms": out, "threads": threads,
          "torch": torch.__version__}


def report(convs: list[dict], results: dict[str, list[dict]], verdict: str | None) -> None:
  med = {side: [{k: statistics.median(r["per_conv_ms"][i][k] for r in rs) for k in KINDS}
                for i in range(len(convs))] for side, rs in results.items()}
  pointwise = [i for i, c in enumerate(convs) if is_pointwise(c)]
  print("\n1x1 convolutions (JAX): as matmuls (layers.Conv1x1, what the model runs) vs as "
        "convolutions (nn.Conv), sums of medians x uses, ms:")
  for k in KINDS:
    mm, cv = (sum(convs[i]["uses"] * med[side][i][k] for i in pointwise)
              for side in ("jax", "jax_conv1x1"))
    speed = f"speed-up {cv / mm:.2f}x" if not verdict else f"NO RATIO: {verdict}"
    print(f"  {k:12s} matmul {mm:8.1f}   convolution {cv:8.1f}   {speed}")
  print(f"\n{'input NHWC':>18s} {'kernel HWIO':>16s} {'s':>2s} {'uses':>4s} | "
        + " | ".join(f"{k:>11s} JAX / PyTorch ms" for k in KINDS))
  totals = {side: dict.fromkeys(KINDS, 0.0) for side in ("jax", "pytorch")}
  for i, c in enumerate(convs):
    cells = []
    for k in KINDS:
      j, p = med["jax"][i][k], med["pytorch"][i][k]
      cells.append(f"{j:8.2f} / {p:8.2f} ({p / j:4.2f}x)")
      for side in totals:
        totals[side][k] += c["uses"] * med[side][i][k]
    print(f"{str(c['lhs']):>18s} {str(c['rhs']):>16s} {c['strides'][0]:2d} {c['uses']:4d} | "
          + " | ".join(cells))
  print("\ntotal over one forward pass's convolutions (sum of medians x uses), ms:")
  for k in KINDS:
    j, p = totals["jax"][k], totals["pytorch"][k]
    speed = f"speed-up {p / j:.2f}x" if not verdict else f"NO RATIO: {verdict}"
    print(f"  {k:12s} JAX {j:8.1f}   PyTorch {p:8.1f}   {speed}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=3, help="alternated rounds per side")
  parser.add_argument("--iters", type=int, default=5, help="timed calls per shape and round")
  parser.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)
  parser.add_argument("--convs", help=argparse.SUPPRESS)
  parser.add_argument("--pointwise", default="matmul", help=argparse.SUPPRESS)
  parser.add_argument("--convolutions", default="ynnpack", choices=("xla", "ynnpack"),
                      help="JAX's convolution kernels: YNNPACK's (JAX's default) or XLA's own "
                           "(the opt-in diffusion_jax.xla_cpu)")
  a = parser.parse_args()
  if a.side == "jax":
    protocol.use_convolutions(a.convolutions)
  if a.side:
    convs = json.loads(a.convs)
    protocol.emit(jax_side(convs, a.iters, a.pointwise) if a.side == "jax"
                  else torch_side(convs, a.iters, protocol.cores()))
    return
  print(protocol.machine_line(), flush=True)
  convs = unet_convolutions(a.batch)
  print(f"ddpm_cifar10, batch {a.batch}: {len(convs)} distinct convolutions, "
        f"{sum(c['uses'] for c in convs)} per forward pass", flush=True)
  script = os.path.join("benchmarks", "bench_conv_layers.py")
  print(f"JAX convolution kernels: {a.convolutions}", flush=True)
  base = [script, f"--iters={a.iters}", "--convs", json.dumps(convs),
          f"--convolutions={a.convolutions}"]
  before = protocol.print_load("before")
  results = protocol.alternate({"jax": base + ["--side", "jax"],
                                "jax_conv1x1": base + ["--side", "jax", "--pointwise", "conv"],
                                "pytorch": base + ["--side", "torch"]}, a.rounds, verbose=False)
  after = protocol.print_load("after")
  report(convs, results, protocol.load_verdict(before, after))


if __name__ == "__main__":
  main()
