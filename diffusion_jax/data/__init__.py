"""diffusion_jax.data."""
