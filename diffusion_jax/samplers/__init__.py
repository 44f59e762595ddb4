"""Samplers: each a pure step plus one `lax.scan` driver; callers jit or pmap them."""

from diffusion_jax.samplers.ancestral import sample
