"""Input-pipeline throughput (images/s) for digits and a CIFAR-sized synthetic TFDS dataset.

  python benchmarks/bench_data.py [--seconds 3] [--batch 256] [--threads 1,2,4] [--workers 2]

Builds both datasets offline in a temporary TFDS data dir (ArrayRecord, PNG images), then times
`make_train_iterator` (what the trainer consumes: float32 [devices, per_device, H, W, C]) for:
digits 8x8 and 16x16 (in memory), and the 10,000-image 32x32x3 set in memory and streamed
(ArrayRecord read + PNG decode per batch) with several grain thread counts and worker processes;
flips on throughout. "first batch" includes opening the dataset (and the in-memory decode).
Ratios are against the in-memory CIFAR-sized variant measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np


def _machine() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  return (f"processor={platform.processor() or platform.machine()!r} cores={os.cpu_count()} "
          f"python={platform.python_version()} jax={jax.__version__} "
          f"backend={jax.default_backend()} devices={jax.device_count()}")


def _throughput(config: dict, batch: int, devices: int, seconds: float) -> tuple[float, float]:
  """-> (images/s after the first batch, seconds to the first batch)."""
  from diffusion_jax import data as dd  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  it = dd.make_train_iterator(config, global_batch_size=batch, seed=0, process_index=0,
                              process_count=1, num_local_devices=devices)
  first = next(it)
  assert first["image"].dtype == np.float32
  ready = time.perf_counter() - start
  images, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(it)
    images += batch
  rate = images / (time.perf_counter() - start)
  it.close()
  return rate, ready


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seconds", type=float, default=3.0)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--threads", default="1,2,4")
  parser.add_argument("--workers", default="2", help="worker-process counts ('' for none)")
  args = parser.parse_args()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from diffusion_jax import data as dd  # noqa: F401  # pylint: disable=unused-import

  print(_machine())
  threads = [int(t) for t in args.threads.split(",")]
  workers = [int(w) for w in args.workers.split(",") if w]
  with tempfile.TemporaryDirectory() as data_dir:
    for name in ("digits", "synthetic_images/cifar_sized"):
      start = time.perf_counter()
      tfds.builder(name, data_dir=data_dir).download_and_prepare(file_format="array_record")
      print(f"prepare {name}: {time.perf_counter() - start:.1f} s")
    cifar = {"name": "synthetic_images/cifar_sized", "data_dir": data_dir, "random_flip": True}
    variants = [
        ("digits 8x8x1, in memory", {"name": "digits", "data_dir": data_dir,
                                     "random_flip": True, "num_threads": max(threads)}),
        ("digits 16x16x1, in memory", {"name": "digits", "data_dir": data_dir, "image_size": 16,
                                       "random_flip": True, "num_threads": max(threads)}),
        ("cifar-sized 32x32x3, in memory", {**cifar, "in_memory": True,
                                            "num_threads": max(threads)}),
    ] + [(f"cifar-sized 32x32x3, streamed, {t} thread(s)",
          {**cifar, "in_memory": False, "num_threads": t}) for t in threads] + [
        (f"cifar-sized 32x32x3, streamed, {w} processes",
         {**cifar, "in_memory": False, "num_threads": 1, "num_workers": w}) for w in workers]
    results = {}
    print(f"global batch {args.batch} over {args.devices} devices, flips on, "
          f"{args.seconds:.0f} s each")
    for label, config in variants:
      rate, ready = _throughput(config, args.batch, args.devices, args.seconds)
      results[label] = rate
      print(f"  {label:45s} {rate:10,.0f} images/s   (first batch after {ready:.2f} s)")
    reference = results["cifar-sized 32x32x3, in memory"]
    for label, rate in results.items():
      if label.startswith("cifar-sized"):
        print(f"  ratio {label:39s} {rate / reference:6.3f}")


if __name__ == "__main__":
  main()
