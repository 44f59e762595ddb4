"""diffusion_jax.models."""
