"""The per-device train step: per-example loss, gradients averaged over `axis_name`, optax
update, EMA update and metrics.

Randomness: each example's key is `fold_in(fold_in(rng, step), global_example_index)`, where the
global index is the example's position in the global batch as the data pipeline lays it out:
host p, local device d, row i holds position `(d * b + i) * P + p` (P processes, b rows per
device; hosts interleave, see `diffusion_jax.data`). Every device and host thus draws different
noise, and the noise of an example does not depend on how the global batch is split over
devices or hosts: the 8-device step equals the 1-device step and 2 hosts x 4 devices equal
1 host x 8 devices. The model's dropout masks, drawn
for the whole per-device batch at once, use the per-device key
`fold_in(fold_in(rng', global device index), step)`: with dropout > 0 the result depends on the
split (per-example dropout keys would need a vmap over the model, measured 1.6x slower on CPU).

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
# loss_fn(model_fn, x0 [B, H, W, C], keys [B]) -> per-example loss [B]; model_fn: a `ModelFn`.
LossFn = Callable[..., jax.Array]
COMPUTE_DTYPES = ("float32", "bfloat16")


class ModelFn:
  """The network as a loss sees it, closed over the (cast) params, labels and dropout key.

  `model_fn(x_t, t)`: the module's `__call__(x_t, t, y, train=True)`, output float32;
  `model_fn(x, s, method=name)`: another method of the same signature (e.g. EDM's raw network);
  `model_fn.apply(name, *args)`: a method without labels or dropout, on the float32 params
    (e.g. VDM's schedule gamma, which bfloat16 would round).
  """

  def __init__(self, apply_fn: Callable[..., jax.Array], params: PyTree, cast_params: PyTree,
               y: jax.Array | None, dropout_key: jax.Array, dtype: Any):
    self._apply_fn, self._params, self._cast_params, self._y = apply_fn, params, cast_params, y
    self._dropout_key, self._dtype = dropout_key, dtype

  def __call__(self, x_t: jax.Array, t: jax.Array, method: str | None = None) -> jax.Array:
    kw = {} if method is None else {"method": method}
    # Integer inputs (text tokens) are ids, never cast to the compute dtype.
    x_in = x_t.astype(self._dtype) if jnp.issubdtype(x_t.dtype, jnp.floating) else x_t
    out = self._apply_fn({"params": self._cast_params}, x_in, t, self._y,
                         train=True, rngs={"dropout": self._dropout_key}, **kw)
    return out.astype(jnp.float32)

  def apply(self, method: str, *args) -> jax.Array:
    return self._apply_fn({"params": self._params}, *args, method=method)

  def with_params(self, fn: Callable[[PyTree], PyTree]) -> "ModelFn":
    """The same network on `fn(params)` (e.g. params with some gradients stopped)."""
    return ModelFn(self._apply_fn, fn(self._params), fn(self._cast_params), self._y,
                   self._dropout_key, self._dtype)


class StepConfig(NamedTuple):
  """Static settings of the step.

  num_classes: > 0 for a class-conditional model (label `num_classes` is the null class).
  label_dropout: probability of replacing a label by the null class (classifier-free guidance).
  compute_dtype: 'float32' or 'bfloat16' (params and inputs cast for the forward pass; the loss,
    gradients, optimizer and EMA stay float32).
  accumulate: k of `optax.MultiSteps` (EMA then moves only on the steps that change the params).
  process_count: number of JAX processes (fixes the global example positions, see above).
  """
  num_classes: int = 0
  label_dropout: float = 0.0
  compute_dtype: str = "float32"
  accumulate: int = 1
  process_count: int = 1


def example_keys(rng: jax.Array, step: jax.Array, batch_size: int, axis_name: str | None,
                 process_count: int = 1) -> jax.Array:
  """Keys [b] for this device's rows: fold_in(fold_in(rng, step), global position).

  process_count: P; the devices along `axis_name` are process-major (P x local devices).
  """
  step_key = jax.random.fold_in(rng, step)
  if axis_name is None:
    return rng_lib.example_keys(step_key, batch_size)
  local_devices = lax.psum(1, axis_name) // process_count
  device = lax.axis_index(axis_name)
  p, d = device // local_devices, device % local_devices
  positions = (d * batch_size + jnp.arange(batch_size)) * process_count + p
  return rng_lib.keys_for_indices(step_key, positions)


def data_of(batch: dict) -> jax.Array:
  """The examples of a batch: 'tokens' (int [B, L], text runs) or 'image' (float [B, H, W, C])."""
  return batch["tokens"] if "tokens" in batch else batch["image"]


def make_train_step(apply_fn: Callable[..., jax.Array], loss_fn: LossFn,
                    tx: optax.GradientTransformation, lr_fn: Callable[[Any], Any],
                    config: StepConfig = StepConfig(), axis_name: str | None = "batch"
                    ) -> Callable[[state_lib.TrainState, dict, jax.Array],
                                  tuple[state_lib.TrainState, dict]]:
  """Builds `step(state, batch, rng) -> (state, metrics)` for one device.

  apply_fn: `module.apply` with the models contract `(variables, x, t, y, train=, rngs=)`.
  batch: {'image': float [B, H, W, C] in [-1, 1], 'label': int32 [B]} (this device's share), or
    {'tokens': int32 [B, L]} for a text run (integer inputs are never cast to compute_dtype).
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

  def loss_and_aux(params, batch, keys, dropout_key):
    x0 = data_of(batch)
    if jnp.issubdtype(x0.dtype, jnp.floating):
      x0 = x0.astype(jnp.float32)
    y = batch.get("label")
    split = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
    loss_keys, label_keys = split[:, 0], split[:, 1]
    if conditional and config.label_dropout > 0:
      drop = jax.vmap(lambda k: jax.random.bernoulli(k, config.label_dropout))(label_keys)
      y = jnp.where(drop, config.num_classes, y)
    model_fn = ModelFn(apply_fn, params, cast(params), y if conditional else None, dropout_key,
                       cdtype)
    return jnp.mean(loss_fn(model_fn, x0, loss_keys))

  def pmean(x):
    return x if axis_name is None else lax.pmean(x, axis_name)

  def step(state: state_lib.TrainState, batch: dict, rng: jax.Array):
    example_rng, device_rng = jax.random.split(rng)
    keys = example_keys(example_rng, state.step, data_of(batch).shape[0], axis_name,
                        config.process_count)
    device = 0 if axis_name is None else lax.axis_index(axis_name)
    dropout_key = jax.random.fold_in(jax.random.fold_in(device_rng, device), state.step)
    loss, grads = jax.value_and_grad(loss_and_aux)(state.params, batch, keys, dropout_key)
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
