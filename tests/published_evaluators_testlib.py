"""The published evaluators, importable beside the CPU torch wheel (test helper, not a test file).

torch-fidelity 0.4.0 and pytorch-fid 0.3.0 import torchvision at package import, and the
registry's torchvision does not load beside the CPU torch wheel here (see ENVIRONMENT.md). The
modules we compare against do not need it:
- torch-fidelity: the package is registered bare (its `__init__` skipped) and, for the metric
  modules, `torch_fidelity.utils` (dataset/extractor plumbing, imports torchvision) is replaced
  by a stub holding the names they import; the metric functions themselves run unchanged.
- pytorch-fid: `calculate_frechet_distance` is read from the installed `fid_score.py` with `ast`
  and executed on its own with the module's own imports (numpy, scipy.linalg).
Both are installed with `pip install --no-deps` (requirements-test-nodeps.txt).
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import pathlib
import sys
import types

import pytest

_UTILS_NAMES = ("create_feature_extractor", "extract_featuresdict_from_input_id_cached",
                "resolve_feature_extractor", "resolve_feature_layer_for_metric",
                "get_cacheable_input_name", "cache_lookup_one_recompute_on_miss")


def torch_fidelity(module: str) -> types.ModuleType:
  """`torch_fidelity.<module>` without the package's torchvision imports (skips if absent)."""
  if not hasattr(sys.modules.get("torch_fidelity"), "_bare"):
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
      pytest.skip("torch-fidelity is not installed (pip install --no-deps torch-fidelity==0.4.0)")
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    package._bare = True
    sys.modules["torch_fidelity"] = package
    utils = types.ModuleType("torch_fidelity.utils")
    for name in _UTILS_NAMES:
      setattr(utils, name, None)
    sys.modules["torch_fidelity.utils"] = utils
  return importlib.import_module(f"torch_fidelity.{module}")


def pytorch_fid_frechet_distance():
  """pytorch-fid 0.3.0's `calculate_frechet_distance`, run from its installed source."""
  spec = importlib.util.find_spec("pytorch_fid")
  if spec is None:
    pytest.skip("pytorch-fid is not installed (pip install --no-deps pytorch-fid==0.3.0)")
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "fid_score.py"
  tree = ast.parse(path.read_text())
  function = [node for node in tree.body if isinstance(node, ast.FunctionDef)
              and node.name == "calculate_frechet_distance"]
  assert len(function) == 1, "pytorch-fid's fid_score.py changed layout"
  import numpy as np
  from scipy import linalg
  namespace = {"np": np, "linalg": linalg}
  exec(compile(ast.Module(body=function, type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102
  return namespace["calculate_frechet_distance"]
