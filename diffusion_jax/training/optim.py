"""The optax chain built from a config: clip by global norm, Adam/AdamW, warmup then decay.

References: Ho et al. 2020 (Adam, lr 2e-4, 5000 warmup steps, clip 1.0);
Peebles & Xie 2023 (AdamW, lr 1e-4, no weight decay, no warmup).
"""
from typing import Any, Callable

import optax

OPTIMIZERS = ("adam", "adamw")
DECAYS = ("constant", "cosine", "linear")


def make_lr_schedule(lr: float, warmup_steps: int, decay: str, num_steps: int,
                     end_lr_factor: float = 0.0) -> optax.Schedule:
  """Linear warmup from 0 over `warmup_steps`, then constant, cosine or linear decay to
  `end_lr_factor * lr` at `num_steps`."""
  if decay not in DECAYS:
    raise ValueError(f"optim.decay must be one of {DECAYS}, got {decay!r}")
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
  """Returns (tx, lr_schedule) from `optim.{name, lr, warmup_steps, decay, grad_clip,
  weight_decay, b1, b2, eps, accumulate}`.

  With `accumulate = k > 1` the chain is wrapped in `optax.MultiSteps`: the params change once
  every k calls (mean of the k gradients) and `lr_schedule` counts parameter updates.
  """
  get = lambda k, d: optim_config.get(k, d) if hasattr(optim_config, "get") else getattr(
      optim_config, k, d)
  name = get("name", "adam")
  if name not in OPTIMIZERS:
    raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {name!r}")
  accumulate = int(get("accumulate", 1))
  if accumulate < 1:
    raise ValueError(f"optim.accumulate must be >= 1, got {accumulate}")
  lr_fn = make_lr_schedule(float(get("lr", 1e-4)), int(get("warmup_steps", 0)),
                           get("decay", "constant"), max(num_steps // accumulate, 1),
                           float(get("end_lr_factor", 0.0)))
  b1, b2, eps = float(get("b1", 0.9)), float(get("b2", 0.999)), float(get("eps", 1e-8))
  parts = []
  clip = get("grad_clip", None)
  if clip is not None and float(clip) > 0:
    parts.append(optax.clip_by_global_norm(float(clip)))
  if name == "adam":
    parts.append(optax.adam(lr_fn, b1=b1, b2=b2, eps=eps))
  else:
    parts.append(optax.adamw(lr_fn, b1=b1, b2=b2, eps=eps,
                             weight_decay=float(get("weight_decay", 0.0))))
  tx = optax.chain(*parts)
  if accumulate > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accumulate)
  return tx, lr_fn
