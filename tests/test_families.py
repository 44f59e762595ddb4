"""The 'vdm' and 'edm' families in the trainer: the train step's loss equals the pure functions'
(`diffusion_jax.vdm`, `diffusion_jax.edm`) on the same batch and keys, a few steps lower it, the
learned schedule stays monotonic, and the runs sample through `experiments.sample`."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import edm
from diffusion_jax.data import digits
from diffusion_jax import vdm
from diffusion_jax.training import components
from diffusion_jax.training import families
from diffusion_jax.training import restore
from diffusion_jax.training import step as step_lib

SHAPE = (8, 8, 1)
TINY_MODEL = {"ch": 8, "num_groups": 4, "ch_mult": (1,), "attention_levels": (0,)}


def _config(name, **diffusion):
  c = importlib.import_module(f"experiments.configs.{name}").get_config()
  for k, v in TINY_MODEL.items():
    c.model[k] = v
  c.diffusion.num_timesteps = 20
  c.optim.warmup_steps = 0
  c.optim.decay = "constant"
  c.train.num_steps = 30
  for k, v in diffusion.items():
    c.diffusion[k] = v
  return c


def _batch(n=16):
  """The first n training digits as the pipeline gives them: 8-bit levels k, k / 127.5 - 1."""
  from sklearn.datasets import load_digits
  levels = digits.digits_to_uint8(load_digits().images[:n])[..., None].astype(np.float64)
  x = jnp.asarray(levels / 127.5 - 1.0, jnp.float32)
  return {"image": x, "label": jnp.zeros((n,), jnp.int32)}


def _step_loss_keys(rng, step, n):
  """The per-example loss keys the train step draws at `step` (see `step.make_train_step`)."""
  example_rng, _ = jax.random.split(rng)
  keys = step_lib.example_keys(example_rng, jnp.int32(step), n, None)
  return jax.vmap(lambda k: jax.random.split(k, 2))(keys)[:, 0]


def _pure_loss(config, comp, params, x0, keys, antithetic=True):
  """The family's loss from the pure functions, on the backbone and schedule params directly
  (not through the wrapper modules)."""
  backbone = comp.model.backbone
  net = lambda u, c: backbone.apply({"params": params["backbone"]}, u, c, None, train=True)
  if config.diffusion.family == "edm":
    return edm.training_loss(net, x0, keys, precond=config.edm.precond,
                             sigma_data=config.edm.sigma_data, p_mean=config.edm.p_mean,
                             p_std=config.edm.p_std)
  v = config.vdm
  gamma_fn = lambda t: vdm.LearnedGamma(v.gamma_min, v.gamma_max, v.num_features).apply(
      {"params": params["gamma"]}, t)
  eps_fn = lambda z, t: net(z, 1000.0 * (gamma_fn(t) - v.gamma_min) / (v.gamma_max - v.gamma_min))
  x = vdm.levels_to_data(jnp.round((x0 + 1.0) * 127.5).astype(jnp.int32))   # VDM's bin centres
  return vdm.vlb_terms(eps_fn, gamma_fn, x, keys, antithetic=antithetic).bpd


@pytest.mark.parametrize("name", ["vdm_digits", "edm_digits"])
def test_family_step_equals_pure_loss_and_lowers_it(name):
  config = _config(name)
  comp = components.build(config, SHAPE)
  state = components.init_state(config, comp, jax.random.PRNGKey(0))
  step = jax.jit(step_lib.make_train_step(comp.model.apply, families.make_loss_fn(
      config, comp.schedule), comp.tx, comp.lr_fn, axis_name=None))
  batch, rng = _batch(), jax.random.PRNGKey(1)
  x0 = batch["image"]
  fixed_keys = _step_loss_keys(rng, 0, x0.shape[0])
  loss_at = jax.jit(lambda p: jnp.mean(_pure_loss(config, comp, p, x0, fixed_keys)))

  before = float(loss_at(state.params))
  gamma_before = state.params.get("gamma")
  state, metrics = step(state, batch, rng)
  # Same batch, same keys, the same float32 operations in a different program: relative
  # rounding of order 1e-6 per op over ~1e3 accumulated ops.
  np.testing.assert_allclose(float(metrics["loss"]), before, rtol=1e-4)
  for _ in range(29):
    state, metrics = step(state, batch, rng)
    assert np.isfinite(float(metrics["loss"]))
  after = float(loss_at(state.params))
  # The zero-initialised output layer gives eps_hat = 0 (VDM: diffusion term = its prior
  # expectation, end points untrained) or D = c_skip x (EDM); 30 Adam steps at lr 2e-3 on one
  # batch fit at least the output scale: chosen before running, a 10% drop on the same keys.
  assert after < 0.9 * before, (before, after)

  if name == "vdm_digits":
    t = jnp.linspace(0.0, 1.0, 1001)
    g = np.asarray(comp.model.apply({"params": state.params}, t, method="gamma"), np.float64)
    # Steps of ~18 / 1000 against float32 rounding of ~1e-6 at |gamma| <= 14.
    assert np.all(np.diff(g) > 0), np.diff(g).min()
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                         gamma_before, state.params["gamma"])
    assert max(jax.tree.leaves(moved)) > 0, "the schedule's params did not train"


def test_vdm_bits_per_dim_of_evaluate_bpd():
  """experiments.evaluate_bpd's bound of a VDM run is the pure `vdm.vlb_terms` bound with
  independent times (so example b's figure depends on its key alone), and its mean over the
  batch is what `evaluate_bits_per_dim` reports."""
  from experiments import evaluate_bpd
  config = _config("vdm_digits")
  comp = components.build(config, SHAPE)
  params = components.init_params(comp, jax.random.PRNGKey(0))
  x0 = _batch(8)["image"]
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(8))
  got = families.vlb_bits_fn(config, comp.model)(params, x0, keys)
  want = _pure_loss(config, comp, params, x0, keys, antithetic=False)
  np.testing.assert_allclose(got, want, rtol=1e-5)   # the same float32 ops, two programs
  batches = [{"image": np.asarray(x0)[None], "mask": np.ones((1, 8), bool)}]
  apply_fn = lambda p, x, t, y: comp.model.apply({"params": p}, x, t, y)
  mean, count = evaluate_bpd.evaluate_bits_per_dim(
      apply_fn, params, comp.schedule, batches, vlb_fn=families.vlb_bits_fn(config, comp.model))
  assert count == 8
  np.testing.assert_allclose(mean, float(np.mean(want)), rtol=1e-5)


def test_vdm_variance_minimising_update_equals_pure_function():
  """With vdm.variance_minimising the trainer's loss gives the schedule's shape parameters the
  gradient of mean(L^2) and every other parameter that of mean(L): the same gradients as the
  pure `vdm.variance_minimising_grads` (two separate gradient passes)."""
  plain, varmin = _config("vdm_digits"), _config("vdm_digits")
  varmin.vdm.variance_minimising = True
  comp = components.build(plain, SHAPE)
  params = components.init_params(comp, jax.random.PRNGKey(0))
  # A curved schedule (larger sigmoid bumps): at the near-linear initialisation d gamma / d slope
  # is a difference of nearly equal terms, t (h(1) - h(0)) - (h(t) - h(0)), whose cancellation
  # would make the rounding bound below meaningless for the slope.
  params["gamma"]["shape"]["c"] = params["gamma"]["shape"]["c"] + 4.0
  x0 = _batch(8)["image"]
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(3), i))(jnp.arange(8))
  net = lambda p: step_lib.ModelFn(comp.model.apply, p, p, None, jax.random.PRNGKey(0),
                                   jnp.float32)
  per_example = lambda p: families.make_loss_fn(plain, comp.schedule)(net(p), x0, keys)
  trainer_loss = lambda p: jnp.mean(families.make_loss_fn(varmin, comp.schedule)(net(p), x0,
                                                                                   keys))
  value, got = jax.jit(jax.value_and_grad(trainer_loss))(params)
  want_value, want = jax.jit(lambda p: vdm.variance_minimising_grads(
      per_example, p, families.is_shape_param))(params)
  plain_grads = jax.jit(jax.grad(lambda p: jnp.mean(per_example(p))))(params)
  assert float(value) == pytest.approx(float(want_value), rel=1e-6)   # the value is unchanged
  # Both sum the per-example terms w_b dL_b/dtheta / B (w_b = 2 L_b for the shape, 1 for the
  # rest) in another order, and the shape's terms have both signs (the shape leaves the mean
  # bound unchanged): the rounding scales with mean_b |w_b dL_b/dtheta|, ~250 float32 ops deep
  # (3e-5 ~ 250 x 1.2e-7).
  losses_b = per_example(params)
  jac = jax.jit(jax.jacrev(per_example))(params)
  for path, g in jax.tree_util.tree_flatten_with_path(got)[0]:
    names = tuple(k.key for k in path)
    w, j = want, jac
    for k in names:
      w, j = w[k], j[k]
    weight = 2.0 * losses_b if families.is_shape_param(names) else jnp.ones_like(losses_b)
    scale = np.mean(np.abs(np.asarray(weight).reshape((-1,) + (1,) * (j.ndim - 1)) * j), axis=0)
    # Plus the rounding of the cotangent the leaf's entries share (upstream of the 1024
    # features), relative to the leaf's largest terms.
    excess = np.abs(np.asarray(g) - np.asarray(w)) - (3e-5 * scale + 1e-6 * np.max(scale))
    assert np.all(excess <= 0), (jax.tree_util.keystr(path), float(np.max(excess)))
  shape_got, shape_plain = got["gamma"]["shape"]["w"], plain_grads["gamma"]["shape"]["w"]
  assert not np.allclose(shape_got, shape_plain, rtol=0.1), "the shape gradients did not change"
  with pytest.raises(ValueError, match="variance_minimising"):
    varmin.vdm.num_steps = 10
    families.family(varmin)


def test_family_config_errors():
  c = _config("edm_digits", prediction="eps")
  with pytest.raises(ValueError, match="diffusion.prediction"):
    families.family(c)
  c = _config("vdm_digits", family="vdn")
  with pytest.raises(ValueError, match="diffusion.family"):
    families.family(c)
  c = _config("vdm_digits")
  c.vdm.gamma = "learnt"
  with pytest.raises(ValueError, match="vdm.gamma"):
    families.family(c)
  with pytest.raises(ValueError, match="no variational bound"):
    families.vlb_bits_fn(_config("edm_digits"), None)


def test_sampling_views():
  """The schedule the samplers see: VDM's alpha_bar = sigmoid(-gamma((t + 1) / T)) from the
  params; EDM's sigma table log-spaced from sigma_min to sigma_max, which `__call__` reads back
  at the index t (closed forms in float64)."""
  config = _config("vdm_digits")
  comp = components.build(config, SHAPE)
  params = components.init_params(comp, jax.random.PRNGKey(0))
  params = jax.tree_util.tree_map_with_path(
      lambda p, a: a + 0.3 if "gamma_min" in jax.tree_util.keystr(p) else a, params)
  schedule = families.sampling_schedule(config, comp.model, params, comp.schedule)
  t = (np.arange(20) + 1.0) / 20
  g = np.asarray(comp.model.apply({"params": params}, jnp.asarray(t, jnp.float32),
                                  method="gamma"), np.float64)
  assert abs(g[0] - (-13.3 + 0.3)) > 0 and g[-1] == pytest.approx(5.0 + 0.3, abs=1e-4)
  # gamma is a 1024-term float32 sum evaluated in two programs (absolute rounding up to ~1e-5
  # apart), and |d log alpha_bar / d gamma| = 1 - alpha_bar <= 1.
  np.testing.assert_allclose(schedule.alphas_cumprod, 1.0 / (1.0 + np.exp(g)), rtol=1e-5)

  config = _config("edm_digits")
  comp = components.build(config, SHAPE)
  sigma = np.exp(np.linspace(np.log(0.002), np.log(80.0), 20))
  np.testing.assert_allclose(comp.schedule.sqrt_recipm1_alphas_cumprod, sigma, rtol=1e-5)
  params = components.init_params(comp, jax.random.PRNGKey(0))
  x_vp = jax.random.normal(jax.random.PRNGKey(2), (3,) + SHAPE)
  t = jnp.array([0.0, 7.5, 19.0])
  got = comp.model.apply({"params": params}, x_vp, t)
  s = jnp.asarray(np.exp(np.log(0.002) + np.array([0.0, 7.5, 19.0]) / 19 * np.log(80 / 0.002)),
                  jnp.float32)
  raw = lambda u, c: comp.model.backbone.apply({"params": params["backbone"]}, u, c)
  want = edm.denoiser(raw, x_vp * jnp.sqrt(1 + s**2)[:, None, None, None], s)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,sampler,steps", [("vdm_digits", "ddpm", None),
                                                ("vdm_digits", "heun", 3),
                                                ("edm_digits", "heun", 3),
                                                ("edm_digits", "ddim", 5)])
def test_experiments_sample_on_family_models(name, sampler, steps):
  """experiments.sample on a (freshly initialised) VDM / EDM model: finite images of the run's
  shape from the schedule samplers and the EDM sampler."""
  from experiments import sample as sample_cli
  from experiments import sampling_lib
  config = _config(name)
  comp = components.build(config, SHAPE)
  params = components.init_params(comp, jax.random.PRNGKey(0))
  schedule = families.sampling_schedule(config, comp.model, params, comp.schedule)
  loaded = restore.Loaded(config, comp.model, schedule, params, SHAPE, 0, 0)
  apply_fn = lambda p, x, t, y: comp.model.apply({"params": p}, x, t, y, train=False)
  floats = sampling_lib.generate(apply_fn, params, schedule, SHAPE, num_samples=4, sampler=sampler,
                                 steps=steps, prediction=config.diffusion.prediction,
                                 progress=False)
  assert floats.shape == (4,) + SHAPE and np.all(np.isfinite(floats))
  images = sample_cli.sample_images(loaded, 4, seed=0, batch_size=4, sampler=sampler, steps=steps)
  assert images.shape == (4,) + SHAPE and images.dtype == np.uint8


@pytest.mark.slow
@pytest.mark.parametrize("family,overrides", [
    ("vdm", {"diffusion.prediction": "eps"}),
    ("edm", {"diffusion.prediction": "x0", "sample.sampler": "heun"})])
def test_trained_family_run_restores_and_samples(tmp_path, family, overrides):
  """A tiny run of each family through the trainer (previews included), restored by
  `load_for_sampling` (a VDM run's schedule from its checkpointed gamma) and sampled by
  experiments.sample's library: finite images of the run's shape."""
  import training_testlib as tl
  from diffusion_jax.training import trainer
  from experiments import sample as sample_cli
  extra = {"diffusion.family": family, "train.num_steps": 4, **overrides}
  config = tl.tiny_config(str(tmp_path / "tfds"), **extra)
  if family == "edm":
    config.sample.kwargs.num_steps = 3
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir)
  loaded = restore.load_for_sampling(workdir)
  assert loaded.step == 4
  if family == "vdm":
    t = jnp.arange(1, 21, dtype=jnp.float32) / 20
    g = np.asarray(loaded.model.apply({"params": loaded.params}, t, method="gamma"), np.float64)
    # As in test_sampling_views: gamma's float32 rounding, |d log abar / d gamma| <= 1.
    np.testing.assert_allclose(loaded.schedule.alphas_cumprod, 1 / (1 + np.exp(g)), rtol=1e-5)
  for sampler, steps in (("ddpm", None), ("heun", 3)):
    images = sample_cli.sample_images(loaded, 4, seed=0, batch_size=4, sampler=sampler,
                                      steps=steps)
    assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8
