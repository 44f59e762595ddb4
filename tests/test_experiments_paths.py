"""experiments.paths: user paths in a training config are made absolute at launch, so a resumed
run (or a subprocess) started from another directory reads the same files."""
import os

from diffusion_jax.training import default_config
from experiments import paths


def test_every_path_key_exists_in_the_schema_and_is_made_absolute(tmp_path, monkeypatch):
  config = default_config.get_config()
  for dotted in paths.CONFIG_PATH_KEYS:
    section, key = dotted.split(".")
    assert key in config[section], f"{dotted} is not declared in default_config.py"
    config[section][key] = f"rel/{key}"
  config.data.text_dir = "data/shakespeare"
  monkeypatch.chdir(tmp_path)
  paths.resolve_config_paths(config)
  for dotted in paths.CONFIG_PATH_KEYS:
    section, key = dotted.split(".")
    want = "data/shakespeare" if dotted == "data.text_dir" else f"rel/{key}"
    assert config[section][key] == os.path.join(str(tmp_path), want)


def test_remote_and_unset_paths_are_left_alone():
  config = default_config.get_config()
  config.data.data_dir = "gs://bucket/tfds"
  config.data.text_dir = None
  paths.resolve_config_paths(config)
  assert config.data.data_dir == "gs://bucket/tfds" and config.data.text_dir is None
