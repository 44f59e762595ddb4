r"""Held-out bits per character (token) and perplexity of a text run, resumable and sharded.

  python -m experiments.evaluate_text --workdir=runs/shakespeare_mdlm
  python -m experiments.evaluate_text --workdir=runs/shakespeare_ar --out=ar_bpc.json
  # Several processes (all must share the workdir): the same command in every one, e.g.
  python -m experiments.evaluate_text --workdir=DIR --coordinator_address=HOST0:PORT \
      --num_processes=2 --process_id=I [--cpu_collectives=gloo]

A masked-diffusion run ('masked') gets its NELBO bound (an upper bound on the true bits),
averaged over --num_time_samples (time, mask) draws per sequence; --num_steps=T gives the
T-step bound instead of the continuous-time one. The autoregressive twin gets its exact NLL.
The held-out text is `<data.text_dir>/valid.txt` packed into the run's seq_len (a TFDS run,
`data.tfds_name`: its `data.eval_split`, lm1b's 'test'), or --text; --max_sequences evaluates
its first sequences only.

Sequence m's draw j uses the key fold_in(fold_in(PRNGKey(--seed), j), m) and every compiled call
runs --batch_size sequences (the last padded), so a sequence's bits do not depend on which
shard or process computes it. Shards of --shard_size sequences (float32 bits [n, draws] and
token counts [n]) are committed to `<eval_dir>/<step>-<ema|raw>-<key>/shard_<i>.npz` as they
finish (`experiments.shards`; eval_dir defaults to `<workdir>/eval_text`, key: a hash of the
settings and of the tokenized text): a killed run, rerun, continues where it stopped and gives
the figures of an uninterrupted one bit for bit; with several processes shard i belongs to
process i % process_count and process 0 combines them. Results (bits per token, its standard
error, the perplexity 2^bits, the settings) are printed and written to
`results_<num_sequences>.json` beside the shards, and with --out also there.

References: Sahoo et al. 2024 (MDLM), the bound of eq. 10 reported as perplexity / BPC.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Sequence

import jax
import numpy as np

from experiments import shards


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, never at import)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from experiments import multihost  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "Workdir of a text run.", required=True)
  flags.DEFINE_string("text", None, "Held-out text file or folder (default: "
                      "data.text_dir/valid.txt, or the TFDS data.eval_split of a "
                      "data.tfds_name run).")
  flags.DEFINE_integer("num_time_samples", 16, "(time, mask) draws per sequence (masked runs).",
                       lower_bound=1)
  flags.DEFINE_integer("num_steps", 0, "0: the continuous-time bound; T: the T-step bound.",
                       lower_bound=0)
  flags.DEFINE_integer("max_sequences", 0, "> 0: only the first that many sequences.",
                       lower_bound=0)
  flags.DEFINE_integer("batch_size", 64, "Sequences per compiled call.", lower_bound=1)
  flags.DEFINE_integer("shard_size", 256, "Sequences per committed shard.", lower_bound=1)
  flags.DEFINE_integer("seed", 0, "Key of the time and mask draws.")
  flags.DEFINE_bool("use_ema", True, "Evaluate the EMA params (else the raw params).")
  flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' or a step number.")
  flags.DEFINE_string("eval_dir", None, "Folder of the shards and results (default: "
                      "<workdir>/eval_text).")
  flags.DEFINE_string("out", None, "Optional extra JSON output path (written by process 0).")
  multihost.define_flags()


def _atomic_json(path: str, value: Any) -> None:
  with open(f"{path}.{os.getpid()}.tmp", "w") as f:
    json.dump(value, f, indent=1, sort_keys=True)
  os.replace(f"{path}.{os.getpid()}.tmp", path)


def evaluate(workdir: str, *, text: str | None = None, num_time_samples: int = 16,
             num_steps: int = 0, max_sequences: int = 0, batch_size: int = 64,
             shard_size: int = 256, seed: int = 0, use_ema: bool = True,
             checkpoint: str | int | None = None, eval_dir: str | None = None,
             progress: bool = True) -> dict[str, Any]:
  """Evaluates a text run (see the module docstring); writes (process 0) and returns the result:
  `text_run.summarize_bits`'s figures plus the run's family, step, the bound and the settings.
  """
  from diffusion_jax.data import text as text_lib  # pylint: disable=g-import-not-at-top
  from diffusion_jax.training import restore, text_run  # pylint: disable=g-import-not-at-top
  from experiments import paths, sampling_lib  # pylint: disable=g-import-not-at-top
  started = time.time()
  workdir = paths.absolute(workdir)
  loaded = restore.load_for_sampling(workdir, use_ema=use_ema,
                                     step=sampling_lib.parse_checkpoint(checkpoint))
  if not text_run.is_text(loaded.config):
    raise ValueError(f"{workdir} is not a text run (data.name={loaded.config.data.name!r}); "
                     "use experiments.evaluate for image runs.")
  data, seq_len = loaded.config.data, int(loaded.image_shape[0])
  if text is None and text_run.tfds_name(data):
    text = f"tfds:{data.tfds_name}/{data.eval_split}"
    all_seqs = text_run.load_text_data(data, splits=("valid",), tokenizer=loaded.tokenizer).valid
  else:
    text = paths.absolute(text) if text else f"{paths.absolute(data.text_dir)}/valid.txt"
    all_seqs = text_lib.pack(loaded.tokenizer.encode(text_lib.read_text(text)), seq_len)
  seqs = all_seqs[:max_sequences] if max_sequences else all_seqs
  family = text_run.family(loaded.config)
  draws = 1 if family == "autoregressive" else num_time_samples
  bound = ("exact" if family == "autoregressive" else
           (f"{num_steps}-step" if num_steps else "continuous"))
  # What a shard's contents depend on; --max_sequences does not (a longer run reuses shards).
  settings = {
      "step": int(loaded.step), "use_ema": use_ema, "family": family, "bound": bound,
      "num_time_samples": draws, "seed": seed, "batch_size": batch_size,
      "shard_size": shard_size, "seq_len": seq_len,
      "sequences_sha256": hashlib.sha256(np.ascontiguousarray(all_seqs, np.int32)).hexdigest(),
  }
  eval_dir = paths.absolute(eval_dir) if eval_dir else os.path.join(workdir, "eval_text")
  shard_dir = os.path.join(eval_dir, f"{loaded.step}-{'ema' if use_ema else 'raw'}-"
                                     f"{shards.settings_key(settings)}")
  bits = text_run.sequence_bits_fn(loaded, num_time_samples=draws, seed=seed,
                                   batch_size=batch_size, num_steps=num_steps or None)

  def compute(start: int, count: int) -> dict[str, np.ndarray]:
    return {"bits": bits(seqs[start:start + count], np.arange(start, start + count)),
            "tokens": np.full(count, seq_len, np.int64)}

  paths_ = shards.run(compute, num_items=len(seqs), shard_size=shard_size, shard_dir=shard_dir,
                      settings=settings, process_index=jax.process_index(),
                      process_count=jax.process_count(), progress=progress,
                      desc="held-out bits", unit="seq")
  parts = {"bits": [], "tokens": []}
  for path in paths_:
    with np.load(path) as data:
      for key, value in parts.items():
        value.append(data[key])
  result = text_run.summarize_bits(np.concatenate(parts["bits"]),
                                   np.concatenate(parts["tokens"]))
  result.update(family=family, bound=bound, step=int(loaded.step), use_ema=use_ema,
                text=str(text), settings={**settings, "max_sequences": max_sequences,
                                          "workdir": workdir, "num_steps": num_steps},
                shards=shard_dir, process_count=jax.process_count(),
                seconds=time.time() - started)
  result["path"] = os.path.join(shard_dir, f"results_{len(seqs)}.json")
  if jax.process_index() == 0:
    _atomic_json(result["path"], result)
  return result


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from diffusion_jax import compile_cache  # pylint: disable=g-import-not-at-top
  from diffusion_jax.training import console  # pylint: disable=g-import-not-at-top
  from experiments import multihost, paths  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  console.quiet_libraries(f.verbosity)
  compile_cache.enable(f.compile_cache)
  multihost.initialize(f)
  result = evaluate(f.workdir, text=f.text, num_time_samples=f.num_time_samples,
                    num_steps=f.num_steps, max_sequences=f.max_sequences,
                    batch_size=f.batch_size, shard_size=f.shard_size, seed=f.seed,
                    use_ema=f.use_ema, checkpoint=f.checkpoint, eval_dir=f.eval_dir)
  if jax.process_index() != 0:
    print(f"process {jax.process_index()}/{jax.process_count()}: done; process 0 writes "
          f"{result['path']}")
    return
  if f.out:
    _atomic_json(paths.absolute(f.out), result)
  print(json.dumps(result))


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from diffusion_jax import compile_cache  # pylint: disable=g-import-not-at-top
  compile_cache.define_flag()
  define_flags()
  app.run(main)
