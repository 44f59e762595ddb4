"""The optax chain built from a config: clip by global norm, Adam/AdamW, warmup then decay.

References: Ho et al. 2020 (Adam, lr 2e-4, 5000 warmup steps, clip 1.0);
Peebles & Xie 2023 (AdamW, lr 1e-4, no weight decay, no warmup).
"""
from typing import Any, Callable

import optax

from diffusion_jax import _checks

OPTIMIZERS = ("adam", "adamw")
DECAYS = ("constant", "cosine", "linear")


def make_lr_schedule(lr: float, warmup_steps: int, decay: str, num_steps: int,
                     end_lr_factor: float = 0.0) -> optax.Schedule:
  """Linear warmup from 0 over `warmup_steps`, then constant, cosine or linear decay to
  `end_lr_factor * lr` at `num_steps`."""
  _checks.check_choice("optim.decay", decay, DECAYS)
  if warmup_steps < 0 or num_steps <= 0:
    raise ValueError(f"need warmup_steps >= 0 and num_steps > 0, got {warmup_steps}, {num_steps}")
  rest = max(num_steps - warmup_steps, 1)
  if decay == "constant":
    after = optax.constant_schedule(lr)
  elif decay == "cosine":
    after = optax.cosine_decay_schedule(lr, rest, alpha=end_lr_factor)
  else:
    after = optax.linear_schedule(lr, lr * end_lr_factor, rest)
  if warmup_steps == 0:
    return after
  warm = optax.linear_schedule(0.0, lr, warmup_steps)
  return optax.join_schedules([warm, after], [warmup_steps])


def make_optimizer(optim_config: Any, num_steps: int
                   ) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
  """Returns (tx, lr_schedule) from `optim.{name, lr, warmup_steps, decay, end_lr_factor,
  grad_clip, weight_decay, b1, b2, eps, accumulate}` (a mapping holding every one of these keys,
  as `default_config.py` declares them).

  With `accumulate = k > 1` the chain is wrapped in `optax.MultiSteps`: the params change once
  every k calls (mean of the k gradients) and `lr_schedule` counts parameter updates.
  """
  o = optim_config
  name = _checks.check_choice("optim.name", o["name"], OPTIMIZERS)
  accumulate = int(o["accumulate"])
  if accumulate < 1:
    raise ValueError(f"optim.accumulate must be >= 1, got {accumulate}")
  lr_fn = make_lr_schedule(float(o["lr"]), int(o["warmup_steps"]), o["decay"],
                           max(num_steps // accumulate, 1), float(o["end_lr_factor"]))
  b1, b2, eps = float(o["b1"]), float(o["b2"]), float(o["eps"])
  parts = []
  if o["grad_clip"] is not None and float(o["grad_clip"]) > 0:
    parts.append(optax.clip_by_global_norm(float(o["grad_clip"])))
  if name == "adam":
    parts.append(optax.adam(lr_fn, b1=b1, b2=b2, eps=eps))
  else:
    parts.append(optax.adamw(lr_fn, b1=b1, b2=b2, eps=eps, weight_decay=float(o["weight_decay"])))
  tx = optax.chain(*parts)
  if accumulate > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accumulate)
  return tx, lr_fn
