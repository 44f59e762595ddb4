"""The train step: 8-device pmap == 1-device step on the same global batch; shard_map == pmap;
k-step fusion == k single calls; EMA and metrics against closed forms."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import diffusion_jax as dj
from diffusion_jax.training import optim, parallel, state as state_lib, step as step_lib
from experiments.configs import default as default_config

T = 50


class TinyNet(nn.Module):
  """A small conv net with dropout and an optional label embedding (models contract)."""
  num_classes: int = 0
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, t, y=None, train=False):
    h = nn.Conv(8, (3, 3))(x)
    emb = nn.Dense(8)(jnp.sin(t.astype(jnp.float32)[:, None] * jnp.arange(1, 5) / T))
    if self.num_classes:
      emb = emb + nn.Embed(self.num_classes + 1, 8)(y)
    h = nn.swish(h + emb[:, None, None, :])
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return nn.Conv(x.shape[-1], (3, 3))(h)


SCHEDULE = dj.get_schedule("linear", T)


def toy_loss(model_fn, x0, rng):
  """The library's eps-MSE loss (per-example keys) on a short linear schedule."""
  return dj.losses.training_loss(model_fn, SCHEDULE, x0, rng)


def setup(num_classes=0, accumulate=1, label_dropout=0.0, dropout=0.0):
  model = TinyNet(num_classes, dropout)
  x = jnp.zeros((1, 8, 8, 1))
  params = model.init(jax.random.PRNGKey(0), x, jnp.zeros((1,), jnp.int32),
                      jnp.zeros((1,), jnp.int32) if num_classes else None)["params"]
  tx, lr_fn = optim.make_optimizer(
      {**default_config.get_config().optim, "name": "adam", "lr": 1e-2, "warmup_steps": 2,
       "decay": "constant", "grad_clip": 1.0, "accumulate": accumulate}, num_steps=100)
  state = state_lib.create_train_state(params, tx, (0.9, 0.99))
  cfg = step_lib.StepConfig(num_classes=num_classes, label_dropout=label_dropout,
                            accumulate=accumulate)
  return model, tx, lr_fn, state, cfg


def batches(num, global_batch, num_classes=10, seed=1):
  rs = np.random.RandomState(seed)
  return [{"image": rs.uniform(-1, 1, (global_batch, 8, 8, 1)).astype(np.float32),
           "label": rs.randint(0, num_classes, (global_batch,)).astype(np.int32)}
          for _ in range(num)]


def run_single(state, data, mk):
  step = jax.jit(mk(axis_name=None))
  rng = jax.random.PRNGKey(42)
  for b in data:
    state, metrics = step(state, b, rng)
  return state, metrics


def run_parallel(state, data, mk, mode, k=1):
  ps = parallel.make_parallel_step(mk(axis_name="batch"), mode, steps_per_call=k)
  n = jax.local_device_count()
  rng = jax.random.PRNGKey(42)
  s = ps.put_state(state)
  for i in range(0, len(data), k):
    chunk = data[i:i + k]
    stacked = jax.tree.map(lambda *xs: np.stack([x.reshape((n, -1) + x.shape[1:]) for x in xs]),
                           *chunk)
    s, metrics = ps.step(s, ps.prepare_batch(stacked), rng)
  return ps.get_state(s), jax.tree.map(lambda m: np.asarray(m).reshape(-1)[-1], metrics)


def test_pmap_equals_single_device():
  """Class-conditional with label dropout: labels, t and noise all follow the example."""
  assert jax.local_device_count() == 8
  model, tx, lr_fn, state, cfg = setup(10, label_dropout=0.3)
  mk = functools.partial(step_lib.make_train_step, model.apply, toy_loss, tx, lr_fn, cfg)
  data = batches(3, 16)
  single, m1 = run_single(state, data, mk)
  multi, m8 = run_parallel(state, data, mk, "pmap")
  chex.assert_trees_all_close(single, multi, rtol=1e-5, atol=1e-6)
  for key in ("loss", "grad_norm", "param_norm", "update_norm", "lr"):
    np.testing.assert_allclose(m1[key], m8[key], rtol=1e-5)
  # The steps did move the params (the comparison is not vacuous).
  assert float(optax.global_norm(jax.tree.map(lambda a, b: a - b, single.params, state.params))) > 1e-3


def test_shard_map_equals_pmap_and_fusion_equals_single_calls():
  model, tx, lr_fn, state, cfg = setup(10, label_dropout=0.1)
  mk = functools.partial(step_lib.make_train_step, model.apply, toy_loss, tx, lr_fn, cfg)
  data = batches(4, 16)
  via_pmap, _ = run_parallel(state, data, mk, "pmap")
  via_smap, _ = run_parallel(state, data, mk, "shard_map")
  fused, _ = run_parallel(state, data, mk, "pmap", k=2)
  chex.assert_trees_all_close(via_pmap, via_smap, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(via_pmap, fused, rtol=1e-5, atol=1e-6)


def test_noise_differs_across_devices_and_steps():
  def keys(axis):
    return step_lib.example_keys(jax.random.PRNGKey(0), jnp.int32(3), 2, axis)

  per_device = jax.pmap(lambda _: keys("batch"), axis_name="batch")(jnp.zeros(8))
  flat = np.asarray(jax.random.key_data(per_device) if jnp.issubdtype(
      per_device.dtype, jax.dtypes.prng_key) else per_device).reshape(16, -1)
  assert len({tuple(r) for r in flat}) == 16
  # The same global indices on one device give the same keys.
  np.testing.assert_array_equal(flat, np.asarray(step_lib.example_keys(
      jax.random.PRNGKey(0), jnp.int32(3), 16, None)).reshape(16, -1))
  other_step = np.asarray(step_lib.example_keys(jax.random.PRNGKey(0), jnp.int32(4), 16, None))
  assert not np.any(np.all(other_step.reshape(16, -1) == flat, axis=1))


def test_ema_and_metrics_closed_form():
  """One step by hand: Adam on the mean loss, EMA with each decay, the logged norms and lr."""
  model, tx, lr_fn, state, cfg = setup(dropout=0.2)
  step = jax.jit(step_lib.make_train_step(model.apply, toy_loss, tx, lr_fn, cfg, axis_name=None))
  b = batches(1, 4)[0]
  state = state.replace(step=jnp.int32(1))  # lr is nonzero after warmup starts
  rng = jax.random.PRNGKey(7)
  new, m = step(state, b, rng)
  example_rng, device_rng = jax.random.split(rng)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(example_rng, 1), i))(
      jnp.arange(4))
  loss_keys = jax.vmap(lambda k: jax.random.split(k, 2)[0])(keys)
  dropout_key = jax.random.fold_in(jax.random.fold_in(device_rng, 0), 1)

  def mean_loss(p):
    f = lambda xt, t: model.apply({"params": p}, xt, t, None, train=True,
                                  rngs={"dropout": dropout_key})
    return jnp.mean(toy_loss(f, jnp.asarray(b["image"]), loss_keys))

  loss, g = jax.value_and_grad(mean_loss)(state.params)
  upd, _ = tx.update(g, state.opt_state, state.params)
  params = optax.apply_updates(state.params, upd)
  chex.assert_trees_all_close(new.params, params, rtol=1e-5, atol=1e-7)
  for d in (0.9, 0.99):
    want = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state.params, params)
    chex.assert_trees_all_close(new.ema_params[state_lib.ema_key(d)], want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(m["loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(m["grad_norm"], optax.global_norm(g), rtol=1e-5)
  np.testing.assert_allclose(m["update_norm"], optax.global_norm(upd), rtol=1e-5)
  np.testing.assert_allclose(m["param_norm"], optax.global_norm(params), rtol=1e-5)
  np.testing.assert_allclose(m["lr"], 0.5e-2, rtol=1e-6)  # warmup 2 steps to 1e-2: half at step 1
  assert int(new.step) == 2 and float(m["nonfinite"]) == 0.0


def test_accumulation_moves_params_every_k_and_ema_with_them():
  model, tx, lr_fn, state, cfg = setup(accumulate=2)
  step = jax.jit(step_lib.make_train_step(model.apply, toy_loss, tx, lr_fn, cfg, axis_name=None))
  states = [state]
  for b in batches(4, 4):
    states.append(step(states[-1], b, jax.random.PRNGKey(0))[0])
  diff = lambda a, c: float(optax.global_norm(jax.tree.map(lambda u, v: u - v, a, c)))
  assert diff(states[3].params, states[2].params) == 0.0  # mid-accumulation: no change
  assert diff(states[3].ema_params, states[2].ema_params) == 0.0
  assert diff(states[4].params, states[3].params) > 0  # 2nd update (lr > 0 after warmup step 1)
  assert diff(states[4].ema_params, states[3].ema_params) > 0


def test_bad_static_arguments():
  model, tx, lr_fn, state, cfg = setup()
  with pytest.raises(ValueError, match="compute_dtype"):
    step_lib.make_train_step(model.apply, toy_loss, tx, lr_fn, cfg._replace(compute_dtype="fp8"))
  with pytest.raises(ValueError, match="train.parallel"):
    parallel.make_parallel_step(lambda s, b, r: (s, {}), "pjit")
  with pytest.raises(ValueError, match="optim.name"):
    optim.make_optimizer({"name": "sgd"}, 10)
