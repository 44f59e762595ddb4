"""Small pieces of the train loop's bookkeeping: when periodic actions fire, and speed / ETA.

References: big_vision `utils.py` (`itstime`, `Chrono`).
"""
import time


def itstime(step: int, every: int, last_step: int | None = None) -> bool:
  """True when `every > 0` divides `step`, or at `last_step` (the run's final step)."""
  return (every > 0 and step % every == 0) or (last_step is not None and step == last_step)


def format_duration(seconds: float) -> str:
  """'h:mm:ss', or '?' for NaN / negative."""
  if not seconds >= 0:
    return "?"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h:d}:{m:02d}:{s:02d}"


class Chrono:
  """Steps per second between `mark`s and the time left to `num_steps`.

  The first measurement starts after compilation (call `mark(step)` once the first call has
  finished), so the speed and the ETA do not include it.
  """

  def __init__(self, num_steps: int):
    self.num_steps = num_steps
    self._step = 0
    self._t = time.perf_counter()

  def mark(self, step: int) -> None:
    self._step, self._t = step, time.perf_counter()

  def steps_per_sec(self, step: int) -> float:
    """Speed since the last `mark` (NaN before any step), and a new mark at `step`."""
    dt = time.perf_counter() - self._t
    done = step - self._step
    self.mark(step)
    return done / dt if dt > 0 and done > 0 else float("nan")

  def eta(self, step: int, steps_per_sec: float) -> str:
    return format_duration((self.num_steps - step) / steps_per_sec
                           if steps_per_sec > 0 else float("nan"))
