"""Paths given on the command line, made absolute once at the entry point.

Everything below the entry points (orbax in particular, which refuses relative checkpoint paths)
then sees absolute paths and never depends on the current directory.
"""
from __future__ import annotations

import os
from typing import Any

# Config keys (`section.key`) that hold paths a user may give relative to the current directory.
CONFIG_PATH_KEYS = ("data.data_dir", "data.folder", "data.latents_dir", "data.text_dir",
                    "data.text_cache_dir", "autoencoder.workdir")


def absolute(path: str | None) -> str | None:
  """`path` with `~` expanded, made absolute against the current directory (None stays None).

  Remote URLs (`gs://...`, any `scheme://`) are returned unchanged.
  """
  if path is None or path == "":
    return path
  path = str(path)
  if "://" in path:
    return path
  return os.path.abspath(os.path.expanduser(path))


def resolve_config_paths(config: Any) -> Any:
  """Makes the path-valued keys of a training config (`CONFIG_PATH_KEYS`) absolute, in place."""
  for dotted in CONFIG_PATH_KEYS:
    section, key = dotted.split(".")
    node = config.get(section) if hasattr(config, "get") else None
    if node is not None and key in node and node[key]:
      node[key] = absolute(node[key])
  return config
