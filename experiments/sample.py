"""Draw samples from a trained run.

  python -m experiments.sample --workdir=runs/digits --num_samples=64 --out=runs/digits/samples.npz
  python -m experiments.sample --workdir=DIR --out=s.npz --sampler=dpm_solver++ --steps=20 \\
      --guidance_scale=2.0 --labels=3

Writes `images` (uint8 [N, H, W, C]) and `labels` (int32 [N], -1 when unconditional) to the
.npz and a PNG grid beside it (same name, .png). The same --seed gives the same images whatever
--batch_size or device count (example i's noise comes from fold_in(seed key, i)).

A text run (`data.name='text'`) writes its N texts to --out (a .txt; `tokens` int32 [N, L] in an
.npz beside it), with --steps masked-diffusion steps (default: seq_len), --temperature, --top_p:

  python -m experiments.sample --workdir=runs/shakespeare_mdlm --num_samples=4 --out=s.txt
  python -m experiments.sample --workdir=runs/shakespeare_mdlm --out=s.txt \
      --infill="ROMEO: ___________ the ___________ of Verona"   # each '_' of a hole: one token
  python -m experiments.sample --workdir=runs/shakespeare_mdlm --out=s.txt --prompt="KING:"

--infill / --prompt need a masked-diffusion run: the given characters are kept, the holes (and,
after a prompt or a short template, the rest of the sequence) are generated.
"""
from absl import app
from absl import flags
from absl import logging
import numpy as np

from diffusion_jax import compile_cache
from diffusion_jax import reverse
from diffusion_jax.training import console
from diffusion_jax.training import latent_decoder
from diffusion_jax.training import restore
from diffusion_jax.training import sampling
from diffusion_jax.training import text_run
from experiments import paths
from experiments import sampling_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when run as a program or by a test that runs `main`,
  never at import, so that importing this module beside another entry point cannot collide)."""
  flags.DEFINE_string("workdir", None, "Workdir of a training run.")
  flags.DEFINE_integer("num_samples", 64, "Number of samples (>= 1).", lower_bound=1)
  flags.DEFINE_string("out", None, "Output .npz path (a .png grid is written beside it).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_bool("use_ema", True, "Sample with EMA params (else the raw params).")
  flags.DEFINE_integer("batch_size", 256, "Samples per compiled call (over all local devices).")
  flags.DEFINE_enum("variance", None, list(reverse.VARIANCES), "Reverse-process variance; unset: "
                    "the run's own (sample.variance, else diffusion.variance).")
  flags.DEFINE_float("temperature", 1.0, "Text runs: sampling temperature (> 0).")
  flags.DEFINE_float("top_p", 1.0, "Text runs: nucleus mass in (0, 1] (1: off).")
  flags.DEFINE_string("infill", None, "Text runs (masked): a template whose --hole runs are filled.")
  flags.DEFINE_string("prompt", None, "Text runs (masked): a prefix; the rest is generated.")
  flags.DEFINE_string("hole", "_", "The hole marker of --infill: each occurrence is one generated token.")
  sampling_lib.define_flags()
  compile_cache.define_flag()
  flags.mark_flags_as_required(["workdir", "out"])


def sample_images(loaded: restore.Loaded, num_samples: int, seed: int, batch_size: int,
                  labels: np.ndarray | None = None, variance: str | None = None,
                  progress: bool = False, **sampler_kw) -> np.ndarray:
  """uint8 [N, H, W, C] from a restored run (see `sampling_lib.make_generator` for sampler_kw).

  variance: the reverse variance; None follows the run (`sampling.sampling_variance`).
  progress: show a bar over the batches (tqdm, on stderr).
  steps / guidance_scale left out (or None) follow the run's sample.steps / guidance_scale.
  A latent run's samples are decoded by its autoencoder (`latent_decoder`), so the images are
  pixels either way.
  """
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
  draw = sampling_lib.make_run_generator(loaded, variance=variance, seed=seed,
                                         batch_size=min(batch_size, num_samples), **sampler_kw)
  decoder = latent_decoder.load_decoder(loaded.config)   # None: a pixel-space run
  return latent_decoder.to_images(draw(num_samples, labels, progress=progress), decoder)


def main(argv):
  del argv
  console.quiet_libraries(FLAGS.verbosity)
  compile_cache.enable(FLAGS.compile_cache)
  loaded = restore.load_for_sampling(paths.absolute(FLAGS.workdir), use_ema=FLAGS.use_ema,
                                     step=sampling_lib.parse_checkpoint(FLAGS.checkpoint))
  if loaded.tokenizer is not None:
    write_texts(loaded)
    return
  labels = sampling_lib.parse_labels(FLAGS.labels, FLAGS.num_samples, loaded.num_classes)
  images = sample_images(loaded, FLAGS.num_samples, FLAGS.seed, FLAGS.batch_size, labels,
                         progress=True, sampler=FLAGS.sampler, steps=FLAGS.steps,
                         timesteps=FLAGS.timesteps, thresholding=FLAGS.thresholding, eta=FLAGS.eta,
                         s_churn=FLAGS.s_churn, snr=FLAGS.snr,
                         corrector_steps=FLAGS.corrector_steps,
                         guidance_scale=FLAGS.guidance_scale, variance=FLAGS.variance)
  out = paths.absolute(FLAGS.out if FLAGS.out.endswith(".npz") else FLAGS.out + ".npz")
  np.savez(out, images=images,
           labels=np.full((len(images),), -1, np.int32) if labels is None else np.asarray(labels))
  png = out[:-4] + ".png"
  sampling.save_grid(images, png)
  logging.info("Step %d, %s params: wrote %s and %s", loaded.step,
               "EMA" if FLAGS.use_ema else "raw", out, png)
  print(f"Wrote {images.shape[0]} samples to {out} and the grid to {png}")


def write_texts(loaded: restore.Loaded) -> None:
  """The text-run branch of `main`: samples (or infills) and writes them as text."""
  if FLAGS.infill is not None and FLAGS.prompt is not None:
    raise ValueError("give --infill or --prompt, not both.")
  template = FLAGS.infill if FLAGS.infill is not None else FLAGS.prompt
  texts, tokens = text_run.sample_texts(
      loaded, FLAGS.num_samples, seed=FLAGS.seed, steps=FLAGS.steps,
      temperature=FLAGS.temperature, top_p=FLAGS.top_p, template=template, hole=FLAGS.hole,
      batch_size=FLAGS.batch_size)
  out = paths.absolute(FLAGS.out if FLAGS.out.endswith(".txt") else FLAGS.out + ".txt")
  with open(out, "w", encoding="utf-8") as f:
    f.write("".join(f"=== sample {i} ===\n{t}\n" for i, t in enumerate(texts)))
  np.savez(out[:-4] + ".npz", tokens=tokens)
  logging.info("Step %d, %s params: wrote %s", loaded.step, "EMA" if FLAGS.use_ema else "raw",
               out)
  print(f"Wrote {len(texts)} texts to {out}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
