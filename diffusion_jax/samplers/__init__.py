"""diffusion_jax.samplers."""
