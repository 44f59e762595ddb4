"""The training / eval iterators: sharding over hosts, order, resume, shapes, flips, batch errors."""
import json

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusion_jax import data as dd
from diffusion_jax.data import synthetic

TINY = "synthetic_images/tiny"  # 240 train / 50 test images that encode their own index.
N = 240


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  tfds.builder(TINY, data_dir=data_dir).download_and_prepare(file_format="array_record")
  return data_dir


def _config(data_dir, **overrides):
  config = ml_collections.ConfigDict({"name": TINY, "data_dir": data_dir, "split": "train",
                                      "image_size": None, "random_flip": False, "folder": None,
                                      "on_corrupt": "raise", "num_threads": 2})
  config.update(overrides)
  return config


def _pixels(batch):
  """float [D, b, H, W, C] in [-1, 1] -> uint8 [D * b, H, W, C] (exact inverse of the scaling)."""
  image = batch["image"]
  return np.round((image.reshape(-1, *image.shape[2:]) + 1) * 127.5).astype(np.uint8)


def _ids(iterator, num_batches):
  return np.concatenate([synthetic.example_id(_pixels(next(iterator)))
                         for _ in range(num_batches)])


def _host_iterator(data_dir, host, hosts=2, seed=0, batch=16, devices=2, **overrides):
  return dd.make_train_iterator(_config(data_dir, **overrides), global_batch_size=batch, seed=seed,
                                process_index=host, process_count=hosts, num_local_devices=devices)


def test_two_hosts_disjoint_and_cover_each_epoch(tiny_dir):
  steps_per_epoch = N // 16
  streams = [_ids(_host_iterator(tiny_dir, h), 3 * steps_per_epoch) for h in range(2)]
  for epoch in range(3):
    window = slice(epoch * N // 2, (epoch + 1) * N // 2)
    a, b = streams[0][window], streams[1][window]
    assert len(set(a)) == len(a) == N // 2 and not set(a) & set(b)
    np.testing.assert_array_equal(np.sort(np.concatenate([a, b])), np.arange(N))
  assert not np.array_equal(streams[0][:N // 2], streams[0][N // 2:N])  # Reshuffled per epoch.
  # The hosts interleave into exactly the single-host stream of the same global batch.
  single = _ids(_host_iterator(tiny_dir, 0, hosts=1, devices=4), steps_per_epoch)
  # Host h's element j is global stream position 2 j + h.
  interleaved = np.stack([s[:N // 2] for s in streams], axis=-1).reshape(-1)
  np.testing.assert_array_equal(single, interleaved)


def test_same_seed_same_order_other_seed_other_order(tiny_dir):
  first = _ids(_host_iterator(tiny_dir, 1, seed=7), 20)
  again = _ids(_host_iterator(tiny_dir, 1, seed=7), 20)
  other = _ids(_host_iterator(tiny_dir, 1, seed=8), 20)
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  unshuffled = _ids(_host_iterator(tiny_dir, 1, shuffle=False), 20)
  np.testing.assert_array_equal(unshuffled, (np.arange(160) * 2 + 1) % N)


def test_set_state_resumes_exactly(tiny_dir):
  reference = _host_iterator(tiny_dir, 0, seed=5, random_flip=True)
  expected = [next(reference) for _ in range(25)]  # Crosses the epoch boundary at step 15.
  interrupted = _host_iterator(tiny_dir, 0, seed=5, random_flip=True)
  for _ in range(11):
    next(interrupted)
  state = json.loads(json.dumps(interrupted.get_state()))  # Survives a JSON round trip.
  assert state["examples_seen"] == 11 * 16
  resumed = _host_iterator(tiny_dir, 0, seed=5, random_flip=True)
  resumed.set_state(state)
  for k in range(11, 25):
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], expected[k]["image"])
    np.testing.assert_array_equal(got["label"], expected[k]["label"])
  # The same state continues the same global stream on a different number of hosts.
  single = _host_iterator(tiny_dir, 0, hosts=1, seed=5, devices=4)
  single.set_state(state)
  ids = synthetic.example_id(_pixels(next(single)))
  host_ids = [synthetic.example_id(_pixels(expected[11]))]
  other = _host_iterator(tiny_dir, 1, seed=5)
  other.set_state(state)
  host_ids.append(synthetic.example_id(_pixels(next(other))))
  np.testing.assert_array_equal(np.sort(ids), np.sort(np.concatenate(host_ids)))
  with pytest.raises(ValueError, match="seed"):
    _host_iterator(tiny_dir, 0, seed=6).set_state(state)


def test_batch_shape_dtype_range_and_labels(tiny_dir):
  batch = next(_host_iterator(tiny_dir, 0, batch=48, devices=8))
  assert batch["image"].shape == (8, 3, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (8, 3) and batch["label"].dtype == np.int32
  assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
  pixels = _pixels(batch)
  np.testing.assert_array_equal(batch["image"].reshape(pixels.shape),
                                (pixels.astype(np.float32) - 127.5) / 127.5)
  np.testing.assert_array_equal(batch["label"].reshape(-1), synthetic.example_id(pixels) % 10)
  info = dd.get_dataset_info(_config(tiny_dir, image_size=16))
  assert info == dd.DatasetInfo((16, 16, 3), 10, N)
  small = next(_host_iterator(tiny_dir, 0, image_size=16))
  assert small["image"].shape == (2, 4, 16, 16, 3)


@pytest.mark.parametrize("in_memory", [True, False])
def test_flips_only_when_enabled(tiny_dir, in_memory):
  plain = _host_iterator(tiny_dir, 0, in_memory=in_memory)
  assert not any(synthetic.is_flipped(_pixels(next(plain))).any() for _ in range(15))
  flipping = _host_iterator(tiny_dir, 0, random_flip=True, in_memory=in_memory)
  flips = []
  for _ in range(15):
    pixels = _pixels(next(flipping))
    flipped = synthetic.is_flipped(pixels)
    originals = np.stack([synthetic.synthetic_image(i) for i in synthetic.example_id(pixels)])
    np.testing.assert_array_equal(pixels[flipped], originals[flipped, :, ::-1])
    np.testing.assert_array_equal(pixels[~flipped], originals[~flipped])
    flips.append(flipped)
  assert 0 < np.concatenate(flips).mean() < 1  # Both kinds occur (fairness: the test below).


def test_flip_mask_is_a_fair_deterministic_coin():
  positions = np.arange(200_000)
  mask = dd.flip_mask(0, positions)
  np.testing.assert_array_equal(mask, dd.flip_mask(0, positions))
  assert abs(mask.mean() - 0.5) < 0.005  # 11 standard deviations of a fair coin's mean.
  assert abs(np.mean(mask[1:] == mask[:-1]) - 0.5) < 0.005  # No serial correlation.
  assert np.mean(mask != dd.flip_mask(1, positions)) > 0.49


def test_stream_visits_each_example_once_per_epoch():
  for num_examples in (1, 7, 10):
    stream = dd.ShuffledStream(num_examples, seed=1)
    for epoch in range(3):
      positions = np.arange(epoch * num_examples, (epoch + 1) * num_examples)
      np.testing.assert_array_equal(np.sort(stream.indices(positions)), np.arange(num_examples))
    # Out-of-order, cross-epoch lookups agree with the epoch permutations.
    positions = np.array([3 * num_examples - 1, 0, num_examples])
    expected = [stream.permutation(2)[-1], stream.permutation(0)[0], stream.permutation(1)[0]]
    np.testing.assert_array_equal(stream.indices(positions), expected)


def test_eval_iterator_masks_padding_and_covers_once(tiny_dir):
  seen = []
  for host in range(2):
    ev = dd.make_eval_iterator(_config(tiny_dir, random_flip=True), global_batch_size=16,
                               process_index=host, process_count=2, num_local_devices=2)
    assert len(ev) == 4  # 25 test examples per host, 8 per host batch.
    batches = list(ev)
    assert len(batches) == 4
    for b in batches:
      assert b["mask"].shape == (2, 4) and b["image"].shape == (2, 4, 32, 32, 3)
      pixels = _pixels(b)
      assert not synthetic.is_flipped(pixels).any()
      seen.append(synthetic.example_id(pixels)[b["mask"].reshape(-1)])
    again = [synthetic.example_id(_pixels(b)) for b in ev]  # Re-iterable and deterministic.
    np.testing.assert_array_equal(np.concatenate(again),
                                  np.concatenate([synthetic.example_id(_pixels(b))
                                                  for b in batches]))
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(50))


@pytest.mark.parametrize("batch,hosts,devices,match", [
    (12, 1, 8, "num_local_devices=8"),
    (10, 4, 1, "process_count=4"),
    (0, 1, 1, "positive"),
])
def test_batch_that_does_not_divide_is_an_error(tiny_dir, batch, hosts, devices, match):
  with pytest.raises(ValueError, match=match):
    dd.make_train_iterator(_config(tiny_dir), global_batch_size=batch, seed=0, process_index=0,
                           process_count=hosts, num_local_devices=devices)
  with pytest.raises(ValueError, match=match):
    dd.make_eval_iterator(_config(tiny_dir), global_batch_size=batch, process_index=0,
                          process_count=hosts, num_local_devices=devices)


@pytest.mark.slow  # Starts worker processes (about 10 s on 2 busy cores).
def test_worker_processes_give_the_same_stream_and_resume(tiny_dir):
  threads = _host_iterator(tiny_dir, 1, random_flip=True, in_memory=False)
  expected = [next(threads) for _ in range(5)]
  workers = _host_iterator(tiny_dir, 1, random_flip=True, in_memory=False, num_workers=2)
  try:
    for k in range(3):
      np.testing.assert_array_equal(next(workers)["image"], expected[k]["image"])
    state = workers.get_state()
    workers.set_state({**state, "examples_seen": state["examples_seen"] - 16})
    for k in range(2, 5):
      np.testing.assert_array_equal(next(workers)["image"], expected[k]["image"])
  finally:
    workers.close()
    threads.close()


def test_default_data_dir_is_the_env_var_else_home_tensorflow_datasets(tmp_path, monkeypatch):
  """The Quickstart's digits config leaves data_dir unset: the digits are prepared in
  $DIFFUSION_JAX_DATA_DIR, else in ~/tensorflow_datasets (TFDS's default), nowhere else."""
  from diffusion_jax.data.options import DataOptions
  from experiments.configs import digits as digits_config
  config = digits_config.get_config().data
  assert config.data_dir is None
  home = tmp_path / "home"
  home.mkdir()
  monkeypatch.setenv("HOME", str(home))
  monkeypatch.delenv("DIFFUSION_JAX_DATA_DIR", raising=False)
  assert DataOptions.from_config(config).data_dir == str(home / "tensorflow_datasets")
  chosen = tmp_path / "chosen"
  monkeypatch.setenv("DIFFUSION_JAX_DATA_DIR", str(chosen))
  assert DataOptions.from_config(config).data_dir == str(chosen)
  # And the data really lands there (the digits builder prepares offline on first use).
  info = dd.get_dataset_info(config)
  assert info.num_examples == 1500
  assert any((chosen / "digits").iterdir()) and not (home / "tensorflow_datasets").exists()
  monkeypatch.delenv("DIFFUSION_JAX_DATA_DIR")
  assert dd.get_dataset_info(config).num_examples == 1500
  assert (home / "tensorflow_datasets" / "digits").is_dir()
