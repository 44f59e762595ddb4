"""Where one JAX train step spends its time, op by op (XLA:CPU thunks), for ddpm_cifar10 / DiT.

  python benchmarks/profile_step.py --model DiT-S/2 [--batch 8] [--steps 3] [--top 30]

The step is bench_train.py's (`get_model` + `dj.training_loss` + `optax.adam` under `jit`, random
weights). It runs twice untimed, then `--steps` times under `jax.profiler.trace` with
`XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true`, which records one event per executed thunk. The
events are read back with `jax._src.lib._profile_data.ProfileData`. Printed: the `--top` thunks by
time per step, and the time per step of each op class (the thunk name's prefix: `ynn_fusion` is
YNNPACK's matmuls and convolutions, `wrapped_broadcast` a broadcast such as the zero-filling of
a scan's stacked buffers, other `*fusion` names XLA's elementwise fusions). Times are summed over
thunks: where thunks run concurrently, the sum exceeds the wall time. To map a thunk to the model
code, dump the optimized HLO (`--xla_dump_to=DIR`) and read the instruction's `op_name` metadata.
Take figures on an idle machine only (benchmarks/protocol.py).
"""
import argparse
import collections
import glob
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_enable_xprof_traceme=true").strip()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import protocol  # noqa: E402
from jax._src.lib import _profile_data  # noqa: E402

import diffusion_jax as dj  # noqa: E402

# Events that are not thunks: the executor's own spans, Python frames, thread-pool waits.
_NOT_OPS = ("ThunkExecutor", "$", "PjitFunction", "CommonPjRt", "SlinkyThreadPool", "Handle ",
            "ParseArguments", "AllocateOutput", "Wait for", "DevicePut", "end: ",
            "PythonRefManager", "ThreadpoolListener")


def op_class(name: str) -> str:
  """'ynn_fusion.42' -> 'ynn_fusion'; 'copy_bitcast_fusion.5' -> 'copy';
  'multiply_tanh_fusion' -> 'elementwise fusion'."""
  base = name.split(".")[0]
  for prefix in ("ynn_fusion", "wrapped_broadcast", "copy", "transpose"):
    if base.startswith(prefix):   # copy_bitcast_fusion: a transposed copy, not arithmetic
      return prefix
  return "elementwise fusion" if base.endswith("fusion") else base


def train_step(model: str, batch: int):
  """(jitted step, its arguments) as in benchmarks/workloads.py's 'train' task."""
  size, cin, ncls = (32, 4, 1000) if model.startswith("DiT-") else (32, 3, 0)
  kw = {"learn_sigma": False} if model.startswith("DiT-") else {"dropout": 0.0}
  module = dj.get_model(model, **kw)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-1, 1, (batch, size, size, cin)), jnp.float32)
  y = jnp.asarray(rng.integers(0, ncls, batch), jnp.int32) if ncls else None
  t = jnp.zeros((batch,), jnp.int32)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x, t, y)["params"])
  params = jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype),
                        shapes)
  schedule = dj.get_schedule("linear", 1000)
  tx = optax.adam(2e-4)

  def step(p, opt, x, key):
    loss = lambda p: dj.training_loss(lambda xt, tt: module.apply({"params": p}, xt, tt, y),
                                      schedule, x, key).mean()
    value, grads = jax.value_and_grad(loss)(p)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt, value
  return jax.jit(step, donate_argnums=(0, 1)), [params, tx.init(params), x, jax.random.key(1)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="DiT-S/2")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--top", type=int, default=30)
  a = parser.parse_args()
  print(protocol.machine_line(), flush=True)
  before = protocol.print_load("before")
  step, args = train_step(a.model, a.batch)

  def run():
    args[0], args[1], value = step(*args)
    value.block_until_ready()
  for _ in range(2):
    run()
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(a.steps):
        run()
    path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
    profile = _profile_data.ProfileData.from_file(path)
  per_op: collections.Counter = collections.Counter()
  calls: collections.Counter = collections.Counter()
  for plane in profile.planes:
    for line in plane.lines:
      for event in line.events:
        if not event.name.startswith(_NOT_OPS):
          per_op[event.name] += event.duration_ns
          calls[event.name] += 1
  after = protocol.print_load("after")
  verdict = protocol.load_verdict(before, after, own_threads=protocol.cores())
  ms = lambda ns: ns / a.steps / 1e6
  total = sum(per_op.values())
  print(f"\n{a.model} train step, batch {a.batch}: {ms(total):.0f} ms of thunk time per step"
        + (f"  [UNDER LOAD: {verdict}]" if verdict else ""))
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
