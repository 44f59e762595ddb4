"""Keep freed host memory in the process, so that XLA:CPU's per-call buffers stay paged in.

XLA:CPU allocates the temporary buffers of one execution as one block and frees it when the call
returns: 933 MB for a DiT-S/2 train step at batch 8, 637 MB for ddpm_cifar10 (the
compiled step's `memory_analysis().temp_size_in_bytes`). glibc's malloc
serves a block that large with a fresh `mmap` and returns it with `munmap`. So every call
touches every page of the block anew: a page fault per 4 KiB page, and the kernel zeroes each
page. On the 2-core benchmark machine that was ~228,000 faults and ~0.33 s of system CPU time
per DiT-S/2 train step. With freed memory kept, a step has no faults, and the train steps were
1.07x (DiT-S/2) and 1.15x (ddpm_cifar10) faster (benchmarks/README.md). PyTorch's train steps
pay far less: its tensors are separate, smaller blocks that glibc mostly reuses (5,000-10,000
faults per step in the benchmarks, and the same settings did not speed them up). Its forward
passes do fault more (19,000-61,000 per call), and the settings made its DiT-S/2 forward 1.12x
faster.

`keep_freed_memory()` sets three of glibc's malloc parameters (mallopt(3)):
- one arena for all threads (`M_ARENA_MAX` = 1). A thread's own arena cannot hold a block over
  64 MB, so it would mmap the block again;
- no `mmap` for large blocks (`M_MMAP_MAX` = 0): they come from the heap;
- freed memory at the top of the heap is not handed back to the system unless it exceeds
  2 GiB (`M_TRIM_THRESHOLD`).

The price:
- one arena serialises the allocations of XLA's compiler threads: compiling the ddpm_cifar10
  train step took 8.4-9.1 s against 6.7-6.8 s (setting only `M_ARENA_MAX` gave the same, the
  other two alone did not);
- the process's resident memory stays at its peak (e.g. ~0.9 GB more for the DiT-S/2 step).

So it pays for long runs of models whose steps need more than glibc's 32 MiB mmap limit of
temporaries, on CPU: ddpm_cifar10 saves ~0.15 s per step against ~3 s more compile time. It
did not pay for the Quickstart's digits model: its steps/s did not change, and a 600-step run
took ~5 s longer. On GPU and TPU the host-side buffers are small.
It is therefore opt-in. `python -m experiments.train` has a cheaper cure on by default:
transparent huge pages for malloc's mmaps (experiments/huge_pages.py), which cut the faults
~200-fold at no compile time: 1.16x (DiT-S/2) and 1.14x (ddpm_cifar10) faster train steps,
against 1.07x and 1.15x for this setting (separate runs). Results do not change; only where the
buffers live does. The environment
variables `MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647` do the same
for any process.

`python -m experiments.train --keep_host_memory ...` turns it on. In a notebook, call it before
the first JAX computation. XLA's threads choose their malloc arena at their first allocation, so
a later call may not reach them:

    from diffusion_jax import host_memory
    host_memory.keep_freed_memory()

It works with glibc (Linux) only. Elsewhere it does nothing and returns False.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

from diffusion_jax import xla_cpu

# glibc's <malloc.h> parameter numbers for mallopt(3).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TRIM_THRESHOLD_BYTES = 2**31 - 1   # mallopt takes an int


def _glibc() -> ctypes.CDLL | None:
  """The C library when it is glibc (which has `mallopt` and `gnu_get_libc_version`)."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version   # pylint: disable=pointless-statement
    libc.mallopt                # pylint: disable=pointless-statement
  except (OSError, AttributeError):
    return None
  return libc


def keep_freed_memory() -> bool:
  """Sets glibc's malloc to keep freed memory for reuse (see the module docstring).

  Returns True when all three parameters were set; False (and nothing changed) without glibc.
  Warns when JAX's backends already exist, as XLA's threads may then keep their own arenas.
  """
  libc = _glibc()
  if libc is None:
    return False
  if xla_cpu.backends_initialized():
    logging.warning("host_memory.keep_freed_memory() was called after JAX created its backends; "
                    "call it before the first JAX computation for it to reach XLA's threads.")
  settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
  return all(libc.mallopt(param, value) == 1 for param, value in settings)


def define_flag() -> None:
  """Define the absl flag `--keep_host_memory` (default False) for an entry point."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_bool("keep_host_memory", False,
                    "CPU training of larger models: keep freed host memory in the process (glibc "
                    "malloc settings), so that XLA:CPU's per-step temporaries are not "
                    "page-faulted in again every step; compiling is slower and the resident "
                    "memory stays at its peak (diffusion_jax.host_memory).")
