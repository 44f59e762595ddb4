"""Runs the README's command blocks as a new user would: the text between
`<!-- command:NAME:start -->` and `<!-- command:NAME:end -->`, through bash, in a fresh copy of
the repository (its tracked and non-ignored files) as the current directory, with relative
paths as written, in a new virtual environment.

The new environment sees the test environment's installed packages through a `.pth` line (no
network is needed and `pip install -r requirements.txt` finds everything already satisfied),
while `pip install --no-deps -e .` installs the *copy* into it, as on a fresh machine.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def readme_block(name: str, readme: pathlib.Path = README) -> str:
  """The shell text of the fenced block between the `command:NAME` markers of the README."""
  text = readme.read_text(encoding="utf-8")
  match = re.search(rf"<!-- command:{re.escape(name)}:start -->\s*```(?:bash|sh)\n(.*?)```\s*"
                    rf"<!-- command:{re.escape(name)}:end -->", text, re.S)
  if not match:
    raise ValueError(f"README.md has no command block named {name!r} (markers "
                     f"<!-- command:{name}:start --> ... <!-- command:{name}:end -->).")
  return match.group(1).strip()


def readme_block_names(readme: pathlib.Path = README) -> list[str]:
  """Names of every marked command block, in README order."""
  return re.findall(r"<!-- command:([\w.-]+):start -->", readme.read_text(encoding="utf-8"))


def fresh_copy(dest: pathlib.Path) -> pathlib.Path:
  """Copies the repository's tracked and untracked-but-not-ignored files into `dest`."""
  listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                          check=True, capture_output=True).stdout.decode().split("\0")
  for rel in filter(None, listed):
    src = REPO / rel
    if src.is_file():
      (dest / rel).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(src, dest / rel)
  return dest


def new_venv(dest: pathlib.Path) -> pathlib.Path:
  """A virtual environment at `dest` whose packages include the running interpreter's."""
  subprocess.run([sys.executable, "-m", "venv", str(dest)], check=True, capture_output=True)
  python = dest / "bin" / "python"
  site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                         "['purelib'])"], check=True, capture_output=True, text=True).stdout.strip()
  parent = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
  pathlib.Path(site, "_test_parent_env.pth").write_text("\n".join(sorted(parent)) + "\n")
  return dest


@dataclasses.dataclass
class UserShell:
  """A fresh repository copy plus a new venv: runs README blocks as a user's shell would."""
  repo: pathlib.Path
  venv: pathlib.Path

  def env(self) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "XLA_FLAGS")}
    env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(self.venv)
    env["PYTHONUNBUFFERED"] = "1"
    return env

  def run(self, command: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    """Runs `command` with bash -e in the copy; raises with the output's tail if it fails."""
    proc = subprocess.run(["bash", "-e", "-c", command], cwd=self.repo, env=self.env(),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
      raise AssertionError(f"command failed with exit code {proc.returncode}:\n{command}\n"
                           f"--- stdout (tail) ---\n{proc.stdout[-4000:]}\n"
                           f"--- stderr (tail) ---\n{proc.stderr[-6000:]}")
    return proc

  def run_block(self, name: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    return self.run(readme_block(name), timeout=timeout)


def user_shell(base: pathlib.Path) -> UserShell:
  """A new fresh copy at `base/repo` and venv at `base/venv`."""
  repo = fresh_copy(base / "repo")
  return UserShell(repo=repo, venv=new_venv(base / "venv"))
