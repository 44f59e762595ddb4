"""A workload in its default setting and in a variant: each in its own process, alternated.

  python benchmarks/bench_variant.py --task train --models ddpm_cifar10 \
      --flags=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution
  python benchmarks/bench_variant.py --task train --models ddpm_cifar10,DiT-S/2 \
      --variant_args=--host_memory=keep
  python benchmarks/bench_variant.py --side torch --models DiT-S/2 --variant_args=--dtype=bfloat16
  python benchmarks/bench_variant.py --models DiT-S/2 --variant_env GLIBC_TUNABLES=glibc.malloc.hugetlb=1
  git worktree add --detach ../before HEAD~1
  python benchmarks/bench_variant.py --models DiT-S/2 --variant_tree ../before

Both sides run `workloads.py --side jax --convolutions=ynnpack --host_memory=release` (JAX's and
glibc's defaults; the workload adds no setting of its own), or with `--side torch` PyTorch's side
(the JAX-only settings do not reach it). The variant also gets
`XLA_FLAGS=<--flags>`, the environment variables `--variant_env NAME=VALUE` (repeatable), the
extra workload arguments `--variant_args` (space-separated; a later argument overrides the
default above), and with `--variant_tree DIR` the code of another checkout: DIR's
`benchmarks/workloads.py` and `diffusion_jax` (a code change measured against the code before
it; each side prints the package it ran). `--huge_pages` starts both sides' processes with
glibc's huge-page tunable (the trainer's default). Prints the spreads, compile times, page faults
per call and the speed-up default time / variant time, refused under load (benchmarks/protocol.py). This
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
  p.add_argument("--variant_env", action="append", default=[], metavar="NAME=VALUE",
                 help="an environment variable of the variant's process (repeatable)")
  p.add_argument("--variant_tree", default=None,
                 help="another checkout of this repository whose code the variant runs")
  p.add_argument("--huge_pages", action="store_true",
                 help="both sides' processes start with glibc's huge-page tunable (as "
                      "python -m experiments.train does; protocol.child_env)")
  p.add_argument("--force_ratio", action="store_true",
                 help="print the ratio even when the load check fails (marked UNDER LOAD)")
  a = p.parse_args()
  variant_env = dict(item.split("=", 1) for item in a.variant_env if "=" in item)
  if len(variant_env) != len(a.variant_env):
    raise SystemExit(f"--variant_env takes NAME=VALUE, got {a.variant_env}")
  if a.flags:
    variant_env["XLA_FLAGS"] = a.flags
  if a.variant_tree and not os.path.isfile(os.path.join(a.variant_tree, "benchmarks",
                                                        "workloads.py")):
    raise SystemExit(f"--variant_tree {a.variant_tree!r} is not a checkout of this repository")
  if not (variant_env or a.variant_args or a.variant_tree):
    raise SystemExit("give the variant: --flags, --variant_env, --variant_args and/or "
                     "--variant_tree")
  if os.environ.get("XLA_FLAGS"):
    raise SystemExit(f"unset XLA_FLAGS first (it is {os.environ['XLA_FLAGS']!r}): the default "
                     "side must run with JAX's defaults")
  both_env = protocol.child_env(a.huge_pages)
  print(protocol.machine_line(), flush=True)
  if both_env:
    print(f"both sides' processes start with GLIBC_TUNABLES={both_env['GLIBC_TUNABLES']}",
          flush=True)
  workload = os.path.join("benchmarks", "workloads.py")
  variant_workload = (os.path.join(os.path.abspath(a.variant_tree), workload) if a.variant_tree
                      else workload)
  for model in a.models.split(","):
    argv = ["--side", a.side, "--task", a.task, "--model", model, f"--batch={a.batch}",
            f"--iters={a.iters}", f"--dtype={a.dtype}", "--convolutions=ynnpack",
            "--host_memory=release"]
    print(f"\n{model} {a.task}, batch {a.batch}, {a.rounds} alternated rounds x {a.iters} timed "
          f"calls; variant: environment {variant_env}, arguments {a.variant_args!r}, code "
          f"{a.variant_tree or 'this checkout'}", flush=True)
    before = protocol.print_load("before")
    default, variant = f"{a.side} default", f"{a.side} variant"
    res = protocol.alternate({default: [workload, *argv],
                              variant: [variant_workload, *argv, *a.variant_args.split()]},
                             a.rounds, env={default: both_env, variant: {**both_env, **variant_env}})
    after = protocol.print_load("after")
    for name, rs in res.items():
      comp = [r["compile_s"] for r in rs]
      package = rs[0].get("package")
      print(f"  {name:13s} {protocol.fmt_ms(protocol.all_times(rs))} per call; "
            f"{'compile' if a.side == 'jax' else 'first call'} {statistics.median(comp):.2f} s"
            f"{protocol.faults_note(rs)}" + (f"; code {package}" if package else ""), flush=True)
    print(protocol.ratio_line(f"{model} {a.task}, default time / variant time",
                              protocol.all_times(res[variant]), protocol.all_times(res[default]),
                              protocol.load_verdict(before, after), a.force_ratio), flush=True)


if __name__ == "__main__":
  main()
