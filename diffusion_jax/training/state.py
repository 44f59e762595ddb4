"""Training state: one immutable pytree carrying step, params, optimizer state and EMA params.

References: Ho et al. 2020 (EMA of the weights, decay 0.9999, used for all reported samples);
the Flax examples' `TrainState` (the pytree layout).
"""
from typing import Any, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import optax

PyTree = Any


def ema_key(decay: float) -> str:
  """The key under which EMA params of `decay` live in `TrainState.ema_params` ('0.9999')."""
  return repr(float(decay))


@flax.struct.dataclass
class TrainState:
  """step: int32 scalar (optimizer calls so far); params; opt_state; ema_params: {ema_key: params}."""
  step: jax.Array
  params: PyTree
  opt_state: optax.OptState
  ema_params: Mapping[str, PyTree]


def create_train_state(params: PyTree, tx: optax.GradientTransformation,
                       ema_decays: Sequence[float] = ()) -> TrainState:
  """A fresh state at step 0; each EMA copy starts equal to `params`."""
  for d in ema_decays:
    if not 0.0 <= float(d) < 1.0:
      raise ValueError(f"ema_decays must lie in [0, 1), got {d!r}")
  ema = {ema_key(d): jax.tree.map(jnp.array, params) for d in ema_decays}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=ema)


def ema_update(ema_params: Mapping[str, PyTree], params: PyTree,
               apply: jax.Array | bool = True) -> dict[str, PyTree]:
  """ema <- decay * ema + (1 - decay) * params for each decay; unchanged where `apply` is False.

  `apply` (bool scalar, may be traced) gates the update, e.g. to the steps where gradient
  accumulation actually changed the params.
  """
  out = {}
  for key, ema in ema_params.items():
    decay = float(key)
    out[key] = jax.tree.map(
        lambda e, p, d=decay: jnp.where(apply, d * e + (1.0 - d) * p.astype(e.dtype), e),
        ema, params)
  return out


def sampling_params_path(ema_decays: Sequence[float], use_ema: bool = True,
                         ema_decay: float | None = None) -> tuple[str, ...]:
  """Where in the state the params to sample with live: ('params',) or ('ema_params', key).

  The one rule used by the trainer's previews and by `restore.load_for_sampling`:
  use_ema=False: the raw params. use_ema=True: the EMA of `ema_decay`, by default the first of
  the run's `ema_decays`; a run that kept no EMA falls back to the raw params.

  Raises:
    ValueError: `ema_decay` names a decay the run did not keep.
  """
  kept = [float(d) for d in ema_decays]
  if not use_ema or (ema_decay is None and not kept):
    return ("params",)
  if ema_decay is None:
    ema_decay = kept[0]
  if float(ema_decay) not in kept:
    raise ValueError(f"ema_decay={ema_decay!r} was not kept by this run; allowed: {kept} "
                     "(train.ema_decays).")
  return ("ema_params", ema_key(ema_decay))


def params_for_sampling(state: TrainState, ema_decays: Sequence[float], use_ema: bool = True,
                        ema_decay: float | None = None) -> tuple[PyTree, str]:
  """The params `sampling_params_path` selects, and a label for logs ('EMA 0.999' or 'raw')."""
  path = sampling_params_path(ema_decays, use_ema, ema_decay)
  if path == ("params",):
    return state.params, "raw"
  return state.ema_params[path[1]], f"EMA {path[1]}"
