"""Reads a `jax.profiler.trace` back: time per event name, per plane (host, each GPU).

  python benchmarks/trace_summary.py TRACE_DIR [--top 30] [--steps N]

Used by profile_step.py (XLA:CPU thunks: the host plane) and bench_mfu.py --profile_dir (GPU
kernels: the '/device:GPU:k' planes). Events are read with
`jax._src.lib._profile_data.ProfileData`. Times are summed per event name: where events overlap
(concurrent thunks, several streams) the sum exceeds the wall time.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os

from jax._src.lib import _profile_data

# Host events that are not ops: the executor's own spans, Python frames, thread-pool waits.
NOT_OPS = ("ThunkExecutor", "$", "PjitFunction", "CommonPjRt", "SlinkyThreadPool", "Handle ",
           "ParseArguments", "AllocateOutput", "Wait for", "DevicePut", "end: ",
           "PythonRefManager", "ThreadpoolListener")
# Substrings of GPU kernel names that are matrix multiplications (cuBLAS / cuBLASLt / CUTLASS).
MATMUL_KERNELS = ("gemm", "cublas", "cutlass", "nvjet", "xmma", "matmul", "wgmma")


def xplane_file(trace_dir: str) -> str:
  paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
  return max(paths, key=os.path.getmtime)


def events_by_plane(path: str) -> dict[str, tuple[collections.Counter, collections.Counter]]:
  """plane name -> (total ns per event name, calls per event name), host spans in NOT_OPS left
  out."""
  out = {}
  for plane in _profile_data.ProfileData.from_file(path).planes:
    ns, calls = collections.Counter(), collections.Counter()
    for line in plane.lines:
      for event in line.events:
        if not event.name.startswith(NOT_OPS):
          ns[event.name] += event.duration_ns
          calls[event.name] += 1
    if ns:
      out[plane.name] = (ns, calls)
  return out


def gpu_kernel_class(name: str) -> str:
  low = name.lower()
  if any(k in low for k in MATMUL_KERNELS):
    return "matmul"
  if "fusion" in low or "loop_" in low or "input_" in low:
    return "XLA fusion"
  if "memcpy" in low or "memset" in low or "copy" in low:
    return "copy / memset"
  if "attention" in low or "fmha" in low or "flash" in low:
    return "fused attention"
  return "other"


def print_device_summary(path: str, steps: int, top: int = 25) -> None:
  """Per GPU plane: busy time per step, the `top` kernels and the time by kernel class."""
  planes = {k: v for k, v in events_by_plane(path).items() if k.startswith("/device:")}
  if not planes:
    print("  (no device planes in the trace: a CPU run; profile_step.py reads host thunks)")
  for name, (ns, calls) in planes.items():
    total = sum(ns.values())
    print(f"\n{name}: {total / steps / 1e6:.1f} ms of kernel time per step")
    for kernel, t in ns.most_common(top):
      print(f"  {t / steps / 1e6:8.2f} ms  {calls[kernel] // steps:4d}x  {kernel[:110]}")
    by_class = collections.Counter()
    for kernel, t in ns.items():
      by_class[gpu_kernel_class(kernel)] += t
    for cls, t in by_class.most_common():
      print(f"  {cls:16s} {t / steps / 1e6:8.2f} ms  {100 * t / total:5.1f} %")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("trace_dir")
  p.add_argument("--top", type=int, default=30)
  p.add_argument("--steps", type=int, default=1, help="steps the trace holds (per-step figures)")
  a = p.parse_args()
  path = xplane_file(a.trace_dir)
  for name, (ns, calls) in events_by_plane(path).items():
    total = sum(ns.values())
    print(f"\n{name}: {total / a.steps / 1e6:.1f} ms of events per step")
    for event, t in ns.most_common(a.top):
      print(f"  {t / a.steps / 1e6:8.2f} ms  {calls[event] // a.steps:4d}x  {event[:110]}")


if __name__ == "__main__":
  main()
