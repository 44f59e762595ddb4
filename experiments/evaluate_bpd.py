"""Test-set bits/dim of a trained run: the full variational bound (EMA params) or the
probability-flow ODE likelihood.

  python -m experiments.evaluate_bpd --workdir=runs/digits
  python -m experiments.evaluate_bpd --workdir=runs/digits --method=ode --ode_steps=100

The VLB is `losses.bits_per_dim` (prior + all T terms + discretised decoder, one lax.scan over
t), or for a VDM run its own bound (continuous time or its T steps, one time per example); the ODE value is -log2 p of uniformly dequantised data (`samplers.likelihood`, Hutchinson
trace), an upper bound on the discrete bits/dim in expectation. Both are averaged over every test
example once (padding masked out), each batch split over the local devices under `jax.jit`
(`training.local_batch`); example i's noise comes from fold_in(PRNGKey(seed), i), so the figure
does not depend on the device count (up to float32 rounding: a device's share of the batch may
sum in another order).

References: Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021 (calc_bpd_loop); Song et al. 2021,
appendix D.2.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import numpy as np

from diffusion_jax import _checks
from diffusion_jax import losses
from diffusion_jax import reverse
from diffusion_jax import rng as rng_lib
from diffusion_jax.samplers import likelihood
from diffusion_jax.schedules import Schedule
from diffusion_jax.training import local_batch

METHODS = ("vlb", "ode")


def evaluate_bits_per_dim(apply_fn, params: Any, schedule: Schedule,
                          batches: Iterable[dict[str, np.ndarray]], *, method: str = "vlb",
                          prediction: str = "eps", variance: str = "fixed_small",
                          clip_denoised: bool = True, ode_steps: int = 100, seed: int = 0,
                          num_batches: int | None = None,
                          vlb_fn: Callable[..., jax.Array] | None = None) -> tuple[float, int]:
  """Mean bits/dim over the masked-in examples of `batches`.

  Args:
    apply_fn: `(params, x [B, H, W, C], t [B], y [B] or None) -> output` (unconditional use:
      y is None).
    params: model parameters.
    schedule: the training schedule.
    batches: dicts {'image': float32 [D, b, H, W, C] on the 256-level grid in [-1, 1],
      'mask': bool [D, b]} (`data.make_eval_iterator`: D = the local device count). Each batch's
      D * b examples are split over the local devices (over one device when their number does
      not divide D * b).
    method: 'vlb' (full variational bound) or 'ode' (probability-flow ODE, dequantised).
    prediction, variance, clip_denoised: the model's parameterisation (VLB).
    ode_steps: Heun steps of the ODE likelihood.
    seed: example i's key is fold_in(PRNGKey(seed), i) (i counts examples in batch order).
    num_batches: stop after this many batches (None: all).
    vlb_fn: `(params, x [b, H, W, C], keys [b]) -> bits/dim [b]`, the bound of a run whose family
      is not a discrete DDPM (`families.vlb_bits_fn`: VDM's continuous-time VLB); None: the
      T-step bound `losses.bits_per_dim`.

  Returns:
    (mean bits/dim, number of examples).
  """
  _checks.check_choice("method", method, METHODS)
  root = jax.random.PRNGKey(seed)

  def per_example(params, x, keys):
    model_fn = lambda x_t, t: apply_fn(params, x_t, t, None)
    if method == "vlb" and vlb_fn is not None:
      return vlb_fn(params, x, keys)
    if method == "vlb":
      return losses.bits_per_dim(model_fn, schedule, x, keys, prediction=prediction,
                                 variance=variance, clip_denoised=clip_denoised).total
    dequant = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:]))(rng_lib.fold_in_all(keys, 1))
    x_cont = x + dequant / 127.5
    dims = int(np.prod(x.shape[1:]))
    result = likelihood.ode_log_likelihood(model_fn, schedule, x_cont, keys, num_steps=ode_steps,
                                           prediction=prediction, variance=variance)
    return likelihood.nats_to_bits_per_dim(result.log_p, dims)

  runners = {}   # batch size -> (its LocalBatch, params placed there, the jitted bound)

  def runner(size: int):
    if size not in runners:
      local = local_batch.LocalBatch.dividing(size)
      run = jax.jit(lambda p, x, k: per_example(p, local.constrain(x), local.constrain(k)),
                    out_shardings=local.sharded)
      runners[size] = (local, local.place(params), run)
    return runners[size]

  seen = [0]

  def fn(batch):
    image = np.asarray(batch["image"])
    size = image.shape[0] * image.shape[1]
    indices = seen[0] + np.arange(size)
    seen[0] += size
    local, placed, run = runner(size)
    keys = rng_lib.keys_for_indices(root, indices)
    return run(placed, local.shard(image.reshape((size,) + image.shape[2:])), local.shard(keys))

  def limited():
    for k, batch in enumerate(batches):
      if num_batches is not None and k >= num_batches:
        return
      yield batch

  return likelihood.mean_over_batches(fn, limited())


def main(argv):
  del argv
  from absl import flags
  from diffusion_jax import compile_cache, data
  from diffusion_jax.training import console
  from diffusion_jax.training import restore   # the training package's run loader
  from diffusion_jax.training import families
  from diffusion_jax.training import sampling

  flags_ = flags.FLAGS
  console.quiet_libraries(flags_.verbosity)
  compile_cache.enable(flags_.compile_cache)
  from experiments import paths
  loaded = restore.load_for_sampling(paths.absolute(flags_.workdir), use_ema=flags_.use_ema)
  if loaded.num_classes:
    raise ValueError("evaluate_bpd scores unconditional models; this run is class-conditional.")
  batches = data.make_eval_iterator(loaded.config.data, global_batch_size=flags_.batch_size,
                                    split=flags_.split)
  diffusion = loaded.config.diffusion
  apply_fn = lambda p, x, t, y: loaded.model.apply({"params": p}, x, t, y, train=False)
  vlb_fn = families.vlb_bits_fn(loaded.config, loaded.model) if flags_.method == "vlb" else None
  bpd, count = evaluate_bits_per_dim(
      apply_fn, loaded.params, loaded.schedule, batches, method=flags_.method,
      prediction=diffusion.prediction,
      variance=sampling.sampling_variance(loaded.config, flags_.variance),
      ode_steps=flags_.ode_steps,
      seed=flags_.seed, num_batches=flags_.num_batches, vlb_fn=vlb_fn)
  print(f"step {loaded.step}: {flags_.method} bits/dim = {bpd:.4f} over {count} examples "
        f"({'EMA' if flags_.use_ema else 'raw'} params)")


if __name__ == "__main__":
  from absl import app
  from absl import flags

  flags.DEFINE_string("workdir", None, "Workdir of a training run.")
  flags.DEFINE_enum("method", "vlb", list(METHODS), "Full VLB or probability-flow ODE.")
  flags.DEFINE_integer("batch_size", 64, "Global evaluation batch size.")
  flags.DEFINE_string("split", None, "Split (default: the data config's eval split).")
  flags.DEFINE_bool("use_ema", True, "EMA params (else raw).")
  flags.DEFINE_integer("ode_steps", 100, "Heun steps of the ODE likelihood.")
  flags.DEFINE_integer("num_batches", None, "Evaluate only this many batches.")
  flags.DEFINE_integer("seed", 0, "Noise seed.")
  flags.DEFINE_enum("variance", None, list(reverse.VARIANCES),
                    "Reverse-process variance; unset: the run's own (sample.variance, else "
                    "diffusion.variance).")
  from diffusion_jax import compile_cache
  compile_cache.define_flag()
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
