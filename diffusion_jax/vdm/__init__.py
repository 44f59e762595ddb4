"""Variational Diffusion Models: continuous-time VP diffusion parameterised by the log-SNR,
with fixed or learned schedules and the continuous (or T-step) variational bound.

References: Kingma, Salimans, Poole & Ho 2021, "Variational Diffusion Models".
"""
from diffusion_jax.vdm.gamma import alpha_sigma
from diffusion_jax.vdm.gamma import fixed_gamma
from diffusion_jax.vdm.gamma import gamma_and_derivative
from diffusion_jax.vdm.gamma import LearnedGamma
from diffusion_jax.vdm.loss import antithetic_times
from diffusion_jax.vdm.loss import data_to_levels
from diffusion_jax.vdm.loss import diffusion_loss
from diffusion_jax.vdm.loss import levels_to_data
from diffusion_jax.vdm.loss import prior_loss
from diffusion_jax.vdm.loss import reconstruction_loss
from diffusion_jax.vdm.loss import variance_minimising_grads
from diffusion_jax.vdm.loss import vlb_terms
from diffusion_jax.vdm.loss import VLBTerms
