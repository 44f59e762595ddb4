"""The measuring protocol shared by the benchmarks, so that a printed ratio cannot mislead.

- Each side (JAX, PyTorch, a variant) runs in its own process (`run_child`): no shared thread
  pools, allocator state or import side effects.
- Sides alternate, A B A B ... (`alternate`), so slow drifts of the machine hit both.
- The load average is printed before and after; `load_verdict` refuses a ratio when anything
  besides the benchmark competed for the machine: the 1-min load may rise to the benchmark's own
  threads (one side at a time, each using every core) plus a quarter of the cores, and no
  further. (A rule of "half the cores" on the raw load would refuse every run: the benchmark's
  own two threads lift a 2-core machine's load to ~1.4-2 within a minute.)
- Every figure is reported as min / median / max over all timed calls (`spread`); ratios use
  the medians and are also given as min-over-min.
- Compile (or first-call) time is reported beside the step time.
- `--huge_pages=both` starts every side's process with glibc's transparent-huge-page tunable, as
  `python -m experiments.train` does (experiments/huge_pages.py); `--huge_pages=jax` only the JAX
  side's (PyTorch in glibc's default); by default no side has it.

A child prints one line `RESULT {json}` (`emit`) with at least `compile_s` and `times_s`.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import huge_pages  # noqa: E402  (standard library only)

HUGE_PAGES_CHOICES = ("off", "both", "jax")   # whose processes start with the huge-page tunable
MAX_EXTRA_LOAD_PER_CORE = 0.25   # load allowed beyond the benchmark's own threads


def cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def loadavg() -> tuple[float, float, float]:
  return os.getloadavg()


def machine_line() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
  except OSError:
    pass
  devs = jax.devices()
  tunables = os.environ.get("GLIBC_TUNABLES")
  return (f"machine: {cpu!r}, {cores()} cores, jax {jax.__version__}, backend "
          f"{jax.default_backend()}, {len(devs)} x {devs[0].device_kind}, python "
          f"{platform.python_version()}" + (f", GLIBC_TUNABLES={tunables}" if tunables else ""))


def emit(result: dict[str, Any]) -> None:
  """Print the child's result line (the parent parses the last one)."""
  print("RESULT " + json.dumps(result), flush=True)


def run_child(argv: Sequence[str], env: dict[str, str] | None = None) -> dict[str, Any]:
  """Run `python argv...` from the repository root and return its RESULT dict."""
  full_env = dict(os.environ, **(env or {}))
  full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=full_env, capture_output=True,
                        text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode or not lines:
    raise RuntimeError(f"child {argv} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                       f"{proc.stderr[-4000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def alternate(sides: dict[str, list[str]], rounds: int, verbose: bool = True,
              env: dict[str, dict[str, str]] | None = None) -> dict[str, list[dict[str, Any]]]:
  """Run each side's child `rounds` times, alternating sides; returns side -> list of results."""
  out: dict[str, list[dict[str, Any]]] = {k: [] for k in sides}
  for r in range(rounds):
    for name, argv in sides.items():
      res = run_child(argv, (env or {}).get(name))
      out[name].append(res)
      if verbose:
        ts = res.get("times_s", [])
        what = "compile" if name.startswith("jax") else "first call"
        print(f'    round {r + 1} {name:8s}: {what} {res.get("compile_s", float("nan")):6.2f} s, '
              f'calls {", ".join(f"{t * 1e3:.0f}" for t in ts)} ms  (load '
              f'{loadavg()[0]:.2f})', flush=True)
  return out


def spread(values: Sequence[float]) -> tuple[float, float, float]:
  return min(values), statistics.median(values), max(values)


def fmt_ms(values: Sequence[float]) -> str:
  lo, med, hi = spread(values)
  return f"{med * 1e3:8.1f} ms (min {lo * 1e3:.1f}, max {hi * 1e3:.1f})"


def load_verdict(before: Sequence[float], after: Sequence[float],
                 own_threads: int | None = None) -> str | None:
  """None when the run may be compared, else the reason to refuse a ratio.

  own_threads: runnable threads the benchmark itself keeps busy (default: every core, as each
  side runs alone with all cores); the 1-min load may not exceed that plus
  MAX_EXTRA_LOAD_PER_CORE x cores before or after.
  """
  own = cores() if own_threads is None else own_threads
  limit = own + MAX_EXTRA_LOAD_PER_CORE * cores()
  worst = max(before[0], after[0])
  if worst > limit:
    return (f"1-min load reached {worst:.2f} > {limit:.2f} (the benchmark's own {own} threads "
            f"+ {MAX_EXTRA_LOAD_PER_CORE} x {cores()} cores): something else competed")
  return None


def print_load(tag: str) -> tuple[float, float, float]:
  la = loadavg()
  print(f"load average {tag}: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} ({cores()} cores)", flush=True)
  return la


def ratio_line(label: str, ours: Sequence[float], peer: Sequence[float],
               verdict: str | None, force: bool = False) -> str:
  """'speed-up peer_time / our_time' from medians (and mins), or the refusal."""
  if verdict and not force:
    return f"  {label}: NO RATIO: {verdict}; rerun on an idle machine (or --force_ratio)"
  med = statistics.median(peer) / statistics.median(ours)
  best = min(peer) / min(ours)
  note = f"  [UNDER LOAD: {verdict}]" if verdict else ""
  return f"  {label}: speed-up {med:.2f}x (medians), {best:.2f}x (best of each){note}"


def faults_note(results: Sequence[dict[str, Any]]) -> str:
  """'; N page faults per call' (the median over the timed calls), when the children count them."""
  faults = [f for r in results for f in r.get("faults", [])]
  return f"; {statistics.median(faults):.0f} page faults per call" if faults else ""


def all_times(results: Sequence[dict[str, Any]], key: str = "times_s") -> list[float]:
  return [t for r in results for t in r[key]]


def compare(task: str, models: Sequence[str], *, batch: int, iters: int, rounds: int,
            steps: int = 50, dtype: str = "float32", extra_jax: Sequence[str] = (),
            torch_side: bool = True, force_ratio: bool = False, per: str = "call",
            scale: float = 1.0, huge_pages: str = "off") -> None:
  """Time `task` of each model on the JAX and PyTorch sides, alternated, each in its own process,
  and print spreads, compile times and (when the load allows) the speed-up.

  `dtype` is both sides' compute dtype: JAX's module dtype; PyTorch's autocast for bfloat16.
  `scale` multiplies per-call times for the reported per-`per` figure (e.g. extrapolation from
  the steps run to 1000 steps per image); ratios do not depend on it. `huge_pages`: 'both'
  sides' processes, or only the 'jax' side's, start with the huge-page tunable (`child_env`).
  """
  if huge_pages not in HUGE_PAGES_CHOICES:
    raise ValueError(f"huge_pages must be one of {HUGE_PAGES_CHOICES}, got {huge_pages!r}")
  script = os.path.join("benchmarks", "workloads.py")
  side_env = {"jax": child_env(huge_pages in ("both", "jax")),
              "pytorch": child_env(huge_pages == "both")}
  print(machine_line(), flush=True)
  for name, env in side_env.items():
    if env and (torch_side or name == "jax"):
      print(f"the {name} side's processes start with GLIBC_TUNABLES={env['GLIBC_TUNABLES']}",
            flush=True)
  if torch_side:
    import torch  # pylint: disable=g-import-not-at-top
    where = (f"on {torch.cuda.get_device_name()}, TF32 matmuls and convolutions allowed as in "
             "JAX's default precision" if torch.cuda.is_available()
             else f"torch.set_num_threads({cores()})")
    print(f"torch {torch.__version__}, {where}", flush=True)
  for model in models:
    base = [script, "--task", task, "--model", model, f"--batch={batch}", f"--iters={iters}",
            f"--steps={steps}", f"--dtype={dtype}"]
    sides = {"jax": base + ["--side", "jax", *extra_jax]}
    if torch_side:
      sides["pytorch"] = base + ["--side", "torch"]
    print(f"\n{model} {task}, batch {batch}, {dtype}" + (f", {steps} steps" if task in ("ddpm", "ddim")
                                                 else "") + f", {rounds} alternated rounds x "
          f"{iters} timed calls", flush=True)
    before = print_load("before")
    res = alternate(sides, rounds, env={name: side_env[name] for name in sides})
    after = print_load("after")
    verdict = load_verdict(before, after)
    for name, rs in res.items():
      ts = all_times(rs)
      comp = [r["compile_s"] for r in rs]
      what = "compile" if name == "jax" else "first call"
      line = (f"  {name:8s} {fmt_ms(ts)} per call; {what} {statistics.median(comp):.2f} s "
              f"(min {min(comp):.2f}, max {max(comp):.2f}){faults_note(rs)}")
      if scale != 1.0 or per != "call":
        line += f"; {statistics.median(ts) * scale:.3g} s per {per}"
      print(line, flush=True)
    if torch_side:
      print(ratio_line(f"{model} {task} JAX vs PyTorch (PyTorch time / JAX time)",
                       all_times(res["jax"]), all_times(res["pytorch"]), verdict, force_ratio),
            flush=True)
    elif verdict:
      print(f"  [UNDER LOAD: {verdict}]")


def common_args(parser, models: str, rounds: int = 3, iters: int = 3, batch: int = 8):
  parser.add_argument("--models", default=models)
  parser.add_argument("--batch", type=int, default=batch)
  parser.add_argument("--rounds", type=int, default=rounds, help="alternated rounds per side")
  parser.add_argument("--iters", type=int, default=iters, help="timed calls per round")
  parser.add_argument("--no_torch", action="store_true", help="JAX side only (accelerators)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="compute dtype (JAX: the module's; PyTorch: autocast)")
  parser.add_argument("--convolutions", default="ynnpack", choices=("xla", "ynnpack"),
                      help="JAX side on CPU: YNNPACK's convolutions (JAX's default) or XLA's own "
                           "(the opt-in diffusion_jax.xla_cpu)")
  parser.add_argument("--host_memory", default="release", choices=("release", "keep"),
                      help="JAX side: glibc's default malloc, or freed memory kept in the "
                           "process (the opt-in diffusion_jax.host_memory)")
  parser.add_argument("--huge_pages", default="off", choices=HUGE_PAGES_CHOICES,
                      help="whose processes start with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 "
                           "(transparent huge pages for malloc's mmaps; python -m "
                           "experiments.train's default, experiments/huge_pages.py): no side's, "
                           "both sides' or only JAX's")
  parser.add_argument("--force_ratio", action="store_true",
                      help="print the ratio even when the load check fails (marked UNDER LOAD)")
  return parser


def child_env(huge: bool) -> dict[str, str]:
  """Environment additions for one side's processes: the huge-page tunable when `huge`. Exits
  when it cannot take effect, or when this shell already set it and `huge` is off (the sides
  would inherit it)."""
  if not huge:
    if huge_pages.active():
      raise SystemExit(f"GLIBC_TUNABLES holds {huge_pages.TUNABLE}: unset it, or pass "
                       "--huge_pages to measure with it")
    return {}
  reason = huge_pages.unavailable_reason()
  if reason:
    raise SystemExit(f"--huge_pages: {reason}")
  return {"GLIBC_TUNABLES": huge_pages.environment_with_tunable(os.environ)["GLIBC_TUNABLES"]}


def minor_faults() -> int:
  """Minor page faults of this process so far (first touches of fresh pages)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn, iters: int, faults: list[int] | None = None) -> list[float]:
  """Seconds of each of `iters` calls of fn() (which must block), after one untimed warm-up.
  With a `faults` list, each timed call's minor page faults are appended to it."""
  fn()
  out = []
  for _ in range(iters):
    f0 = minor_faults()
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
    if faults is not None:
      faults.append(minor_faults() - f0)
  return out


def use_host_memory(choice: str) -> None:
  """Before JAX starts: 'keep' turns on the opt-in `diffusion_jax.host_memory` (freed memory
  stays in the process), 'release' keeps glibc's defaults."""
  if choice == "keep":
    from diffusion_jax import host_memory  # pylint: disable=g-import-not-at-top
    if not host_memory.keep_freed_memory():
      raise SystemExit("--host_memory=keep needs glibc's malloc")


def use_convolutions(choice: str) -> None:
  """Before JAX starts: 'xla' turns on the opt-in XLA convolutions (`diffusion_jax.xla_cpu`),
  'ynnpack' keeps JAX's default. Exits when 'xla' cannot take effect."""
  if choice == "xla":
    from diffusion_jax import xla_cpu  # pylint: disable=g-import-not-at-top
    if not xla_cpu.use_xla_convolutions():
      raise SystemExit("--convolutions=xla, but XLA_FLAGS chose otherwise or JAX started early")


def jax_args(args) -> list[str]:
  """The JAX side's workload flags from `common_args`' parsed `args`."""
  return [f"--convolutions={args.convolutions}", f"--host_memory={args.host_memory}"]
