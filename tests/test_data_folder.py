"""Image folders: mixed sizes and formats, class sub-folders, crop/resize, corrupt files."""
import os

import numpy as np
import pytest
from PIL import Image

from diffusion_jax import data as dd

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 200, 0)


def _framed(width, height, inner, outer):
  """A width x height RGB image: its central square (side min(w, h)) `inner`, the rest `outer`."""
  image = np.empty((height, width, 3), np.uint8)
  image[:] = outer
  side = min(width, height)
  top, left = (height - side) // 2, (width - side) // 2
  image[top:top + side, left:left + side] = inner
  return image


@pytest.fixture()
def folder(tmp_path):
  """cats/: 3 PNGs and a JPEG, mixed sizes; dogs/: a grey PNG, an RGBA PNG, a nested JPEG."""
  root = tmp_path / "images"
  (root / "cats").mkdir(parents=True)
  (root / "dogs" / "nested").mkdir(parents=True)
  Image.fromarray(_framed(40, 20, RED, BLUE)).save(root / "cats" / "a_wide.png")
  Image.fromarray(_framed(12, 30, RED, BLUE)).save(root / "cats" / "b_tall.png")
  Image.fromarray(_framed(16, 16, RED, BLUE)).save(root / "cats" / "c_square.PNG")
  Image.fromarray(_framed(24, 24, GREEN, GREEN)).save(root / "cats" / "d.jpg", quality=95)
  Image.fromarray(np.full((10, 10), 77, np.uint8), mode="L").save(root / "dogs" / "grey.png")
  rgba = np.zeros((8, 8, 4), np.uint8)
  rgba[..., :3], rgba[..., 3] = 99, 255
  Image.fromarray(rgba, mode="RGBA").save(root / "dogs" / "rgba.png")
  Image.fromarray(_framed(50, 50, BLUE, BLUE)).save(root / "dogs" / "nested" / "e.jpeg")
  (root / "dogs" / "notes.txt").write_text("not an image")
  return root


def _config(root, **overrides):
  return {"name": "folder", "folder": str(root), "image_size": 8, "num_threads": 2, **overrides}


def test_loads_mixed_sizes_and_formats_with_class_labels(folder):
  config = _config(folder)
  assert dd.get_dataset_info(config) == dd.DatasetInfo((8, 8, 3), 2, 7)
  data = dd.load_split_as_numpy(config)
  assert data["image"].shape == (7, 8, 8, 3) and data["image"].dtype == np.uint8
  np.testing.assert_array_equal(data["label"], [0, 0, 0, 0, 1, 1, 1])  # Sorted: cats, dogs.
  # Center crop keeps only the red central square of every framed PNG (exact: one colour).
  for i in range(3):
    assert (data["image"][i] == RED).all(), i
  assert np.abs(data["image"][3].astype(int) - GREEN).max() <= 3  # JPEG, within rounding.
  assert (data["image"][4] == 77).all()  # Grey -> RGB.
  assert np.abs(data["image"][5].astype(int) - BLUE).max() <= 3  # dogs/nested/e.jpeg, read too.
  assert (data["image"][6] == 99).all()  # RGBA -> RGB.
  grey = dd.load_split_as_numpy(_config(folder, channels=1))
  assert grey["image"].shape == (7, 8, 8, 1) and (grey["image"][4] == 77).all()


def test_crop_none_resizes_the_whole_image(folder):
  data = dd.load_split_as_numpy(_config(folder, crop="none", resize_method="nearest"))
  wide = data["image"][0]  # 40x20 squeezed to 8x8: the blue side bands stay visible.
  assert (wide[:, 0] == BLUE).all() and (wide[:, -1] == BLUE).all() and (wide[:, 4] == RED).all()
  assert (data["image"][2] == RED).all()  # The square one has no frame to lose.


def test_train_iterator_over_folder(folder):
  it = dd.make_train_iterator(_config(folder, random_flip=True, in_memory=False),
                              global_batch_size=4, seed=0, process_index=0, process_count=1,
                              num_local_devices=2)
  batch = next(it)
  assert batch["image"].shape == (2, 2, 8, 8, 3) and batch["label"].shape == (2, 2)
  assert -1 <= batch["image"].min() and batch["image"].max() <= 1
  cached = dd.make_train_iterator(_config(folder, random_flip=True, in_memory=True),
                                  global_batch_size=4, seed=0, process_index=0, process_count=1,
                                  num_local_devices=2)
  for _ in range(3):  # Streaming and in-memory folders give the same batches.
    np.testing.assert_array_equal(next(cached)["image"], batch["image"])
    batch = next(it)


def test_unlabelled_folder_and_sizes_must_match_without_image_size(tmp_path):
  for i, size in enumerate([(6, 6), (6, 6), (9, 5)]):
    Image.fromarray(np.full((*size[::-1], 3), i, np.uint8)).save(tmp_path / f"{i}.png")
  with pytest.raises(ValueError, match="image_size"):
    dd.get_dataset_info({"name": "folder", "folder": str(tmp_path)})
  os.remove(tmp_path / "2.png")
  info = dd.get_dataset_info({"name": "folder", "folder": str(tmp_path)})
  assert info == dd.DatasetInfo((6, 6, 3), 0, 2)
  with pytest.raises(FileNotFoundError, match="not a directory"):
    dd.get_dataset_info({"name": "folder", "folder": str(tmp_path / "missing")})


@pytest.fixture()
def corrupt_folder(folder):
  truncated = folder / "cats" / "truncated.png"
  data = (folder / "cats" / "a_wide.png").read_bytes()
  truncated.write_bytes(data[:len(data) // 2])
  (folder / "dogs" / "garbage.jpg").write_bytes(b"\xff\xd8\xff this is not a jpeg")
  return folder, [str(truncated), str(folder / "dogs" / "garbage.jpg")]


def test_corrupt_files_raise_with_their_paths(corrupt_folder):
  root, bad = corrupt_folder
  with pytest.raises(ValueError, match="2 unreadable") as e:
    dd.make_train_iterator(_config(root), global_batch_size=2, seed=0, process_index=0,
                           process_count=1, num_local_devices=1)
  for path in bad:
    assert path in str(e.value)


def test_corrupt_files_skipped_with_a_warning_naming_them(corrupt_folder):
  root, bad = corrupt_folder
  with pytest.warns(RuntimeWarning, match="skipped") as record:
    data = dd.load_split_as_numpy(_config(root, on_corrupt="skip"))
  message = "\n".join(str(w.message) for w in record)
  for path in bad:
    assert path in message
  assert data["image"].shape == (7, 8, 8, 3)  # The 7 good images, as before.
  np.testing.assert_array_equal(data["label"], [0, 0, 0, 0, 1, 1, 1])
