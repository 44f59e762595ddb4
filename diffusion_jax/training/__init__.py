"""diffusion_jax.training: train state, optax chain, per-device step, pmap / shard_map wrap,
orbax checkpoints, the train loop and loading a run for sampling."""
from diffusion_jax.training.checkpoint import Checkpointer
from diffusion_jax.training.optim import make_lr_schedule, make_optimizer
from diffusion_jax.training.parallel import ParallelStep, make_parallel_step
from diffusion_jax.training.restore import Loaded, load_for_sampling
from diffusion_jax.training.state import TrainState, create_train_state, ema_key, ema_update
from diffusion_jax.training.step import StepConfig, make_train_step
from diffusion_jax.training.trainer import NonFiniteError, Preempted, train_and_evaluate

__all__ = [
    "Checkpointer", "Loaded", "NonFiniteError", "ParallelStep", "Preempted", "StepConfig",
    "TrainState", "create_train_state", "ema_key", "ema_update", "load_for_sampling",
    "make_lr_schedule", "make_optimizer", "make_parallel_step", "make_train_step",
    "train_and_evaluate",
]
