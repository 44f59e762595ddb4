"""The per-device train step: per-example loss, gradients averaged over `axis_name`, optax
update, EMA update and metrics.

Randomness: each example's key is `fold_in(fold_in(rng, step), global_example_index)`, where the
global index counts examples over all devices of all hosts (`axis_index * per_device_batch + i`).
Every device and host thus draws different noise, and the noise of an example does not depend on
how the global batch is split over devices: the 8-device step equals the 1-device step on the
same batch. (This refines `fold_in(fold_in(rng, device), step)`: the device index enters through
the example index.)

References: Ho et al. 2020, Algorithm 1 (one step of L_simple training);
Ho & Salimans 2022 (label dropout to a null class for classifier-free guidance).
"""
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from diffusion_jax import rng as rng_lib
from diffusion_jax.training import state as state_lib

PyTree = Any
# loss_fn(model_fn, x0 [B, H, W, C], rng) -> per-example loss [B]; model_fn(x_t, t) -> output.
LossFn = Callable[[Callable[[jax.Array, jax.Array], jax.Array], jax.Array, jax.Array], jax.Array]
COMPUTE_DTYPES = ("float32", "bfloat16")


class StepConfig(NamedTuple):
  """Static settings of the step.

  num_classes: > 0 for a class-conditional model (label `num_classes` is the null class).
  label_dropout: probability of replacing a label by the null class (classifier-free guidance).
  compute_dtype: 'float32' or 'bfloat16' (params and inputs cast for the forward pass; the loss,
    gradients, optimizer and EMA stay float32).
  accumulate: k of `optax.MultiSteps` (EMA then moves only on the steps that change the params).
  """
  num_classes: int = 0
  label_dropout: float = 0.0
  compute_dtype: str = "float32"
  accumulate: int = 1


def example_keys(rng: jax.Array, step: jax.Array, batch_size: int,
                 axis_name: str | None) -> jax.Array:
  """Keys [B] for the examples on this device: fold_in(fold_in(rng, step), global index)."""
  offset = 0 if axis_name is None else lax.axis_index(axis_name) * batch_size
  return rng_lib.example_keys(jax.random.fold_in(rng, step), batch_size, offset)


def make_train_step(apply_fn: Callable[..., jax.Array], loss_fn: LossFn,
                    tx: optax.GradientTransformation, lr_fn: Callable[[Any], Any],
                    config: StepConfig = StepConfig(), axis_name: str | None = "batch"
                    ) -> Callable[[state_lib.TrainState, dict, jax.Array],
                                  tuple[state_lib.TrainState, dict]]:
  """Builds `step(state, batch, rng) -> (state, metrics)` for one device.

  apply_fn: `module.apply` with the models contract `(variables, x, t, y, train=, rngs=)`.
  batch: {'image': float [B, H, W, C] in [-1, 1], 'label': int32 [B]} (this device's share).
  rng: the run's base key (identical on every device).
  metrics: loss, grad_norm, param_norm, update_norm, lr, nonfinite (1.0 when the loss or a
    gradient is not finite), all averaged over `axis_name`.
  With `axis_name=None` there are no collectives (a plain single-device step).
  """
  if config.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {config.compute_dtype!r}")
  if not 0.0 <= config.label_dropout < 1.0:
    raise ValueError(f"label_dropout must lie in [0, 1), got {config.label_dropout}")
  cdtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
  conditional = config.num_classes > 0

  def cast(tree):
    return jax.tree.map(lambda a: a.astype(cdtype) if jnp.issubdtype(a.dtype, jnp.floating)
                        else a, tree)

  def example_loss(params, x0, y, key):
    k_loss, k_drop, k_label = jax.random.split(key, 3)
    if conditional and config.label_dropout > 0:
      y = jnp.where(jax.random.bernoulli(k_label, config.label_dropout), config.num_classes, y)
    yb = y[None] if conditional else None
    cparams = cast(params)

    def model_fn(x_t, t):
      out = apply_fn({"params": cparams}, x_t.astype(cdtype), t, yb, train=True,
                     rngs={"dropout": k_drop})
      return out.astype(jnp.float32)

    return loss_fn(model_fn, x0[None], k_loss)[0]

  def loss_and_aux(params, batch, keys):
    losses = jax.vmap(example_loss, in_axes=(None, 0, 0, 0))(
        params, batch["image"].astype(jnp.float32), batch["label"], keys)
    return jnp.mean(losses)

  def pmean(x):
    return x if axis_name is None else lax.pmean(x, axis_name)

  def step(state: state_lib.TrainState, batch: dict, rng: jax.Array):
    keys = example_keys(rng, state.step, batch["image"].shape[0], axis_name)
    loss, grads = jax.value_and_grad(loss_and_aux)(state.params, batch, keys)
    grads = pmean(grads)
    loss = pmean(loss)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if config.accumulate > 1:
      applied = opt_state.mini_step == 0
      opt_count = state.step // config.accumulate
    else:
      applied = True
      opt_count = state.step
    ema = state_lib.ema_update(state.ema_params, params, applied)
    grad_norm = optax.global_norm(grads)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "param_norm": optax.global_norm(params),
        "update_norm": optax.global_norm(updates),
        "lr": jnp.asarray(lr_fn(opt_count), jnp.float32),
        "nonfinite": 1.0 - (jnp.isfinite(loss) & jnp.isfinite(grad_norm)).astype(jnp.float32),
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema)
    return new_state, metrics

  return step
