"""The experiment entry points (train, sample, evaluate, ...): thin absl programs over the library.

Importing this package chooses XLA:CPU's own convolutions over YNNPACK's
(`diffusion_jax.xla_cpu`, measured faster for the U-Nets) before any entry point creates JAX's
backend. A user's own `XLA_FLAGS` setting of that flag wins.
"""
from diffusion_jax import xla_cpu

xla_cpu.use_xla_convolutions()
