"""The benchmarks' shared train step really trains: one step of `workloads.jax_train_step` moves
every parameter (a step whose loss did not depend on the differentiated parameters once timed a
forward pass as a train step: XLA drops a zero backward)."""
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import workloads  # noqa: E402


def test_train_step_updates_every_parameter():
  step, args = workloads.jax_train_step("DiT-S/2", 1)
  before = [np.asarray(a) for a in jax.tree.leaves(args[0])]
  params, _, loss = step(*args)
  after = [np.asarray(a) for a in jax.tree.leaves(params)]
  assert np.isfinite(float(loss))
  # Adam's first step moves a parameter by ~lr = 2e-4 wherever its gradient is non-zero, and
  # leaves it exactly unchanged where the gradient is zero.
  unchanged = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if np.array_equal(a, b)]
  assert not unchanged, f"{len(unchanged)} of {len(before)} parameter leaves got no gradient"


def test_sampling_workloads_run():
  """The sampling throughput workloads (bench_sampling.py) run on the current sampler API: a
  renamed sampler argument once broke them silently, since nothing else calls them."""
  for task in ("ddpm", "ddim"):
    result = workloads.jax_side(task, "DiT-S/2", batch=1, iters=1, steps=2, dtype="float32")
    assert result["compile_s"] > 0 and len(result["times_s"]) == 1
