"""diffusion_jax: diffusion models in JAX/Flax.

`import diffusion_jax as dj` gives the pure diffusion math (schedules, forward and reverse
processes, losses, samplers), the models, the data pipeline and the trainer.
"""

from diffusion_jax import data
from diffusion_jax import forward
from diffusion_jax import losses
from diffusion_jax import reverse
from diffusion_jax import rng
from diffusion_jax import samplers
from diffusion_jax import schedules
from diffusion_jax.data import get_dataset_info
from diffusion_jax.data import load_split_as_numpy
from diffusion_jax.data import make_eval_iterator
from diffusion_jax.data import make_train_iterator
from diffusion_jax.forward import eps_from_v
from diffusion_jax.forward import eps_from_x0
from diffusion_jax.forward import predict_eps
from diffusion_jax.forward import predict_x0
from diffusion_jax.forward import prediction_target
from diffusion_jax.forward import q_mean_variance
from diffusion_jax.forward import q_posterior_mean_variance
from diffusion_jax.forward import q_sample
from diffusion_jax.forward import v_from_eps_x0
from diffusion_jax.forward import x0_from_eps
from diffusion_jax.forward import x0_from_v
from diffusion_jax.losses import bits_per_dim
from diffusion_jax.losses import training_loss
from diffusion_jax.reverse import p_mean_variance
from diffusion_jax.reverse import p_sample
from diffusion_jax.reverse import PMeanVariance
from diffusion_jax.samplers import classifier_free_guidance
from diffusion_jax.samplers import get_sampler
from diffusion_jax.samplers import Inpaint
from diffusion_jax.samplers import ode_log_likelihood
from diffusion_jax.samplers import respace
from diffusion_jax.samplers import sample
from diffusion_jax.schedules import from_betas
from diffusion_jax.schedules import get_schedule
from diffusion_jax.schedules import Schedule

from diffusion_jax import training
from diffusion_jax.training import train_and_evaluate

__version__ = "0.1.0"

# Models (issue 3): networks by name, parameter counting, weight import.
from diffusion_jax import models  # `diffusion_jax.convert` is imported on demand (it is also a CLI)
from diffusion_jax.models import DiT, UNet, count_params, get_model
