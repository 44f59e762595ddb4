"""Transparent huge pages for XLA:CPU's host buffers: the training entry point restarts itself once
with glibc's malloc tunable `glibc.malloc.hugetlb=1`.

Why: XLA:CPU allocates the temporaries of one execution as one block (933 MB for a DiT-S/2 train
step at batch 8) and frees it when the call returns. glibc serves a block that large with a
fresh `mmap` and returns it with `munmap`, so every step page-faults in every 4 KiB page again,
and the kernel zeroes each one. On the 2-core benchmark machine that was ~224,000 faults and
~0.37 s of system time per DiT-S/2 train step. With the tunable, glibc asks the kernel for
transparent huge pages on its mmaps (madvise(MADV_HUGEPAGE)): a fault maps 2 MiB, and the same step
took ~510 faults and ~0.07 s of system time (benchmarks/README.md). Unlike
`diffusion_jax.host_memory.keep_freed_memory` it costs no compile time and keeps no memory.

glibc reads its tunables once, when a process starts, so a running process cannot turn this on
for itself: `python -m experiments.train` execs itself again (same pid, arguments and
environment, plus `GLIBC_TUNABLES=...:glibc.malloc.hugetlb=1`) before it imports JAX.
`--nohuge_pages` turns that off. It needs Linux, glibc >= 2.35 and transparent huge pages not
set to `never` (/sys/kernel/mm/transparent_hugepage/enabled); elsewhere the run goes on as it
is. In a notebook or another program, start Python with the variable set:

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 jupyter lab

Only the standard library is imported here, so the restart happens before the heavy imports.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
FLAG = "huge_pages"
FLAG_HELP = ("CPU runs: restart once with glibc's malloc tunable glibc.malloc.hugetlb=1, so "
             "XLA:CPU's large per-step buffers are mapped with transparent huge pages instead of "
             "being page-faulted in 4 KiB at a time every step (experiments/huge_pages.py).")
# absl's spellings of a false boolean flag.
_FALSE_VALUES = ("false", "f", "0")


def unavailable_reason(thp_setting: str = THP_SETTING) -> str | None:
  """Why the tunable cannot work in this process (a sentence), or None when it can."""
  if not sys.platform.startswith("linux"):
    return f"needs Linux (this is {sys.platform})"
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    major_minor = tuple(int(part) for part in version.split(".")[:2])
  except (AttributeError, OSError, ValueError):
    return "needs glibc (the C library here is not glibc)"
  if name != "glibc" or major_minor < (2, 35):
    return f"needs glibc >= 2.35 (this is {name} {version})"
  try:
    with open(thp_setting) as f:
      setting = f.read()
  except OSError:
    return f"this kernel has no transparent huge pages ({thp_setting} is missing)"
  if "[never]" in setting:
    return f"transparent huge pages are off on this machine ({thp_setting}: {setting.strip()})"
  return None


def active(environ: Mapping[str, str] = os.environ) -> bool:
  """Whether the tunable is in this process's environment (so glibc read it at start-up)."""
  return TUNABLE in environ.get("GLIBC_TUNABLES", "").split(":")


def requested(argv: Sequence[str]) -> bool:
  """False when the command line turns the restart off: --nohuge_pages or --huge_pages=false
  (absl's spellings, one or two dashes)."""
  for arg in argv:
    if arg == "--":
      break
    if not arg.startswith("-"):
      continue
    name, _, value = arg.lstrip("-").partition("=")
    if name == "no" + FLAG and not value:
      return False
    if name == FLAG and value.lower() in _FALSE_VALUES:
      return False
  return True


def environment_with_tunable(environ: Mapping[str, str]) -> dict[str, str]:
  """A copy of `environ` whose GLIBC_TUNABLES also holds the tunable (glibc joins tunables with
  ':')."""
  env = dict(environ)
  env["GLIBC_TUNABLES"] = ":".join(t for t in (environ.get("GLIBC_TUNABLES", ""), TUNABLE) if t)
  return env


def restart_with_huge_pages(argv: Sequence[str]) -> None:
  """Execs this Python process again with the tunable set, unless it is set already, the command
  line `argv` turns it off or it cannot work here (then it returns and nothing changed).

  Call it first thing in an entry point's `__main__` block, before JAX is imported. The new
  process has the same pid (signals and launchers are unaffected) and the same interpreter
  options and arguments (`sys.orig_argv`).
  """
  if active() or not requested(argv) or unavailable_reason() is not None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
              environment_with_tunable(os.environ))
  except OSError:   # no usable interpreter path: go on without huge pages
    return


def describe(wanted: bool) -> str:
  """One line for the run's log: whether huge pages are on, and if not why (`wanted`: the parsed
  --huge_pages flag)."""
  if active():
    return f"on (GLIBC_TUNABLES has {TUNABLE})"
  if not wanted:
    return f"off (--no{FLAG})"
  reason = unavailable_reason()
  return f"unavailable: {reason}" if reason else "off (the restart did not happen)"
