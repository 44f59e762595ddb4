"""Masked diffusion vs its autoregressive twin on text: held-out bits per character, and the
speed / quality trade-off of the diffusion sampler as its number of steps varies.

  python benchmarks/text_speed_quality.py --mdlm runs/shakespeare_mdlm --ar runs/shakespeare_ar \\
      --out_dir docs [--steps 8,16,32,64,128] [--num_samples 32] [--eval_sequences 128]

For each run: the held-out BPC (`text_run.heldout_bits`: the continuous-time NELBO bound,
averaged over --time_samples draws per sequence, for the diffusion run; the exact NLL for the
twin). Then N samples from the diffusion run at each step count, and N from the twin (KV cache,
one network call per token); for each: tokens/s (N x L over the wall time of a second,
compiled call, best of --rounds) and quality = the mean bits per character of the samples
under the autoregressive twin (lower: more like what the twin learned; the twin's own samples
score its entropy rate, and real held-out text scores its held-out BPC). Writes
OUT_DIR/text_speed_quality.json, .png (quality vs tokens/s) and prints the load average: timings
taken under load are not final numbers (benchmarks/protocol.py).
"""
import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol  # noqa: E402

from diffusion_jax import autoregressive  # noqa: E402
from diffusion_jax.data import text as text_lib  # noqa: E402
from diffusion_jax.training import restore  # noqa: E402
from diffusion_jax.training import text_run  # noqa: E402


def ar_bits_of(ar: restore.Loaded):
  """jitted bits per token [N] of tokens [N, L] under the twin."""
  vocab = ar.tokenizer.vocab_size

  @jax.jit
  def bits(tokens):
    logits_fn = lambda x: ar.model.apply({"params": ar.params}, x, None)
    return autoregressive.nll(logits_fn, tokens, bos_id=vocab) / (tokens.shape[1] * math.log(2))
  return bits


def timed_sampler(run: restore.Loaded, num: int, steps: int | None, rounds: int):
  """(tokens [num, L], best seconds of `rounds` compiled calls, network calls)."""
  length, vocab = int(run.image_shape[0]), run.tokenizer.vocab_size
  fn = jax.jit(lambda params, key: text_run.generate(run.config, run.model, params, key, num,
                                                     length, vocab, steps=steps))
  tokens, calls = jax.block_until_ready(fn(run.params, jax.random.PRNGKey(0)))  # compile
  times = []
  for r in range(rounds):
    t0 = time.perf_counter()
    tokens, calls = jax.block_until_ready(fn(run.params, jax.random.PRNGKey(r + 1)))
    times.append(time.perf_counter() - t0)
  return np.asarray(tokens), min(times), int(calls)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mdlm", required=True)
  parser.add_argument("--ar", required=True)
  parser.add_argument("--out_dir", default="docs")
  parser.add_argument("--steps", default="8,16,32,64,128")
  parser.add_argument("--num_samples", type=int, default=32)
  parser.add_argument("--eval_sequences", type=int, default=128)
  parser.add_argument("--time_samples", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--use_ema", action="store_true", help="EMA params (default: the raw "
                      "params: an EMA of decay 0.999 still remembers the initialisation after a "
                      "few hundred steps)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step of both runs "
                      "(default: each run's latest)")
  args = parser.parse_args()
  before = protocol.print_load("before")
  mdlm = restore.load_for_sampling(args.mdlm, use_ema=args.use_ema, step=args.step)
  ar = restore.load_for_sampling(args.ar, use_ema=args.use_ema, step=args.step)
  length = int(mdlm.image_shape[0])
  valid_path = os.path.join(protocol.ROOT, mdlm.config.data.text_dir, "valid.txt")
  seqs = text_lib.pack(mdlm.tokenizer.encode(text_lib.read_text(valid_path)), length)
  seqs = seqs[:args.eval_sequences]
  result = {"machine": protocol.machine_line(), "mdlm_step": int(mdlm.step),
            "ar_step": int(ar.step), "seq_len": length, "num_samples": args.num_samples,
            "eval_sequences": int(len(seqs)), "use_ema": bool(args.use_ema)}
  result["heldout"] = {
      "mdlm_bound": text_run.heldout_bits(mdlm, seqs, num_time_samples=args.time_samples),
      "ar_exact": text_run.heldout_bits(ar, seqs)}
  print(json.dumps(result["heldout"]))
  score = ar_bits_of(ar)

  def measure(name, run, steps):
    """One point: sample with `run` (steps None: the twin), time it, score it under the twin."""
    tokens, sec, calls = timed_sampler(run, args.num_samples, steps, args.rounds)
    bits = np.asarray(score(jnp.asarray(tokens)))
    point = {"sampler": name, "steps": length if steps is None else steps,
             "network_calls": calls, "tokens_per_s": args.num_samples * length / sec,
             "ar_bpc_of_samples": float(bits.mean()),
             "ar_bpc_stderr": float(bits.std(ddof=1) / math.sqrt(len(bits))),
             "example": text_run.decode(run.tokenizer, tokens[:1])[0]}
    print(json.dumps({k: v for k, v in point.items() if k != "example"}))
    return point

  points = [measure("mdlm", mdlm, int(s)) for s in args.steps.split(",")]
  points.append(measure("ar", ar, None))
  real = np.asarray(score(jnp.asarray(seqs[:args.num_samples])))
  result["ar_bpc_of_heldout_text"] = float(real.mean())
  result["points"] = points
  after = protocol.print_load("after")
  result["load_before"], result["load_after"] = before, after
  result["load_verdict"] = protocol.load_verdict(before, after)
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, "text_speed_quality.json"), "w") as f:
    json.dump(result, f, indent=2)
  plot(result, os.path.join(args.out_dir, "text_speed_quality.png"))


def plot(result: dict, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 4))
  md = [p for p in result["points"] if p["sampler"] == "mdlm"]
  ar = [p for p in result["points"] if p["sampler"] == "ar"]
  ax.errorbar([p["tokens_per_s"] for p in md], [p["ar_bpc_of_samples"] for p in md],
              yerr=[p["ar_bpc_stderr"] for p in md], marker="o", label="masked diffusion")
  for p in md:
    ax.annotate(f'{p["steps"]} steps', (p["tokens_per_s"], p["ar_bpc_of_samples"]),
                textcoords="offset points", xytext=(4, 4), fontsize=8)
  ax.errorbar([p["tokens_per_s"] for p in ar], [p["ar_bpc_of_samples"] for p in ar],
              yerr=[p["ar_bpc_stderr"] for p in ar], marker="s", color="C3", linestyle="none",
              label="autoregressive twin (KV cache)")
  ax.axhline(result["ar_bpc_of_heldout_text"], color="gray", linestyle=":",
             label="held-out text")
  ax.set_xscale("log")
  ax.set_xlabel("tokens / s (CPU, under load)")
  ax.set_ylabel("bits/char of samples under the AR twin")
  ax.set_title(f'Shakespeare, L={result["seq_len"]}: diffusion steps vs quality')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
