"""The Flax FID Inception net equals torch-fidelity 0.4.0's FeatureExtractorInceptionV3.

No weights can be downloaded here, so both networks get the same RANDOM weights: torch-fidelity's
module is built (its weight loading skipped), its parameters and batch-norm statistics redrawn,
its state dict written with torch.save and imported by our `load_torch_weights` (the path real
weight files take). Several batches, sizes that are resized (32x32, 64x48) and one that is not
(299x299).
"""
import unittest.mock

import jax
import numpy as np
import pytest
import torch

import published_evaluators_testlib as published_evaluators
from diffusion_jax.evaluation import inception

FEATURES = ("2048", "logits_unbiased", "logits")
OURS = ("pool", "logits_unbiased", "logits")


def _randomized_torch_fidelity_inception(seed: int = 0):
  """torch-fidelity's extractor with He-scaled random convs and random batch-norm statistics."""
  module = published_evaluators.torch_fidelity("feature_extractor_inceptionv3")
  cls = module.FeatureExtractorInceptionV3
  with unittest.mock.patch.object(torch, "load", return_value={}), \
       unittest.mock.patch.object(cls, "load_state_dict", lambda self, sd: None):
    model = cls("inception-v3-compat", list(FEATURES), feature_extractor_weights_path="unused")
  generator = torch.Generator().manual_seed(seed)
  uniform = lambda shape, lo, hi: lo + (hi - lo) * torch.rand(shape, generator=generator)
  with torch.no_grad():
    for name, tensor in model.state_dict().items():
      if name.endswith("conv.weight"):  # He scaling keeps activations O(1) through ~50 layers.
        fan_in = tensor[0].numel()
        tensor.copy_(torch.randn(tensor.shape, generator=generator) * np.sqrt(2.0 / fan_in))
      elif name.endswith("bn.weight") or name.endswith("running_var"):
        tensor.copy_(uniform(tensor.shape, 0.5, 1.5))
      elif name.endswith("bn.bias") or name.endswith("running_mean"):
        tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
      elif name.startswith("fc."):
        tensor.copy_(torch.randn(tensor.shape, generator=generator) / np.sqrt(tensor.shape[-1]))
  return model.eval()


@pytest.fixture(scope="module")
def both(tmp_path_factory):
  model = _randomized_torch_fidelity_inception()
  path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
  torch.save(model.state_dict(), path)
  params = inception.load_torch_weights(str(path))
  apply = jax.jit(lambda p, x: inception.InceptionV3().apply({"params": p}, x))
  return model, params, apply


def test_resize_equals_torch_fidelity():
  interp = published_evaluators.torch_fidelity("interpolate_compat_tensorflow")
  rng = np.random.default_rng(0)
  for shape in [(2, 32, 32, 3), (1, 64, 48, 3), (1, 8, 8, 1)]:
    x = rng.integers(0, 256, shape).astype(np.float32)
    expected = interp.interpolate_bilinear_2d_like_tensorflow1x(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), align_corners=False)
    got = np.asarray(inception.resize_bilinear_tf1(x, 299))
    # The same float32 operations in the same order: equal up to fused multiply-adds (XLA may
    # fuse a + (b - a) * d), i.e. 2 roundings of values <= 255: 255 * 2 * 2^-24 ~ 3e-5.
    np.testing.assert_allclose(got, expected.permute(0, 2, 3, 1).numpy(), rtol=0, atol=4e-5)


def _assert_features_equal(both, batches):
  model, params, apply = both
  for images in batches:
    with torch.no_grad():
      expected = model(torch.from_numpy(images).permute(0, 3, 1, 2))
    got = apply(params, images)
    for ours, theirs in zip(OURS, expected, strict=True):
      theirs = theirs.numpy()
      scale = np.abs(theirs).max()
      assert scale > 1e-2  # Random weights kept the activations alive.
      # float32 on both sides, convolutions summed in different orders (XLA vs oneDNN). A sum
      # of n random-sign terms has a rounding error ~ sqrt(n) eps |term| against a size
      # ~ sqrt(n) |term|: a few ulps relative per layer; ~20 layers in sequence compound
      # additively to ~50 ulps ~ 3e-6 of the feature scale: 1e-5 leaves a 3x margin (measured
      # ~8e-7). Architecture errors are far larger: counting the padding in the average pools
      # alone moves the features by 3e-2 of their scale.
      np.testing.assert_allclose(np.asarray(got[ours]), theirs, rtol=0, atol=1e-5 * scale,
                                 err_msg=f"{ours} for input {images.shape}")


def test_features_equal_torch_fidelity(both):
  # Two batches of CIFAR-sized images (resized to 299; one compiled shape keeps this fast).
  rng = np.random.default_rng(1)
  _assert_features_equal(both, [rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
                                for _ in range(2)])


@pytest.mark.slow
def test_features_equal_torch_fidelity_other_sizes(both):
  # A non-square input (resized) and one already 299x299 (no resize).
  rng = np.random.default_rng(2)
  _assert_features_equal(both, [rng.integers(0, 256, (2, 64, 48, 3), dtype=np.uint8),
                                rng.integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)])


def test_weight_import_rejects_foreign_state_dicts(both):
  model, _, _ = both
  state = dict(model.state_dict())
  state["AuxLogits.fc.weight"] = torch.zeros(3)  # Ignored (torchvision layouts carry it).
  inception.params_from_torch(state)
  with pytest.raises(ValueError, match="lacks"):
    inception.params_from_torch({k: v for k, v in state.items() if k != "fc.bias"})
  with pytest.raises(ValueError, match="shape"):
    inception.params_from_torch({**state, "fc.bias": torch.zeros(1000)})
  with pytest.raises(ValueError, match="unknown key"):
    inception.params_from_torch({**state, "Mixed_5b.extra.weight": torch.zeros(1)})
