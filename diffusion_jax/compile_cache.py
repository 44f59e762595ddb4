"""JAX's persistent compilation cache, on by default for the command-line entry points.

A second `experiments.sample` or `experiments.train` call with the same model and shapes then
loads the compiled executables from disk instead of compiling them again.

    from diffusion_jax import compile_cache
    compile_cache.enable()                # $DIFFUSION_JAX_CACHE/jax_cache or ~/.cache/diffusion_jax/jax_cache
    compile_cache.enable('/tmp/my_cache')
    compile_cache.enable('')              # off

Entry points define the flag with `compile_cache.define_flag()` (`--compile_cache=DIR`, empty
to turn it off) and call `compile_cache.enable(FLAGS.compile_cache)` first thing in `main`.

References: JAX docs, "Persistent compilation cache"
(jax.readthedocs.io/en/latest/persistent_compilation_cache.html).
"""
from __future__ import annotations

import os

import jax

ENV_VAR = "DIFFUSION_JAX_CACHE"


def default_cache_dir() -> str:
  """`jax_cache` under $DIFFUSION_JAX_CACHE (the library's cache, which also holds the digits
  classifier) if set (set but empty turns the cache off), else ~/.cache/diffusion_jax/jax_cache
  (under $XDG_CACHE_HOME when that is set)."""
  if ENV_VAR in os.environ:
    return os.path.join(os.environ[ENV_VAR], "jax_cache") if os.environ[ENV_VAR] else ""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "diffusion_jax", "jax_cache")


def enable(cache_dir: str | None = None, min_compile_time_secs: float = 0.5) -> str | None:
  """Turn on the persistent compilation cache in `cache_dir` (None: `default_cache_dir()`).

  An empty `cache_dir` leaves the cache off. Programs that compiled in less than
  `min_compile_time_secs` are not written (reading them back would cost about as much).
  Returns the absolute cache directory, or None when off. Call before the first compilation.
  """
  if cache_dir is None:
    cache_dir = default_cache_dir()
  if not cache_dir:
    return None
  if min_compile_time_secs < 0:
    raise ValueError(f"min_compile_time_secs must be >= 0, got {min_compile_time_secs}")
  cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
  os.makedirs(cache_dir, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  _forget_cache_decision()
  return cache_dir


def _forget_cache_decision() -> None:
  """JAX decides once per process whether the cache is used (at the first compilation); make
  it decide again so that enabling after something was compiled still takes effect."""
  try:
    from jax._src import compilation_cache as cc  # pylint: disable=g-import-not-at-top
    cc.reset_cache()
  except (ImportError, AttributeError):  # a JAX without it: enable() must then come first
    pass


def define_flag() -> None:
  """Define the absl flag `--compile_cache` (default `default_cache_dir()`, empty: off)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("compile_cache", default_cache_dir(),
                      "Directory of the persistent JAX compilation cache; empty turns it off "
                      f"(default: ${ENV_VAR}/jax_cache or ~/.cache/diffusion_jax/jax_cache).")
