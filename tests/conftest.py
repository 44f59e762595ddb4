"""Test setup: 8 fake CPU devices, so the pmap / shard_map paths run on any machine, and the
session-wide `quickstart_run` fixture (the README Quickstart, trained once per test run and
shared by every slow test, on every xdist worker, that needs a trained digits model).

The device flag must be set before JAX initialises its backends, hence at import of conftest
(nothing imported here imports JAX).
"""
import dataclasses
import os
import pathlib
import subprocess

import pytest

import shared_runs

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if os.environ.get("TOLERANCE_REPORT"):      # measurement aid, see tests/numerics_testlib.py
  import numerics_testlib
  numerics_testlib.install_report(os.environ["TOLERANCE_REPORT"])

@dataclasses.dataclass
class QuickstartRun:
  """The README Quickstart, run once as written in a fresh copy (see tests/readme_commands.py).

  shell: a `readme_commands.UserShell` (the copy and its venv), to run further README blocks in
    the same place.
  workdir: the trained digits run, `<copy>/runs/digits`.
  result: the Quickstart command's completed process (stdout, stderr).
  """
  shell: object
  workdir: pathlib.Path
  result: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> QuickstartRun:
  """The README's Quickstart command, run once per test run (`shared_runs.run_once`)."""
  import readme_commands  # pylint: disable=import-outside-toplevel

  def build(directory):
    proc = readme_commands.user_shell(directory).run_block("quickstart", timeout=3600)
    return {"args": proc.args, "stdout": proc.stdout, "stderr": proc.stderr}

  shared, saved = shared_runs.run_once(tmp_path_factory, "quickstart_shared", build)
  shell = readme_commands.UserShell(repo=shared / "repo", venv=shared / "venv")
  result = subprocess.CompletedProcess(saved["args"], 0, saved["stdout"], saved["stderr"])
  return QuickstartRun(shell=shell, workdir=shell.repo / "runs" / "digits", result=result)
