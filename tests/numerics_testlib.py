"""Tolerances that follow from the computation, shared by the numerical tests.

Two float32 programs that compute the same expression in a different order (another XLA fusion,
a pmap instead of a jit, a scan instead of a loop, a zero mask folded in) differ by rounding
only: at most about one float32 ulp of the largest intermediate per operation, and the
differences of a chain of `ops` operations add (worst case, linearly). So

  |actual - desired| <= ops * eps32 * scale

with `scale` the largest magnitude the computation carries (by default max |desired|), and the
same `ops * eps32` as a relative tolerance for elements far above that floor. See
tests/README.md for the table of every tolerance in the suite and the errors measured.
"""

from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)     # 1.19e-7: one ulp at 1.0


def f32_tol(ops: int, scale: float = 1.0) -> float:
  """The rounding bound of `ops` float32 operations on values of magnitude `scale`."""
  return ops * EPS32 * scale


def assert_f32_close(actual, desired, ops: int, scale: float | None = None, err_msg: str = ""):
  """actual == desired up to the rounding of `ops` float32 operations (see the module doc).

  Args:
    actual, desired: arrays of one shape.
    ops: the number of dependent float32 operations that can round differently (e.g. sampler
      steps x operations per step).
    scale: the magnitude of the intermediates; default max |desired|.
  """
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  if scale is None:
    scale = float(np.max(np.abs(desired))) if desired.size else 0.0
  np.testing.assert_allclose(actual, desired, rtol=f32_tol(ops), atol=f32_tol(ops, scale),
                             err_msg=err_msg)


def install_report(path: str) -> None:
  """Measurement aid (not used by default): wraps np.testing.assert_allclose so that every call
  appends `test-id <TAB> max|a-d| <TAB> atol <TAB> rtol <TAB> max|d|` to `path`. Enabled by
  `TOLERANCE_REPORT=path pytest ...` (see tests/conftest.py); the table in tests/README.md was
  measured this way."""
  import os
  original = np.testing.assert_allclose

  def logged(actual, desired, rtol=1e-7, atol=0, *args, **kwargs):
    try:
      a = np.asarray(actual, np.float64)
      d = np.asarray(desired, np.float64)
      err = float(np.max(np.abs(a - d))) if a.size else 0.0
      big = float(np.max(np.abs(d))) if d.size else 0.0
      where = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
      import traceback
      frames = traceback.extract_stack(limit=4)[:-1]
      frame = [f for f in frames if "numerics_testlib" not in f.filename][-1]
      with open(path, "a") as f:
        f.write(f"{where}\t{os.path.basename(frame.filename)}:{frame.lineno}\t{err:.3g}\t"
                f"{atol:.3g}\t{rtol:.3g}\t{big:.3g}\n")
    except Exception:    # pylint: disable=broad-except   (a report must never change a result)
      pass
    return original(actual, desired, rtol, atol, *args, **kwargs)

  np.testing.assert_allclose = logged


def reductions_per_call(fn, *args) -> int:
  """How many reductions (matmuls, convolutions, sums) one call of fn(*args) traces: the
  operations whose summation order a kernel may choose, so a run with another batch size per
  device (another kernel) may round each of them differently."""
  import jax  # pylint: disable=import-outside-toplevel
  text = str(jax.make_jaxpr(fn)(*args))
  return sum(text.count(name) for name in ("dot_general", "conv_general_dilated", "reduce_sum"))
