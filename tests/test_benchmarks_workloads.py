"""The benchmarks' helpers. The shared train step really trains: one step of `workloads.jax_train_step` moves
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


def test_trace_summary_reads_a_profile_back(tmp_path):
  """trace_summary (profile_step.py, bench_mfu.py --profile_dir) finds the trace's xplane file
  and the host plane's XLA:CPU thunk events of a traced jitted matmul; kernel names are classed
  by their cuBLAS / CUTLASS / XLA-fusion markers."""
  import jax.numpy as jnp
  import trace_summary
  f = jax.jit(lambda a: jnp.tanh(a @ a))
  a = jnp.ones((256, 256))
  f(a).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    f(a).block_until_ready()
  planes = trace_summary.events_by_plane(trace_summary.xplane_file(str(tmp_path)))
  host = [ns for name, (ns, _) in planes.items() if name.startswith("/host")]
  assert host and sum(host[0].values()) > 0
  assert not any(e.startswith(trace_summary.NOT_OPS) for e in host[0])
  assert trace_summary.gpu_kernel_class("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
  assert trace_summary.gpu_kernel_class("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNN") == "matmul"
  assert trace_summary.gpu_kernel_class("loop_multiply_fusion_3") == "XLA fusion"
  assert trace_summary.gpu_kernel_class("some_kernel") == "other"
