"""diffusion_jax.compile_cache: where the cache goes, off by an empty path, and that it is used."""
import os

import jax
import jax.numpy as jnp
import pytest

from diffusion_jax import compile_cache


@pytest.fixture
def restore_jax_config():
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  saved = {k: getattr(jax.config, k) for k in keys}
  yield
  for k, v in saved.items():
    jax.config.update(k, v)
  compile_cache._forget_cache_decision()  # pylint: disable=protected-access


def test_default_dir_from_env_and_home(monkeypatch):
  monkeypatch.setenv(compile_cache.ENV_VAR, "/somewhere/cache")
  assert compile_cache.default_cache_dir() == "/somewhere/cache/jax_cache"
  monkeypatch.setenv(compile_cache.ENV_VAR, "")
  assert compile_cache.default_cache_dir() == ""      # set but empty: off
  monkeypatch.delenv(compile_cache.ENV_VAR)
  monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
  monkeypatch.setenv("HOME", "/home/u")
  assert compile_cache.default_cache_dir() == "/home/u/.cache/diffusion_jax/jax_cache"


def test_empty_path_is_off(restore_jax_config):
  before = jax.config.jax_compilation_cache_dir
  assert compile_cache.enable("") is None
  assert jax.config.jax_compilation_cache_dir == before


def test_bad_threshold_raises(tmp_path):
  with pytest.raises(ValueError, match="min_compile_time_secs"):
    compile_cache.enable(str(tmp_path), min_compile_time_secs=-1)


def test_compiled_program_is_written(tmp_path, restore_jax_config):
  jax.jit(lambda x: x + 1)(1.0)  # something compiled before: enabling must still take effect
  path = compile_cache.enable(str(tmp_path / "c"), min_compile_time_secs=0.0)
  assert path == str(tmp_path / "c") and jax.config.jax_compilation_cache_dir == path
  # A function no other test compiles, so this compilation is not served from memory.
  jax.jit(lambda x: jnp.sin(x) * 3.25 + jnp.cos(x) ** 7)(jnp.arange(13.0)).block_until_ready()
  assert any(files for _, _, files in os.walk(path))
