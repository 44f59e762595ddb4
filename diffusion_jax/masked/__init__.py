"""Masked (absorbing-state) diffusion for discrete data such as text: mask schedules, the
forward masking process, the SUBS parameterisation, the continuous and T-step ELBO, and the
ancestral sampler (cached, infilling, semi-autoregressive blocks).

References: Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language Models" (MDLM);
Shi et al. 2024, "Simplified and Generalized Masked Diffusion for Discrete Data" (MD4).
"""
from diffusion_jax.masked.forward import q_sample
from diffusion_jax.masked.forward import subs_log_probs
from diffusion_jax.masked.loss import antithetic_times
from diffusion_jax.masked.loss import loss_at
from diffusion_jax.masked.loss import masked_cross_entropy
from diffusion_jax.masked.loss import nelbo
from diffusion_jax.masked.loss import times_and_weights
from diffusion_jax.masked.schedule import cosine
from diffusion_jax.masked.schedule import get_mask_schedule
from diffusion_jax.masked.schedule import linear
from diffusion_jax.masked.schedule import MaskSchedule
from diffusion_jax.masked.schedule import polynomial
from diffusion_jax.masked.sampler import block_sample
from diffusion_jax.masked.sampler import sample
from diffusion_jax.masked.sampler import Sample
from diffusion_jax.masked.sampler import top_p_filter
