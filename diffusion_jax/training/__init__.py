"""diffusion_jax.training."""
