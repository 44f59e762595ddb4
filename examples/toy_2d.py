"""Learn a 2-D Gaussian mixture with a small Flax MLP, using only the pure diffusion_jax API.

Run:  python examples/toy_2d.py --steps 1500
It trains with `dj.training_loss` on a `dj.get_schedule` schedule, samples with `dj.sample`, and
prints how many samples land on the mixture's modes (and an untrained model's figure beside it).

References: Ho et al. 2020 (L_simple, algorithm 2).
"""
from __future__ import annotations

import argparse
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import diffusion_jax as dj

NUM_MODES = 8
RADIUS = 0.7
MODE_STD = 0.05


def mode_centers() -> np.ndarray:
  """[NUM_MODES, 2] centers on a circle of radius RADIUS."""
  angles = 2 * np.pi * np.arange(NUM_MODES) / NUM_MODES
  return RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def sample_data(key: jax.Array, n: int) -> jax.Array:
  """n points [n, 2] from the mixture (equal weights, isotropic std MODE_STD)."""
  k1, k2 = jax.random.split(key)
  modes = jax.random.randint(k1, (n,), 0, NUM_MODES)
  return jnp.asarray(mode_centers(), jnp.float32)[modes] + MODE_STD * jax.random.normal(k2, (n, 2))


def mixture_log_likelihood(x: np.ndarray) -> np.ndarray:
  """log p(x) [n] under the true mixture, in nats."""
  d2 = ((x[:, None, :] - mode_centers()[None]) ** 2).sum(-1)
  log_comp = -d2 / (2 * MODE_STD ** 2) - math.log(2 * math.pi * MODE_STD ** 2)
  return np.logaddexp.reduce(log_comp, axis=1) - math.log(NUM_MODES)


class MLP(nn.Module):
  """(x_t [B, 2], t [B]) -> eps prediction [B, 2]: sinusoidal t features, SiLU MLP."""
  width: int = 128
  depth: int = 3
  num_timesteps: int = 100

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
    freqs = jnp.exp(jnp.linspace(0.0, math.log(100.0), 8))
    phase = (t.astype(jnp.float32) / self.num_timesteps)[:, None] * freqs[None] * math.pi
    h = jnp.concatenate([x, jnp.sin(phase), jnp.cos(phase)], axis=-1)
    for _ in range(self.depth):
      h = nn.silu(nn.Dense(self.width)(h))
    return nn.Dense(2, kernel_init=nn.initializers.zeros)(h)


class Result(NamedTuple):
  samples: np.ndarray        # [num_samples, 2] from the trained model
  untrained: np.ndarray      # [num_samples, 2] from the initial model (a baseline)
  losses: np.ndarray         # [num_steps] training loss


def train_and_sample(num_steps: int = 1500, batch_size: int = 1024, num_samples: int = 2000,
                     num_timesteps: int = 100, lr: float = 1e-2, seed: int = 0) -> Result:
  """Trains the MLP for `num_steps` Adam steps and draws `num_samples` samples."""
  schedule = dj.get_schedule("cosine", num_timesteps)
  model = MLP(num_timesteps=num_timesteps)
  key = jax.random.PRNGKey(seed)
  init_key, data_key, loss_key, sample_key = jax.random.split(key, 4)
  params = model.init(init_key, jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32))["params"]
  tx = optax.adam(optax.cosine_decay_schedule(lr, num_steps, alpha=0.05))
  opt_state = tx.init(params)

  def loss_fn(params, x0, rng):
    model_fn = lambda x, t: model.apply({"params": params}, x, t)
    return jnp.mean(dj.training_loss(model_fn, schedule, x0, rng))

  @jax.jit
  def train_step(params, opt_state, step):
    x0 = sample_data(jax.random.fold_in(data_key, step), batch_size)
    loss, grads = jax.value_and_grad(loss_fn)(params, x0, jax.random.fold_in(loss_key, step))
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def draw(params):
    model_fn = lambda x, t: model.apply({"params": params}, x, t)
    return dj.sample(model_fn, schedule, (num_samples, 2), sample_key)

  untrained = draw(params)
  losses = []
  for step in range(num_steps):
    params, opt_state, loss = train_step(params, opt_state, step)
    losses.append(loss)
  return Result(samples=np.asarray(draw(params)), untrained=np.asarray(untrained),
                losses=np.asarray(jnp.stack(losses)))


def on_mode_fraction(x: np.ndarray, radius: float = 4 * MODE_STD) -> float:
  """Fraction of points within `radius` of some mode center."""
  d = np.sqrt(((x[:, None, :] - mode_centers()[None]) ** 2).sum(-1)).min(axis=1)
  return float((d < radius).mean())


def mode_counts(x: np.ndarray) -> np.ndarray:
  """How many points fall nearest to each mode (within 4 std) [NUM_MODES]."""
  d = np.sqrt(((x[:, None, :] - mode_centers()[None]) ** 2).sum(-1))
  near = d.min(axis=1) < 4 * MODE_STD
  return np.bincount(d.argmin(axis=1)[near], minlength=NUM_MODES)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=1500)
  parser.add_argument("--samples", type=int, default=2000)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  result = train_and_sample(num_steps=args.steps, num_samples=args.samples, seed=args.seed)
  data = np.asarray(sample_data(jax.random.PRNGKey(args.seed + 1), args.samples))
  print(f"loss: first {result.losses[:10].mean():.4f}, last {result.losses[-10:].mean():.4f}")
  for name, x in (("data", data), ("trained", result.samples), ("untrained", result.untrained)):
    print(f"{name:>9}: on-mode fraction {on_mode_fraction(x):.3f}, mean log-likelihood "
          f"{mixture_log_likelihood(x).mean():8.3f} nats, per-mode counts {mode_counts(x)}")


if __name__ == "__main__":
  main()
