"""An offline sample-quality metric for 8x8 digits: Frechet distance in a small classifier's features.

The FID Inception net means nothing on 8x8 digits (and its weights cannot be fetched offline), so
the digits metric uses a small Flax CNN trained on the digits training split: its penultimate
layer (64 smooth features) plays the role of Inception's pool features, and the same
`metrics.frechet_distance` turns them into a distance.

The classifier is trained reproducibly (fixed seed, fixed batch order, one device) the first time
it is needed, or by `python -m diffusion_jax.evaluation`, and cached in
`$DIFFUSION_JAX_CACHE` (default `~/.cache/diffusion_jax`) under a name keyed by a hash of its
settings; a changed setting trains (and caches) a new one.

  digits_features(images uint8 [N, 8, 8, 1]) -> float64 [N, 64]
  digits_frechet_distance(images, reference='test') -> float   # vs the held-out test split
  real_floor() -> float                                         # test split vs training split
  classifier_accuracy('test') -> float                          # sanity: > 0.9

A Frechet distance from N samples is biased upwards by roughly tr(sigma)/N per set, so compare
figures computed from the same numbers of images; `real_floor` (297 test vs 1,500 training
images) is the value real digits reach.

References: Heusel et al. 2017, arXiv:1706.08500 (FID); the digits split of
`diffusion_jax.data.digits`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import traverse_util

from diffusion_jax.evaluation import metrics

CACHE_ENV = "DIFFUSION_JAX_CACHE"
IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10
REFERENCES = ("test", "train")
# Bump when the training code changes in a way the settings below do not capture.
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ClassifierSettings:
  """Everything that determines the trained classifier (its cache key is a hash of these)."""
  conv_features: tuple[int, ...] = (32, 64)
  feature_dim: int = 64
  seed: int = 0
  num_steps: int = 1500
  batch_size: int = 100
  learning_rate: float = 2e-3
  weight_decay: float = 1e-4
  max_shift: int = 1
  format_version: int = FORMAT_VERSION

  def key(self) -> str:
    """A short hash of the settings (the cache file name's suffix)."""
    text = json.dumps(dataclasses.asdict(self), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


DEFAULT_SETTINGS = ClassifierSettings()


class DigitsClassifier(nn.Module):
  """A small CNN for 8x8 digits; returns (logits [B, 10], features [B, feature_dim]).

  3x3 convs (stride 1, then 2) with SiLU, a dense layer of `feature_dim` SiLU units (the
  features: smooth, so no unit is exactly constant and the covariance stays full rank), and a
  linear classifier. Input: float32 [B, 8, 8, 1] in [-1, 1].
  """
  conv_features: tuple[int, ...] = (32, 64)
  feature_dim: int = 64

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    for i, width in enumerate(self.conv_features):
      x = nn.silu(nn.Conv(width, (3, 3), strides=1 if i == 0 else 2, name=f"conv{i}")(x))
    x = x.reshape((x.shape[0], -1))
    features = nn.silu(nn.Dense(self.feature_dim, name="features")(x))
    return nn.Dense(NUM_CLASSES, name="logits")(features), features


def _model(settings: ClassifierSettings) -> DigitsClassifier:
  return DigitsClassifier(conv_features=tuple(settings.conv_features),
                          feature_dim=settings.feature_dim)


def cache_dir() -> str:
  """`$DIFFUSION_JAX_CACHE`, else `~/.cache/diffusion_jax`."""
  return os.environ.get(CACHE_ENV) or os.path.expanduser("~/.cache/diffusion_jax")


def cache_path(settings: ClassifierSettings = DEFAULT_SETTINGS) -> str:
  """Where the classifier trained with `settings` is (or will be) cached."""
  return os.path.join(cache_dir(), f"digits_classifier-{settings.key()}.npz")


@functools.cache
def _split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [N, 8, 8, 1] images, int32 [N] labels) of a digits split."""
  from diffusion_jax.data import load_split_as_numpy  # pylint: disable=g-import-not-at-top
  data = load_split_as_numpy({"name": "digits", "image_size": 8}, split)
  return data["image"], data["label"]


def _to_float(images: np.ndarray) -> np.ndarray:
  """uint8 [N, H, W, 1] -> float32 in [-1, 1]."""
  return images.astype(np.float32) / 127.5 - 1.0


def _random_shift(x: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
  """Shifts each image [B, H, W, C] by up to max_shift pixels in each direction (zero fill)."""
  if max_shift == 0:
    return x
  h, w = x.shape[1:3]
  padded = np.pad(x, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)), constant_values=-1.0)
  dy, dx = rng.integers(0, 2 * max_shift + 1, (2, x.shape[0]))
  return np.stack([padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(x.shape[0])])


def train_classifier(settings: ClassifierSettings = DEFAULT_SETTINGS) -> dict[str, Any]:
  """Trains the classifier on the digits training split from scratch; returns its params.

  Deterministic: initialisation from PRNGKey(seed), batches and their random shifts (up to
  max_shift pixels, background fill) drawn by a NumPy generator seeded with `seed` (a fresh
  permutation per epoch), AdamW on the cross-entropy, on the default device.
  """
  images, labels = _split("train")
  x_all = _to_float(images)
  model = _model(settings)
  params = model.init(jax.random.PRNGKey(settings.seed), x_all[:1])["params"]
  optimizer = optax.adamw(optax.cosine_decay_schedule(settings.learning_rate, settings.num_steps),
                          weight_decay=settings.weight_decay)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits, _ = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(settings.seed)
  order = np.zeros((0,), np.int64)
  for _ in range(settings.num_steps):
    if order.size < settings.batch_size:
      order = np.concatenate([order, rng.permutation(len(x_all))])
    batch, order = order[:settings.batch_size], order[settings.batch_size:]
    x = _random_shift(x_all[batch], settings.max_shift, rng)
    params, opt_state = step(params, opt_state, x, labels[batch])
  return jax.tree.map(np.asarray, params)


def _save(path: str, params: dict[str, Any], settings: ClassifierSettings) -> None:
  """Writes params (flattened, '/'-joined keys) and the settings atomically to `path`."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}
  meta = {"settings": dataclasses.asdict(settings), "jax": jax.__version__}
  tmp = f"{path}.{os.getpid()}.tmp.npz"
  np.savez(tmp, __meta__=np.array(json.dumps(meta)), **flat)
  os.replace(tmp, path)  # Atomic: concurrent first uses each write a whole file.


def _load(path: str) -> dict[str, Any]:
  with np.load(path) as data:
    flat = {tuple(k.split("/")): data[k] for k in data.files if k != "__meta__"}
  return traverse_util.unflatten_dict(flat)


@functools.cache
def load_classifier(settings: ClassifierSettings = DEFAULT_SETTINGS) -> dict[str, Any]:
  """The classifier's params: from the cache, else trained now (seconds on a CPU) and cached."""
  path = cache_path(settings)
  if not os.path.exists(path):
    _save(path, train_classifier(settings), settings)
  return _load(path)


@functools.cache
def _apply_fn(settings: ClassifierSettings):
  model = _model(settings)
  return jax.jit(lambda params, x: model.apply({"params": params}, x))


def _check_images(images: np.ndarray) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 in 0..255, got dtype {images.dtype} (convert samples "
                     "in [-1, 1] with np.round((x + 1) * 127.5).clip(0, 255).astype(np.uint8)).")
  if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
    raise ValueError(f"images must have shape [N, 8, 8, 1] (the digits size; other sizes are not "
                     f"resized), got {images.shape}.")
  if images.shape[0] == 0:
    raise ValueError("images is empty.")
  return images


def _forward(images: np.ndarray, settings: ClassifierSettings, batch_size: int):
  """(logits float32 [N, 10], features float32 [N, D]) in batches of `batch_size`."""
  images = _check_images(images)
  params = load_classifier(settings)
  apply = _apply_fn(settings)
  logits, features = [], []
  for start in range(0, images.shape[0], batch_size):
    chunk = _to_float(images[start:start + batch_size])
    pad = batch_size - chunk.shape[0]  # Pad the last batch: one compiled shape.
    chunk = np.concatenate([chunk, np.zeros((pad,) + IMAGE_SHAPE, np.float32)])
    out_logits, out_features = apply(params, chunk)
    logits.append(np.asarray(out_logits)[:batch_size - pad])
    features.append(np.asarray(out_features)[:batch_size - pad])
  return np.concatenate(logits), np.concatenate(features)


def digits_features(images: np.ndarray, settings: ClassifierSettings = DEFAULT_SETTINGS,
                    batch_size: int = 500) -> np.ndarray:
  """Penultimate-layer features of the digits classifier.

  Args:
    images: uint8 [N, 8, 8, 1] in 0..255 (the digits data's pixel scale).
    settings: the classifier (default: the cached standard one).
    batch_size: images per forward call.

  Returns:
    float64 [N, settings.feature_dim].
  """
  return _forward(images, settings, batch_size)[1].astype(np.float64)


def classifier_accuracy(split: str = "test",
                        settings: ClassifierSettings = DEFAULT_SETTINGS) -> float:
  """Top-1 accuracy of the digits classifier on a digits split ('test' or 'train')."""
  if split not in REFERENCES:
    raise ValueError(f"split must be one of {REFERENCES}, got {split!r}.")
  images, labels = _split(split)
  logits, _ = _forward(images, settings, 500)
  return float(np.mean(np.argmax(logits, axis=-1) == labels))


@functools.cache
def reference_statistics(reference: str = "test", settings: ClassifierSettings = DEFAULT_SETTINGS
                         ) -> tuple[np.ndarray, np.ndarray]:
  """(mu [D], sigma [D, D]) of the classifier's features on a digits split ('test' or 'train')."""
  if reference not in REFERENCES:
    raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}.")
  return metrics.feature_statistics(digits_features(_split(reference)[0], settings))


def digits_frechet_distance(images: np.ndarray, reference: str = "test",
                            settings: ClassifierSettings = DEFAULT_SETTINGS) -> float:
  """Frechet distance between images (uint8 [N, 8, 8, 1], N >= 2) and a digits split's features.

  reference: 'test' (the 297 held-out digits, default) or 'train' (the 1,500 training digits).
  """
  mu_ref, sigma_ref = reference_statistics(reference, settings)
  mu, sigma = metrics.feature_statistics(digits_features(images, settings))
  return metrics.frechet_distance(mu, sigma, mu_ref, sigma_ref)


def real_floor(settings: ClassifierSettings = DEFAULT_SETTINGS) -> float:
  """The real-vs-real floor: Frechet distance of the held-out test digits to the training digits."""
  return digits_frechet_distance(_split("test")[0], reference="train", settings=settings)


def main() -> None:
  """Trains (or loads) the cached classifier and prints its accuracy and the real floor."""
  path = cache_path()
  print(f"digits classifier: {path} ({'cached' if os.path.exists(path) else 'training'})")
  load_classifier()
  print(f"test accuracy {classifier_accuracy('test'):.4f}, "
        f"train accuracy {classifier_accuracy('train'):.4f}")
  print(f"real floor (test vs train digits Frechet distance): {real_floor():.4f}")

