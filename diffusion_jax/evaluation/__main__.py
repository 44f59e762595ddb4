"""`python -m diffusion_jax.evaluation`: trains (or loads) the cached digits classifier and prints
its test accuracy and the real-vs-real digits floor."""
from diffusion_jax.evaluation import digits

digits.main()
