"""The diffusion family of a run (`diffusion.family`): what the network is trained on and how
it is seen by the samplers.

  'ddpm': the discrete beta schedule of `diffusion.schedule`; `losses.training_loss`.
  'vdm':  continuous-time VP diffusion in the log-SNR `gamma(t)` (`config.vdm`): the network is
          `VDMNetwork` (the backbone, conditioned on gamma, beside a fixed or learned schedule
          whose params live in the same params tree); the loss is the VLB in bits/dim.
  'edm':  EDM's preconditioned denoiser (`config.edm`): the network is `EDMNetwork` (the raw
          backbone F inside D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)); the loss is EDM's.

Every family is sampled through the library's samplers as a discrete VP model of T =
`diffusion.num_timesteps` steps: `sampling_schedule` gives that schedule and the network's
`__call__(x_vp, t, y, train)` takes the VP state at the index t in [0, T-1] (fractional for the
ODE samplers):
  vdm: alpha_bar_t = sigmoid(-gamma((t + 1) / T)) (the learned gamma read from the params),
       output eps: ancestral sampling on it is VDM's T-step ancestral sampler;
  edm: sigma_t log-spaced from `edm.sigma_min` (t = 0) to `edm.sigma_max` (t = T - 1),
       alpha_bar_t = 1 / (1 + sigma_t^2), output x0 = D(x; sigma_t): Heun on the Karras grid
       (`samplers.ode`, which reads sigma back from t by the same log-linear interpolation) is
       EDM's sampler.

References: Kingma et al. 2021 (VDM: the VLB, the learned schedule, conditioning on the
normalised gamma); Karras et al. 2022 (EDM: table 1, algorithms 1-2).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import _checks
from diffusion_jax import edm
from diffusion_jax import losses
from diffusion_jax import schedules
from diffusion_jax import vdm

# The text families ('masked', 'autoregressive') are built and trained by `text_run`; none of
# the image functions below applies to them.
TEXT_FAMILIES = ("masked", "autoregressive")
FAMILIES = ("ddpm", "vdm", "edm") + TEXT_FAMILIES
VDM_GAMMAS = ("learned",) + vdm.gamma.SHAPES
# The family's required prediction target (what `__call__` returns to the samplers).
PREDICTIONS = {"vdm": "eps", "edm": "x0"}
# VDM feeds the backbone's time embedding with the normalised gamma times this factor.
VDM_TIME_SCALE = 1000.0
# The ddpm family's per-example loss keys of `losses.training_loss`.
DDPM_LOSS_KEYS = ("prediction", "loss_type", "weighting", "variance", "min_snr_gamma", "p2_gamma",
                  "p2_k", "vlb_weight")

PyTree = Any


def family(config: Any) -> str:
  """`config.diffusion.family`, checked (with the family's constraints on the other keys)."""
  name = _checks.check_choice("diffusion.family", config.diffusion.family, FAMILIES)
  if name == "ddpm" or name in TEXT_FAMILIES:
    return name
  want = PREDICTIONS[name]
  if config.diffusion.prediction != want:
    raise ValueError(f"diffusion.prediction={config.diffusion.prediction!r}, but the {name!r} "
                     f"family's network outputs {want!r}: set diffusion.prediction={want!r}.")
  if config.model.learn_sigma:
    raise ValueError(f"model.learn_sigma=True: the {name!r} family has no learned variance; "
                     "set model.learn_sigma=False.")
  if name == "vdm":
    _checks.check_choice("vdm.gamma", config.vdm.gamma, VDM_GAMMAS)
    _checks.check_choice("vdm.decoder", config.vdm.decoder, vdm.loss.DECODERS)
    if not config.vdm.gamma_min < config.vdm.gamma_max:
      raise ValueError(f"vdm.gamma_min={config.vdm.gamma_min} must be below "
                       f"vdm.gamma_max={config.vdm.gamma_max}.")
    if int(config.vdm.num_steps) < 0:
      raise ValueError(f"vdm.num_steps must be >= 0 (0: continuous time), got "
                       f"{config.vdm.num_steps}.")
    if config.vdm.variance_minimising and (config.vdm.gamma != "learned"
                                           or int(config.vdm.num_steps) > 0):
      raise ValueError("vdm.variance_minimising=True needs vdm.gamma='learned' and "
                       "vdm.num_steps=0 (only the continuous bound is independent of the "
                       "schedule's shape in expectation).")
  else:
    _checks.check_choice("edm.precond", config.edm.precond, edm.PRECONDITIONINGS)
    if not 0.0 < config.edm.sigma_min < config.edm.sigma_max:
      raise ValueError(f"need 0 < edm.sigma_min < edm.sigma_max, got {config.edm.sigma_min}, "
                       f"{config.edm.sigma_max}.")
  return name


class _Wrapper(nn.Module):
  """A family's module around a backbone; exposes the backbone's model-contract attributes."""
  backbone: nn.Module

  @property
  def num_classes(self) -> int:
    return self.backbone.num_classes

  @property
  def in_channels(self) -> int:
    return self.backbone.in_channels

  @property
  def learn_sigma(self) -> bool:
    return self.backbone.learn_sigma

  @property
  def out_channels(self) -> int:
    return self.backbone.out_channels


class VDMNetwork(_Wrapper):
  """A backbone predicting eps from (z_t, gamma(t)), and VDM's schedule gamma, in one module.

  Params: {'backbone': ..., 'gamma': ...} (the 'gamma' entry only for a learned schedule).
  Methods: `gamma(t [B]) -> [B]` (t in [0, 1]); `eps(z [B, H, W, C], g [B], y, train)`;
  `__call__(z, t, y, train)`: eps at the sampling index t in [0, T-1], i.e. time (t + 1) / T.
  """
  schedule: str = "learned"
  gamma_min: float = vdm.gamma.GAMMA_MIN
  gamma_max: float = vdm.gamma.GAMMA_MAX
  num_features: int = 1024
  num_timesteps: int = 1000

  def setup(self):
    if self.schedule == "learned":
      self.learned = vdm.LearnedGamma(self.gamma_min, self.gamma_max, self.num_features,
                                      name="gamma")

  def gamma(self, t: jax.Array) -> jax.Array:
    t = jnp.asarray(t, jnp.float32)
    if self.schedule == "learned":
      return self.learned(t)
    return vdm.fixed_gamma(self.schedule, self.gamma_min, self.gamma_max)(t)

  def eps(self, z: jax.Array, g: jax.Array, y: jax.Array | None = None,
          train: bool = False) -> jax.Array:
    # As VDM: the time embedding sees (gamma - gamma_min) / (gamma_max - gamma_min) x 1000 with
    # the configured (initial) end points.
    cond = VDM_TIME_SCALE * (g - self.gamma_min) / (self.gamma_max - self.gamma_min)
    return self.backbone(z, cond, y, train=train)

  def __call__(self, z: jax.Array, t: jax.Array, y: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    t = (jnp.asarray(t, jnp.float32) + 1.0) / self.num_timesteps
    t = jnp.broadcast_to(t, (z.shape[0],))
    return self.eps(z, self.gamma(t), y, train)


class EDMNetwork(_Wrapper):
  """EDM's preconditioned denoiser around a raw backbone F.

  Params: {'backbone': ...}. Methods: `raw(u, c_noise [B], y, train) = F(u, c_noise)`;
  `denoise(x, sigma [B], y, train) = D(x; sigma)` in sigma space;
  `__call__(x_vp, t, y, train)`: D at the sampling index t in [0, T-1] (`sigma_at`), with the
  sigma-space state x = sqrt(1 + sigma^2) x_vp.
  """
  precond: str = "edm"
  sigma_data: float = edm.SIGMA_DATA
  sigma_min: float = 0.002
  sigma_max: float = 80.0
  num_timesteps: int = 1000

  def raw(self, u: jax.Array, c_noise: jax.Array, y: jax.Array | None = None,
          train: bool = False) -> jax.Array:
    return self.backbone(u, c_noise, y, train=train)

  def denoise(self, x: jax.Array, sigma: jax.Array, y: jax.Array | None = None,
              train: bool = False) -> jax.Array:
    return edm.denoiser(lambda u, c: self.raw(u, c, y, train), x, sigma, precond=self.precond,
                        sigma_data=self.sigma_data)

  def __call__(self, x_vp: jax.Array, t: jax.Array, y: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    sigma = jnp.broadcast_to(edm_sigma_at(t, self.sigma_min, self.sigma_max, self.num_timesteps),
                             (x_vp.shape[0],))
    x = x_vp * jnp.sqrt(1.0 + jnp.square(sigma)).reshape((-1,) + (1,) * (x_vp.ndim - 1))
    return self.denoise(x, sigma, y, train)


def edm_sigma_at(t: jax.Array, sigma_min: float, sigma_max: float, num_timesteps: int
                 ) -> jax.Array:
  """sigma at the (fractional) index t of the EDM run's sampling table: log-linear from
  sigma_min (t = 0) to sigma_max (t = T - 1)."""
  frac = jnp.asarray(t, jnp.float32) / max(num_timesteps - 1, 1)
  return jnp.exp(math.log(sigma_min) + frac * (math.log(sigma_max) - math.log(sigma_min)))


def wrap_backbone(config: Any, backbone: nn.Module) -> nn.Module:
  """The module a run trains and samples: the backbone itself ('ddpm') or its family's wrapper."""
  name = family(config)
  steps = int(config.diffusion.num_timesteps)
  if name == "vdm":
    v = config.vdm
    return VDMNetwork(backbone, v.gamma, float(v.gamma_min), float(v.gamma_max),
                      int(v.num_features), steps)
  if name == "edm":
    e = config.edm
    return EDMNetwork(backbone, e.precond, float(e.sigma_data), float(e.sigma_min),
                      float(e.sigma_max), steps)
  return backbone


def base_schedule(config: Any) -> schedules.Schedule:
  """The run's T-step schedule as far as the config fixes it: the beta schedule ('ddpm'), the
  sigma table ('edm'), the configured gamma ('vdm'; for a learned gamma its initial, linear,
  end points: the trained one is `sampling_schedule`'s)."""
  name = family(config)
  steps = int(config.diffusion.num_timesteps)
  if name == "edm":
    sigma = np.asarray(edm_sigma_at(jnp.arange(steps), config.edm.sigma_min,
                                    config.edm.sigma_max, steps), np.float64)
    return schedules.from_alphas_cumprod(1.0 / (1.0 + np.square(sigma)))
  shape = "linear" if config.vdm.gamma == "learned" else config.vdm.gamma
  gamma_fn = vdm.fixed_gamma(shape, float(config.vdm.gamma_min), float(config.vdm.gamma_max))
  return _vdm_schedule(gamma_fn, steps)


def _vdm_schedule(gamma_fn: Callable[[jax.Array], jax.Array], steps: int) -> schedules.Schedule:
  """alpha_bar_t = sigmoid(-gamma((t + 1) / T)), t = 0..T-1 (float64 from float32 gamma)."""
  g = np.asarray(gamma_fn(jnp.arange(1, steps + 1, dtype=jnp.float32) / steps), np.float64)
  return schedules.from_alphas_cumprod(1.0 / (1.0 + np.exp(g)))


def sampling_schedule(config: Any, model: nn.Module, params: PyTree,
                      default: schedules.Schedule) -> schedules.Schedule:
  """The schedule the samplers run a model on (eager, from host or device params): `default`
  (the run's `base_schedule` or beta schedule) except for a learned VDM gamma, read from
  `params`."""
  if family(config) == "vdm" and config.vdm.gamma == "learned":
    gamma_fn = lambda t: model.apply({"params": params}, t, method="gamma")
    return _vdm_schedule(gamma_fn, int(config.diffusion.num_timesteps))
  return default


def vdm_data(x0: jax.Array) -> jax.Array:
  """Data in [-1, 1] moved to VDM's 8-bit bin centres (`vdm.levels_to_data`)."""
  return vdm.levels_to_data(vdm.data_to_levels(x0))


def vdm_vlb(config: Any, model_fn: Callable[..., jax.Array],
            gamma_fn: Callable[[jax.Array], jax.Array], x0: jax.Array, keys: jax.Array,
            antithetic: bool | None = None) -> jax.Array:
  """The VDM bound in bits/dim [B] of data x0 (moved to the 8-bit bin centres with the '8bit'
  decoder) with per-example keys [B]; `model_fn(z, g)` is the eps network at log-SNR -g."""
  v = config.vdm
  x = vdm_data(x0) if v.decoder == "8bit" else x0
  eps_fn = lambda z, t: model_fn(z, gamma_fn(t))
  steps = int(v.num_steps) or None
  return vdm.vlb_terms(eps_fn, gamma_fn, x, keys, num_steps=steps, decoder=v.decoder,
                       antithetic=bool(v.antithetic if antithetic is None else antithetic)).bpd


def is_shape_param(path: tuple) -> bool:
  """Whether a params path (tuple of names) is a shape parameter of the learned VDM schedule
  (`VDMNetwork`'s 'gamma/shape/...': it moves the curve, not its end points)."""
  return tuple(path[:2]) == ("gamma", "shape")


def _stop_all_but_shape(params: PyTree) -> PyTree:
  def keep(path, leaf):
    names = tuple(getattr(k, "key", getattr(k, "name", k)) for k in path)
    return leaf if is_shape_param(names) else jax.lax.stop_gradient(leaf)
  return jax.tree_util.tree_map_with_path(keep, params)


def vlb_bits_fn(config: Any, model: nn.Module) -> Callable[..., jax.Array] | None:
  """`(params, x0 [B, ...], keys [B]) -> bits/dim [B]`: the bound of a VDM run (independent times,
  so example b's value depends on its key alone), None for a 'ddpm' run (its T-step bound is
  `losses.bits_per_dim`). An 'edm' run has no variational bound: a ValueError (use the ODE
  likelihood)."""
  name = family(config)
  if name == "ddpm":
    return None
  if name == "edm":
    raise ValueError("diffusion.family='edm' has no variational bound; evaluate the "
                     "probability-flow ODE likelihood instead (method='ode').")
  def bits(params, x0, keys):
    gamma_fn = lambda t: model.apply({"params": params}, t, method="gamma")
    eps_fn = lambda z, g: model.apply({"params": params}, z, g, None, method="eps")
    return vdm_vlb(config, eps_fn, gamma_fn, x0, keys, antithetic=False)
  return bits


def make_loss_fn(config: Any, schedule: schedules.Schedule) -> Callable[..., jax.Array]:
  """loss_fn(model_fn, x0 [B, ...], keys [B]) -> [B], the one place the families' losses meet.

  model_fn: the train step's network (`training.step.ModelFn`): `model_fn(x, t)` runs
  `__call__`, `model_fn(x, t, method=name)` another method with labels and dropout, and
  `model_fn.apply(name, *args)` a method without them (the learned schedule).
    ddpm: `losses.training_loss` with the config's prediction, loss type, weighting, variance.
    vdm:  the VLB in bits/dim (`vdm_vlb`) with the module's gamma; with
          `vdm.variance_minimising` the schedule's shape parameters follow the gradient of the
          mean squared bound instead (VDM sec. 5.2; `vdm.variance_minimising_grads`).
    edm:  `edm.training_loss` on the module's raw backbone.
  """
  name = family(config)
  if name == "vdm":
    def bound(model_fn, x0, keys):
      gamma_fn = lambda t: model_fn.apply("gamma", t)
      return vdm_vlb(config, lambda z, g: model_fn(z, g, method="eps"), gamma_fn, x0, keys)
    if not config.vdm.variance_minimising:
      return bound
    def vdm_loss(model_fn, x0, keys):
      loss = bound(model_fn, x0, keys)
      # Shape parameters get the gradient of mean(L^2) = mean(2 L dL), the others that of
      # mean(L): a zero-valued term whose gradient reaches the shape parameters only, adding
      # (2 L - 1) dL to their plain dL (one more forward and backward pass of the network).
      shape_only = bound(model_fn.with_params(_stop_all_but_shape), x0, keys)
      extra = jax.lax.stop_gradient(2.0 * loss - 1.0) * shape_only
      return loss + extra - jax.lax.stop_gradient(extra)
    return vdm_loss
  if name == "edm":
    e = config.edm
    kw = dict(precond=e.precond, sigma_data=float(e.sigma_data), p_mean=float(e.p_mean),
              p_std=float(e.p_std))
    def edm_loss(model_fn, x0, keys):
      return edm.training_loss(lambda u, c: model_fn(u, c, method="raw"), x0, keys, **kw)
    return edm_loss
  kw = {k: config.diffusion[k] for k in DDPM_LOSS_KEYS}
  def ddpm_loss(model_fn, x0, keys):
    return losses.training_loss(model_fn, schedule, x0, keys, **kw)
  return ddpm_loss
