"""The digits builder: offline preparation through TFDS, exact pixels and labels of scikit-learn."""
import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from diffusion_jax import data as dd
from diffusion_jax.data import digits


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  """Prepares digits into a fresh data dir with every network connection refused."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  refuse = pytest.MonkeyPatch()

  def no_network(*args, **kwargs):
    raise OSError("network disabled in this test")

  refuse.setattr(socket.socket, "connect", no_network)
  refuse.setattr(socket, "create_connection", no_network)
  refuse.setattr(socket, "getaddrinfo", no_network)
  try:
    info = dd.get_dataset_info({"name": "digits", "data_dir": data_dir})
  finally:
    refuse.undo()
  assert info == dd.DatasetInfo((8, 8, 1), 10, 1500)
  return data_dir


def test_mapping_is_lossless_and_documented():
  v = np.arange(17)
  u = digits.digits_to_uint8(v.astype(np.float64))
  np.testing.assert_array_equal(u, np.round(v * 255 / 16).astype(np.uint8))  # round(v*255/16)
  assert u[0] == 0 and u[16] == 255 and np.all(np.diff(u.astype(int)) > 0)
  np.testing.assert_array_equal(digits.uint8_to_digits(u), v)
  with pytest.raises(ValueError, match="0..16"):
    digits.digits_to_uint8(np.array([17.0]))


@pytest.mark.parametrize("split,start,stop", [("train", 0, 1500), ("test", 1500, 1797)])
def test_prepared_files_hold_sklearn_pixels_and_labels(digits_dir, split, start, stop):
  reference = load_digits()
  # Straight through TFDS (the ArrayRecord files and their features) ...
  source = tfds.data_source("digits", split=split, data_dir=digits_dir, download=False)
  examples = source.__getitems__(list(range(len(source))))
  stored = np.stack([e["image"] for e in examples])
  assert stored.dtype == np.uint8 and stored.shape == (stop - start, 8, 8, 1)
  np.testing.assert_array_equal([e["id"] for e in examples], np.arange(start, stop))
  np.testing.assert_array_equal(digits.uint8_to_digits(stored[..., 0]),
                                reference.images[start:stop])
  np.testing.assert_array_equal([e["label"] for e in examples], reference.target[start:stop])
  # ... and through the pipeline's own loader.
  loaded = dd.load_split_as_numpy({"name": "digits", "data_dir": digits_dir}, split)
  np.testing.assert_array_equal(loaded["image"], stored)
  np.testing.assert_array_equal(loaded["label"], reference.target[start:stop])
  assert loaded["label"].dtype == np.int32


def test_resize_to_16(digits_dir):
  config = {"name": "digits", "data_dir": digits_dir, "image_size": 16, "resize_method": "nearest"}
  assert dd.get_dataset_info(config) == dd.DatasetInfo((16, 16, 1), 10, 1500)
  big = dd.load_split_as_numpy(config, "test")["image"]
  small = dd.load_split_as_numpy({"name": "digits", "data_dir": digits_dir}, "test")["image"]
  # Nearest-neighbour 2x upsampling repeats every pixel into a 2x2 block.
  np.testing.assert_array_equal(big, small.repeat(2, axis=1).repeat(2, axis=2))
  smooth = dd.load_split_as_numpy({**config, "resize_method": "bicubic"}, "test")["image"]
  assert smooth.shape == (297, 16, 16, 1) and not np.array_equal(smooth, big)
