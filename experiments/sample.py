"""Draw samples from a trained run.

  python -m experiments.sample --workdir=runs/digits --num_samples=64 --out=runs/digits/samples.npz

Writes `images` (uint8 [N, H, W, C]) and `labels` (int32 [N], -1 when unconditional) to the
.npz and a PNG grid beside it (same name, .png). The same --seed gives the same images whatever
--batch_size (example i's noise comes from fold_in(seed key, i)).
"""
from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import rng as rng_lib
from diffusion_jax.training import restore
from diffusion_jax.training import sampling

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir of a training run.")
flags.DEFINE_integer("num_samples", 64, "Number of samples.")
flags.DEFINE_string("out", None, "Output .npz path (a .png grid is written beside it).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_bool("use_ema", True, "Sample with EMA params (else the raw params).")
flags.DEFINE_integer("batch_size", 256, "Samples per compiled call.")
flags.mark_flags_as_required(["workdir", "out"])


def sample_images(loaded: restore.Loaded, num_samples: int, seed: int, batch_size: int,
                  labels: np.ndarray | None = None) -> np.ndarray:
  """uint8 [N, H, W, C] from a restored run; batch-size independent for a given seed."""
  if labels is None:
    labels = sampling.default_labels(num_samples, loaded.num_classes)
  keys = rng_lib.example_keys(jax.random.PRNGKey(seed), num_samples)

  @jax.jit
  def draw(keys, y):
    return sampling.generate(loaded.config, loaded.model, loaded.schedule, loaded.params, keys,
                             keys.shape[0], loaded.image_shape, y)

  out = []
  for i in range(0, num_samples, batch_size):
    y = None if labels is None else jnp.asarray(labels[i:i + batch_size])
    out.append(sampling.to_uint8(draw(keys[i:i + batch_size], y)))
  return np.concatenate(out)


def main(argv):
  del argv
  loaded = restore.load_for_sampling(FLAGS.workdir, use_ema=FLAGS.use_ema)
  labels = sampling.default_labels(FLAGS.num_samples, loaded.num_classes)
  images = sample_images(loaded, FLAGS.num_samples, FLAGS.seed, FLAGS.batch_size, labels)
  out = FLAGS.out if FLAGS.out.endswith(".npz") else FLAGS.out + ".npz"
  np.savez(out, images=images,
           labels=np.full((len(images),), -1, np.int32) if labels is None else np.asarray(labels))
  png = out[:-4] + ".png"
  sampling.save_grid(images, png)
  logging.info("Step %d, %s params: wrote %s and %s", loaded.step,
               "EMA" if FLAGS.use_ema else "raw", out, png)
  print(f"Wrote {images.shape[0]} samples to {out} and the grid to {png}")


if __name__ == "__main__":
  app.run(main)
