"""Masked diffusion vs its autoregressive twin on text: held-out bits per character, and the
speed / quality trade-off of the diffusion sampler as its number of steps varies.

  python benchmarks/text_speed_quality.py --mdlm runs/shakespeare_mdlm --ar runs/shakespeare_ar \\
      --out_dir docs [--steps 8,16,32,64,128] [--num_samples 32] [--eval_sequences 128]

For each run: the held-out BPC (`text_run.heldout_bits`: the continuous-time NELBO bound,
averaged over --time_samples draws per sequence, for the diffusion run; the exact NLL for the
twin). Then N samples from the diffusion run at each step count, and N from the twin (KV cache,
one network call per token), each scored by quality = the mean bits per character of the
samples under the autoregressive twin (lower: more like what the twin learned; the twin's own
samples score its entropy rate, and real held-out text scores its held-out BPC).

Speed follows benchmarks/protocol.py: every sampler (each step count, and the twin) is timed in
its own process (load the run, compile, --calls timed calls of N samples), the samplers
alternate for --rounds rounds, and tokens/s = N x L / the median call. The load average is
printed before and after; under load the figures are marked as such (JSON `load_verdict`, the
plot's axis label) and are not final. Writes OUT_DIR/text_speed_quality.json and .png (quality
vs tokens/s).
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


def sampler(run: restore.Loaded, num: int, steps: int | None):
  """jitted (params, key) -> (tokens [num, L], network calls); steps None: the twin."""
  length, vocab = int(run.image_shape[0]), run.tokenizer.vocab_size
  return jax.jit(lambda params, key: text_run.generate(run.config, run.model, params, key, num,
                                                       length, vocab, steps=steps))


def time_child(workdir: str, use_ema: bool, step: int | None, num: int, steps: int | None,
               calls: int) -> None:
  """One side of the speed comparison, in its own process: emits compile_s and times_s."""
  run = restore.load_for_sampling(workdir, use_ema=use_ema, step=step)
  fn = sampler(run, num, steps)
  t0 = time.perf_counter()
  compiled = fn.lower(run.params, jax.random.PRNGKey(0)).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(run.params, jax.random.PRNGKey(0)))  # warm-up, not timed
  times = []
  for r in range(calls):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(run.params, jax.random.PRNGKey(r + 1)))
    times.append(time.perf_counter() - t0)
  protocol.emit({"compile_s": compile_s, "times_s": times})


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mdlm", required=True)
  parser.add_argument("--ar", required=True)
  parser.add_argument("--out_dir", default="docs")
  parser.add_argument("--steps", default="8,16,32,64,128")
  parser.add_argument("--num_samples", type=int, default=32)
  parser.add_argument("--eval_sequences", type=int, default=128)
  parser.add_argument("--time_samples", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=3, help="alternated timing rounds")
  parser.add_argument("--calls", type=int, default=2, help="timed calls per sampler and round")
  parser.add_argument("--time_child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--child_steps", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--use_ema", action="store_true", help="EMA params (default: the raw "
                      "params: an EMA of decay 0.999 still remembers the initialisation after a "
                      "few hundred steps)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step of both runs "
                      "(default: each run's latest)")
  args = parser.parse_args()
  if args.time_child:
    time_child(args.time_child, args.use_ema, args.step, args.num_samples,
               args.child_steps or None, args.calls)
    return
  args.mdlm, args.ar = os.path.abspath(args.mdlm), os.path.abspath(args.ar)  # children: cwd ROOT
  before = protocol.print_load("before")
  mdlm = restore.load_for_sampling(args.mdlm, use_ema=args.use_ema, step=args.step)
  ar = restore.load_for_sampling(args.ar, use_ema=args.use_ema, step=args.step)
  length = int(mdlm.image_shape[0])
  seqs = text_run.load_text_data(mdlm.config.data, splits=("valid",),
                                 tokenizer=mdlm.tokenizer).valid[:args.eval_sequences]
  result = {"machine": protocol.machine_line(), "mdlm_step": int(mdlm.step),
            "ar_step": int(ar.step), "seq_len": length, "num_samples": args.num_samples,
            "eval_sequences": int(len(seqs)), "use_ema": bool(args.use_ema)}
  result["heldout"] = {
      "mdlm_bound": text_run.heldout_bits(mdlm, seqs, num_time_samples=args.time_samples),
      "ar_exact": text_run.heldout_bits(ar, seqs)}
  print(json.dumps(result["heldout"]))
  score = ar_bits_of(ar)

  def quality(name, run, steps):
    """One point's samples (key 0) scored under the twin; steps None: the twin's own."""
    tokens, calls = sampler(run, args.num_samples, steps)(run.params, jax.random.PRNGKey(0))
    tokens = np.asarray(tokens)
    bits = np.asarray(score(jnp.asarray(tokens)))
    point = {"sampler": name, "steps": length if steps is None else steps,
             "network_calls": int(calls), "ar_bpc_of_samples": float(bits.mean()),
             "ar_bpc_stderr": float(bits.std(ddof=1) / math.sqrt(len(bits))),
             "example": text_run.decode(run.tokenizer, tokens[:1])[0]}
    print(json.dumps({k: v for k, v in point.items() if k != "example"}), flush=True)
    return point

  points = [quality("mdlm", mdlm, int(s)) for s in args.steps.split(",")]
  points.append(quality("ar", ar, None))
  real = np.asarray(score(jnp.asarray(seqs[:args.num_samples])))
  result["ar_bpc_of_heldout_text"] = float(real.mean())

  common = ["benchmarks/text_speed_quality.py", "--mdlm", args.mdlm, "--ar", args.ar,
            f"--num_samples={args.num_samples}", f"--calls={args.calls}"]
  common += ["--use_ema"] if args.use_ema else []
  common += [f"--step={args.step}"] if args.step is not None else []
  sides = {f'{p["sampler"]}_{p["steps"]}': common + [
      "--time_child", args.mdlm if p["sampler"] == "mdlm" else args.ar,
      f'--child_steps={p["steps"] if p["sampler"] == "mdlm" else 0}'] for p in points}
  print(f"timing {len(sides)} samplers, each in its own process, {args.rounds} alternated "
        f"rounds x {args.calls} calls", flush=True)
  timed = protocol.alternate(sides, args.rounds, verbose=False)
  for p, (name, results) in zip(points, timed.items(), strict=True):
    times = protocol.all_times(results)
    lo, med, hi = protocol.spread(times)
    p.update(tokens_per_s=args.num_samples * length / med,
             tokens_per_s_spread=[args.num_samples * length / t for t in (hi, med, lo)],
             compile_s=float(np.median([r["compile_s"] for r in results])))
    print(f"  {name:10s} {protocol.fmt_ms(times)} per call of {args.num_samples} x {length} "
          f"tokens: {p['tokens_per_s']:.0f} tokens/s; compile {p['compile_s']:.1f} s", flush=True)
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
  ax.set_xlabel("tokens / s (CPU" + (", under load: not final)" if result["load_verdict"]
                                      else ", idle machine)"))
  ax.set_ylabel("bits/char of samples under the AR twin")
  ax.set_title(f'Shakespeare, L={result["seq_len"]}: diffusion steps vs quality')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
