"""Train a small KL autoencoder (the latent-diffusion VAE at a tiny width) for a CPU latent run.

  python -m experiments.train_autoencoder --out=runs/digits_vae          # vae_digits on digits
  python -m experiments.train_autoencoder --preset=vae_tiny --data.name=cifar10 --out=DIR

The objective is the reconstruction error of a posterior sample plus a small KL term (LDM's
KL-reg autoencoder without its perceptual and adversarial losses, which need pretrained nets):
  loss = mean_b [ sum_pixels (x - D(z))^2  +  kl_weight * KL(q(z | x) || N(0, I)) ],
  z = mean + std * eps (reparameterised), Adam, gradients clipped at norm 1.
Afterwards the scaling factor is set as LDM does (1 / std of the latents: here the posterior
means over the whole training split), so that diffusion-space latents have unit variance, and the
held-out split's reconstructions are measured (MSE on [-1, 1] images; for 8x8x1 digits also the
digits Frechet distance of the reconstructions to the held-out digits, beside the real floor).

Writes OUT as an autoencoder directory (`diffusion_jax.convert.save_checkpoint`: model.json
with the preset, the overrides (the scaling factor) and a `source` holding the training settings
and the reconstruction figures; an orbax step 0 of the params), which `experiments.encode_latents
--vae=OUT` and the training config's `autoencoder.workdir` read.

References: Rombach et al. 2022 (arXiv:2112.10752), Sec. 3 and Appendix G (KL-reg autoencoder),
Sec. 4.3.2 / D.1 (the scale factor); Kingma & Welling 2014 (reparameterisation).
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict
from ml_collections import config_flags
import numpy as np
import optax

from diffusion_jax import convert
from diffusion_jax import data as data_lib
from diffusion_jax import xla_cpu
from diffusion_jax.data.pipeline import to_float
from diffusion_jax.models import autoencoder
from diffusion_jax.models import registry
from diffusion_jax.training import console
from experiments import paths

FLAGS = flags.FLAGS
LOSSES = ("l2", "l1")


def define_flags() -> None:
  """The command line's flags (defined when run as a program)."""
  ph = config_dict.placeholder
  config_flags.DEFINE_config_dict("data", ml_collections.ConfigDict(dict(
      name="digits", image_size=ph(int), split="train", eval_split="test", data_dir=ph(str),
      folder=ph(str), channels=ph(int), random_flip=False)),
      "Data config (as in the training configs; None: the pipeline default).")
  flags.DEFINE_string("out", None, "Output autoencoder directory.", required=True)
  flags.DEFINE_enum("preset", "vae_digits", registry.autoencoder_names(), "Autoencoder preset.")
  flags.DEFINE_integer("steps", 600, "Optimizer steps.", lower_bound=1)
  flags.DEFINE_integer("batch_size", 64, "Batch size.", lower_bound=1)
  flags.DEFINE_float("lr", 2e-3, "Adam learning rate (constant after 50 warmup steps).")
  flags.DEFINE_float("kl_weight", 1e-3, "Weight of the KL term (per image, summed over latents).")
  flags.DEFINE_enum("loss", "l2", list(LOSSES), "Reconstruction error summed over pixels.")
  flags.DEFINE_integer("seed", 0, "Initialisation, data order and posterior noise.")
  flags.DEFINE_enum("cpu_convolutions", "xla", list(xla_cpu.CONVOLUTIONS),
                    "The train step's convolution kernels on CPU: XLA's own (faster) or "
                    "YNNPACK's (JAX's default); diffusion_jax/xla_cpu.py.")


def reconstruction_loss(vae: autoencoder.AutoencoderKL, params: Any, x: jax.Array, key: jax.Array,
                        kl_weight: float, loss: str = "l2") -> tuple[jax.Array, dict]:
  """The objective for a batch x [B, H, W, C] in [-1, 1]: (scalar loss, {'rec', 'kl'} [B] means)."""
  if loss not in LOSSES:
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
  posterior = vae.apply({"params": params}, x, method=autoencoder.AutoencoderKL.encode)
  recon = vae.apply({"params": params}, posterior.sample(key),
                    method=autoencoder.AutoencoderKL.decode)
  err = recon - x
  rec = jnp.sum(jnp.square(err) if loss == "l2" else jnp.abs(err), axis=(1, 2, 3))
  kl = posterior.kl()
  return jnp.mean(rec + kl_weight * kl), {"rec": jnp.mean(rec), "kl": jnp.mean(kl)}


def _encode_means(vae, params, images_uint8: np.ndarray, batch: int = 256) -> np.ndarray:
  """Posterior means (unscaled) [N, h, w, L] of uint8 images, in batches (one compiled shape)."""
  fn = jax.jit(lambda p, x: vae.apply({"params": p}, x,
                                      method=autoencoder.AutoencoderKL.encode).mean)
  out = []
  for s in range(0, len(images_uint8), batch):
    chunk = to_float(images_uint8[s:s + batch])
    pad = batch - len(chunk)
    chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
    out.append(np.asarray(fn(params, chunk))[:batch - pad])
  return np.concatenate(out)


def reconstruction_report(vae: autoencoder.AutoencoderKL, params: Any, images: np.ndarray,
                          batch: int = 256) -> tuple[dict[str, float], np.ndarray]:
  """({'mse': on [-1, 1], 'digits_fd' (8x8x1 images)}, uint8 reconstructions) of uint8 images,
  each reconstructed from its posterior mean (encode then decode with the scaling applied)."""
  enc = jax.jit(lambda p, x: autoencoder.encode(vae, p, x))
  dec = jax.jit(lambda p, z: autoencoder.decode(vae, p, z))
  recon = []
  for s in range(0, len(images), batch):
    chunk = to_float(images[s:s + batch])
    pad = batch - len(chunk)
    chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
    recon.append(np.asarray(dec(params, enc(params, chunk)))[:batch - pad])
  recon = np.concatenate(recon)
  report = {"mse": float(np.mean(np.square(recon - to_float(images))))}
  recon_u8 = np.rint((np.clip(recon, -1, 1) + 1) * 127.5).astype(np.uint8)
  if images.shape[1:] == (8, 8, 1):
    from diffusion_jax.evaluation import digits  # pylint: disable=g-import-not-at-top
    report["digits_fd"] = digits.digits_frechet_distance(recon_u8, reference="test")
    report["digits_real_floor"] = digits.real_floor()
  return report, recon_u8


def train(data_config: Any, out: str, *, preset: str = "vae_digits", steps: int = 600,
          batch_size: int = 64, lr: float = 2e-3, kl_weight: float = 1e-3, loss: str = "l2",
          seed: int = 0, log_every: int = 100, cpu_convolutions: str = "xla") -> dict[str, Any]:
  """Trains `preset` on data_config's split and writes OUT (see the module docstring).
  cpu_convolutions: the train step's convolution kernels on CPU ('xla' or 'ynnpack',
  `diffusion_jax.xla_cpu.compiler_options`); the encoder and decoder used afterwards keep JAX's.

  Returns the `source` record written into model.json (settings and figures).
  """
  t0 = time.time()
  info = data_lib.get_dataset_info(data_config)
  vae = registry.get_autoencoder(preset, in_channels=info.image_shape[-1],
                                 out_channels=info.image_shape[-1])
  init_key, noise_key = jax.random.split(jax.random.key(seed))
  params = autoencoder.init_autoencoder(vae, init_key, info.image_shape[0])
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(optax.join_schedules(
      [optax.linear_schedule(0.0, lr, 50), optax.constant_schedule(lr)], [50])))
  opt_state = tx.init(params)

  @functools.partial(jax.jit, compiler_options=xla_cpu.compiler_options(cpu_convolutions))
  def step(params, opt_state, x, key):
    (value, aux), grads = jax.value_and_grad(
        lambda p: reconstruction_loss(vae, p, x, key, kl_weight, loss), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, dict(aux, loss=value)

  it = data_lib.make_train_iterator(data_config, global_batch_size=batch_size, seed=seed,
                                    process_index=0, process_count=1, num_local_devices=1)
  for i in range(steps):
    x = next(it)["image"][0]
    params, opt_state, m = step(params, opt_state, x, jax.random.fold_in(noise_key, i))
    if (i + 1) % log_every == 0 or i + 1 == steps:
      logging.info("step %d/%d | loss %.4f | rec %.4f | kl %.2f", i + 1, steps,
                   float(m["loss"]), float(m["rec"]), float(m["kl"]))
  it.close()
  train_images = data_lib.load_split_as_numpy(data_config)["image"]
  scaling = 1.0 / float(np.std(_encode_means(vae, params, train_images)))
  vae = vae.clone(scaling_factor=scaling)
  eval_split = data_config.get("eval_split", None) or "test"
  report, _ = reconstruction_report(vae, params, data_lib.load_split_as_numpy(
      data_config, eval_split)["image"])
  source = {"trained_by": "experiments.train_autoencoder", "preset": preset, "steps": steps,
            "batch_size": batch_size, "lr": lr, "kl_weight": kl_weight, "loss": loss, "seed": seed,
            "data": dict(data_config), "eval_split": eval_split,
            "reconstruction": report, "seconds": round(time.time() - t0, 1)}
  convert.save_checkpoint(out, vae, jax.tree.map(np.asarray, params), source, preset=preset)
  return source


def main(argv):
  del argv
  console.quiet_libraries(FLAGS.verbosity)
  out = paths.absolute(FLAGS.out)
  data_config = paths.resolve_config_paths(ml_collections.ConfigDict({"data": FLAGS.data})).data
  source = train(data_config.to_dict(), out, preset=FLAGS.preset, steps=FLAGS.steps,
                 batch_size=FLAGS.batch_size, lr=FLAGS.lr, kl_weight=FLAGS.kl_weight,
                 loss=FLAGS.loss, seed=FLAGS.seed, cpu_convolutions=FLAGS.cpu_convolutions)
  print(json.dumps(source["reconstruction"]))
  print(f"wrote {out} ({os.path.join(out, 'model.json')}): reconstruction of the "
        f"{source['eval_split']} split {source['reconstruction']}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
