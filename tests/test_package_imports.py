"""The library does not depend on its experiment scripts: no module of `diffusion_jax` imports
`experiments` (the configuration schema is `diffusion_jax/training/default_config.py`).

Two checks: every import statement of the package's files (also those inside functions), read
with `ast`; and every module imported in a fresh interpreter in which `experiments` cannot be
imported, which also catches imports by computed name at import time.

References: ARCHITECTURE.md (imports run one way).
"""
import ast
import json
import pathlib
import subprocess
import sys

import training_testlib as tl

PACKAGE = pathlib.Path(tl.REPO) / "diffusion_jax"
FORBIDDEN = "experiments"


def _is_forbidden(name: str) -> bool:
  return name == FORBIDDEN or name.startswith(FORBIDDEN + ".")


def experiments_imports(source: str, filename: str = "<source>") -> list[str]:
  """'line: name' of each import of `experiments` in `source`: `import` and `from` statements
  anywhere in the file, and `importlib.import_module` / `__import__` with a literal name."""
  found = []
  for node in ast.walk(ast.parse(source, filename)):
    names = []
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names = [node.module]
    elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
      func = node.func
      called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
      if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
        names = [node.args[0].value]
    found += [f"{node.lineno}: {name}" for name in names if _is_forbidden(name)]
  return found


def test_the_scan_finds_each_form_of_import():
  bad = ("import experiments\n"
         "import os, experiments.configs as c\n"
         "from experiments.configs import digits\n"
         "def f():\n"
         "  from experiments import paths\n"
         "  return importlib.import_module('experiments.train'), __import__('experiments')\n")
  assert experiments_imports(bad) == [
      "1: experiments", "2: experiments.configs", "3: experiments.configs", "5: experiments",
      "6: experiments.train", "6: experiments"]
  fine = ("import experiments_extra\nfrom . import experiments\nfrom diffusion_jax import data\n"
          "x = 'experiments.train'\n")
  assert experiments_imports(fine) == []


def test_no_module_of_the_package_imports_experiments():
  files = sorted(PACKAGE.rglob("*.py"))
  assert len(files) > 50, files   # the scan reads the package's files
  found = {str(f.relative_to(tl.REPO)): experiments_imports(f.read_text(), str(f)) for f in files}
  assert {f: lines for f, lines in found.items() if lines} == {}


# Run in a fresh interpreter: `experiments` made unimportable before anything is imported, then
# every module of the package imported (not `__main__`, which runs a program) and a run's
# config.json read back over the schema (`restore.load_config`).
_BLOCKED_RUN = """
import importlib, json, pathlib, sys, tempfile
attempts = []
class Blocker:
  def find_spec(self, name, path=None, target=None):
    if name == "experiments" or name.startswith("experiments."):
      attempts.append(name)
      raise ImportError(f"{name} is blocked")
    return None
sys.meta_path.insert(0, Blocker())
package = pathlib.Path(sys.argv[1])
modules = []
for f in sorted(package.rglob("*.py")):
  parts = f.relative_to(package.parent).with_suffix("").parts
  if parts[-1] == "__main__":
    continue
  modules.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
for name in modules:
  importlib.import_module(name)
from diffusion_jax.training import default_config, restore
with tempfile.TemporaryDirectory() as d:
  config = default_config.get_config()
  config.train.num_steps = 7
  (pathlib.Path(d) / "config.json").write_text(config.to_json())
  loaded = restore.load_config(d)
during = list(attempts)
try:
  import experiments.configs
  blocked = False
except ImportError:
  blocked = True
print(json.dumps({"modules": modules, "attempts": during,
                  "blocked": blocked, "num_steps": loaded.train.num_steps,
                  "experiments_loaded": [m for m in sys.modules if m.split(".")[0] == "experiments"]}))
"""


def test_every_module_imports_without_experiments():
  env = tl.subprocess_env(1)
  r = subprocess.run([sys.executable, "-c", _BLOCKED_RUN, str(PACKAGE)], env=env, cwd=tl.REPO,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert "diffusion_jax.training.restore" in out["modules"]
  assert "diffusion_jax.convert" in out["modules"]
  assert out["blocked"]   # the blocker works: an import of experiments after the run is refused
  assert out["attempts"] == [] and out["experiments_loaded"] == []
  assert out["num_steps"] == 7
