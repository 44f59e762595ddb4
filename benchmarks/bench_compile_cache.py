"""Start-up of a second `experiments.sample` call with and without the persistent compilation cache.

  python benchmarks/bench_compile_cache.py --workdir runs/digits [--num_samples 16] [--rounds 3]

Each call is its own process (`python -m experiments.sample ...`, wall time of the whole
process: imports, restore, compile or cache load, sampling, writing). One untimed call fills a
fresh cache directory first; then calls with `--compile_cache=<that dir>` and with
`--compile_cache=` (off) alternate. Load average printed before and after; no ratio under load
(benchmarks/protocol.py).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol


def sample_call(workdir: str, out: str, num_samples: int, cache: str) -> float:
  cmd = [sys.executable, "-m", "experiments.sample", f"--workdir={workdir}",
         f"--num_samples={num_samples}", f"--out={out}", f"--compile_cache={cache}"]
  env = dict(os.environ, PYTHONPATH=protocol.ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=protocol.ROOT, env=env, capture_output=True, text=True,
                        check=False)
  sec = time.perf_counter() - t0
  if proc.returncode:
    raise RuntimeError(f"{cmd} failed:\n{proc.stderr[-3000:]}")
  return sec


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a trained run (e.g. the Quickstart digits)")
  p.add_argument("--num_samples", type=int, default=16)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--force_ratio", action="store_true")
  a = p.parse_args()
  workdir = os.path.abspath(a.workdir)
  print(protocol.machine_line(), flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    cache, out = os.path.join(tmp, "cache"), os.path.join(tmp, "samples.npz")
    fill = sample_call(workdir, out, a.num_samples, cache)
    files = sum(len(f) for _, _, f in os.walk(cache))
    print(f"first call, filling the cache: {fill:.1f} s ({files} cache files)", flush=True)
    before = protocol.print_load("before")
    times = {"cache on": [], "cache off": []}
    for r in range(a.rounds):
      for name, c in (("cache on", cache), ("cache off", "")):
        times[name].append(sample_call(workdir, out, a.num_samples, c))
        print(f"    round {r + 1} {name:9s}: {times[name][-1]:.1f} s  (load "
              f"{protocol.loadavg()[0]:.2f})", flush=True)
    after = protocol.print_load("after")
  for name, ts in times.items():
    lo, med, hi = protocol.spread(ts)
    print(f"  {name:9s}: {med:.1f} s per call (min {lo:.1f}, max {hi:.1f})")
  print(protocol.ratio_line("start-up, cache off time / cache on time", times["cache on"],
                            times["cache off"], protocol.load_verdict(before, after),
                            a.force_ratio))


if __name__ == "__main__":
  main()
