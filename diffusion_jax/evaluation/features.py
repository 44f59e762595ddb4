"""Feature networks by name: what turns uint8 images into the features the metrics read.

`get_feature_net('digits')` (the cached digits classifier, 64 features, 10 logits) or
`get_feature_net('inception', weights=PATH)` (the FID Inception net, 2048 pool features, 1008
logits; the weights are pytorch-fid's or torch-fidelity's file, never downloaded). A
`FeatureNet` is pure: `net.apply(net.params, images uint8 [B, H, W, C]) -> {'pool', 'logits'}`;
callers jit or pmap it.

References: Heusel et al. 2017, arXiv:1706.08500 (FID features); `digits.py`, `inception.py`.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from diffusion_jax import _checks

FEATURE_NETS = ("digits", "inception")


class FeatureNet(NamedTuple):
  """A feature network: name, params and a pure apply(params, uint8 images) -> dict.

  apply returns {'pool': float32 [B, D] (FID/KID/P-R features), 'logits': float32 [B, K]
  (Inception Score logits: for Inception the bias-free ones, as the original IS code)}.
  image_shape: the (H, W, C) it requires, or None when it resizes any input.
  """
  name: str
  params: Any
  apply: Callable[[Any, jax.Array], dict[str, jax.Array]]
  image_shape: Optional[tuple[int, int, int]]


def _digits_net() -> FeatureNet:
  from diffusion_jax.evaluation import digits  # pylint: disable=g-import-not-at-top
  model = digits._model(digits.DEFAULT_SETTINGS)  # pylint: disable=protected-access

  def apply(params, images):
    logits, features = model.apply({"params": params},
                                   images.astype(jnp.float32) / 127.5 - 1.0)
    return {"pool": features, "logits": logits}

  return FeatureNet("digits", digits.load_classifier(), apply, digits.IMAGE_SHAPE)


def inception_net(params: Any, dtype: Any = jnp.float32) -> FeatureNet:
  """The FID Inception net with the given params (see `inception.load_torch_weights`)."""
  from diffusion_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
  model = inception.InceptionV3(dtype=dtype)

  def apply(params, images):
    out = model.apply({"params": params}, images)
    return {"pool": out["pool"], "logits": out["logits_unbiased"]}

  return FeatureNet("inception", params, apply, None)


def get_feature_net(name: str, weights: Optional[str] = None) -> FeatureNet:
  """A feature network by name ('digits' or 'inception'; the latter needs `weights`)."""
  _checks.check_choice("feature net", name, FEATURE_NETS)
  if name == "digits":
    return _digits_net()
  if not weights:
    raise ValueError("features='inception' needs weights: the path of pytorch-fid's "
                     "pt_inception-2015-12-05-6726825d.pth or torch-fidelity's "
                     "weights-inception-2015-12-05-6726825d.pth (nothing is downloaded).")
  from diffusion_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
  return inception_net(inception.load_torch_weights(weights))
