"""Where training metrics go: `metrics.jsonl` (one JSON row per logged step) and TensorBoard.

`MetricWriter(workdir, resume_step)` first drops the `metrics.jsonl` rows past `resume_step`
(rows written after the restored checkpoint by a run that was killed), so a resumed run has one
row per step. On hosts other than 0 it writes nothing. `MeanAccumulator` averages per-step
metric arrays between two writes.

References: clu.metric_writers (the interface: write_scalars(step, dict), flush, close).
"""
from typing import Mapping
import json

import numpy as np
from etils import epath

METRICS_FILE = "metrics.jsonl"


def drop_rows_after(path: epath.Path, step: int) -> int:
  """Rewrites the JSONL file at `path` without rows whose "step" exceeds `step` (atomically);
  returns the number of rows dropped. A torn last line (a kill mid-write) is dropped too."""
  if not path.exists():
    return 0
  kept, dropped = [], 0
  for line in path.read_text().splitlines():
    try:
      row_step = int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
      dropped += 1
      continue
    if row_step <= step:
      kept.append(line)
    else:
      dropped += 1
  if dropped:
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
  return dropped


class MetricWriter:
  """Scalars to `<workdir>/metrics.jsonl` and TensorBoard (`<workdir>/tb`); inactive: no-op."""

  def __init__(self, workdir: str | epath.Path, resume_step: int, active: bool = True):
    self.active = active
    self.dropped = 0
    if not active:
      return
    workdir = epath.Path(workdir)
    self.dropped = drop_rows_after(workdir / METRICS_FILE, resume_step)
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    # purge_step: TensorBoard hides events of an earlier launch at or past the resumed step.
    self._tb = SummaryWriter(str(workdir / "tb"), purge_step=resume_step + 1)
    self._jsonl = open(workdir / METRICS_FILE, "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.active:
      return
    self._jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in
                                                         scalars.items()}}) + "\n")
    self._jsonl.flush()
    for k, v in scalars.items():   # 'loss' -> train/loss; a key with a group ('eval/fid') as is
      self._tb.add_scalar(k if "/" in k else f"train/{k}", float(v), int(step))
    self._tb.flush()

  def close(self) -> None:
    if self.active:
      self.active = False
      self._tb.close()
      self._jsonl.close()


class MeanAccumulator:
  """Running sums of per-step metrics ({name: array of per-step values})."""

  def __init__(self):
    self._sums: dict[str, float] = {}
    self._count = 0

  def add(self, metrics: Mapping[str, np.ndarray]) -> None:
    for k, v in metrics.items():
      self._sums[k] = self._sums.get(k, 0.0) + float(np.sum(v))
    self._count += int(np.size(next(iter(metrics.values()))))

  def pop(self) -> dict[str, float]:
    """The means since the last pop ({} when nothing was added), and a reset."""
    means = {k: v / self._count for k, v in self._sums.items()} if self._count else {}
    self._sums, self._count = {}, 0
    return means
