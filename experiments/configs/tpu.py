"""TPU pod variant of any config: bfloat16 compute, several fused steps per call, data from a
bucket. The argument names the base config (default ddpm_cifar10):

  python -m experiments.train --config=experiments/configs/tpu.py:ddpm_cifar10 \
      --workdir=gs://BUCKET/runs/ddpm_c10 --distributed --config.data.data_dir=gs://BUCKET/tfds
"""
import importlib

import ml_collections

BASES = ("digits", "ddpm_cifar10", "dit_cifar10")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  base, _, variant = (arg or "ddpm_cifar10").partition(",")
  if base not in BASES:
    raise ValueError(f"tpu.py base config must be one of {BASES}, got {base!r}")
  c = importlib.import_module(f"experiments.configs.{base}").get_config(variant or None)
  c.train.compute_dtype = "bfloat16"
  c.train.parallel = "pmap"
  c.train.steps_per_call = 10   # every *_every and num_steps must stay multiples of this
  # (on TPU a fused lax.scan saves host round trips; on XLA:CPU keep 1, the scan is slower)
  c.data.data_dir = "gs://YOUR_BUCKET/tensorflow_datasets"
  return c
