"""diffusion_jax: diffusion models in JAX/Flax.

`import diffusion_jax as dj` gives the pure diffusion math (schedules, forward and reverse
processes, losses, samplers), the models, the data pipeline and the trainer.
"""

__version__ = "0.1.0"

from diffusion_jax import data
from diffusion_jax.data import (get_dataset_info, load_split_as_numpy, make_eval_iterator,
                                make_train_iterator)
