"""XLA:CPU's own convolutions instead of YNNPACK's: faster for the U-Nets on CPU, opt-in.

jax 0.10's XLA:CPU hands every convolution to YNNPACK. For the U-Nets here, XLA's own
convolutions were faster, forward and backward. On the 2-core AMD EPYC benchmark machine, idle,
ddpm_cifar10 at batch 8 took 987 ms per train step with XLA's convolutions against 1138 ms with
YNNPACK's, and 258 ms per forward pass against 288 ms. One 3x3 kernel gradient
(8x32x32x128 -> 128) took 6.0 ms against 9.7 ms (benchmarks/README.md). The DiT, whose only
convolution is the patch embedding, and the text models do not change. Matmuls stay with YNNPACK.

It is not the default, because XLA's convolution kernels give results that depend on the batch
size and on the number of host devices, at float32 rounding. With them, the FID of
`experiments.evaluate` on 1 and on 8 devices differed in the 8th significant digit, and one
pixel in 6144 of a uint8 sample grid differed between a 2-device and an 8-device process. With
YNNPACK's kernels both are bit for bit the same (tests/test_evaluation_run.py). Choose XLA's
kernels for speed on CPU when that reproducibility does not matter.

The choice is an XLA flag, read once when JAX creates its CPU backend. For the entry points, set
it in the environment:

    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution python -m experiments.train ...

In a notebook, call `use_xla_convolutions()` before the first JAX computation:

    from diffusion_jax import xla_cpu
    xla_cpu.use_xla_convolutions()

A user's own `XLA_FLAGS` setting of `xla_cpu_experimental_ynn_fusion_type` is left alone. The
flag is ignored on GPU and TPU.
"""
from __future__ import annotations

import logging
import os

FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
FLAG = f"--{FLAG_NAME}=-individual_convolution"


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
