"""In-training evaluation: the `config.eval` keys and a hook a trainer calls every `every` steps.

The trainer owns sampling and checkpoints; this module only turns samples into a number:

  hook = EvalHook(config.eval)                       # once
  if hook.due(step):
    images = <config.eval.num_samples samples as uint8 [N, H, W, C]>
    scalars = hook(images)                           # {'eval/digits_fd': 81.2}
    <log scalars to TensorBoard and metrics.jsonl>
    if hook.update_best(workdir, step, scalars):     # lower is better; DIR/eval/best.json
      <keep this step's checkpoint as the best one>

metric: 'digits_fd' (the digits classifier's Frechet distance vs the held-out digits) or 'fid'
(FID Inception features vs `ref`, a pytorch-fid .npz or ADM batch; needs `inception_weights`).

References: Heusel et al. 2017, arXiv:1706.08500 (FID); `digits.py`, `inception.py`.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from diffusion_jax.evaluation import metrics

HOOK_METRICS = ("digits_fd", "fid")


def default_config() -> ml_collections.ConfigDict:
  """config.eval with its defaults (every=0: off)."""
  return ml_collections.ConfigDict({
      "every": 0,               # steps between evaluations; 0 turns in-training evaluation off
      "num_samples": 500,       # samples per evaluation (a Frechet distance's bias grows ~1/N)
      "metric": "digits_fd",    # one of HOOK_METRICS
      "ref": "digits",          # 'digits' or a statistics .npz (metric='fid')
      "inception_weights": "",  # pt_inception-2015-12-05-6726825d.pth for metric='fid'
      "batch_size": 100,        # feature network batch
  })


class EvalHook:
  """Computes the configured metric of uint8 samples; tracks the best value in a workdir."""

  def __init__(self, eval_config: Any):
    self.every = int(eval_config.every)
    self.metric = eval_config.metric
    if self.metric not in HOOK_METRICS:
      raise ValueError(f"config.eval.metric={self.metric!r}; allowed: {', '.join(HOOK_METRICS)}.")
    if self.metric == "fid" and not eval_config.inception_weights:
      raise ValueError("config.eval.metric='fid' needs config.eval.inception_weights (pytorch-fid's "
                       "pt_inception-2015-12-05-6726825d.pth or torch-fidelity's file).")
    if self.metric == "digits_fd" and eval_config.ref != "digits":
      raise ValueError(f"config.eval.metric='digits_fd' needs ref='digits', got {eval_config.ref!r}.")
    self.config = eval_config
    self._fid_state: Optional[tuple[Any, Any, np.ndarray, np.ndarray]] = None

  def due(self, step: int) -> bool:
    """Whether to evaluate after `step` (every > 0 and step a multiple of it)."""
    return self.every > 0 and step > 0 and step % self.every == 0

  def _fid(self, images: np.ndarray) -> float:
    if self._fid_state is None:
      from diffusion_jax.evaluation import inception, reference  # pylint: disable=g-import-not-at-top
      params = inception.load_torch_weights(self.config.inception_weights)
      ref = reference.load_reference(self.config.ref)
      if not ref.mu.size:
        raise ValueError(f"{self.config.ref!r} holds no mu/sigma; write them with "
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

  def update_best(self, workdir: str, step: int, scalars: dict[str, float]) -> bool:
    """Records the value in workdir/eval/best.json if it beats the stored one (lower is better).

    Returns True when this step is the new best (the trainer then keeps its checkpoint).
    """
    value = scalars[f"eval/{self.metric}"]
    path = os.path.join(workdir, "eval", "best.json")
    if os.path.exists(path):
      with open(path) as f:
        best = json.load(f)
      if best.get("metric") == self.metric and best["value"] <= value:
        return False
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump({"metric": self.metric, "value": value, "step": int(step)}, f)
    os.replace(path + ".tmp", path)
    return True
