"""A workload in its default setting and in a variant: each in its own process, alternated.

  python benchmarks/bench_variant.py --task train --models ddpm_cifar10 \
      --flags=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution
  python benchmarks/bench_variant.py --task train --models ddpm_cifar10,DiT-S/2 \
      --variant_args=--host_memory=keep
  python benchmarks/bench_variant.py --side torch --models DiT-S/2 --variant_args=--dtype=bfloat16

Both sides run `workloads.py --side jax --convolutions=ynnpack --host_memory=release` (JAX's and
glibc's defaults; the workload adds no setting of its own), or with `--side torch` PyTorch's side
(the JAX-only settings do not reach it). The variant also gets
`XLA_FLAGS=<--flags>` and the extra workload arguments `--variant_args` (space-separated; a later
argument overrides the default above). Prints the spreads, compile times, page faults per call
and the speed-up default time / variant time, refused under load (benchmarks/protocol.py). This
is how the opt-ins `diffusion_jax.xla_cpu` and `diffusion_jax.host_memory` were measured.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--side", default="jax", choices=("jax", "torch"))
  p.add_argument("--models", default="ddpm_cifar10")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--rounds", type=int, default=3, help="alternated rounds per side")
  p.add_argument("--iters", type=int, default=3, help="timed calls per round")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--task", default="train", choices=("forward", "train", "ddpm", "ddim"))
  p.add_argument("--flags", default="", help="XLA_FLAGS of the variant")
  p.add_argument("--variant_args", default="", help="extra workloads.py arguments of the variant")
  p.add_argument("--force_ratio", action="store_true",
                 help="print the ratio even when the load check fails (marked UNDER LOAD)")
  a = p.parse_args()
  if not (a.flags or a.variant_args):
    raise SystemExit("give the variant: --flags and/or --variant_args")
  if os.environ.get("XLA_FLAGS"):
    raise SystemExit(f"unset XLA_FLAGS first (it is {os.environ['XLA_FLAGS']!r}): the default "
                     "side must run with JAX's defaults")
  print(protocol.machine_line(), flush=True)
  for model in a.models.split(","):
    argv = [os.path.join("benchmarks", "workloads.py"), "--side", a.side, "--task", a.task,
            "--model", model, f"--batch={a.batch}", f"--iters={a.iters}", f"--dtype={a.dtype}",
            "--convolutions=ynnpack", "--host_memory=release"]
    print(f"\n{model} {a.task}, batch {a.batch}, {a.rounds} alternated rounds x {a.iters} timed "
          f"calls; variant: XLA_FLAGS={a.flags!r}, arguments {a.variant_args!r}", flush=True)
    before = protocol.print_load("before")
    default, variant = f"{a.side} default", f"{a.side} variant"
    res = protocol.alternate({default: argv, variant: argv + a.variant_args.split()},
                             a.rounds, env={default: {}, variant: {"XLA_FLAGS": a.flags}}
                             if a.flags else None)
    after = protocol.print_load("after")
    for name, rs in res.items():
      comp = [r["compile_s"] for r in rs]
      print(f"  {name:13s} {protocol.fmt_ms(protocol.all_times(rs))} per call; "
            f"{'compile' if a.side == 'jax' else 'first call'} {statistics.median(comp):.2f} s"
            f"{protocol.faults_note(rs)}", flush=True)
    print(protocol.ratio_line(f"{model} {a.task}, default time / variant time",
                              protocol.all_times(res[variant]), protocol.all_times(res[default]),
                              protocol.load_verdict(before, after), a.force_ratio), flush=True)


if __name__ == "__main__":
  main()
