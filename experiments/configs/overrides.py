"""Command-line `--config.a.b=value` overrides: an unknown key is a one-line error naming the key
and the nearest declared ones, instead of ml_collections' traceback.

  app.run(main, flags_parser=overrides.parse_flags)

References: ml_collections `config_flags` (the overrides are applied while absl parses flags).
"""
from __future__ import annotations

import sys
from typing import Any, Sequence

from absl import app
from absl import flags

from diffusion_jax import _checks


def _override_paths(argv: Sequence[str], flag_name: str) -> list[str]:
  """The dotted keys of every `--{flag_name}.a.b[=v]` (or `--no{flag_name}.a.b`) in argv."""
  paths = []
  for arg in argv[1:]:
    if arg == "--":
      break
    name = arg.lstrip("-").split("=", 1)[0]
    if name.startswith("no" + flag_name + "."):
      name = name[2:]
    if arg.startswith("-") and name.startswith(flag_name + "."):
      paths.append(name[len(flag_name) + 1:])
  return paths


def unknown_key_message(config: Any, path: str, flag_name: str = "config") -> str | None:
  """None if `path` ('model.learn_sigma') names a key of `config`, else a message naming the
  first missing part and the nearest keys at that level."""
  node, done = config, []
  for part in path.split("."):
    keys = list(node.keys()) if hasattr(node, "keys") else []
    if part not in keys:
      where = ".".join([flag_name] + done)
      close = _checks.nearest(part, keys)
      full = [f"--{where}.{c}" for c in close]
      hint = f" Did you mean {' or '.join(full)}?" if full else ""
      level = f"Keys of {where}: {', '.join(sorted(keys))}." if keys else \
          f"{where} is a value, not a group of keys."
      return (f"Unknown config key --{flag_name}.{path}: {where} has no key {part!r}.{hint} "
              f"{level} Every key and its default: diffusion_jax/training/default_config.py.")
    node = node[part]
    done.append(part)
  return None


def _load_config(argv: Sequence[str], flag_name: str) -> Any:
  """The config named by `--{flag_name}=path[:arg]` in argv, loaded by the flag's own parser
  (None if absent or unloadable)."""
  if flag_name not in flags.FLAGS:
    return None
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith(f"--{flag_name}="):
      path = arg.split("=", 1)[1]
    elif arg == f"--{flag_name}" and i + 1 < len(argv):
      path = argv[i + 1]
    else:
      continue
    try:
      return flags.FLAGS[flag_name].parser.parse(path)
    except Exception:  # pylint: disable=broad-except  # absl reports a bad --config itself
      return None
  return None


def parse_flags(argv: list[str], flag_name: str = "config") -> list[str]:
  """absl flags parser for `app.run(main, flags_parser=parse_flags)`.

  Parses like absl's default; an override of a key the config does not declare exits with
  status 1 and a message naming the key and the nearest valid keys.
  """
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    config = _load_config(argv, flag_name)
    messages = [unknown_key_message(config, p, flag_name)
                for p in _override_paths(argv, flag_name)] if config is not None else []
    messages = [m for m in messages if m]
    if not messages:
      raise
    print(f"FATAL Flags parsing error: {messages[0]}", file=sys.stderr)
    sys.exit(1)
    raise AssertionError("unreachable") from e
