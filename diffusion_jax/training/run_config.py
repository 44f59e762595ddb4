"""A run's config across launches: what may change when a workdir is resumed, and the record.

`config.json` is the config of the run's latest launch; `configs/<UTC time>.json` (e.g.
`configs/20261125T233700.123456Z.json`) keeps the
config of every launch (a run that predates the history gets its old `config.json` copied in
first), so no config a run was trained with is ever lost.

On a resume, `check_resume` compares the new config with `config.json` key by key (dotted
keys, JSON values) before anything is written:
- keys matching `MAY_CHANGE` are allowed to differ; the differences are logged;
- every other difference (the `MUST_MATCH` keys below, and any key in neither list) is a
  `ConfigChangeError` listing `key: old -> new` and how to start a fresh workdir.

References: the Flax examples (config.json in the workdir); big_vision (config per run).
"""
from typing import Any
import datetime
import fnmatch
import json

from absl import logging
from etils import epath

# Changes that alter the train state's structure or the meaning of its numbers. Listed for the
# reader: any key that is not in MAY_CHANGE is treated the same way.
MUST_MATCH = (
    "seed",               # the data order and the per-step noise keys
    "model.*",            # the parameters' structure and meaning
    "diffusion.*",        # schedule, T, prediction target, loss: what the network learned
    "vdm.*", "edm.*",     # the family's schedule, loss and preconditioning
    "data.name", "data.image_size", "data.channels", "data.folder", "data.split",
    "data.latents_dir", "data.latent_sample", "data.tfds_name", "data.text_key",
    "autoencoder.workdir",  # the latent space the model learned
    "train.batch_size",   # examples per step: the data iterator's position and the step count
    "train.ema_decays",   # the EMA copies kept in the state
    "optim.name",         # the optimizer state's structure
    "optim.accumulate",   # optax.MultiSteps wraps the optimizer state
)

# Changes that keep the state valid: run length, cadences, execution, sampling and evaluation
# settings, learning-rate values and schedule shape, and where the data lives.
MAY_CHANGE = (
    "train.num_steps", "train.log_every", "train.checkpoint_every", "train.sample_every",
    "train.snapshot_every", "train.keep_latest", "train.steps_per_call", "train.parallel",
    "train.compute_dtype", "train.cpu_convolutions", "train.label_dropout",
    "optim.lr", "optim.warmup_steps", "optim.decay", "optim.grad_clip", "optim.weight_decay",
    "optim.b1", "optim.b2", "optim.eps", "optim.min_lr*", "optim.schedule*",
    "sample.*", "autoencoder.decode_batch_size",
    "eval.*",             # a record of other eval settings is replaced (evaluation.hook)
    "data.data_dir", "data.text_dir", "data.text_cache_dir", "data.download", "data.on_corrupt",
    "data.random_flip", "data.num_workers", "data.prefetch*", "data.shuffle_buffer*",
)

_ABSENT = "<absent>"


class ConfigChangeError(ValueError):
  """The new config changes keys that must stay fixed for the life of a run."""


def to_json(config: Any) -> str:
  if hasattr(config, "to_json_best_effort"):
    return config.to_json_best_effort(indent=2)
  return json.dumps(dict(config), indent=2, default=str)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{'a.b': value} for a nested dict of JSON values."""
  out: dict[str, Any] = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def may_change(key: str) -> bool:
  return any(fnmatch.fnmatchcase(key, pattern) for pattern in MAY_CHANGE)


def differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (old value, new value)} over both configs' keys."""
  a, b = flatten(old), flatten(new)
  return {k: (a.get(k, _ABSENT), b.get(k, _ABSENT))
          for k in sorted(set(a) | set(b)) if a.get(k, _ABSENT) != b.get(k, _ABSENT)}


def check_resume(config: Any, workdir: str | epath.Path) -> dict[str, tuple[Any, Any]]:
  """Compares `config` with the run's `config.json` (if any); returns the allowed differences.

  Raises:
    ConfigChangeError: a key outside `MAY_CHANGE` differs (the message lists them all).
  """
  saved = epath.Path(workdir) / "config.json"
  if not saved.exists():
    return {}
  # Read through `restore.load_config`, so keys a run written by an older version lacks take
  # the declared defaults rather than reading as changes.
  from diffusion_jax.training import restore  # pylint: disable=import-outside-toplevel
  old = json.loads(to_json(restore.load_config(workdir)))
  diff = differences(old, json.loads(to_json(config)))
  refused = {k: v for k, v in diff.items() if not may_change(k)}
  if refused:
    lines = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
    raise ConfigChangeError(
        f"The config differs from the one this run was trained with ({saved}) in keys that "
        f"must stay fixed for a run's lifetime:\n{lines}\nNothing was written. To train with "
        "these settings start a fresh run (a new --workdir); to resume this run, drop those "
        "overrides. Keys that may change on resume are listed in "
        "diffusion_jax/training/run_config.py (MAY_CHANGE).")
  for k, (old, new) in diff.items():
    logging.info("Config change on resume: %s: %r -> %r", k, old, new)
  return diff


def record(config: Any, workdir: str | epath.Path) -> epath.Path:
  """Writes `config.json` and the launch's `configs/<UTC time>.json`; returns the latter."""
  workdir = epath.Path(workdir)
  history = workdir / "configs"
  current = workdir / "config.json"
  if current.exists() and not history.exists():   # a run from before the history existed
    history.mkdir(parents=True)
    mtime = datetime.datetime.fromtimestamp(current.stat().mtime, datetime.timezone.utc)
    (history / f"{_stamp(mtime)}.json").write_text(current.read_text())
  history.mkdir(parents=True, exist_ok=True)
  text = to_json(config)
  now = datetime.datetime.now(datetime.timezone.utc)
  path = history / f"{_stamp(now)}.json"
  if path.exists():
    raise FileExistsError(f"{path} exists: two launches in the same microsecond?")
  path.write_text(text)
  tmp = workdir / "config.json.tmp"   # atomic: other hosts may be reading config.json
  tmp.write_text(text)
  tmp.replace(current)
  return path


def _stamp(t: datetime.datetime) -> str:
  """'20261125T233700.123456Z': sorts in launch order."""
  return t.strftime("%Y%m%dT%H%M%S.%fZ")
