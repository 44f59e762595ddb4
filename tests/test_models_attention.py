"""`layers.attention`'s 'einsum' kernel (a hand-written JVP rule, transposed by JAX for the
gradient) against `jax.nn.dot_product_attention` differentiated by JAX, in float32 and bfloat16,
forward and reverse mode."""
import io
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import numerics_testlib
import pytest

from diffusion_jax.models import get_model, layers
from models_testlib import random_params

B, N, S, HEADS, HEAD_DIM = 2, 7, 9, 3, 8
EPS_BF16 = 2.0 ** -8   # bfloat16 has 8 significand bits: one ulp at 1.0


def _inputs(seed=0):
  kq, kk, kv, kw = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = 2.0 * jax.random.normal(kq, (B, N, HEADS, HEAD_DIM))   # logits of a few units: a peaked softmax
  k = 2.0 * jax.random.normal(kk, (B, S, HEADS, HEAD_DIM))
  v = jax.random.normal(kv, (B, S, HEADS, HEAD_DIM))
  weights = jax.random.normal(kw, (B, N, HEADS, HEAD_DIM))   # the cotangent of the output
  return q, k, v, weights


def _masks():
  causal = (jnp.arange(S)[None, :] <= jnp.arange(N)[:, None] + 1)[None, None]   # [1, 1, N, S]
  row_masked = jnp.ones((B, 1, N, S), bool).at[1, 0, 3].set(False)   # one query sees no key
  return {"none": None, "causal": causal, "a fully masked row": row_masked}


def _value_and_grads(implementation, mask, dtype=jnp.float32):
  q, k, v, weights = _inputs()

  def loss(q, k, v):
    out = layers.attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask,
                           implementation)
    return jnp.sum(out.astype(jnp.float32) * weights), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


@pytest.mark.parametrize("mask_name", list(_masks()))
def test_einsum_kernel_matches_jax_nn_in_float32(mask_name):
  """Output and the gradients of q, k, v agree with jax.nn's XLA attention to float32 rounding.
  A gradient element sums S products whose factors are themselves sums over S or head_dim terms,
  possibly in another order, so up to 2 (S + head_dim) roundings of the largest gradient's
  magnitude. The same holds for a forward-mode derivative (`jax.jvp`, which a custom VJP could
  not give: the ODE likelihood's trace estimate uses it)."""
  mask = _masks()[mask_name]
  out, grads = _value_and_grads("einsum", mask)
  ref_out, ref_grads = _value_and_grads("xla", mask)
  numerics_testlib.assert_f32_close(out, ref_out, ops=2 * S)
  for name, g, ref in zip("qkv", grads, ref_grads, strict=True):
    numerics_testlib.assert_f32_close(g, ref, ops=2 * (S + HEAD_DIM), err_msg=f"d{name}")
  q, k, v, weights = _inputs(seed=1)
  tangents = (weights, jnp.roll(q, 1, axis=1)[:, :1].repeat(S, axis=1), -v)
  jvp = lambda impl: jax.jvp(lambda q, k, v: layers.attention(q, k, v, mask, impl), (q, k, v),
                             tangents)[1]
  numerics_testlib.assert_f32_close(jvp("einsum"), jvp("xla"), ops=2 * (S + HEAD_DIM))


def test_einsum_kernel_in_bfloat16_is_as_close_to_float32_as_jax_nn():
  """bfloat16 inputs: logits and softmax stay in float32, probabilities and logit cotangents are
  rounded to bfloat16 before the value / key / query matmuls (as in jax.nn's kernel). Each result
  passes through ~6 such roundings (inputs, probabilities or logit cotangents, output) of
  2^-8 relative each; against the float32 result both kernels stay within 8 bfloat16 ulps of the
  largest magnitude."""
  mask = _masks()["causal"]
  ref_out, ref_grads = _value_and_grads("xla", mask)
  for implementation in ("einsum", "xla"):
    out, grads = _value_and_grads(implementation, mask, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads),
                              strict=True):
      ref = np.asarray(ref, np.float64)
      err = np.max(np.abs(np.asarray(got, np.float64) - ref))
      assert err <= 8 * EPS_BF16 * np.max(np.abs(ref)), (implementation, name, err)


@pytest.mark.parametrize("mask_name", list(_masks()))
def test_undifferentiated_einsum_kernel_matches_jax_nn(mask_name):
  """Called without a derivative, the 'einsum' kernel normalises after the value matmul,
  (exp(S - max) V) / rowsum: equal to jax.nn's kernel up to the rounding of its S-term sums in
  float32 (2 S operations), and in bfloat16 as close to the float32 result as jax.nn's own
  bfloat16 result is (8 ulps of the largest magnitude, as above)."""
  mask = _masks()[mask_name]
  q, k, v, _ = _inputs()
  call = jax.jit(lambda q, k, v, impl: layers.attention(q, k, v, mask, impl), static_argnums=3)
  ref = call(q, k, v, "xla")
  numerics_testlib.assert_f32_close(call(q, k, v, "einsum"), ref, ops=2 * S)
  q16, k16, v16 = (a.astype(jnp.bfloat16) for a in (q, k, v))
  for implementation in ("einsum", "xla"):
    out = call(q16, k16, v16, implementation)
    assert out.dtype == jnp.bfloat16
    err = np.max(np.abs(np.asarray(out, np.float64) - np.asarray(ref, np.float64)))
    assert err <= 8 * EPS_BF16 * np.max(np.abs(np.asarray(ref))), (implementation, err)


def test_undifferentiated_kernel_keeps_its_two_matmuls_in_separate_fusions():
  """A guard for XLA:CPU: written as softmax then value matmul, the kernel's forward pass became
  one YNNPACK fusion holding both matmuls and the softmax, which ran ~5x slower than the pieces
  (the DiT-S/2 forward pass 654 against 386 ms, benchmarks/README.md). No fused computation of
  the compiled forward pass may hold more than one dot. XLA fused them only above a size: at
  DiT-S/2's shape (batch 8, 256 tokens, 6 heads of 64) and at [64, 64, 4, 32], not at the small
  shapes of the tests above, so these two shapes are compiled (not run)."""
  for shape in ((8, 256, 6, 64), (64, 64, 4, 32)):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    text = jax.jit(lambda q, k, v: layers.attention(q, k, v, None, "einsum")).lower(
        x, x, x).compile().as_text()
    fused = [c for c in text.split("\n\n") if c.lstrip().startswith("%fused_computation")]
    assert fused, text[:2000]
    for computation in fused:
      assert computation.count(" dot(") <= 1, (shape, computation)


def test_default_is_einsum_on_cpu_and_probabilities_are_saved_under_the_scan_policy():
  """On CPU `implementation=None` is the 'einsum' kernel (identical results); under
  `jax.checkpoint(policy=SCAN_SAVE_POLICY)` its probabilities are a saved residual, named, so the
  backward pass of a scanned block does not recompute the softmax."""
  assert jax.default_backend() == "cpu"
  for mask in _masks().values():
    default, einsum = _value_and_grads(None, mask), _value_and_grads("einsum", mask)
    for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(einsum), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  q, k, v, _ = _inputs()
  block = jax.checkpoint(lambda q, k, v: layers.attention(q, k, v).sum(),
                         policy=layers.SCAN_SAVE_POLICY)
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    jax.ad_checkpoint.print_saved_residuals(block, q, k, v)
  assert f"f32[{B},{HEADS},{N},{S}] named '{layers.ATTENTION_PROBS}'" in printed.getvalue()


def test_default_kernel_by_backend(monkeypatch):
  """implementation=None picks by backend: 'einsum' on CPU; on a GPU cuDNN's fused kernel for
  unmasked bfloat16 / float16 inputs, falling back to 'xla' where cuDNN refuses when traced;
  'xla' for float32 or masked inputs and on other backends. With no GPU here the GPU branch runs
  with the backend reported as 'gpu': cuDNN is tried and refuses ('cuDNN is not detected'), and
  the result is the 'xla' form's bits."""
  if jax.default_backend() == "gpu":
    pytest.skip("needs a backend where cuDNN refuses: on a GPU it runs, with other bits")
  q, k, v, _ = _inputs()
  mask = _masks()["causal"]
  tried = []
  real = jax.nn.dot_product_attention

  def recording(*args, implementation=None, **kwargs):
    tried.append(implementation)
    return real(*args, implementation=implementation, **kwargs)
  monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
  xla = lambda q, mask=None: real(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask,
                                  implementation="xla")

  if jax.default_backend() == "cpu":
    np.testing.assert_array_equal(np.asarray(layers.attention(q, k, v)),
                                  np.asarray(layers.attention(q, k, v, implementation="einsum")))
    assert tried == []
  for backend in ("gpu", "tpu"):
    monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
      for m in (None, mask):
        tried.clear()
        qc, kc, vc = (a.astype(dtype) for a in (q, k, v))
        out = layers.attention(qc, kc, vc, m)
        np.testing.assert_array_equal(np.asarray(out, np.float32),
                                      np.asarray(xla(qc, m), np.float32))
        cudnn_applies = backend == "gpu" and m is None and dtype != jnp.float32
        assert tried == (["cudnn", "xla"] if cudnn_applies else ["xla"]), (backend, dtype, m)


def test_blocks_scanned_by_backend(monkeypatch):
  """scan_blocks=None means scanned on CPU and unrolled elsewhere (the measured faster forms);
  True / False are kept. On a DiT the choice shows in the traced program: one `scan` or none."""
  assert layers.blocks_scanned(True) and not layers.blocks_scanned(False)
  dit = get_model("dit_tiny", depth=2)
  x, t, y = jnp.zeros((1, 8, 8, 3)), jnp.array([3]), jnp.array([1])
  params = random_params(dit, (8, 8, 3), with_labels=True)
  scans = lambda m: str(jax.make_jaxpr(lambda p: m.apply({"params": p}, x, t, y))(params)).count(
      " scan[")
  for backend, scanned in (("cpu", True), ("gpu", False), ("tpu", False)):
    monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
    assert layers.blocks_scanned(None) is scanned
    assert layers.blocks_scanned(True) and not layers.blocks_scanned(False)
    assert scans(dit) == int(scanned), backend
    assert scans(dit.clone(scan_blocks=True)) == 1 and scans(dit.clone(scan_blocks=False)) == 0


def test_attention_works_under_vmap():
  """vmap over a leading axis gives the unbatched result up to float32 rounding: the batched
  matmuls may sum in another order (bit-equal on one CPU, 2.4e-7 apart on another). Bound: a
  logit's HEAD_DIM-term sum rounds by ~HEAD_DIM ulps of its terms (|q_i k_i| / sqrt(HEAD_DIM) up
  to ~12 here), which exp turns into that relative error of a probability; then S terms of the
  value sum and the division: HEAD_DIM * 12 + S + 1 roundings."""
  q, k, v, _ = _inputs()
  stacked = jax.vmap(lambda q: layers.attention(q, k, v, implementation="einsum"))(q[None])
  assert stacked.shape == (1, B, N, HEADS, HEAD_DIM)
  numerics_testlib.assert_f32_close(stacked[0],
                                    layers.attention(q, k, v, implementation="einsum"),
                                    ops=HEAD_DIM * 12 + S + 1)


def test_unet_attention_field_picks_the_kernel():
  """The U-Net passes `attention` to its attention blocks: the default is the 'einsum' kernel on
  CPU (identical output), 'xla' agrees to float32 rounding (the 8x8 attention sums 64 keys and
  64 channels; the layers after it carry those differences through ~100 operations), and an
  unknown name is a ValueError naming the choices."""
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  t = jnp.array([5, 900])
  default = get_model("unet_tiny")
  params = random_params(default, (16, 16, 3), std=0.2)
  out = default.apply({"params": params}, x, t)
  einsum = get_model("unet_tiny", attention="einsum").apply({"params": params}, x, t)
  np.testing.assert_array_equal(np.asarray(einsum), np.asarray(out))
  xla = get_model("unet_tiny", attention="xla").apply({"params": params}, x, t)
  numerics_testlib.assert_f32_close(xla, out, ops=64 + 64 + 100)
  with pytest.raises(ValueError, match="one of .*got 'flash'"):
    get_model("unet_tiny", attention="flash").apply({"params": params}, x, t)
