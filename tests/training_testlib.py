"""Shared helpers for the trainer and experiment tests: a tiny digits config and checkpoint reads."""
import os
import sys
import tempfile
import textwrap

import jax
import numpy as np

from experiments.configs import digits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The trainer tests compile the same tiny programs many times (in-process and in subprocesses):
# a persistent compilation cache makes the reruns cheap. It changes no numbers.
CACHE_DIR = os.path.join(tempfile.gettempdir(), "diffusion_jax_test_jax_cache")
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

# Command-line overrides that make the digits config tiny (also used by the subprocess tests).
TINY = {
    "model.ch": 8, "model.num_groups": 4, "model.ch_mult": (1,), "model.attention_levels": (0,),
    "diffusion.num_timesteps": 20,
    "train.num_steps": 8, "train.batch_size": 16, "train.steps_per_call": 1,
    "train.checkpoint_every": 2, "train.log_every": 2, "train.sample_every": 0,
    "sample.num_samples": 4, "optim.warmup_steps": 2, "train.ema_decays": (0.9, 0.99),
}


# Child-process code for the page-fault tests (test_host_memory, test_huge_pages): jits a
# computation whose only large buffer is a 64 MiB temporary (sin of an outer product, feeding a
# matrix-vector product), calls it 10 times to warm up, then leaves the minor page faults of 10
# more calls in `faults`, the last result in `out` and the temporary's size in `temp_bytes`.
FAULT_PROBE = textwrap.dedent("""
    import resource
    import jax, jax.numpy as jnp, numpy as np

    n = 4096
    f = jax.jit(lambda x, w: jnp.sin(x[:, None] * w[None, :]) @ w)
    x = jnp.linspace(-3.0, 3.0, n, dtype=jnp.float32)
    w = jnp.linspace(0.5, 1.5, n, dtype=jnp.float32)
    compiled = f.lower(x, w).compile()
    temp_bytes = compiled.memory_analysis().temp_size_in_bytes
    for _ in range(10):
      out = compiled(x, w).block_until_ready()
    faults = []
    for _ in range(10):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      out = compiled(x, w).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")

def set_keys(config, values: dict):
  """Sets dotted keys ('train.num_steps': 4, ...) on a ConfigDict; returns it."""
  for key, value in values.items():
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return config


def tiny_config(data_dir: str, **overrides):
  config = set_keys(digits.get_config(), {**TINY, **overrides})
  config.data.data_dir = data_dir
  return config


def override_flags(data_dir: str, **overrides) -> list[str]:
  flags = []
  for key, value in {**TINY, **overrides}.items():
    if isinstance(value, tuple):
      value = "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    flags.append(f"--config.{key}={value}")
  return flags + [f"--config.data.data_dir={data_dir}"]


def train_command(workdir: str, data_dir: str, **overrides) -> list[str]:
  return [sys.executable, "-m", "experiments.train",
          f"--config={os.path.join(REPO, 'experiments/configs/digits.py')}",
          f"--workdir={workdir}"] + override_flags(data_dir, **overrides)


def subprocess_env(num_devices: int = 8) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_COMPILATION_CACHE_DIR"] = CACHE_DIR
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return env


def read_state(workdir: str, step: int | None = None):
  """(step, host state) of the newest readable checkpoint of a run."""
  from diffusion_jax.training import checkpoint, components, restore  # pylint: disable=g-import-not-at-top
  import json
  config = restore.load_config(workdir)
  info = json.loads(open(os.path.join(workdir, "dataset_info.json")).read())
  comp = components.build(config, tuple(info["image_shape"]))
  target = components.init_state(config, comp, jax.random.PRNGKey(0), abstract=True)
  ck = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  try:
    at, state, _ = ck.restore(target, step)
  finally:
    ck.close()
  return at, state


def max_abs_diff(a, b) -> float:
  """max |a - b| over the leaves of two trees of the same structure (checked)."""
  assert jax.tree.structure(a) == jax.tree.structure(b), (jax.tree.structure(a),
                                                          jax.tree.structure(b))
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def group_relative_diffs(a, b) -> dict[str, float]:
  """{group: max |a - b| / max |a|} over groups of leaves of two train states (structure
  checked): params, each EMA, and each optimizer-state field (Adam's mu, nu, ...). Each group is
  measured against its own magnitude, so Adam's second moments (~1e-8) are not hidden under a
  tolerance made for the parameters (~1); not per leaf, since some leaves' gradients are zero in
  exact arithmetic (an attention key bias: softmax ignores a constant shift) and hold rounding
  noise only."""
  assert jax.tree.structure(a) == jax.tree.structure(b), (jax.tree.structure(a),
                                                          jax.tree.structure(b))
  diffs, scales = {}, {}
  for (path, x), y in zip(jax.tree.leaves_with_path(a), jax.tree.leaves(b), strict=True):
    keys = [str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path]
    group = keys[0]
    if keys[0] == "opt_state":
      group = "opt_state." + next((k for k in keys[1:] if not k.isdigit()), "")
    elif keys[0] == "ema_params" and len(keys) > 1:
      group = "ema_params." + keys[1]
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if not x.size:
      continue
    diffs[group] = max(diffs.get(group, 0.0), float(np.max(np.abs(x - y))))
    scales[group] = max(scales.get(group, 0.0), float(np.max(np.abs(x))))
  return {g: (diffs[g] / scales[g] if scales[g] > 0 else (0.0 if diffs[g] == 0 else np.inf))
          for g in diffs}
