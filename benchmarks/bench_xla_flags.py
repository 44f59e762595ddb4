"""A JAX workload with and without extra XLA flags: each variant in its own process, alternated.

  python benchmarks/bench_xla_flags.py --task train --models ddpm_cifar10 \
      --flags=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution

Both variants run `workloads.py --side jax --convolutions=ynnpack` (so the workload adds no flag
of its own); the variant gets `XLA_FLAGS=<--flags>`, the baseline JAX's defaults. Prints the
spreads, compile times and the speed-up baseline time / variant time, refused under load
(benchmarks/protocol.py). This is how the convolution flag of `diffusion_jax.xla_cpu` was chosen.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol


def main() -> None:
  p = protocol.common_args(argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter), "ddpm_cifar10")
  p.add_argument("--task", default="train", choices=("forward", "train", "ddpm", "ddim"))
  p.add_argument("--flags", required=True, help="XLA_FLAGS of the variant")
  a = p.parse_args()
  if os.environ.get("XLA_FLAGS"):
    raise SystemExit(f"unset XLA_FLAGS first (it is {os.environ['XLA_FLAGS']!r}): the baseline "
                     "must run with JAX's defaults")
  print(protocol.machine_line(), flush=True)
  for model in a.models.split(","):
    argv = [os.path.join("benchmarks", "workloads.py"), "--side", "jax", "--task", a.task,
            "--model", model, f"--batch={a.batch}", f"--iters={a.iters}", f"--dtype={a.dtype}",
            "--convolutions=ynnpack"]
    print(f"\n{model} {a.task}, batch {a.batch}, {a.rounds} alternated rounds x {a.iters} timed "
          f"calls; variant XLA_FLAGS={a.flags!r}", flush=True)
    before = protocol.print_load("before")
    res = protocol.alternate({"jax default": argv, "jax variant": argv}, a.rounds,
                             env={"jax default": {}, "jax variant": {"XLA_FLAGS": a.flags}})
    after = protocol.print_load("after")
    for name, rs in res.items():
      comp = [r["compile_s"] for r in rs]
      print(f"  {name:11s} {protocol.fmt_ms(protocol.all_times(rs))} per call; compile "
            f"{statistics.median(comp):.2f} s", flush=True)
    print(protocol.ratio_line(f"{model} {a.task}, default time / variant time",
                              protocol.all_times(res["jax variant"]),
                              protocol.all_times(res["jax default"]),
                              protocol.load_verdict(before, after), a.force_ratio), flush=True)


if __name__ == "__main__":
  main()
