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


# --- every pixel format a folder may hold (issue 9: 16-bit PNGs decoded to all-white) ------------

def _png_by_hand(array: np.ndarray, color_type: int, bit_depth: int) -> bytes:
  """A PNG written without PIL (so the 16-bit files do not depend on PIL's writer): array
  [H, W] or [H, W, C] of uint8 / uint16, colour type 0 (grey) or 2 (RGB), filter 0 per row."""
  import struct
  import zlib
  height, width = array.shape[:2]
  dtype = ">u2" if bit_depth == 16 else "u1"
  raw = b"".join(b"\x00" + np.ascontiguousarray(array[i]).astype(dtype).tobytes()
                 for i in range(height))

  def chunk(kind, payload):
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

  header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
          + chunk(b"IEND", b""))


def _pixel_formats(root):
  """{file name: expected uint8 RGB [4, 4, 3]} for one file of each format, written under root.
  The expectations are computed here in NumPy from the pixel values written."""
  rs = np.random.RandomState(0)
  root.mkdir(parents=True, exist_ok=True)
  expected = {}
  grey = rs.randint(0, 256, (4, 4)).astype(np.uint8)
  Image.fromarray(grey, mode="L").save(root / "grey.png")
  expected["grey.png"] = np.repeat(grey[..., None], 3, -1)
  rgb = rs.randint(0, 256, (4, 4, 3)).astype(np.uint8)
  Image.fromarray(rgb, mode="RGB").save(root / "rgb.png")
  expected["rgb.png"] = rgb
  rgba = np.concatenate([rgb[::-1], rs.randint(0, 256, (4, 4, 1)).astype(np.uint8)], -1)
  Image.fromarray(rgba, mode="RGBA").save(root / "rgba.png")
  expected["rgba.png"] = rgba[..., :3]                  # alpha dropped
  palette = rs.randint(0, 256, (5, 3)).astype(np.uint8)
  index = rs.randint(0, 5, (4, 4)).astype(np.uint8)
  pal = Image.fromarray(index, mode="P")
  pal.putpalette(palette.ravel().tolist())
  pal.save(root / "palette.png")
  expected["palette.png"] = palette[index]
  bits = rs.randint(0, 2, (4, 4)).astype(bool)
  Image.fromarray(bits).convert("1").save(root / "onebit.png")
  expected["onebit.png"] = np.repeat(np.where(bits, 255, 0).astype(np.uint8)[..., None], 3, -1)
  grey16 = np.array([0, 1, 128, 129, 257, 383, 384, 32767, 32768, 65279, 65407, 65408, 65534,
                     65535, 4369, 30000], np.uint16).reshape(4, 4)
  (root / "grey16.png").write_bytes(_png_by_hand(grey16, 0, 16))
  grey8 = np.round(grey16 / 257.0).astype(np.uint8)       # 65535 -> 255, exact rounding
  expected["grey16.png"] = np.repeat(grey8[..., None], 3, -1)
  rgb16 = rs.randint(0, 65536, (4, 4, 3)).astype(np.uint16)
  (root / "rgb16.png").write_bytes(_png_by_hand(rgb16, 2, 16))
  expected["rgb16.png"] = np.round(rgb16 / 257.0).astype(np.uint8)
  return expected


def test_every_pixel_format_decodes_to_its_values(tmp_path):
  root = tmp_path / "formats"
  expected = _pixel_formats(root)
  data = dd.load_split_as_numpy(_config(root, image_size=None))
  names = sorted(expected)           # the folder is read in sorted path order
  assert data["image"].shape == (len(names), 4, 4, 3)
  for got, name in zip(data["image"], names, strict=True):
    if name == "rgb16.png":
      # PIL reduces 16-bit RGB to 8 bits by the high byte (v >> 8), within 1 of round(v / 257).
      assert np.abs(got.astype(int) - expected[name]).max() <= 1, name
    else:
      np.testing.assert_array_equal(got, expected[name], err_msg=name)
  # One channel: grey values stay exact, colour goes through ITU-R 601-2 luma.
  grey = dd.load_split_as_numpy(_config(root, image_size=None, channels=1))["image"][..., 0]
  np.testing.assert_array_equal(grey[names.index("grey16.png")],
                                expected["grey16.png"][..., 0])
  np.testing.assert_array_equal(grey[names.index("grey.png")], expected["grey.png"][..., 0])
  luma = expected["rgb.png"].astype(float) @ [0.299, 0.587, 0.114]
  assert np.abs(grey[names.index("rgb.png")] - luma).max() <= 1


def test_sixteen_bit_grey_is_not_clipped_to_white(tmp_path):
  """The failure seen: a mid-grey 16-bit PNG read as all 255."""
  root = tmp_path / "mid"
  root.mkdir()
  (root / "a.png").write_bytes(_png_by_hand(np.full((4, 4), 32768, np.uint16), 0, 16))
  image = dd.load_split_as_numpy(_config(root, image_size=None, channels=1))["image"]
  assert (image == 128).all()
