"""The command-line sampling library: device-count independence, labels, guidance, recompiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax as dj
from experiments import sampling_lib
from numerics_testlib import assert_f32_close

SCHEDULE = dj.get_schedule("linear", 50)
IMAGE = (4, 4, 2)


def apply_fn(params, x, t, y):
  """A tiny class-conditional 'network' (10 classes + null label 10)."""
  t = jnp.asarray(t, jnp.float32)[:, None, None, None]
  label = 0.0 if y is None else y.astype(jnp.float32)[:, None, None, None]
  spatial = jnp.mean(x, axis=(1, 2), keepdims=True)
  return jnp.tanh(params["w"] * x + 0.01 * t + 0.05 * label + spatial)


PARAMS = {"w": jnp.float32(0.7)}


@pytest.mark.parametrize("sampler,steps", [("ddpm", "10"), ("dpm_solver++", "8"), ("heun", "5")])
def test_same_seed_same_images_on_one_and_eight_devices(sampler, steps):
  kw = dict(num_samples=20, seed=3, sampler=sampler, steps=steps, num_classes=10,
            guidance_scale=2.0, progress=False)
  one = sampling_lib.generate(apply_fn, PARAMS, SCHEDULE, IMAGE, batch_size=7,
                              devices=jax.local_devices()[:1], **kw)
  eight = sampling_lib.generate(apply_fn, PARAMS, SCHEDULE, IMAGE, batch_size=16, **kw)
  assert one.shape == (20,) + IMAGE
  # Same keys per example, other batch layout and program: rounding only, ~20 float32
  # operations per step (two network halves + guidance mix) x at most 10 steps (x2 for Heun).
  assert_f32_close(one, eight, ops=20 * 10 * 2)


def test_guidance_scale_one_is_conditional_and_labels_matter():
  kw = dict(num_samples=8, seed=0, sampler="ddim", steps="10", num_classes=10, progress=False)
  plain = sampling_lib.generate(apply_fn, PARAMS, SCHEDULE, IMAGE, **kw)
  near_one = sampling_lib.generate(apply_fn, PARAMS, SCHEDULE, IMAGE, guidance_scale=1.0 + 1e-7,
                                   **kw)
  # The guided mix at scale 1 + 1e-7 moves each step by 1e-7 |cond - uncond| (~1 here), the
  # order of one rounding: 10 steps x ~20 operations of rounding in all.
  assert_f32_close(near_one, plain, ops=20 * 10)
  other = sampling_lib.generate(apply_fn, PARAMS, SCHEDULE, IMAGE,
                                labels=sampling_lib.parse_labels("7", 8, 10), **kw)
  assert not np.allclose(plain, other)


def test_parse_labels():
  np.testing.assert_array_equal(sampling_lib.parse_labels(None, 5, 3), [0, 1, 2, 0, 1])
  np.testing.assert_array_equal(sampling_lib.parse_labels("4,9", 3, 10), [4, 9, 4])
  assert sampling_lib.parse_labels(None, 5, 0) is None
  for bad, classes in [("10", 10), ("a", 10), ("1", 0)]:
    with pytest.raises(ValueError):
      sampling_lib.parse_labels(bad, 4, classes)


def test_evaluate_bits_per_dim_masks_padding_and_matches_the_vlb():
  from experiments import evaluate_bpd
  schedule = dj.get_schedule("cosine", 10)
  pixels = jax.random.randint(jax.random.key(0), (11,) + IMAGE, 0, 256)
  images = np.asarray(pixels, np.float32) / 127.5 - 1.0
  model_fn = lambda x, t: apply_fn(PARAMS, x, t, None)
  root = jax.random.PRNGKey(0)
  keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.arange(11))
  expected = dj.bits_per_dim(model_fn, schedule, jnp.asarray(images), keys).total.mean()
  # Two batches of 8 devices x 1 example, the second padded with 5 masked-out repeats.
  padded = np.concatenate([images, np.repeat(images[:1], 5, axis=0)])
  mask = np.arange(16) < 11
  batches = [{"image": padded[k * 8:(k + 1) * 8].reshape((8, 1) + IMAGE),
              "mask": mask[k * 8:(k + 1) * 8].reshape(8, 1)} for k in range(2)]
  bpd, count = evaluate_bpd.evaluate_bits_per_dim(apply_fn, PARAMS, schedule, batches)
  assert count == 11
  np.testing.assert_allclose(bpd, expected, rtol=1e-5)
  ode_bpd, count = evaluate_bpd.evaluate_bits_per_dim(apply_fn, PARAMS, schedule, batches[:1],
                                                      method="ode", ode_steps=2)
  assert count == 8 and np.isfinite(ode_bpd)


def test_readme_sampling_example_runs():
  import pathlib
  import re
  text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
  block = re.search(r"<!-- sampling-example:start -->\s*```python\n(.*?)```\s*"
                    r"<!-- sampling-example:end -->", text, re.S)
  assert block, "README lacks the sampling-example block"
  namespace = {}
  exec(compile(block.group(1), "README.md", "exec"), namespace)
  assert namespace["images"].shape == namespace["more"].shape == (8, 8, 8, 3)
  assert namespace["draw"]._cache_size() == 1


def test_steps_is_a_count_on_the_default_grid():
  assert sampling_lib.parse_steps("20") == 20 and sampling_lib.parse_steps(None) is None
  with pytest.raises(ValueError, match="timesteps"):
    sampling_lib.parse_steps("ddim50")
  # --steps=20 for dpm_solver++ is the authors' time-uniform grid, not the '20' respacing spec.
  plan = dj.samplers.plan("dpm_solver++", SCHEDULE, sampling_lib.parse_steps("20"))
  np.testing.assert_array_equal(plan.per_call["timesteps"],
                                dj.samplers.space_timesteps(50, "linspace20"))


def test_pc_through_the_command_line_library():
  kw = dict(num_samples=6, seed=1, steps="8", progress=False, batch_size=6,
            devices=jax.local_devices()[:1])
  # The ancestral predictor without corrector is DDPM's step (tests/test_samplers_pc.py): the
  # static settings reach the sampler, and pc's grid for --steps is ddpm's. Rounding of ~10
  # operations per step x 8 steps.
  ancestral = sampling_lib.generate(apply_fn, PARAMS, SCHEDULE, IMAGE, sampler="pc",
                                    static={"predictor": "ancestral", "corrector": "none"}, **kw)
  ddpm = sampling_lib.generate(apply_fn, PARAMS, SCHEDULE, IMAGE, sampler="ddpm", **kw)
  assert_f32_close(ancestral, ddpm, ops=10 * 8)
  # The corrector's snr reaches it.
  corrected = [sampling_lib.generate(apply_fn, PARAMS, SCHEDULE, IMAGE, sampler="pc", snr=snr,
                                     **kw) for snr in (0.16, 0.3)]
  assert not np.allclose(*corrected)


def test_generator_is_built_once_and_matches_generate():
  # make_generator traces (and compiles) its pmapped sampler once: later calls, other sizes and
  # first indices included, reuse it. Its draws are generate's (same keys fold_in(seed, index),
  # same per-device program: same bits), so shards drawn with one generator equal one big draw.
  traces = []

  def counting_apply(params, x, t, y):
    traces.append(x.shape)      # runs at trace time only
    return apply_fn(params, x, t, y)

  kw = dict(seed=1, sampler="ddim", steps="6", num_classes=10, guidance_scale=1.5)
  draw = sampling_lib.make_generator(counting_apply, PARAMS, SCHEDULE, IMAGE, batch_size=8, **kw)
  labels = sampling_lib.parse_labels("3,5", 20, 10)
  shards = [draw(8, labels[0:8], first_index=0), draw(12, labels[8:20], first_index=8)]
  assert len(traces) == 1
  whole = sampling_lib.generate(apply_fn, PARAMS, SCHEDULE, IMAGE, num_samples=20, batch_size=8,
                                labels=labels, progress=False, **kw)
  np.testing.assert_array_equal(np.concatenate(shards), whole)


def test_parse_checkpoint():
  assert [sampling_lib.parse_checkpoint(s) for s in (None, "latest", "best", "1200")] == [
      None, None, "best", 1200]
  with pytest.raises(ValueError, match="checkpoint must be 'latest', 'best' or a step number"):
    sampling_lib.parse_checkpoint("newest")
