"""The fast samplers on the Quickstart's trained digits model (slow): in range, and close to the
full ancestral chain in quality.

Thresholds (issue 16, fixed before any of these samplers was measured on this model): every
sampler's samples lie in [-1, 1] (a pixel model with the default x0 clipping); DPM-Solver++ at
20 network evaluations, Heun at <= 20 (10 steps, 19 evaluations) and DDIM at 25 steps reach a
digits Frechet distance within 1.5x of the 250-step ancestral sampler's. 500 samples each
(seed 0, the same noise streams for every sampler).
"""

import numpy as np
import pytest

from diffusion_jax.samplers import grids
from diffusion_jax.training import restore
from diffusion_jax.training import sampling
from experiments import sampling_lib

NUM_SAMPLES = 500
WITHIN = 1.5      # the factor over the 250-step ancestral sampler
RUNS = {          # sampler: steps on its default grid
    "dpm_solver++": 20,
    "heun": 10,   # 2 * 10 - 1 = 19 network evaluations
    "ddim": 25,
    "euler": 20,  # range only
}


def draw(loaded, name, steps):
  diffusion = loaded.config.diffusion
  return sampling_lib.generate(
      lambda p, x, t, y: loaded.model.apply({"params": p}, x, t, y, train=False), loaded.params,
      loaded.schedule, loaded.image_shape, num_samples=NUM_SAMPLES, seed=0,
      batch_size=NUM_SAMPLES, sampler=name, steps=steps, prediction=diffusion.prediction,
      variance=sampling.sampling_variance(loaded.config), progress=False)


@pytest.mark.slow
@pytest.mark.xdist_group("quickstart")
def test_fast_samplers_match_the_ancestral_chain_on_trained_digits(quickstart_run):
  from diffusion_jax.evaluation.digits import digits_frechet_distance
  loaded = restore.load_for_sampling(quickstart_run.workdir, use_ema=True)
  num_timesteps = loaded.schedule.num_timesteps
  samples = {"ddpm": draw(loaded, "ddpm", num_timesteps)}
  samples.update({name: draw(loaded, name, steps) for name, steps in RUNS.items()})
  for name, x in samples.items():
    assert np.all(np.isfinite(x)) and x.min() >= -1.0 and x.max() <= 1.0, (
        name, float(x.min()), float(x.max()))
  distance = {name: float(digits_frechet_distance(sampling.to_uint8(x)))
              for name, x in samples.items()}
  for name in ("dpm_solver++", "heun", "ddim"):
    assert grids.network_evaluations(name, RUNS[name]) <= 25
    assert distance[name] <= WITHIN * distance["ddpm"], distance


@pytest.mark.slow
@pytest.mark.xdist_group("quickstart")
def test_samplers_split_over_8_devices_draw_the_trained_models_images(quickstart_run):
  # The trainer's previews / evaluation sampler and the command-line generator, both split over
  # the 8 test devices (training.local_batch), draw the trained digits model's images as on one
  # device, up to float32 rounding: a device's batch of 2 instead of 16 may pick kernels that sum
  # in another order, so each of the network's reductions may round differently at each of the
  # 10 steps (on this machine the trainer's sampler differed by up to 1.4e-6 here, while the
  # tiny test model's images were the same bits).
  import jax
  import jax.numpy as jnp
  from numerics_testlib import assert_f32_close, reductions_per_call
  from diffusion_jax.training import components
  from diffusion_jax.training import trainer
  loaded = restore.load_for_sampling(quickstart_run.workdir, use_ema=True)
  comp = components.build(loaded.config, loaded.image_shape)
  key = jax.random.PRNGKey(5)
  spread = trainer._ImageSampler(loaded.config, comp, 16, sampler="ddim", steps=10)
  one = trainer._ImageSampler(loaded.config, comp, 16, sampler="ddim", steps=10,
                              devices=jax.devices()[:1])
  x = jnp.zeros((2,) + tuple(loaded.image_shape))
  ops = 10 * reductions_per_call(
      lambda p: loaded.model.apply({"params": p}, x, jnp.zeros(2), None, train=False),
      loaded.params)
  images = spread(loaded.params, key)
  assert len(images.sharding.device_set) == 8
  assert_f32_close(images, one(loaded.params, key), ops=ops)
  assert np.asarray(images).std() > 0.1   # digits, not a constant
  cli = {n: sampling_lib.make_run_generator(loaded, seed=0, batch_size=16, sampler="ddim",
                                            steps=10, devices=jax.devices()[:n])(16)
         for n in (1, 8)}
  assert_f32_close(cli[8], cli[1], ops=ops)
