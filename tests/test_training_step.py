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
from diffusion_jax.training import default_config
from diffusion_jax.training import optim, parallel, state as state_lib, step as step_lib
from numerics_testlib import f32_tol

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


def keyless_loss(model_fn, x0, rng):
  """A per-example loss that draws no randomness, [B]: the expected step then needs no copy of
  the step's key plumbing (tested on its own in test_noise_differs_across_devices_and_steps)."""
  del rng
  out = model_fn(0.5 * x0, jnp.full((x0.shape[0],), 7, jnp.int32))
  return jnp.mean((out - x0) ** 2, axis=(1, 2, 3))


def numpy_adam(params, grads, mu, nu, count, lr, *, b1=0.9, b2=0.999, eps=1e-8, clip=1.0,
               weight_decay=0.0):
  """One Adam(W) step with global-norm clipping in float64 NumPy, on flat lists of arrays.

  References: Kingma & Ba 2015, algorithm 1; Loshchilov & Hutter 2019 (decoupled decay);
  Pascanu et al. 2013 (clipping by the global norm).
  """
  norm = np.sqrt(sum(np.sum(g ** 2) for g in grads))
  grads = [g * min(1.0, clip / norm) for g in grads]
  mu = [b1 * m + (1 - b1) * g for m, g in zip(mu, grads, strict=True)]
  nu = [b2 * v + (1 - b2) * g ** 2 for v, g in zip(nu, grads, strict=True)]
  updates = [-lr * ((m / (1 - b1 ** count)) / (np.sqrt(v / (1 - b2 ** count)) + eps)
                    + weight_decay * p) for m, v, p in zip(mu, nu, params, strict=True)]
  return [p + u for p, u in zip(params, updates, strict=True)], mu, nu, updates


def leaves64(tree):
  return [np.asarray(a, np.float64) for a in jax.tree.leaves(tree)]


def assert_leaves_close(got, want, ops, slack=None):
  """Each leaf against its own magnitude (rounding of `ops` float32 operations), plus an
  optional per-element allowance `slack` (a list like `want`)."""
  slack = slack or [0.0] * len(want)
  for g, w, extra in zip(leaves64(got), want, slack, strict=True):
    bound = f32_tol(ops, float(np.abs(w).max())) + f32_tol(ops) * np.abs(w) + extra
    assert np.all(np.abs(g - w) <= bound), np.max(np.abs(g - w) - bound)


@pytest.mark.parametrize("name,weight_decay", [("adam", 0.0), ("adamw", 0.1)])
def test_two_steps_against_numpy_adam_ema_and_metrics(name, weight_decay):
  """Two steps from a fresh state against Adam(W), the EMA and the logged metrics written out
  in float64 NumPy. Warmup over 2 steps to 1e-2: lr 0 at step 0 (only the moments move), 5e-3
  at step 1."""
  model = TinyNet()
  params0 = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)),
                       jnp.zeros((1,), jnp.int32))["params"]
  tx, lr_fn = optim.make_optimizer(
      {**default_config.get_config().optim, "name": name, "lr": 1e-2, "warmup_steps": 2,
       "decay": "constant", "grad_clip": 1.0, "weight_decay": weight_decay}, num_steps=100)
  state = state_lib.create_train_state(params0, tx, (0.9, 0.99))
  step = jax.jit(step_lib.make_train_step(model.apply, keyless_loss, tx, lr_fn,
                                          step_lib.StepConfig(), axis_name=None))
  data = batches(2, 4)
  treedef = jax.tree.structure(params0)
  p = leaves64(params0)
  mu, nu = [np.zeros_like(a) for a in p], [np.zeros_like(a) for a in p]
  ema = {d: list(p) for d in (0.9, 0.99)}
  slack = [np.zeros_like(a) for a in p]        # accumulated per-element gradient-rounding bound
  for i, (b, lr) in enumerate(zip(data, (0.0, 5e-3), strict=True)):
    before = leaves64(state.params)
    state, m = step(state, b, jax.random.PRNGKey(i))
    # The gradient of the model itself is JAX's (float32, at the same float32 params).
    at = jax.tree.unflatten(treedef, [jnp.asarray(a, jnp.float32) for a in p])
    mean_loss = jax.value_and_grad(lambda q, b=b: jnp.mean(keyless_loss(
        lambda x, t: model.apply({"params": q}, x, t, None, train=True), jnp.asarray(b["image"]),
        None)))
    loss, g = jax.jit(mean_loss)(at)
    grads = leaves64(g)
    # The rounding of each gradient element, seen as the difference between two float32
    # programs (jit, eager). Adam's update is scale-free in g (u ~ lr m / sqrt(v)), so a
    # relative gradient error r_i moves u_i by ~lr r_i however small g_i is (after cancellation
    # in the batch sum r_i can be 1e-4 and more): allowed 4 lr r_i per element.
    eager = leaves64(mean_loss(at)[1])
    rel = [np.minimum(np.abs(a - e) / np.maximum(np.abs(a), 1e-30), 1.0)
           for a, e in zip(grads, eager, strict=True)]
    slack = [s + 4 * lr * r for s, r in zip(slack, rel, strict=True)]
    p, mu, nu, updates = numpy_adam(p, grads, mu, nu, i + 1, lr, weight_decay=weight_decay)
    # Adam's bias correction 1 - b2^t (2e-3 at t = 2) is computed in float32 from the float32
    # b2: its error, ~(t + 1) eps32 from b2's representation and the power, over 1 - b2^t,
    # reaches the update at half that relative size through the square root (~4e-5 at t = 2).
    bias_rel = 0.5 * (i + 2) * f32_tol(1) / (1 - 0.999 ** (i + 1))
    slack = [s + bias_rel * np.abs(u) for s, u in zip(slack, updates, strict=True)]
    ema = {d: [d * e + (1 - d) * a for e, a in zip(ema[d], p, strict=True)] for d in ema}
    # Metrics: float32 reductions of ~1e3 terms, rounding ~ log2(1e3) ~ 10 operations.
    np.testing.assert_allclose(m["loss"], float(loss), rtol=f32_tol(10))
    np.testing.assert_allclose(m["grad_norm"], np.sqrt(sum(np.sum(a ** 2) for a in grads)),
                               rtol=f32_tol(10))
    # The update norm against the step's own parameter change (each p + u rounds by <= eps |p|
    # / 2, so the norms differ by <= eps ||p||); Adam's update itself is checked through the
    # params below. (Not against the NumPy update's norm: Adam divides by |g|, so the rounding
    # of gradients that are tiny after cancellation reaches the update at full lr size.)
    moved = np.sqrt(sum(np.sum((a - c) ** 2) for a, c in zip(leaves64(state.params), before,
                                                              strict=True)))
    np.testing.assert_allclose(m["update_norm"], moved, rtol=f32_tol(10),
                               atol=f32_tol(1, np.sqrt(sum(np.sum(a ** 2) for a in before))))
    if not lr:
      assert float(m["update_norm"]) == 0.0
    np.testing.assert_allclose(m["param_norm"], np.sqrt(sum(np.sum(a ** 2) for a in p)),
                               rtol=f32_tol(10))
    assert float(m["lr"]) == np.float32(lr)
  # Adam in float32: clip, two moment updates, bias corrections, sqrt, divide, add: ~20
  # roundings per step relative to each leaf's size (and the update is lr-sized, below that).
  assert_leaves_close(state.params, p, ops=20 * 2, slack=slack)
  assert_leaves_close(optax.tree_utils.tree_get(state.opt_state, "mu"), mu, ops=20 * 2)
  assert_leaves_close(optax.tree_utils.tree_get(state.opt_state, "nu"), nu, ops=20 * 2)
  for d in (0.9, 0.99):
    assert_leaves_close(state.ema_params[state_lib.ema_key(d)], ema[d], ops=20 * 2, slack=slack)
  assert int(state.step) == 2


def test_dropout_is_active_in_the_step():
  """With dropout 0.2 the step's loss differs from the dropout-free network's on the same data."""
  losses = []
  for rate in (0.0, 0.2):
    model, tx, lr_fn, state, cfg = setup(dropout=rate)
    step = jax.jit(step_lib.make_train_step(model.apply, keyless_loss, tx, lr_fn, cfg,
                                            axis_name=None))
    losses.append(float(step(state, batches(1, 4)[0], jax.random.PRNGKey(7))[1]["loss"]))
  assert losses[0] != losses[1]


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


def test_bfloat16_compute_matches_float32_to_bfloat16_precision():
  """train.compute_dtype='bfloat16': the forward pass runs in bfloat16 (params and inputs cast),
  while params, gradients, Adam and EMA stay float32. The loss and gradient agree with the
  float32 step to bfloat16 precision: eps_bf16 = 2^-8 per rounding, ~10 roundings through this
  2-conv network, so the loss within 10 x 2^-8 ~ 4% relative, and the gradient direction within
  a cosine of 0.99 (it would be ~0 for an unrelated gradient); and they are not bitwise equal
  (the bfloat16 path really ran)."""
  model, tx, lr_fn, state, cfg = setup()
  b = batches(1, 4)[0]
  outs = {}
  for dtype in ("float32", "bfloat16"):
    step = jax.jit(step_lib.make_train_step(model.apply, keyless_loss, tx, lr_fn,
                                            cfg._replace(compute_dtype=dtype), axis_name=None))
    new, m = step(state, b, jax.random.PRNGKey(0))
    for leaf in jax.tree.leaves((new.params, new.opt_state, new.ema_params)):
      assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
    # Adam's first moment after one step is 0.1 x the (clipped) float32 gradient.
    outs[dtype] = (float(m["loss"]), leaves64(optax.tree_utils.tree_get(new.opt_state, "mu")))
  (loss32, upd32), (loss16, upd16) = outs["float32"], outs["bfloat16"]
  assert loss16 != loss32
  assert abs(loss16 - loss32) <= 10 * 2.0 ** -8 * abs(loss32)
  a, c = np.concatenate([u.ravel() for u in upd32]), np.concatenate([u.ravel() for u in upd16])
  assert a @ c / np.linalg.norm(a) / np.linalg.norm(c) > 0.99


@pytest.mark.parametrize("config_name, same_bits", [("digits", True), ("dit_digits", False)])
def test_init_state_unoptimised_compile_matches_an_optimised_one(config_name, same_bits):
  """`components.init_state` compiles the step-0 state without backend optimisations (it runs
  once). Against the same program compiled with XLA's defaults: the U-Net's state is the same
  bits; the DiT's normal draws may differ by a few float32 ulp (the erfinv polynomial and two
  scalings, with or without fused multiply-adds: |a - b| <= 4 * 2^-23 |b|; 2.1e-7 relative was
  seen), and at least one leaf is still equal bit for bit."""
  import importlib  # pylint: disable=g-import-not-at-top
  from diffusion_jax.training import components  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"experiments.configs.{config_name}").get_config()
  size = int(config.data.image_size)
  comp = components.build(config, (size, size, 1))
  rng = jax.random.PRNGKey(0)
  got = components.init_state(config, comp, rng)
  reference = jax.jit(components.make_state_fn(config, comp))(rng)
  pairs = list(zip(jax.tree.leaves(got), jax.tree.leaves(reference), strict=True))
  assert jax.tree.structure(got) == jax.tree.structure(reference)
  if same_bits:
    for a, b in pairs:
      np.testing.assert_array_equal(a, np.asarray(b))
  else:
    for a, b in pairs:
      np.testing.assert_allclose(a, np.asarray(b), rtol=4 * 2.0**-23, atol=0)
    assert any(np.array_equal(a, np.asarray(b)) for a, b in pairs)
