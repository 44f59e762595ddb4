"""In-training evaluation: the metric of `config.eval` on a trainer's samples, and the best record.

The keys are declared (with their defaults) in `training/default_config.py`, section `eval`;
this module reads them. The trainer (`training/trainer.py`) owns sampling and checkpoints:

  hook = EvalHook(config.eval)                       # once, before training: checks the keys
  if hook.due(step, last_step):
    images = <config.eval.num_samples samples as uint8 [N, H, W, C]>
    scalars = hook(images)                           # {'eval/digits_fd': 81.2}
    <log scalars to TensorBoard and metrics.jsonl>
    if is_new_best(read_best(workdir), value, hook.settings):   # lower is better
      <save this step's checkpoint in workdir/best/>, then write_best(...)   # DIR/eval/best.json

metric: 'digits_fd' (the digits classifier's Frechet distance vs the held-out digits) or 'fid'
(FID Inception features vs `ref`, a pytorch-fid .npz or ADM batch; needs `inception_weights`).
Both are lower-is-better. best.json records the step, the value and the settings that define
the value; a record made with other settings does not count (the next evaluation replaces it).

References: Heusel et al. 2017, arXiv:1706.08500 (FID); `digits.py`, `inception.py`.
"""
from __future__ import annotations

import json
from typing import Any, Optional

import jax
import numpy as np
from etils import epath

from diffusion_jax import _checks
from diffusion_jax.evaluation import metrics

HOOK_METRICS = ("digits_fd", "fid")
BEST_DIR = "best"                 # workdir/best/<step>/{state, data}: the best step's checkpoint
BEST_RECORD = "eval/best.json"    # relative to the workdir


class EvalHook:
  """Computes the configured metric of uint8 samples (config.eval, checked at construction)."""

  def __init__(self, eval_config: Any, sampler: Optional[str] = None):
    """eval_config: `config.eval`; sampler: the sampler the trainer resolved (for `settings`)."""
    self.every = int(eval_config.every)
    self.metric = _checks.check_choice("config.eval.metric", eval_config.metric, HOOK_METRICS)
    if self.every < 0:
      raise ValueError(f"config.eval.every={self.every} must be >= 0 (0: no evaluation).")
    if int(eval_config.num_samples) < 2 or int(eval_config.batch_size) < 1:
      raise ValueError(f"config.eval.num_samples={eval_config.num_samples} must be >= 2 and "
                       f"config.eval.batch_size={eval_config.batch_size} >= 1.")
    if self.metric == "fid" and not eval_config.inception_weights:
      raise ValueError("config.eval.metric='fid' needs config.eval.inception_weights (pytorch-fid's "
                       "pt_inception-2015-12-05-6726825d.pth or torch-fidelity's file).")
    if self.metric == "digits_fd" and eval_config.ref != "digits":
      raise ValueError(f"config.eval.metric='digits_fd' needs config.eval.ref='digits', got "
                       f"{eval_config.ref!r}.")
    self.config = eval_config
    self.settings = {"metric": self.metric, "num_samples": int(eval_config.num_samples),
                     "ref": eval_config.ref, "sampler": sampler or eval_config.sampler,
                     "steps": eval_config.steps, "batch_size": int(eval_config.batch_size),
                     "inception_weights": eval_config.inception_weights}
    self._fid_state: Optional[tuple[Any, Any, np.ndarray, np.ndarray]] = None

  def due(self, step: int, last_step: Optional[int] = None) -> bool:
    """Whether to evaluate after `step`: every > 0 and step a multiple of it, or the last step."""
    return self.every > 0 and step > 0 and (step % self.every == 0 or step == last_step)

  def _fid(self, images: np.ndarray) -> float:
    if self._fid_state is None:
      from diffusion_jax.evaluation import inception, reference  # pylint: disable=g-import-not-at-top
      params = inception.load_torch_weights(self.config.inception_weights)
      ref = reference.load_reference(self.config.ref)
      if not ref.mu.size:
        raise ValueError(f"config.eval.ref={self.config.ref!r} holds no mu/sigma; write them with "
                         "`python -m experiments.evaluate --save_ref=...` first.")
      apply = jax.jit(lambda p, x: inception.InceptionV3().apply({"params": p}, x)["pool"])
      self._fid_state = (params, apply, ref.mu, ref.sigma)
    params, apply, mu_ref, sigma_ref = self._fid_state
    size = int(self.config.batch_size)
    pool = np.concatenate([np.asarray(apply(params, images[s:s + size]))
                           for s in range(0, len(images), size)])
    return metrics.frechet_distance(*metrics.feature_statistics(pool), mu_ref, sigma_ref)

  def __call__(self, images: np.ndarray) -> dict[str, float]:
    """{'eval/<metric>': value} for uint8 images [N, H, W, C] (N >= 2)."""
    if self.metric == "digits_fd":
      from diffusion_jax.evaluation import digits  # pylint: disable=g-import-not-at-top
      value = digits.digits_frechet_distance(images, reference="test")
    else:
      value = self._fid(np.asarray(images))
    return {f"eval/{self.metric}": float(value)}


def read_best(workdir: str | epath.Path) -> Optional[dict[str, Any]]:
  """workdir/eval/best.json ({'metric', 'value', 'step', 'settings'}), or None."""
  path = epath.Path(workdir) / BEST_RECORD
  return json.loads(path.read_text()) if path.exists() else None


def is_new_best(record: Optional[dict[str, Any]], value: float, settings: dict[str, Any]) -> bool:
  """True when `value` beats the record (lower is better), or the record is absent or was made
  with other settings (a value of other settings is not comparable)."""
  if record is None or record.get("settings") != settings:
    return True
  return value < record["value"]


def write_best(workdir: str | epath.Path, step: int, value: float,
               settings: dict[str, Any]) -> None:
  """Writes workdir/eval/best.json atomically (after the step's checkpoint is complete)."""
  path = epath.Path(workdir) / BEST_RECORD
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(json.dumps({"metric": settings["metric"], "value": float(value),
                             "step": int(step), "settings": settings}, indent=1))
  tmp.replace(path)
