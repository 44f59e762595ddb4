"""TFDS datasets (ArrayRecord) read through the trainer's code path without TensorFlow; errors."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tfds_testlib
import tensorflow_datasets as tfds

from diffusion_jax import data as dd
from diffusion_jax.data import sources, synthetic

TINY = "synthetic_images/tiny"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  """A TFDS dataset built in this test: 240 train / 50 test PNG images as ArrayRecord."""
  return tfds_testlib.build_array_record(str(tmp_path_factory.mktemp("tfds")), TINY)


_READER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from diffusion_jax import data as dd
    from diffusion_jax.data import sources, synthetic
    out = {}
    for in_memory in (False, True):
      config = {"name": sys.argv[1], "data_dir": sys.argv[2], "in_memory": in_memory,
                "random_flip": True, "num_threads": 2}
      it = dd.make_train_iterator(config, global_batch_size=16, seed=3, process_index=0,
                                  process_count=1, num_local_devices=2)
      batch = next(it)
      pixels = np.round((batch["image"] + 1) * 127.5).astype(np.uint8).reshape(16, 32, 32, 3)
      ev = dd.make_eval_iterator(config, global_batch_size=16, process_index=0, process_count=1,
                                 num_local_devices=2)
      ids = [synthetic.example_id(np.round((b["image"] + 1) * 127.5).astype(np.uint8)
                                  .reshape(-1, 32, 32, 3))[b["mask"].reshape(-1)].tolist()
             for b in ev]
      out[str(in_memory)] = {"shape": list(batch["image"].shape),
                             "ids": synthetic.example_id(pixels).tolist(),
                             "flipped": synthetic.is_flipped(pixels).tolist(),
                             "labels": batch["label"].reshape(-1).tolist(),
                             "pixels_sum": int(pixels.astype(np.int64).sum()),
                             "eval_ids": sum(ids, [])}
    out["tensorflow_imported"] = any(m == "tensorflow" or m.startswith("tensorflow.")
                                     for m in sys.modules)
    print(json.dumps(out))
""")


def test_reads_without_tensorflow_through_the_trainer_path(tiny_dir):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", _READER, TINY, tiny_dir], capture_output=True,
                          text=True, env=env, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["tensorflow_imported"] is False
  streamed, cached = out["False"], out["True"]
  assert streamed == cached  # Streaming decode and the in-memory copy give identical batches.
  assert streamed["shape"] == [2, 8, 32, 32, 3]
  ids = np.asarray(streamed["ids"])
  assert len(set(ids.tolist())) == 16 and ids.min() >= 0 and ids.max() < 240
  np.testing.assert_array_equal(streamed["labels"], ids % 10)
  # The pixels are exactly the PNGs that were written (un-flipping the flipped ones).
  expected = np.stack([synthetic.synthetic_image(i) for i in ids])
  flipped = np.asarray(streamed["flipped"])
  expected[flipped] = expected[flipped, :, ::-1]
  assert streamed["pixels_sum"] == int(expected.astype(np.int64).sum())
  assert streamed["eval_ids"] == list(range(50))


def test_tfds_source_pixels_exact(tiny_dir):
  loaded = dd.load_split_as_numpy({"name": TINY, "data_dir": tiny_dir}, "test")
  np.testing.assert_array_equal(loaded["image"],
                                np.stack([synthetic.synthetic_image(i) for i in range(50)]))
  np.testing.assert_array_equal(loaded["label"], np.arange(50) % 10)
  assert dd.get_dataset_info({"name": TINY, "data_dir": tiny_dir}) == dd.DatasetInfo(
      (32, 32, 3), 10, 240)


def test_unknown_name_says_how_to_prepare(tmp_path):
  with pytest.raises(ValueError, match=r"Unknown dataset name 'cifar_10'") as e:
    dd.get_dataset_info({"name": "cifar_10", "data_dir": str(tmp_path)})
  message = str(e.value)
  assert "'cifar10'" in message  # The close match.
  assert "tfds build cifar_10" in message and "--file_format=array_record" in message
  assert "diffusion_jax[tensorflow]" in message


def test_not_prepared_is_an_error_not_a_download(tmp_path):
  with pytest.raises(FileNotFoundError, match="not prepared") as e:
    dd.make_train_iterator({"name": "cifar10", "data_dir": str(tmp_path)}, global_batch_size=8,
                           seed=0, process_index=0, process_count=1, num_local_devices=1)
  assert f"tfds build cifar10 --data_dir={tmp_path} --file_format=array_record" in str(e.value)


def test_not_prepared_and_cannot_be_downloaded(tmp_path, monkeypatch):
  def unreachable(*args, **kwargs):
    raise ConnectionError("www.cs.toronto.edu unreachable")

  monkeypatch.setattr(tfds.download.DownloadManager, "download", unreachable)
  monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", unreachable)
  # The network probe passes (as on a connected machine); the download itself fails.
  monkeypatch.setattr(sources, "network_error", lambda: None)
  with pytest.raises(FileNotFoundError, match="preparing it failed") as e:
    dd.get_dataset_info({"name": "cifar10", "data_dir": str(tmp_path), "download": True})
  assert "unreachable" in str(e.value) and "tfds build cifar10" in str(e.value)


def test_download_without_network_fails_fast(tmp_path, monkeypatch):
  """No network (every socket connection refused, as offline): a clear error in seconds, not after
  TFDS's retries (~3.5 minutes were seen), and TFDS's downloader is never started."""
  import socket
  import time

  def no_network(*args, **kwargs):
    raise OSError(101, "Network is unreachable")

  def must_not_run(*args, **kwargs):
    raise AssertionError("download_and_prepare started without network")

  for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(socket, "create_connection", no_network)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", must_not_run)
  start = time.monotonic()
  with pytest.raises(FileNotFoundError, match="no network") as e:
    dd.get_dataset_info({"name": "cifar10", "data_dir": str(tmp_path), "download": True})
  assert time.monotonic() - start < 10
  assert "tfds build cifar10" in str(e.value) and "preparing it failed" in str(e.value)
  # The bundled digits need no network: still prepared offline with the network gone.
  monkeypatch.undo()
  monkeypatch.setattr(socket, "create_connection", no_network)
  assert dd.get_dataset_info({"name": "digits", "data_dir": str(tmp_path)}).num_examples == 1500


def test_bad_options_name_the_argument():
  for key, value in [("on_corrupt", "ignore"), ("crop", "random"), ("resize_method", "cubic"),
                     ("image_size", -3), ("in_memory", "yes")]:
    with pytest.raises(ValueError, match=key):
      dd.DataOptions.from_config({"name": "digits", key: value})
  with pytest.raises(ValueError, match="data_config.name"):
    dd.DataOptions.from_config({"data_dir": "/tmp"})
  with pytest.raises(ValueError, match="data_config.folder"):
    dd.DataOptions.from_config({"name": "folder"})


def test_tfrecord_prepared_dataset_asks_for_array_record(tiny_dir, tmp_path):
  copy = tmp_path / "tfds"
  shutil.copytree(tiny_dir, copy)
  info_file = copy / "synthetic_images" / "tiny" / "1.0.0" / "dataset_info.json"
  info = json.loads(info_file.read_text())
  info["fileFormat"] = "tfrecord"
  info_file.write_text(json.dumps(info))
  with pytest.raises(FileNotFoundError, match="--file_format=array_record"):
    dd.get_dataset_info({"name": TINY, "data_dir": str(copy)})
