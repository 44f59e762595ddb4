"""Text runs end to end in-process: a tiny masked-diffusion run and its autoregressive twin
train, resume exactly, write text previews, sample, infill (given characters kept) and evaluate
held-out bits per character (the twin's checked against a float64 NumPy NLL; experiments.
evaluate_text resumed after an interruption, on another batch size and on two processes)."""
import json
import logging
import math
import os
import re

import chex
import numpy as np
import numerics_testlib
import pytest
import training_testlib  # also: the persistent compilation cache of the trainer tests

from diffusion_jax.data import text as text_lib
from diffusion_jax.training import restore
from diffusion_jax.training import text_run
from diffusion_jax.training import trainer
from experiments.configs import text_shakespeare

TINY = {
    "data.seq_len": 16, "model.hidden_size": 16, "model.depth": 1, "model.num_heads": 2,
    "train.num_steps": 4, "train.batch_size": 8, "train.checkpoint_every": 2,
    "train.log_every": 2, "optim.warmup_steps": 2, "sample.num_samples": 2,
    "sample.text_steps": 4, "data.num_threads": 0,
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A small prepared corpus (train.txt, valid.txt, tokenizer.json) as prepare_text writes it."""
  folder = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis"]
  text = " ".join(rng.choice(words, 2000)) + "\n"
  train, valid = text_lib.split_holdout(text, 0.1)
  (folder / "train.txt").write_text(train)
  (folder / "valid.txt").write_text(valid)
  text_lib.save_tokenizer(text_lib.CharTokenizer.from_text(text), str(folder / "tokenizer.json"))
  return str(folder)


def tiny_config(corpus, variant="mdlm", **overrides):
  config = training_testlib.set_keys(text_shakespeare.get_config(variant), {**TINY, **overrides})
  config.data.text_dir = corpus
  return config


@pytest.mark.parametrize("variant", ["mdlm", pytest.param("ar", marks=pytest.mark.slow)])
def test_text_run_trains_resumes_exactly_and_writes_text(tmp_path, corpus, variant, caplog):
  """4 steps at once == 2 steps then a resume to 4 (same data order, keys, program); the
  previews are .txt files of the corpus's characters, the first also printed in the log; the
  loss is finite bits/char."""
  # Set on the absl logger itself: an earlier test in this process may have raised its level
  # (absl.logging.set_verbosity); caplog restores it after the test.
  caplog.set_level(logging.INFO, logger="absl")
  full_config = tiny_config(corpus, variant)
  config_tokens_per_step = full_config.train.batch_size * full_config.data.seq_len
  full = trainer.train_and_evaluate(full_config, str(tmp_path / "full"))
  assert int(full.step) == 4
  workdir = str(tmp_path / "resumed")
  trainer.train_and_evaluate(tiny_config(corpus, variant, **{"train.num_steps": 2}), workdir)
  resumed = trainer.train_and_evaluate(tiny_config(corpus, variant), workdir)
  chex.assert_trees_all_equal(resumed, full)
  rows = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
  # A start near uniform over the V = 15 characters: about log2(15) = 3.9 bits/char (the
  # masked bound is the same in expectation: a masked position pays log2 V with weight 1/t, and
  # E[fraction masked / t] = 1); 4 steps of a tiny model move it by well under a bit.
  assert all(np.isfinite(r["loss"]) and 2.5 < r["loss"] < 6.0 for r in rows)
  # Throughput is counted in tokens (batch x seq_len per step), not images.
  logged = [r for r in rows if "steps_per_sec" in r]
  assert logged and all("images_per_sec" not in r for r in logged)
  assert all(r["tokens_per_sec"] == pytest.approx(r["steps_per_sec"] * config_tokens_per_step)
             for r in logged)
  info = json.loads(open(tmp_path / "full" / "dataset_info.json").read())
  assert info["image_shape"] == [16] and info["vocab_size"] == len(set(
      open(os.path.join(corpus, "train.txt")).read() + open(os.path.join(corpus,
                                                                         "valid.txt")).read()))
  preview = open(tmp_path / "full" / "samples" / "step_0000004.txt").read()
  alphabet = set(open(os.path.join(corpus, "train.txt")).read())
  body = "".join(line for line in preview.splitlines(keepends=True)
                 if not line.startswith("=== sample"))
  assert preview.count("=== sample") == 2 and set(body) <= alphabet | {"\n"}
  first = preview.split("=== sample 1 ===")[0].removeprefix("=== sample 0 ===\n").rstrip("\n")
  assert any(first in r.getMessage() for r in caplog.records if "text samples" in r.getMessage())


@pytest.fixture(scope="module")
def trained_dirs(tmp_path_factory, corpus):
  """Workdirs of a 2-step masked run and its autoregressive twin."""
  runs = {}
  for variant in ("mdlm", "ar"):
    workdir = str(tmp_path_factory.mktemp(variant))
    trainer.train_and_evaluate(tiny_config(corpus, variant, **{"train.num_steps": 2}), workdir)
    runs[variant] = workdir
  return runs


@pytest.fixture(scope="module")
def trained(trained_dirs):
  return {variant: restore.load_for_sampling(workdir) for variant, workdir in trained_dirs.items()}


def test_infill_keeps_the_given_characters(trained):
  loaded = trained["mdlm"]
  template = "to be _____ not_"
  texts, tokens = text_run.sample_texts(loaded, 3, seed=1, steps=8, template=template)
  assert tokens.shape == (3, 16) and int(tokens.max()) < loaded.tokenizer.vocab_size
  for text in texts:
    # Every hole filled with a corpus character ('_' is not one).
    assert len(text) == 16 and text_run.MASK_CHAR not in text
    for given, got in zip(template, text, strict=False):
      if given != "_":
        assert got == given
  # The same seed gives the same texts whatever the batch size (per-example keys).
  again, _ = text_run.sample_texts(loaded, 3, seed=1, steps=8, template=template, batch_size=2)
  assert again == texts
  with pytest.raises(ValueError, match="masked-diffusion run"):
    text_run.sample_texts(trained["ar"], 1, template=template)


def test_autoregressive_heldout_bits_match_a_float64_nll(trained):
  """The twin's held-out bits/char: log-softmax of its logits (BOS excluded) in float64 NumPy."""
  loaded = trained["ar"]
  vocab = loaded.tokenizer.vocab_size
  seqs = np.random.default_rng(1).integers(0, vocab, (5, 16)).astype(np.int32)
  got = text_run.heldout_bits(loaded, seqs, batch_size=2)
  inputs = np.concatenate([np.full((5, 1), vocab, np.int32), seqs[:, :-1]], axis=1)
  logits = np.asarray(loaded.model.apply({"params": loaded.params}, inputs, None), np.float64)
  logits[..., vocab] = -np.inf
  logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                keepdims=True)) - logits.max(-1, keepdims=True)
  want = -np.take_along_axis(logp, seqs[..., None], -1)[..., 0].sum(-1) / (16 * math.log(2))
  # float32 logits of magnitude ~1 through a 28-way log-softmax and a 16-term sum: ~1e-6.
  np.testing.assert_allclose(got["bits_per_token"], want.mean(), rtol=1e-5)


def test_evaluate_text_on_the_autoregressive_twin(trained_dirs, trained, tmp_path):
  """The sharded evaluation of the twin: its exact NLL, one draw, the same bits as the
  in-memory `heldout_bits` with the same batch size (the same compiled call per batch)."""
  from experiments import evaluate_text  # pylint: disable=import-outside-toplevel
  result = evaluate_text.evaluate(trained_dirs["ar"], max_sequences=5, batch_size=2,
                                  shard_size=2, eval_dir=str(tmp_path), progress=False)
  assert (result["bound"], result["num_time_samples"], result["family"]) == (
      "exact", 1, "autoregressive")
  memory = text_run.heldout_bits(trained["ar"], _valid(trained["ar"])[:5], batch_size=2)
  assert result["bits_per_token"] == memory["bits_per_token"]


def test_masked_heldout_bound_is_the_mean_of_its_draws(trained):
  """The bound over 4 (time, mask) draws per sequence is positive and finite, and does not
  depend on the batch size (per-sequence keys)."""
  loaded = trained["mdlm"]
  seqs = text_lib.pack(loaded.tokenizer.encode("to be or not to be that is the question " * 4),
                       16)
  four = text_run.heldout_bits(loaded, seqs, num_time_samples=4, batch_size=3)
  assert four["num_time_samples"] == 4 and four["bits_per_token"] > 0
  assert np.isfinite(four["stderr"])
  other = text_run.heldout_bits(loaded, seqs, num_time_samples=4, batch_size=2)
  np.testing.assert_allclose(other["bits_per_token"], four["bits_per_token"], rtol=1e-6)


def _shard_bits(result):
  """{shard file name: per-sequence bits [n, draws]} of an evaluate_text result."""
  out = {}
  for name in sorted(os.listdir(result["shards"])):
    if re.fullmatch(r"shard_\d{6}\.npz", name):
      with np.load(os.path.join(result["shards"], name)) as data:
        out[name] = data["bits"]
  return out


def test_evaluate_text_resumes_bit_for_bit_and_ignores_batch_size(trained_dirs, trained,
                                                                   tmp_path, monkeypatch):
  """experiments.evaluate_text in-process on 20 held-out sequences in shards of 6 (6, 6, 6, 2):
  a run interrupted after two committed shards, then rerun, and a run with one shard deleted,
  then rerun, give the per-sequence bits and figures of an uninterrupted run exactly (same
  per-call batch, keys per sequence index); the committed shards are not recomputed. Another
  batch size gives the same figures up to float32 rounding; the in-memory `heldout_bits` with
  the same batch size gives them exactly."""
  from experiments import evaluate_text, shards  # pylint: disable=import-outside-toplevel
  run = lambda name, **kw: evaluate_text.evaluate(
      trained_dirs["mdlm"], num_time_samples=2, max_sequences=20, shard_size=6, progress=False,
      eval_dir=str(tmp_path / name), **{"batch_size": 4, **kw})
  whole = run("whole")
  assert whole["num_sequences"] == 20 and whole["num_tokens"] == 20 * 16
  assert whole["bound"] == "continuous" and whole["num_time_samples"] == 2
  assert sorted(_shard_bits(whole)) == [f"shard_{i:06d}.npz" for i in range(4)]
  assert json.loads(open(whole["path"]).read())["bits_per_token"] == whole["bits_per_token"]
  np.testing.assert_allclose(whole["perplexity"], 2 ** whole["bits_per_token"], rtol=1e-12)
  figures = lambda r: {k: r[k] for k in ("bits_per_token", "stderr", "perplexity",
                                         "num_sequences", "num_tokens")}

  commit = shards.atomic_savez
  committed = []

  def dies_after_two(path, **arrays):
    if len(committed) == 2:
      raise KeyboardInterrupt("killed")
    commit(path, **arrays)
    committed.append(path)

  monkeypatch.setattr(shards, "atomic_savez", dies_after_two)
  with pytest.raises(KeyboardInterrupt):
    run("resumed")
  monkeypatch.setattr(shards, "atomic_savez", commit)
  mtimes = {p: os.stat(p).st_mtime_ns for p in committed}
  resumed = run("resumed")
  assert {p: os.stat(p).st_mtime_ns for p in committed} == mtimes     # not recomputed
  assert figures(resumed) == figures(whole)
  for name, bits in _shard_bits(whole).items():
    np.testing.assert_array_equal(_shard_bits(resumed)[name], bits)

  os.remove(os.path.join(resumed["shards"], "shard_000002.npz"))
  again = run("resumed")
  assert figures(again) == figures(whole)

  memory = text_run.heldout_bits(trained["mdlm"], _valid(trained["mdlm"])[:20],
                                 num_time_samples=2, batch_size=4)
  assert figures(memory) == figures(whole)
  other = run("batch5", batch_size=5)
  # The same per-sequence float32 computation in another batch shape (numerics_testlib): one
  # block (~30 ops), embedding and log-softmax (~20), a sum over 16 positions: ops = 70.
  for name, bits in _shard_bits(whole).items():
    numerics_testlib.assert_f32_close(_shard_bits(other)[name], bits, ops=70, err_msg=name)
  numerics_testlib.assert_f32_close(other["bits_per_token"], whole["bits_per_token"], ops=70)


@pytest.mark.slow
def test_evaluate_text_on_two_processes_equals_one_process(trained_dirs, tmp_path):
  """`python -m experiments.evaluate_text` on 2 processes (jax.distributed on CPU, gloo, one
  device each; shards 0, 2, 4 on process 0 and 1, 3 on process 1) commits the same per-sequence
  bits as 1 process and process 0 alone writes the same figures."""
  import socket  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  # No compilation cache: a warm one lets one process reach the barrier long before the other
  # (tests/test_multihost_eval.py).
  env = {k: v for k, v in training_testlib.subprocess_env(num_devices=1).items()
         if k != "JAX_COMPILATION_CACHE_DIR"}
  command = lambda name: [sys.executable, "-m", "experiments.evaluate_text",
                          f"--workdir={trained_dirs['mdlm']}", "--num_time_samples=2",
                          "--max_sequences=20", "--shard_size=4", "--batch_size=4",
                          f"--eval_dir={tmp_path / name}", "--compile_cache="]
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(command("one"), env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=str(tmp_path))]
  procs += [subprocess.Popen(command("two") + [
      f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
      "--cpu_collectives=gloo"], env=env, text=True, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, cwd=str(tmp_path)) for i in range(2)]
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=600)
      assert p.returncode == 0, err[-3000:]
      outs.append(out)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  one, two = (json.loads(out.strip().splitlines()[-1]) for out in outs[:2])
  assert "process 1/2: done" in outs[2]
  assert (one["process_count"], two["process_count"]) == (1, 2)
  a, b = _shard_bits(one), _shard_bits(two)
  assert sorted(a) == sorted(b) == [f"shard_{i:06d}.npz" for i in range(5)]
  for name, bits in a.items():
    np.testing.assert_array_equal(b[name], bits, err_msg=name)
  for key in ("bits_per_token", "stderr", "perplexity", "num_sequences", "num_tokens"):
    assert one[key] == two[key], key


def _valid(loaded):
  path = os.path.join(loaded.config.data.text_dir, "valid.txt")
  return text_lib.pack(loaded.tokenizer.encode(text_lib.read_text(path)), 16)


def test_text_config_errors(tmp_path, corpus):
  config = tiny_config(corpus)
  config.diffusion.family = "ddpm"
  with pytest.raises(ValueError, match="diffusion.family"):
    trainer.train_and_evaluate(config, str(tmp_path / "a"))
  config = tiny_config(corpus, **{"eval.every": 2})
  with pytest.raises(ValueError, match="eval.every"):
    trainer.train_and_evaluate(config, str(tmp_path / "b"))
  config = tiny_config(corpus, **{"data.tokenizer": "bpe"})
  with pytest.raises(ValueError, match="data.tokenizer"):
    trainer.train_and_evaluate(config, str(tmp_path / "c"))
  config = tiny_config(corpus, variant="ar", **{"model.causal": False})
  with pytest.raises(ValueError, match="model.causal=True"):
    trainer.train_and_evaluate(config, str(tmp_path / "d"))
  with pytest.raises(ValueError, match="variant"):
    text_shakespeare.get_config("gpt")


@pytest.mark.slow
def test_text_commands_end_to_end(tmp_path, corpus):
  """experiments.train (masked, tiny) -> experiments.sample --infill -> experiments.evaluate_text,
  as a user runs them (subprocesses, one device)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  env = training_testlib.subprocess_env(num_devices=1)
  workdir = str(tmp_path / "run")
  flags = [f"--config.{k}={v}" for k, v in TINY.items()] + [f"--config.data.text_dir={corpus}"]
  run = lambda *args: subprocess.run([sys.executable, "-m", *args], env=env, cwd=str(tmp_path),
                                     capture_output=True, text=True, check=False)
  out = run("experiments.train", f"--config={training_testlib.REPO}/experiments/configs/"
            "text_shakespeare.py", f"--workdir={workdir}", *flags)
  assert out.returncode == 0, out.stderr[-2000:]
  template = "to be ____ not"
  out = run("experiments.sample", f"--workdir={workdir}", "--num_samples=2", "--steps=4",
            f"--infill={template}", f"--out={tmp_path / 's.txt'}")
  assert out.returncode == 0, out.stderr[-2000:]
  texts = [line for line in open(tmp_path / "s.txt").read().split("\n")
           if line and not line.startswith("=== sample")]
  assert len(texts) == 2 and all(len(t) == 16 and "_" not in t for t in texts)
  assert all(t[:6] == "to be " and t[10:14] == " not" for t in texts)
  out = run("experiments.evaluate_text", f"--workdir={workdir}", "--num_time_samples=2",
            f"--out={tmp_path / 'bpc.json'}")
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.load(open(tmp_path / "bpc.json"))
  assert result["family"] == "masked" and result["bound"] == "continuous"
  assert np.isfinite(result["bits_per_token"]) and result["step"] == 4
