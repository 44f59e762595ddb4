"""Sweeps: members declared as products and zips of config overrides, expanded, named and
validated before anything runs.

A sweep file (`experiments/sweeps/<name>.py`) defines `get_sweep(arg=None) -> Sweep`:

  from experiments.sweep_lib import Sweep, product, sweep

  def get_sweep(arg=None):
    return Sweep(product(sweep("diffusion.prediction", ["eps", "x0", "v"]),
                         sweep("diffusion.weighting", ["none", "min_snr"])),
                 seeds=2, fixed={"train.num_steps": 1000})

`sweep(key, values)` is one axis; `product(*axes)` is every combination (the last axis varies
fastest), `zip_(*axes)` pairs axes of equal length element by element; both nest. `seeds=k`
repeats each member with `seed = 0 .. k-1`. `fixed` overrides apply to every member.

References: big_vision's and XManager's hyper-parameter sweeps (product / zip of dicts).
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import itertools
import os
import re
import shlex
import sys
from typing import Any, Sequence

Member = dict[str, Any]   # dotted config key -> value


def sweep(key: str, values: Sequence[Any]) -> list[Member]:
  """One axis: `[{key: v} for v in values]`."""
  if not isinstance(key, str) or not key:
    raise ValueError(f"sweep(key=...) must be a dotted config key such as 'diffusion.prediction', "
                     f"got {key!r}.")
  values = list(values)
  if not values:
    raise ValueError(f"sweep({key!r}, values=[]) is empty: give at least one value.")
  return [{key: v} for v in values]


def _merge(parts: Sequence[Member], where: str) -> Member:
  out: Member = {}
  for part in parts:
    shared = sorted(set(out) & set(part))
    if shared:
      raise ValueError(f"{where}: key(s) {shared} set by more than one axis.")
    out.update(part)
  return out


def product(*axes: Sequence[Member]) -> list[Member]:
  """Every combination of one member from each axis (the last axis varies fastest)."""
  if not axes or any(len(a) == 0 for a in axes):
    raise ValueError("product(...) of no axes, or of an empty axis, has no members.")
  return [_merge(combo, "product") for combo in itertools.product(*axes)]


def zip_(*axes: Sequence[Member]) -> list[Member]:
  """Members paired element by element; the axes must have equal lengths."""
  if not axes or any(len(a) == 0 for a in axes):
    raise ValueError("zip_(...) of no axes, or of an empty axis, has no members.")
  lengths = sorted({len(a) for a in axes})
  if len(lengths) > 1:
    raise ValueError(f"zip_(...) needs axes of equal length, got lengths {[len(a) for a in axes]}.")
  return [_merge(parts, "zip_") for parts in zip(*axes, strict=True)]


@dataclasses.dataclass
class Sweep:
  """members: override dicts (from sweep/product/zip_); seeds: repeats with seed 0..seeds-1;
  fixed: overrides applied to every member (e.g. a shorter `train.num_steps`)."""
  members: list[Member]
  seeds: int = 1
  fixed: Member = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Run:
  """One expanded member: its directory name, the overrides that define it (without the fixed
  ones), its seed, and every override passed to the trainer."""
  name: str
  varied: tuple[tuple[str, Any], ...]
  seed: int
  overrides: tuple[tuple[str, Any], ...]

  @property
  def group(self) -> str:
    """The member name without the seed: runs of one group are averaged in the results."""
    return self.name.rsplit("__seed", 1)[0]


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
  """The last component of each dotted key, or more components where that is ambiguous."""
  out = {}
  for key in keys:
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
      short = ".".join(parts[-n:])
      if sum(1 for k in keys if k.split(".")[-n:] == parts[-n:]) == 1:
        break
    out[key] = short
  return out


def _fmt(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return "-".join(_fmt(v) for v in value) or "none"
  if isinstance(value, float):
    return f"{value:g}"
  return str(value)


def _safe(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")


def member_name(varied: Member, short: dict[str, str], seed: int | None) -> str:
  """A readable, filesystem-safe name: `prediction-eps__weighting-none__seed0`."""
  body = "__".join(f"{_safe(short[k])}-{_safe(_fmt(v))}" for k, v in varied.items()) or "base"
  return body if seed is None else f"{body}__seed{seed}"


def expand(spec: Sweep) -> list[Run]:
  """The runs of a sweep: every member x seed, named; a duplicate member is a ValueError."""
  if not isinstance(spec, Sweep):
    raise ValueError(f"get_sweep() must return a Sweep, got {type(spec).__name__}.")
  if not spec.members:
    raise ValueError("The sweep has no members.")
  if not isinstance(spec.seeds, int) or spec.seeds < 1:
    raise ValueError(f"Sweep(seeds=...) must be a positive integer, got {spec.seeds!r}.")
  seen: dict[tuple, int] = {}
  for i, member in enumerate(spec.members):
    if "seed" in member:
      raise ValueError("Sweep 'seed' with Sweep(seeds=k), not as a member key.")
    frozen = tuple(sorted((k, repr(v)) for k, v in member.items()))
    if frozen in seen:
      raise ValueError(f"Members {seen[frozen]} and {i} are the same: {member}.")
    seen[frozen] = i
  keys = sorted({k for m in spec.members for k in m})
  short = _short_keys(keys)
  runs, names = [], set()
  for member in spec.members:
    for seed in range(spec.seeds):
      name = member_name(member, short, seed)
      if name in names:
        raise ValueError(f"Two members have the same name {name!r}; their values print alike "
                         f"({member}). Use values that differ when printed.")
      names.add(name)
      overrides = {**spec.fixed, **member, "seed": seed}
      runs.append(Run(name=name, varied=tuple(member.items()), seed=seed,
                      overrides=tuple(overrides.items())))
  return runs


def _call_file(path: str, function: str, flag: str) -> Any:
  """`function(arg)` of the Python file given as `path[:arg]` (as `--config=` takes it)."""
  path, _, arg = path.partition(":")
  if not os.path.isfile(path):
    raise ValueError(f"--{flag}={path!r}: no such file.")
  module_spec = importlib.util.spec_from_file_location(f"_{flag}_file", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, function):
    raise ValueError(f"--{flag}={path}: the file defines no {function}().")
  return getattr(module, function)(arg or None)


def load_sweep(path: str) -> Sweep:
  """`get_sweep(arg)` of a sweep file given as `path[:arg]`."""
  return _call_file(path, "get_sweep", "sweep")


def load_config(path: str) -> Any:
  """`get_config(arg)` of a config file given as `path[:arg]`."""
  return _call_file(path, "get_config", "config")


def _all_keys(config: Any, prefix: str = "") -> list[str]:
  keys = []
  for k in config.keys():
    v = config[k]
    if hasattr(v, "keys"):
      keys += _all_keys(v, f"{prefix}{k}.")
    keys.append(f"{prefix}{k}")
  return keys


def validate(runs: Sequence[Run], config: Any) -> None:
  """Applies every run's overrides to a copy of `config`: an unknown key (with the nearest
  valid ones) or a value of the wrong type is a ValueError naming the run, before anything runs.
  """
  valid = _all_keys(config)
  for run in runs:
    trial = config.copy_and_resolve_references()
    for key, value in run.overrides:
      *path, last = key.split(".")
      node = trial
      for part in path:
        node = node.get(part) if hasattr(node, "get") else None
      if not hasattr(node, "keys") or last not in node:
        near = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
        raise ValueError(f"Run {run.name!r}: unknown config key {key!r}"
                         + (f"; nearest valid keys: {near}." if near else "."))
      try:
        node[last] = value
      except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"Run {run.name!r}: config key {key!r} cannot take {value!r}: {e}") from e


def flag_value(value: Any) -> str:
  """A value as ml_collections' `--config.key=` parses it (tuples as `(a,b,)`)."""
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(flag_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def train_command(run: Run, config_path: str, workdir: str,
                  python: str = sys.executable) -> list[str]:
  """The `experiments.train` command of one run."""
  return [python, "-m", "experiments.train", f"--config={config_path}",
          f"--workdir={workdir}"] + [f"--config.{k}={flag_value(v)}" for k, v in run.overrides]


def shell_line(argv: Sequence[str]) -> str:
  return " ".join(shlex.quote(a) for a in argv)
