"""A transformer over token sequences built from the DiT blocks: the masked-diffusion denoiser
(bidirectional, conditioned on t by adaLN-Zero or not at all) and its autoregressive twin (the
same network with a causal mask, with a KV-cache decoding step).

Tokens are int32 in [0, vocab_size]; id `vocab_size` is the extra token (the mask for diffusion,
the beginning-of-sequence token for the autoregressive twin), so the embedding table and the
logits have vocab_size + 1 entries. Positions enter only through rotary embeddings in every
attention layer (no learned position table: any length up to memory).

Parameter names: `token_embedder` (the [V + 1, D] table), `t_embedder_0/2` (with time
conditioning), `block_N/...` (as in DiT), `final_adaLN_modulation`, `final_linear` (untied
output only).

References: Peebles & Xie 2023 (DiT blocks); Sahoo et al. 2024 (MDLM: a DiT-style
bidirectional transformer with rotary embeddings over tokens, time conditioning optional);
Su et al. 2021 (RoFormer); Press & Wolf 2017, "Using the Output Embedding to Improve Language
Models" (tied embeddings).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import layers
from diffusion_jax.models.dit import DiTBlock
from diffusion_jax.models.dit import KVCache
from diffusion_jax.models.dit import _layer_norm
from diffusion_jax.models.dit import _modulate

Dtype = Any


class TextTransformer(nn.Module):
  """Call: `apply({'params': p}, tokens [B, L] int32, t [B] float in [0, 1] or None, y=None,
  train=False)` (the models' contract, with tokens for x; no labels) -> logits
  [B, L, vocab_size + 1] float32. t is ignored unless `time_conditioning`.

  `decode(tokens [B, N], positions [N], caches)` (method=`TextTransformer.decode`, causal models)
  runs N tokens at `positions` against the KV caches of every block (`init_caches`: one
  `KVCache` whose k and v are [depth, B, S, heads, head_dim]) and returns
  (logits [B, N, vocab_size + 1], caches).

  Attributes:
    vocab_size: V data tokens (the extra token V is the mask / BOS).
    hidden_size, depth, num_heads, mlp_ratio: transformer width, blocks, heads, MLP expansion.
    time_conditioning: adaLN-Zero conditioning on t (sinusoidal embedding of 1000 t and an MLP);
      False: the modulation is a learned constant (c = 0), and the network ignores t.
    causal: token i attends to tokens <= i (the autoregressive twin).
    tie_embeddings: logits = final features . token table (else a separate zero-initialised
      output layer).
    rope_base: rotary embedding base.
    norm_eps: LayerNorm epsilon.
    scan_blocks: True applies the blocks as one `lax.scan` over their stacked parameters (the
      same parameters and outputs up to float32 rounding, gradient cost linear in depth on
      XLA:CPU, one block compiled; `layers.scan_blocks`); False unrolls them; None (default)
      picks the backend's faster form: scanned on CPU, unrolled elsewhere
      (`layers.blocks_scanned`).
    attention: the attention kernel, `layers.attention`'s implementation: None (the backend's
      fastest: 'einsum' on CPU, cuDNN's fused kernel on a GPU where it applies, else 'xla'),
      'einsum', 'xla' or 'cudnn' (GPU, bfloat16).
    dtype, param_dtype: computation and parameter dtypes (logits are float32).
  """
  vocab_size: int = 256
  hidden_size: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  time_conditioning: bool = True
  causal: bool = False
  tie_embeddings: bool = True
  rope_base: float = 10000.0
  norm_eps: float = 1e-6
  scan_blocks: bool | None = None
  attention: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  is_token_model = True   # registry.init_params feeds int tokens [B, L]

  def setup(self):
    d = self.hidden_size
    if d % self.num_heads or (d // self.num_heads) % 2:
      raise ValueError(f"hidden_size={d} must be divisible by num_heads={self.num_heads} with an "
                       "even head size (rotary embeddings)")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    normal = nn.initializers.normal(0.02)
    self.token_embedder = nn.Embed(self.vocab_size + 1, d, embedding_init=normal, **kw)
    if self.time_conditioning:
      self.t_embedder_0 = layers.Dense(d, kernel_init=normal, **kw)
      self.t_embedder_2 = layers.Dense(d, kernel_init=normal, **kw)
    self.blocks = [self._block(name=f"block_{i}") for i in range(self.depth)]
    zeros = nn.initializers.zeros
    self.final_adaLN_modulation = layers.Dense(2 * d, kernel_init=zeros, **kw)
    if not self.tie_embeddings:
      self.final_linear = layers.Dense(self.vocab_size + 1, kernel_init=zeros, **kw)

  def _block(self, **kwargs: Any) -> DiTBlock:
    return DiTBlock(self.hidden_size, self.num_heads, self.mlp_ratio, self.norm_eps,
                    rope_base=self.rope_base, causal=self.causal, attention=self.attention,
                    dtype=self.dtype, param_dtype=self.param_dtype, **kwargs)

  def _scanned(self) -> bool:
    """Whether the blocks run as one scan (never at init: that creates `block_i` one by one)."""
    return (layers.blocks_scanned(self.scan_blocks) and self.depth > 0
            and not self.is_initializing())

  def _conditioning(self, batch: int, t: jax.Array | None) -> jax.Array:
    """c [B, D]: the time embedding, or zeros without time conditioning."""
    if not self.time_conditioning:
      return jnp.zeros((batch, self.hidden_size), self.dtype)
    if t is None:
      raise ValueError("a time-conditioned TextTransformer needs t [B]; got None")
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
    temb = layers.timestep_embedding(1000.0 * t, 256, flip_sin_to_cos=True, freq_shift=0.0)
    return self.t_embedder_2(nn.silu(self.t_embedder_0(temb.astype(self.dtype))))

  def _logits(self, h: jax.Array, c: jax.Array) -> jax.Array:
    shift, scale = jnp.split(self.final_adaLN_modulation(nn.silu(c)), 2, axis=-1)
    h = _modulate(_layer_norm(h, self.norm_eps), shift, scale)
    out = self.token_embedder.attend(h) if self.tie_embeddings else self.final_linear(h)
    return out.astype(jnp.float32)

  def _check_tokens(self, tokens: jax.Array) -> None:
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be int [B, L]; got {tokens.dtype} {tokens.shape}")

  def __call__(self, tokens: jax.Array, t: jax.Array | None = None, y: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    del train  # no dropout
    if y is not None:
      raise ValueError("TextTransformer is unconditional: labels y must be None")
    self._check_tokens(tokens)
    c = self._conditioning(tokens.shape[0], t)
    h = self.token_embedder(tokens)
    if self._scanned():
      h = layers.scan_blocks(self._block(parent=None), self.variables["params"], self.depth, h, c)
    else:
      for block in self.blocks:
        h = block(h, c)
    return self._logits(h, c)

  def init_caches(self, batch: int, length: int) -> KVCache:
    """Empty KV caches for `length` positions of every block, stacked: k, v [depth, batch,
    length, heads, head_dim] (call through `apply` or `bind`)."""
    head_dim = self.hidden_size // self.num_heads
    zeros = jnp.zeros((self.depth, batch, length, self.num_heads, head_dim), self.dtype)
    return KVCache(zeros, zeros)

  def decode(self, tokens: jax.Array, positions: jax.Array,
             caches: KVCache) -> tuple[jax.Array, KVCache]:
    """Causal decoding of tokens [B, N] at consecutive `positions` [N] with the stacked KV caches
    of `init_caches`; block i reads and updates caches[i] (scanned with its parameters)."""
    if not self.causal:
      raise ValueError("decode needs a causal TextTransformer (causal=True)")
    self._check_tokens(tokens)
    if caches.k.shape[0] != self.depth:
      raise ValueError(f"caches hold {caches.k.shape[0]} blocks, the model has depth="
                       f"{self.depth}; make them with init_caches")
    c = self._conditioning(tokens.shape[0], None)
    h = self.token_embedder(tokens)
    if self._scanned():
      h, caches = layers.scan_blocks(self._block(parent=None), self.variables["params"],
                                     self.depth, h, c, positions, per_block=caches)
    else:
      new = []
      for i, block in enumerate(self.blocks):
        h, cache = block(h, c, positions, KVCache(caches.k[i], caches.v[i]))
        new.append(cache)
      caches = KVCache(*(jnp.stack(parts) for parts in zip(*new, strict=True))) if new else caches
    return self._logits(h, c), caches
