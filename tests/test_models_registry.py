"""Presets: exact parameter counts (eval_shape, nothing allocated) and output shapes of every preset."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import count_params, get_model, init_params, model_names

# DiT table (REFERENCE.md; official implementation at 32x32x4, 1000 classes, learned sigma). It
# counts the fixed positional embedding (num_patches x width, a frozen nn.Parameter in the official
# code); ours is a constant computed in the forward pass, so it is subtracted below.
DIT_TABLE = {
    "S": (384, {2: 32_963_360, 4: 32_945_024, 8: 33_148_160}),
    "B": (768, {2: 130_512_416, 4: 130_475_648, 8: 130_881_536}),
    "L": (1024, {2: 458_102_816, 4: 458_053_760, 8: 458_594_816}),
    "XL": (1152, {2: 675_129_632, 4: 675_074_432, 8: 675_683_072}),
}


def test_ddpm_cifar10_count():
  assert count_params(get_model("ddpm_cifar10"), (32, 32, 3)) == 35_746_307


def test_ddpm_256_count():
  assert count_params(get_model("ddpm_256"), (256, 256, 3)) == 113_673_219


@functools.lru_cache(maxsize=None)
def _dit_param_shapes(name):
  """Parameter shapes of a DiT preset at 32x32x4 with labels (traced once, shared below)."""
  return jax.eval_shape(lambda: init_params(get_model(name), jax.random.key(0), (32, 32, 4), True))


@pytest.mark.parametrize("size", list(DIT_TABLE))
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_dit_counts(size, patch):
  width, counts = DIT_TABLE[size]
  pos_embed = (32 // patch) ** 2 * width
  got = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(_dit_param_shapes(f"DiT-{size}/{patch}")))
  assert got == counts[patch] - pos_embed


def test_count_params_matches_the_shapes():
  assert count_params(get_model("DiT-S/8"), (32, 32, 4), with_labels=True) == sum(
      int(np.prod(p.shape)) for p in jax.tree.leaves(_dit_param_shapes("DiT-S/8")))


def test_small_preset_counts():
  # Closed forms are impractical here; these pin the presets so a change is deliberate.
  assert count_params(get_model("unet_tiny"), (16, 16, 3)) == 702_499
  assert count_params(get_model("unet_digits"), (8, 8, 1)) == 1_623_169
  assert count_params(get_model("unet_digits"), (16, 16, 1)) == 1_623_169  # size-independent
  assert count_params(get_model("dit_tiny"), (32, 32, 3), True) == 181_400


BIG = ["ddpm_cifar10", "ddpm_256"] + [f"DiT-{s}/{p}" for s in DIT_TABLE for p in (2, 4, 8)]
SIZES = {"ddpm_cifar10": 32, "ddpm_256": 256}


@pytest.mark.parametrize("name", BIG)
def test_big_preset_shapes_eval_shape(name):
  """Forward of every big preset on a tiny batch, bf16 compute, with and without labels."""
  module = get_model(name, dtype=jnp.bfloat16)
  size = SIZES.get(name, 32)
  cin = module.in_channels
  x = jax.ShapeDtypeStruct((2, size, size, cin), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.int32)
  conditional = module.num_classes > 0
  if name in SIZES:
    params = jax.eval_shape(lambda: init_params(module, jax.random.key(0), (size, size, cin),
                                                conditional))
  else:  # params do not depend on dtype: reuse the float32 shapes traced for the counts
    params = _dit_param_shapes(name)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  out = jax.eval_shape(lambda p, x, t: module.apply({"params": p}, x, t), params, x, t)
  assert out.shape == (2, size, size, module.out_channels) and out.dtype == jnp.float32
  if conditional:
    y = jax.ShapeDtypeStruct((2,), jnp.int32)
    out = jax.eval_shape(lambda p, x, t, y: module.apply({"params": p}, x, t, y), params, x, t, y)
    assert out.shape == (2, size, size, 2 * cin)


def test_unknown_name_lists_names():
  with pytest.raises(ValueError, match="DiT-XL/2") as err:
    get_model("DiT-XXL/2")
  for name in model_names():
    assert name in str(err.value)


def test_unknown_override_raises():
  with pytest.raises(ValueError, match="allowed"):
    get_model("unet_tiny", channels=3)


@pytest.mark.parametrize("name, shape, labels", [("unet_tiny", (16, 16, 3), False),
                                                 ("dit_tiny", (32, 32, 3), True),
                                                 ("text_tiny", (16,), False)])
def test_init_params_equals_flax_init_on_concrete_inputs(name, shape, labels):
  """`init_params` (Flax `lazy_init` on abstract inputs, no forward pass) gives the same bits as
  Flax's `init` run on concrete zero inputs, outside and inside `jit`."""
  module, rng = get_model(name), jax.random.key(3)
  if len(shape) == 1:   # a token model: (tokens [1, L], t [1])
    args = (jnp.zeros((1,) + shape, jnp.int32), jnp.zeros((1,), jnp.float32))
    rngs = {"params": rng}
  else:
    x, t = jnp.zeros((1,) + shape, jnp.float32), jnp.zeros((1,), jnp.int32)
    args = (x, t, jnp.zeros((1,), jnp.int32) if labels else None)
    rngs = {"params": rng, "dropout": rng}
  for wrap in (lambda f: f, jax.jit):
    reference = wrap(lambda r: module.init(dict.fromkeys(rngs, r), *args)["params"])(rng)
    got = wrap(lambda r: init_params(module, r, shape, labels))(rng)
    assert jax.tree.structure(got) == jax.tree.structure(reference)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(reference), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
