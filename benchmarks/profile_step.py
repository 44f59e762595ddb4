"""Where one JAX train step (or forward pass) spends its time, op by op (XLA:CPU thunks), for
ddpm_cifar10 / DiT.

  python benchmarks/profile_step.py --model DiT-S/2 [--batch 8] [--steps 3] [--top 30] [--task forward]

The step is bench_train.py's (`workloads.jax_train_step`: `get_model` + `dj.training_loss` +
`optax.adam` under `jit`, random weights). It runs twice untimed, then `--steps` times under `jax.profiler.trace` with
`XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true`, which records one event per executed thunk. The
events are read back by `trace_summary.py`. Printed: the `--top` thunks by
time per step, and the time per step of each op class (the thunk name's prefix: `ynn_fusion` is
YNNPACK's matmuls and convolutions, `wrapped_broadcast` a broadcast such as the zero-filling of
a scan's stacked buffers, other `*fusion` names XLA's elementwise fusions). Times are summed over
thunks: where thunks run concurrently, the sum exceeds the wall time. To map a thunk to the model
code, dump the optimized HLO (`--xla_dump_to=DIR`) and read the instruction's `op_name` metadata.
Take figures on an idle machine only (benchmarks/protocol.py).
"""
import argparse
import collections
import os
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_enable_xprof_traceme=true").strip()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import protocol  # noqa: E402
import trace_summary  # noqa: E402
import workloads  # noqa: E402

def op_class(name: str) -> str:
  """'ynn_fusion.42' -> 'ynn_fusion'; 'copy_bitcast_fusion.5' -> 'copy';
  'multiply_tanh_fusion' -> 'elementwise fusion'."""
  base = name.split(".")[0]
  for prefix in ("ynn_fusion", "wrapped_broadcast", "copy", "transpose", "convolution"):
    if base.startswith(prefix):   # copy_bitcast_fusion: a transposed copy, not arithmetic
      return prefix
  return "elementwise fusion" if base.endswith("fusion") else base


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="DiT-S/2")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--top", type=int, default=30)
  parser.add_argument("--task", default="train", choices=("train", "forward"),
                      help="the train step (default) or one forward pass (bench_models.py's)")
  parser.add_argument("--convolutions", default="ynnpack", choices=("xla", "ynnpack"),
                      help="YNNPACK's convolution kernels (JAX's default) or XLA's own (opt-in)")
  parser.add_argument("--host_memory", default="release", choices=("release", "keep"),
                      help="glibc's default malloc, or freed memory kept (diffusion_jax.host_memory)")
  a = parser.parse_args()
  protocol.use_host_memory(a.host_memory)
  protocol.use_convolutions(a.convolutions)
  print(protocol.machine_line(), flush=True)
  before = protocol.print_load("before")
  if a.task == "train":
    step, args = workloads.jax_train_step(a.model, a.batch)

    def run():
      args[0], args[1], value = step(*args)
      value.block_until_ready()
  else:
    module, params, x, t, y = workloads.jax_setup(a.model, a.batch, "float32")
    forward = jax.jit(lambda p, x, t: module.apply({"params": p}, x, t, y))
    run = lambda: forward(params, x, t).block_until_ready()
  for _ in range(2):
    run()
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      t0 = time.perf_counter()
      for _ in range(a.steps):
        run()
      wall_ms = (time.perf_counter() - t0) / a.steps * 1e3
    per_op, calls = collections.Counter(), collections.Counter()
    for ns, n in trace_summary.events_by_plane(trace_summary.xplane_file(trace_dir)).values():
      per_op.update(ns)
      calls.update(n)
  after = protocol.print_load("after")
  verdict = protocol.load_verdict(before, after, own_threads=protocol.cores())
  ms = lambda ns: ns / a.steps / 1e6
  total = sum(per_op.values())
  print(f"\n{a.model} {a.task}, batch {a.batch}: {ms(total):.0f} ms of thunk time per step, "
        f"{wall_ms:.0f} ms wall time per profiled step"
        + (f"  [UNDER LOAD: {verdict}]" if verdict else ""))
  if ms(total) < 0.8 * wall_ms:
    print("  (the thunk events cover less than the step. With --convolutions=ynnpack they "
          "cover all of it, so the missing time is most likely XLA's own convolutions, whose "
          "work these events do not capture)")
  print(f"\nthe {a.top} largest thunks (ms per step, executions per step):")
  for name, ns in per_op.most_common(a.top):
    print(f"  {ms(ns):8.1f}  {calls[name] // a.steps:4d}x  {name}")
  by_class: collections.Counter = collections.Counter()
  for name, ns in per_op.items():
    by_class[op_class(name)] += ns
  print("\nby op class:")
  for name, ns in by_class.most_common():
    print(f"  {name:22s} {ms(ns):8.1f} ms  {100 * ns / total:5.1f} %")


if __name__ == "__main__":
  main()
