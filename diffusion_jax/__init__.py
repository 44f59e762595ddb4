"""diffusion_jax: diffusion models in JAX/Flax.

`import diffusion_jax as dj` gives the pure diffusion math (schedules, forward and reverse
processes, losses, samplers), the models, the data pipeline and the trainer.
"""

__version__ = "0.1.0"

# Models (issue 3): networks by name, parameter counting, weight import.
from diffusion_jax import models  # `diffusion_jax.convert` is imported on demand (it is also a CLI)
from diffusion_jax.models import DiT, UNet, count_params, get_model
