"""XLA:CPU's own convolutions instead of YNNPACK's: faster U-Net training on CPU.

jax 0.10's XLA:CPU hands every convolution to YNNPACK. For the U-Nets here, XLA's own
convolutions were faster, above all their kernel gradients. ddpm_cifar10 at batch 8, idle
2-core AMD EPYC machines (benchmarks/README.md):
- AVX-512: train step 987 ms with XLA's convolutions against 1138 ms with YNNPACK's
  (1.15x), forward pass 258 against 288 ms; one 3x3 kernel gradient (8x32x32x128 -> 128) 6.0
  against 9.7 ms;
- AVX2 (Zen 3): train step 2671 against 4741 ms (1.78x), forward pass 879 against 959 ms.
The DiT, whose only convolution is the patch embedding, and the text models do not change.
Matmuls stay with YNNPACK.

XLA's convolution kernels give results that depend on the batch size and on the number of host
devices, at float32 rounding: with them, the FID of `experiments.evaluate` on 1 and on 8 devices
differed in the 8th significant digit, and one pixel in 6144 of a uint8 sample grid differed
between a 2-device and an 8-device process. With YNNPACK's kernels both are bit for bit the same
(tests/test_evaluation_run.py). A train step's gradient has no such property to lose (it is a
sum over the batch, and the device count splits that sum), so:

- one program: `compiler_options('xla')` is a `jax.jit(..., compiler_options=...)` argument that
  compiles that program with XLA's convolutions and leaves every other program alone. The
  trainer does this for its train step by default (config `train.cpu_convolutions='xla'`; its
  sampling and evaluation keep YNNPACK's). A notebook's own step:

      step = jax.jit(step, compiler_options=xla_cpu.compiler_options("xla"))

- the whole process, sampling and evaluation included: an XLA flag, read once when JAX creates
  its CPU backend. For the entry points, set it in the environment:

      XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution python -m experiments.sample ...

  In a notebook, call `use_xla_convolutions()` before the first JAX computation.

A user's own `XLA_FLAGS` setting of `xla_cpu_experimental_ynn_fusion_type` is left alone (then
`compiler_options` returns None). Both are ignored on GPU and TPU.
"""
from __future__ import annotations

import logging
import os

FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
FLAG = f"--{FLAG_NAME}=-individual_convolution"
CONVOLUTIONS = ("xla", "ynnpack")
# jax 0.10.2's XLA:CPU gives YNNPACK its dots, convolutions and reductions by default. A per-program
# option names the whole list (it takes no +/- edits), so this is that default without
# convolutions: a program compiled with it is the one `FLAG` gives, instruction for instruction
# (tests/test_xla_cpu.py compares the two, so a jaxlib with another default list fails there).
WITHOUT_CONVOLUTIONS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"


def compiler_options(convolutions: str, name: str = "convolutions") -> dict[str, str] | None:
  """`compiler_options` for `jax.jit` that pick one program's convolution kernels on CPU.

  Args:
    convolutions: 'xla' (XLA's own kernels) or 'ynnpack' (JAX's default).
    name: what the caller calls `convolutions` (e.g. a config key), for the ValueError.
  Returns:
    {FLAG_NAME: WITHOUT_CONVOLUTIONS} for 'xla' on a CPU backend; None (JAX's defaults) for
    'ynnpack', on other backends, and when the user's `XLA_FLAGS` already names `FLAG_NAME`
    (their setting wins, as in `use_xla_convolutions`).
  """
  if convolutions not in CONVOLUTIONS:
    raise ValueError(f"{name} must be one of {CONVOLUTIONS}, got {convolutions!r}")
  import jax  # pylint: disable=g-import-not-at-top  (the module stays importable before JAX)
  if (convolutions == "ynnpack" or jax.default_backend() != "cpu"
      or FLAG_NAME in os.environ.get("XLA_FLAGS", "")):
    return None
  return {FLAG_NAME: WITHOUT_CONVOLUTIONS}


def backends_initialized() -> bool:
  """Whether JAX has created its backends (after which process-level settings such as XLA
  flags can no longer take effect)."""
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):   # a JAX without it: assume not yet
    return False


def use_xla_convolutions() -> bool:
  """Adds `FLAG` to `XLA_FLAGS` unless it already names `FLAG_NAME`.

  Returns whether `XLA_FLAGS` now holds `FLAG`: False when the user's own setting differs, and
  False with a warning when JAX's backends already exist (the flag could no longer take effect).
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if FLAG_NAME in flags:
    return FLAG in flags.split()
  if backends_initialized():
    logging.warning("xla_cpu.use_xla_convolutions() was called after JAX created its backends; "
                    "call it before the first JAX computation for it to take effect.")
    return False
  os.environ["XLA_FLAGS"] = (flags + " " + FLAG).strip()
  return True
