"""diffusion_jax.evaluation: sample-quality metrics from features, and the networks giving them.

`metrics` holds the float64 NumPy metrics (Frechet distance, feature statistics); `digits` the
offline digits metric (a small cached classifier's features). Knows nothing of samplers or the
trainer: callers turn samples into uint8 images and pass them in.
"""
from diffusion_jax.evaluation.digits import (classifier_accuracy, digits_features,
                                             digits_frechet_distance, real_floor)
from diffusion_jax.evaluation.metrics import feature_statistics, frechet_distance

__all__ = [
    "classifier_accuracy", "digits_features", "digits_frechet_distance", "feature_statistics",
    "frechet_distance", "real_floor",
]
