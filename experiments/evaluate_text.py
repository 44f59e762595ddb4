r"""Held-out bits per character (token) of a text run.

  python -m experiments.evaluate_text --workdir=runs/shakespeare_mdlm
  python -m experiments.evaluate_text --workdir=runs/shakespeare_ar --out=ar_bpc.json

A masked-diffusion run ('masked') gets its NELBO bound (an upper bound on the true bits),
averaged over --num_time_samples (time, mask) draws per sequence; --num_steps=T gives the
T-step bound instead of the continuous-time one. The autoregressive twin gets its exact NLL.
The held-out text is `<data.text_dir>/valid.txt` packed into the run's seq_len (a TFDS run,
`data.tfds_name`: its `data.eval_split`, lm1b's 'test'), or --text;
--max_sequences evaluates its first sequences only (a quick figure; the full split is cheap
for the CPU configs). Results are printed and, with --out, written as JSON.

References: Sahoo et al. 2024 (MDLM), the bound of eq. 10 reported as perplexity / BPC.
"""
import json

from absl import app
from absl import flags

from diffusion_jax.data import text as text_lib
from diffusion_jax.training import console
from diffusion_jax.training import restore
from diffusion_jax.training import text_run
from experiments import paths
from experiments import sampling_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir of a text run.")
flags.DEFINE_string("text", None, "Held-out text file or folder (default: data.text_dir/valid.txt, "
                    "or the TFDS data.eval_split of a data.tfds_name run).")
flags.DEFINE_integer("num_time_samples", 16, "(time, mask) draws per sequence (masked runs).",
                     lower_bound=1)
flags.DEFINE_integer("num_steps", 0, "0: the continuous-time bound; T: the T-step bound.",
                     lower_bound=0)
flags.DEFINE_integer("max_sequences", 0, "> 0: only the first that many sequences.",
                     lower_bound=0)
flags.DEFINE_integer("batch_size", 64, "Sequences per compiled call.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Key of the time and mask draws.")
flags.DEFINE_bool("use_ema", True, "Evaluate the EMA params (else the raw params).")
flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' or a step number.")
flags.DEFINE_string("out", None, "Optional JSON output path.")
flags.mark_flags_as_required(["workdir"])


def evaluate(workdir: str, *, text: str | None = None, num_time_samples: int = 16,
             num_steps: int = 0, max_sequences: int = 0, batch_size: int = 64, seed: int = 0,
             use_ema: bool = True, checkpoint: str | int | None = None) -> dict:
  """The result dict of `text_run.heldout_bits` plus the run's family, step and settings."""
  loaded = restore.load_for_sampling(workdir, use_ema=use_ema, step=checkpoint)
  data = loaded.config.data
  if text is None and text_run.tfds_name(data):
    text = f"tfds:{data.tfds_name}/{data.eval_split}"
    seqs = text_run.load_text_data(data, splits=("valid",), tokenizer=loaded.tokenizer).valid
  else:
    if text is None:
      text = f"{paths.absolute(data.text_dir)}/valid.txt"
    seqs = text_lib.pack(loaded.tokenizer.encode(text_lib.read_text(text)),
                         loaded.image_shape[0])
  if max_sequences:
    seqs = seqs[:max_sequences]
  result = text_run.heldout_bits(loaded, seqs, num_time_samples=num_time_samples, seed=seed,
                                 batch_size=batch_size, num_steps=num_steps or None)
  result.update(family=text_run.family(loaded.config), step=int(loaded.step), text=str(text),
                bound="exact" if text_run.family(loaded.config) == "autoregressive" else
                (f"{num_steps}-step" if num_steps else "continuous"), use_ema=use_ema)
  return result


def main(argv):
  del argv
  console.quiet_libraries(FLAGS.verbosity)
  result = evaluate(paths.absolute(FLAGS.workdir), text=FLAGS.text,
                    num_time_samples=FLAGS.num_time_samples, num_steps=FLAGS.num_steps,
                    max_sequences=FLAGS.max_sequences, batch_size=FLAGS.batch_size,
                    seed=FLAGS.seed, use_ema=FLAGS.use_ema,
                    checkpoint=sampling_lib.parse_checkpoint(FLAGS.checkpoint))
  if FLAGS.out:
    with open(paths.absolute(FLAGS.out), "w") as f:
      json.dump(result, f, indent=2)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
