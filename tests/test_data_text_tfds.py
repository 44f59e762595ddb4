"""Text from TFDS (ArrayRecord, no TensorFlow): a tiny TFDS text dataset built here packs into
exactly the sequences of the same records written to a file, streams through the sharded,
resumable text iterator, and trains / resumes / evaluates a masked-diffusion run."""
import json
import os
import subprocess
import sys
import textwrap

import chex
import numpy as np
import pytest
import tfds_testlib
import training_testlib

from diffusion_jax.data import synthetic_text
from diffusion_jax.data import text as text_lib
from diffusion_jax.data import text_tfds
from diffusion_jax.training import text_run
from diffusion_jax.training import trainer
from experiments import evaluate_text
from experiments.configs import text_lm1b

TINY = "synthetic_text/tiny"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  """The TFDS dataset built in this test: 300 train / 40 test sentences as ArrayRecord."""
  return tfds_testlib.build_array_record(str(tmp_path_factory.mktemp("tfds_text")), TINY)


def data_config(tiny_dir, tokenizer="byte", seq_len=16, **kw):
  config = text_lm1b.get_config().data
  config.update({"tfds_name": TINY, "data_dir": tiny_dir, "tokenizer": tokenizer,
                 "seq_len": seq_len, "num_threads": 2, **kw})
  return config


def test_records_are_the_written_sentences(tiny_dir):
  options = text_tfds.tfds_options(data_config(tiny_dir))
  assert text_tfds.tfds_texts(options, "train") == [
      synthetic_text.synthetic_sentence(i, "train") for i in range(300)]
  assert text_tfds.tfds_texts(options, "test[5:9]") == [
      synthetic_text.synthetic_sentence(i, "test") for i in range(5, 9)]


@pytest.mark.parametrize("tokenizer", ["byte", "char"])
@pytest.mark.parametrize("chunk", [7, 4096])   # chunk boundaries inside the split, or none
def test_packing_equals_the_records_written_to_a_file(tiny_dir, tmp_path, monkeypatch,
                                                      tokenizer, chunk):
  """The independent reference: the sentences (from the generator, not TFDS) written to
  train.txt / valid.txt one per line, read and packed by the file path."""
  monkeypatch.setattr(text_tfds, "_CHUNK", chunk)
  train = "\n".join(synthetic_text.synthetic_sentence(i, "train") for i in range(300))
  valid = "\n".join(synthetic_text.synthetic_sentence(i, "test") for i in range(40))
  (tmp_path / "train.txt").write_text(train, encoding="utf-8")
  (tmp_path / "valid.txt").write_text(valid, encoding="utf-8")
  file_tok = (text_lib.ByteTokenizer() if tokenizer == "byte"
              else text_lib.CharTokenizer.from_text(train))
  got = text_run.load_text_data(data_config(tiny_dir, tokenizer, seq_len=16))
  assert got.tokenizer.to_json() == file_tok.to_json()
  for split, text in (("train", train), ("valid", valid)):
    expected = text_lib.pack(file_tok.encode(text_lib.read_text(str(tmp_path / f"{split}.txt"))),
                             16)
    packed = getattr(got, split)
    assert packed.dtype == np.uint8   # both vocabularies fit a byte
    np.testing.assert_array_equal(packed, expected)
  # The packed text decodes back to the records' text (the dropped tail aside).
  assert got.tokenizer.decode(got.train.reshape(-1)) == train[:len(got.tokenizer.decode(
      got.train.reshape(-1)))]


def test_compact_sequences_stream_shard_and_resume_like_int32(tiny_dir):
  """uint8 sequences give the int32 batches of the same sequences; two hosts together are the
  one-host global batch; a state taken after 3 batches resumes the same stream."""
  seqs = text_run.load_text_data(data_config(tiny_dir), splits=("train",)).train
  kw = dict(global_batch_size=8, seed=5, num_threads=0)

  def take(sequences, n, state=None, **hosts):
    hosts = {"process_index": 0, "process_count": 1, "num_local_devices": 2, **hosts}
    it = text_lib.make_text_train_iterator(sequences, **kw, **hosts)
    if state is not None:
      it.set_state(state)
    batches = [next(it)["tokens"] for _ in range(n)]
    return batches, it.get_state()

  compact, _ = take(seqs, 6)
  wide, _ = take(seqs.astype(np.int32), 6)
  for a, b in zip(compact, wide, strict=True):
    assert a.dtype == np.int32 and a.shape == (2, 4, 16)
    np.testing.assert_array_equal(a, b)
  first, state = take(seqs, 3)
  rest, _ = take(seqs, 3, state)
  for a, b in zip(first + rest, compact, strict=True):
    np.testing.assert_array_equal(a, b)
  h0, _ = take(seqs, 6, process_index=0, process_count=2, num_local_devices=1)
  h1, _ = take(seqs, 6, process_index=1, process_count=2, num_local_devices=1)
  for a, b, whole in zip(h0, h1, compact, strict=True):
    # Host h holds the global positions p % 2 == h: interleaving them is the global batch.
    merged = np.stack([a.reshape(4, 16), b.reshape(4, 16)], axis=1).reshape(8, 16)
    np.testing.assert_array_equal(merged, whole.reshape(8, 16))


_READER = textwrap.dedent("""
    import hashlib, json, sys
    import ml_collections
    from diffusion_jax.training import text_run
    from experiments.configs import text_lm1b
    data = text_lm1b.get_config().data
    data.update(tfds_name=sys.argv[1], data_dir=sys.argv[2], seq_len=16, tokenizer=sys.argv[3])
    got = text_run.load_text_data(data)
    print(json.dumps({"train": hashlib.sha256(got.train.tobytes()).hexdigest(),
                      "shape": list(got.train.shape),
                      "tensorflow": any(m == "tensorflow" or m.startswith("tensorflow.")
                                        for m in sys.modules)}))
""")


def test_reads_without_tensorflow(tiny_dir):
  import hashlib
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", _READER, TINY, tiny_dir, "char"],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["tensorflow"] is False
  here = text_run.load_text_data(data_config(tiny_dir, "char"), splits=("train",)).train
  assert out["shape"] == list(here.shape)
  assert out["train"] == hashlib.sha256(here.tobytes()).hexdigest()


def tiny_run_config(tiny_dir, **overrides):
  config = text_lm1b.get_config()
  config.data.update(tfds_name=TINY, data_dir=tiny_dir, tokenizer="char")
  tiny = {"data.seq_len": 16, "model.name": "text_tiny", "model.hidden_size": 16,
          "model.depth": 1, "model.num_heads": 2, "train.num_steps": 4, "train.batch_size": 8,
          "train.checkpoint_every": 2, "train.log_every": 2, "optim.warmup_steps": 2,
          "sample.num_samples": 2, "sample.text_steps": 4, "data.num_threads": 0,
          "train.compute_dtype": "float32"}
  return training_testlib.set_keys(config, {**tiny, **overrides})


def test_tfds_text_run_trains_resumes_exactly_and_evaluates_the_test_split(tmp_path, tiny_dir):
  """4 steps at once == 2 steps then a resume to 4; evaluate_text scores TFDS 'test'."""
  full = trainer.train_and_evaluate(tiny_run_config(tiny_dir), str(tmp_path / "full"))
  workdir = str(tmp_path / "resumed")
  trainer.train_and_evaluate(tiny_run_config(tiny_dir, **{"train.num_steps": 2}), workdir)
  resumed = trainer.train_and_evaluate(tiny_run_config(tiny_dir), workdir)
  chex.assert_trees_all_equal(resumed, full)
  info = json.loads((tmp_path / "full" / "dataset_info.json").read_text())
  train_text = "\n".join(synthetic_text.synthetic_sentence(i, "train") for i in range(300))
  assert info["image_shape"] == [16] and info["vocab_size"] == len(set(train_text))
  result = evaluate_text.evaluate(str(tmp_path / "full"), num_time_samples=1, max_sequences=5)
  assert result["text"] == f"tfds:{TINY}/test" and result["num_sequences"] == 5
  # Chosen before running: a near-uniform untrained model's bound is log2 V in expectation (a
  # masked position pays log2 V with weight 1/t, and E[masked fraction / t] = 1). One draw per
  # sequence has a heavy upper tail (the 1/t weight): the mean of 5 draws exceeds log2 V by 2.5
  # bits (a factor 1.47) only if one draw's factor exceeds ~3.4, P ~ 0.5% per sequence; the
  # keys are fixed, so the check is deterministic. It catches a wrong split or tokenizer.
  assert abs(result["bits_per_token"] - np.log2(info["vocab_size"])) < 2.5


def test_tfds_text_errors(tiny_dir, tmp_path):
  with pytest.raises(ValueError, match="data.text_key 'sentence'.*features: \\['text'\\]"):
    text_run.load_text_data(data_config(tiny_dir, text_key="sentence"))
  with pytest.raises(ValueError, match=r"\(data.tfds_name\)"):
    text_run.load_text_data(data_config(tiny_dir, tfds_name="lm1bb"))
  with pytest.raises(FileNotFoundError, match="tfds build lm1b .*--file_format=array_record"):
    text_run.load_text_data(data_config(str(tmp_path), tfds_name="lm1b"))
  with pytest.raises(ValueError, match="data.text_dir.*or data.tfds_name"):
    text_run.load_text_data(data_config(tiny_dir, tfds_name=None))


def test_lm1b_config_is_mdlms_lm1b_recipe():
  """kuleshov-group/mdlm configs/config.yaml, configs/model/small.yaml, configs/data/lm1b.yaml
  and scripts/train_lm1b_*.sh (model.length=128); bytes instead of bert-base-uncased."""
  from diffusion_jax.training import default_config  # pylint: disable=import-outside-toplevel
  c = text_lm1b.get_config()
  def keys(tree, prefix=""):
    return {k for name, v in tree.items() for k in (
        keys(v, f"{prefix}{name}.") if isinstance(v, dict) else {prefix + name})}

  assert keys(c.to_dict()) == keys(default_config.get_config().to_dict())
  assert (c.data.name, c.data.tfds_name, c.data.split, c.data.eval_split, c.data.text_key,
          c.data.seq_len, c.data.tokenizer, c.data.text_dir) == \
      ("text", "lm1b", "train", "test", "text", 128, "byte", None)
  assert (c.model.name, c.model.time_conditioning, c.model.tie_embeddings) == \
      ("text_small", False, False)
  assert (c.diffusion.family, c.masked.schedule, c.masked.num_steps, c.masked.t_min) == \
      ("masked", "linear", 0, 1e-3)
  assert (c.optim.name, c.optim.lr, c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay,
          c.optim.warmup_steps, c.optim.decay, c.optim.grad_clip) == \
      ("adamw", 3e-4, 0.9, 0.999, 1e-8, 0.0, 2500, "constant", 1.0)
  assert (c.train.batch_size, c.train.num_steps, tuple(c.train.ema_decays)) == \
      (512, 1_000_000, (0.9999,))


def fixed_alphabet():
  """A user tokenizer for the factory test: characters of a fixed alphabet (not the corpus's)."""
  chars = set("".join(synthetic_text.WORDS)) | set("traines0123456789: \n")
  return text_lib.CharTokenizer(sorted(chars | {"#"}))   # '#' never occurs in the records


def test_a_tokenizer_factory_plugs_in_and_is_rebuilt_from_its_name(tiny_dir, tmp_path):
  """data.tokenizer='module:function': the records are encoded by that function's tokenizer, and
  the saved tokenizer.json rebuilds it (as `restore` does) by importing the function again."""
  name = f"{__name__}:fixed_alphabet"
  got = text_run.load_text_data(data_config(tiny_dir, name, seq_len=16))
  reference = fixed_alphabet()
  assert got.tokenizer.vocab_size == reference.vocab_size
  train = "\n".join(synthetic_text.synthetic_sentence(i, "train") for i in range(300))
  np.testing.assert_array_equal(got.train, text_lib.pack(reference.encode(train), 16))
  path = str(tmp_path / "tokenizer.json")
  text_lib.save_tokenizer(got.tokenizer, path)
  assert json.loads(open(path).read()) == {"kind": "factory", "factory": name}
  again = text_lib.load_tokenizer(path)
  np.testing.assert_array_equal(again.encode(train), reference.encode(train))
  assert again.decode(again.encode("café #")) == "café #"
  with pytest.raises(ValueError, match="cannot import the tokenizer factory 'no_such_mod:f'"):
    text_run.load_tokenizer(data_config(tiny_dir, "no_such_mod:f"))
  with pytest.raises(ValueError, match="data.tokenizer='bpe'.*'package.module:function'"):
    text_run.load_tokenizer(data_config(tiny_dir, "bpe"))


def test_text_cache_is_written_once_and_mapped_later(tiny_dir, tmp_path, monkeypatch):
  """With data.text_cache_dir the second load reads no record (the reader is disabled) and
  gives the same sequences; another tokenizer or split gets its own file."""
  cache = str(tmp_path / "cache")
  first = text_run.load_text_data(data_config(tiny_dir, "char", text_cache_dir=cache))
  names = sorted(os.listdir(cache))
  assert len(names) == 3 and sum(n.endswith(".npy") for n in names) == 2   # alphabet, 2 splits

  def no_reading(*args, **kwargs):
    raise AssertionError("records were read although the cache holds them")

  monkeypatch.setattr(text_tfds._Records, "chunk", no_reading)
  again = text_run.load_text_data(data_config(tiny_dir, "char", text_cache_dir=cache))
  assert again.tokenizer.to_json() == first.tokenizer.to_json()
  np.testing.assert_array_equal(again.train, first.train)
  np.testing.assert_array_equal(again.valid, first.valid)
  monkeypatch.undo()
  text_run.load_text_data(data_config(tiny_dir, "byte", text_cache_dir=cache), splits=("train",))
  assert len(os.listdir(cache)) == 4
