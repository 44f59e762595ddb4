"""diffusion_jax.evaluation: sample-quality metrics from features, and the networks giving them.

`metrics` holds the float64 NumPy metrics (FID, IS, KID, precision/recall, density/coverage);
`inception` the FID Inception network in Flax and its weight import; `digits` the offline digits
metric (a small cached classifier's features). Knows nothing of samplers or the
trainer: callers turn samples into uint8 images and pass them in.
"""
from diffusion_jax.evaluation.digits import (classifier_accuracy, digits_features,
                                             digits_frechet_distance, real_floor)
from diffusion_jax.evaluation.inception import InceptionV3, load_torch_weights, params_from_torch
from diffusion_jax.evaluation.metrics import (density_coverage, feature_statistics,
                                              frechet_distance, inception_score, kernel_distance,
                                              precision_recall)

__all__ = [
    "InceptionV3", "classifier_accuracy", "density_coverage", "digits_features",
    "digits_frechet_distance", "feature_statistics", "frechet_distance", "inception_score",
    "kernel_distance", "load_torch_weights", "params_from_torch", "precision_recall", "real_floor",
]
