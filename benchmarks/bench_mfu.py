"""Model FLOPs utilisation (MFU) of the JAX train step against the device's measured matmul peak.

  python benchmarks/bench_mfu.py --model DiT-XL/2 --batch 32,64 --dtype bfloat16  # a GPU
  python benchmarks/bench_mfu.py --model DiT-S/2 --batch 4 --peak_size 2048       # CPU smoke

Issue 12's accelerator goal: a DiT-XL/2 bfloat16 train step at >= 50 % of the card's measured
matmul peak. Measured in one process on the default device:
- peak: an [n, n] @ [n, n] matmul in the step's dtype (`--peak_size` n), FLOP/s = 2 n^3 / the
  median call;
- model FLOPs per step: 3 x the forward pass's FLOPs as XLA counts them
  (`cost_analysis()['flops']` of the lowered forward, blocks unrolled and attention through
  jax.nn's 'xla' kernel: the cost analysis counts a loop body once and a custom call such as
  cuDNN's attention not at all), the usual convention (one forward, two for the backward;
  recomputation and the optimizer are not counted). Cross-check: DiT reports 6.06 / 118.6
  GFLOPs (multiply-adds) per image for DiT-S/2 / DiT-XL/2 at 256px, so XLA's count (2 FLOPs per
  multiply-add) should print about twice that;
- step time: the median of `--iters` calls of `workloads.jax_train_step` (bench_train.py's step:
  `dj.training_loss` + `optax.adam`, random weights; DiT inputs are 32x32x4 latents, i.e. 256px
  images through the SD VAE, with class labels), after one warm-up call.
MFU = model FLOPs / step time / peak. Prints the machine and the load average before and after
(benchmarks/protocol.py); a figure taken under load is not final.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import protocol  # noqa: E402
import trace_summary  # noqa: E402
import workloads  # noqa: E402

PROFILED_STEPS = 3


def xla_flops(lowered) -> float:
  """FLOPs of a lowered (or compiled) computation as XLA's cost analysis counts them."""
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):   # older jax: one dict per computation
    cost = cost[0]
  if not cost or "flops" not in cost:
    raise RuntimeError("XLA's cost analysis gave no 'flops' on this backend")
  return float(cost["flops"])


def matmul_peak(n: int, dtype: str, iters: int) -> float:
  """Measured FLOP/s of an [n, n] @ [n, n] matmul in `dtype` on the default device."""
  dt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  a = jax.random.normal(jax.random.key(0), (n, n), dt)
  b = jax.random.normal(jax.random.key(1), (n, n), dt)
  matmul = jax.jit(lambda a, b: a @ b).lower(a, b).compile()
  return 2.0 * n ** 3 / statistics.median(protocol.timed(lambda: matmul(a, b).block_until_ready(), iters))


def forward_flops_per_image(model: str, module, params, dtype: str) -> float:
  """XLA's FLOP count of one image's forward pass (batch 1), counted on the unrolled network with
  jax.nn's 'xla' attention: XLA's cost analysis counts a loop body once, not once per iteration,
  so scanned blocks would be undercounted depth-fold, and it does not see inside a custom call,
  so cuDNN's fused attention (the GPU default) would count as 0 FLOPs (DiT-XL/2: 230.41 instead
  of 239.04 GFLOP). The lowered (not compiled) program is counted where the backend can (CPU),
  else the compiled one (GPU gives no count before compiling)."""
  fields = {"scan_blocks": False, "attention": "xla"}
  flat = module.clone(**{k: v for k, v in fields.items() if hasattr(module, k)})
  _, _, x, t, y = workloads.jax_setup(model, 1, dtype, params=params)
  lowered = jax.jit(lambda p, x, t: flat.apply({"params": p}, x, t, y)).lower(params, x, t)
  try:
    return xla_flops(lowered)
  except RuntimeError:
    return xla_flops(lowered.compile())


def measure(model: str, setup: tuple, dtype: str, iters: int, peak: float, peak_size: int,
            flops_per_image: float, profile_dir: str | None = None):
  """Times the train step on `setup` (`workloads.jax_setup`'s tuple) and prints its MFU; with
  `profile_dir`, then traces PROFILED_STEPS more steps there and prints the device planes' kernel
  times (`trace_summary`). Returns the parameters after the steps (the step donates its
  inputs)."""
  _, _, x, _, _ = setup
  batch = x.shape[0]
  forward_flops = flops_per_image * batch
  model_flops = 3.0 * forward_flops
  step, args = workloads.jax_train_step(model, batch, dtype, setup=setup)
  t0 = time.perf_counter()
  compiled = step.lower(*args).compile()
  compile_s = time.perf_counter() - t0

  def run():
    args[0], args[1], value = compiled(*args)
    value.block_until_ready()
  seconds = statistics.median(protocol.timed(run, iters))
  achieved = model_flops / seconds
  print(f"{model} train step, batch {batch}, {dtype}: {seconds * 1e3:.1f} ms (median of "
        f"{iters}), {batch / seconds:.0f} images/s, compile {compile_s:.1f} s")
  print(f"  model FLOPs per step: 3 x {batch} x {flops_per_image / 1e9:.2f} GFLOP (XLA's count of "
        f"one image's forward pass) = {model_flops / 1e12:.3f} TFLOP")
  print(f"  {achieved / 1e12:.2f} TFLOP/s: MFU {100 * achieved / peak:.1f} % of the measured "
        "matmul peak", flush=True)
  if achieved > peak:
    print(f"  the step beat the {peak_size}^3 matmul: that matmul is too small to reach the "
          "device's peak; rerun with a larger --peak_size")
  if profile_dir:
    with jax.profiler.trace(profile_dir):
      for _ in range(PROFILED_STEPS):
        run()
    path = trace_summary.xplane_file(profile_dir)
    print(f"  profile of {PROFILED_STEPS} steps: {path}")
    trace_summary.print_device_summary(path, PROFILED_STEPS)
  return args[0]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="DiT-XL/2")
  parser.add_argument("--batch", default="32", help="batch sizes, comma-separated (one set of "
                      "random weights serves them all)")
  parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--peak_size", type=int, default=8192)
  parser.add_argument("--profile_dir", default=None,
                      help="trace the first batch size's step into this folder and print its "
                      "kernel times (benchmarks/trace_summary.py)")
  parser.add_argument("--model_kwargs", default="{}",
                      help="JSON of module fields to override, e.g. '{\"scan_blocks\": false}', "
                      "or a list of such objects: variants measured one after the other in this "
                      "process (one matmul peak, one set of weights, one FLOP count)")
  a = parser.parse_args()
  variants = json.loads(a.model_kwargs)
  variants = variants if isinstance(variants, list) else [variants]
  batches = [int(b) for b in a.batch.split(",")]
  print(protocol.machine_line(), flush=True)
  before = protocol.print_load("before")

  peak = matmul_peak(a.peak_size, a.dtype, a.iters)
  print(f"matmul peak ({a.dtype}, {a.peak_size}^3): {peak / 1e12:.2f} TFLOP/s", flush=True)
  params = per_image = None
  for overrides in variants:
    for batch in batches:
      module, params, x, t, y = workloads.jax_setup(a.model, batch, a.dtype, params=params)
      if per_image is None:   # the overrides change how, not what, the network computes
        try:
          per_image = forward_flops_per_image(a.model, module, params, a.dtype)
        except RuntimeError as e:   # the step is still timed; the MFU prints as nan
          print(f"no FLOP count: {e}")
          per_image = float("nan")
      if overrides:
        print(f"variant {json.dumps(overrides)}:")
      try:
        params = measure(a.model, (module.clone(**overrides), params, x, t, y), a.dtype, a.iters,
                         peak, a.peak_size, per_image,
                         a.profile_dir if (batch, overrides) == (batches[0], variants[0]) else None)
      except Exception as e:  # pylint: disable=broad-except  (one variant must not stop the rest)
        print(f"  {a.model}, batch {batch}, variant {json.dumps(overrides)} failed: "
              f"{type(e).__name__}: {str(e)[:400]}", flush=True)
        params = None   # the failed step may have consumed (donated) them: draw new ones
  after = protocol.print_load("after")
  verdict = protocol.load_verdict(before, after)
  if verdict:
    print(f"UNDER LOAD: {verdict}: these figures are not final")


if __name__ == "__main__":
  main()
