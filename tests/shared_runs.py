"""Expensive test fixtures (a trained run) built once per test run, shared by the xdist workers.

`--dist loadgroup` did not keep the tests of one group on one worker here (checked with
pytest-xdist 3.8: module-level `xdist_group` marks were not honoured), so sharing goes through
the file system: a directory beside the workers' own temporary directories and a file lock.
"""
import fcntl
import json
import os
import pathlib


def run_once(tmp_path_factory, name: str, build) -> tuple[pathlib.Path, dict]:
  """`build(directory) -> JSON-able dict`, run once per test run however many xdist workers ask:
  the first holds a file lock on a directory beside the workers' own temporary directories and
  builds; the others wait for it and get the same (directory, result).
  """
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent            # <basetemp>/popen-gwN -> the run's shared <basetemp>
  shared = root / name
  shared.mkdir(exist_ok=True)
  with open(shared / ".lock", "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    done = shared / "result.json"
    if not done.exists():
      done_tmp = shared / "result.json.tmp"
      done_tmp.write_text(json.dumps(build(shared)))
      done_tmp.replace(done)
    return shared, json.loads(done.read_text())
