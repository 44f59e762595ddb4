"""experiments.huge_pages: the entry point restarts itself once with glibc's huge-page tunable, and
then XLA:CPU's large per-call buffer is no longer faulted in 4 KiB at a time on every call.

The child below is what `python -m experiments.train` does first (restart, then JAX), followed by
the measurement of test_host_memory.py: a jitted computation whose only large buffer is a 64 MiB
temporary, 10 warm-up calls, then the minor page faults of 10 more. Without the tunable glibc
mmaps the block afresh each call and every one of its 16,384 pages faults; with it the block is
mapped with 2 MiB transparent huge pages (32 of them), so a call faults a few dozen times. The
bound allows 1/16 of the pages per call: room for 4 KiB pages at the unaligned ends of the
block and for small allocations, and still 16x below the count without the tunable.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import training_testlib as tl
from experiments import huge_pages

_CHILD = textwrap.dedent("""
    import json, os, sys
    print("START", os.getpid(), flush=True)
    from experiments import huge_pages
    huge_pages.restart_with_huge_pages(sys.argv[1:])
""") + tl.FAULT_PROBE + textwrap.dedent("""
    print("RESULT " + json.dumps({
        "pid": os.getpid(), "tunables": os.environ.get("GLIBC_TUNABLES"), "faults": faults,
        "temp_bytes": temp_bytes, "out": np.asarray(out).tolist(),
        "describe": huge_pages.describe(huge_pages.requested(sys.argv[1:]))}))
""")


def _run(*args: str, tunables: str | None = None) -> tuple[list[int], dict]:
  """Runs the child; returns the pids of its START lines and its RESULT."""
  env = {k: v for k, v in tl.subprocess_env(1).items() if k != "GLIBC_TUNABLES"}
  if tunables:
    env["GLIBC_TUNABLES"] = tunables
  proc = subprocess.run([sys.executable, "-c", _CHILD, *args], cwd=tl.REPO, env=env,
                        capture_output=True, text=True, check=True)
  starts = [int(l.split()[1]) for l in proc.stdout.splitlines() if l.startswith("START ")]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return starts, json.loads(line[len("RESULT "):])


_UNAVAILABLE = huge_pages.unavailable_reason()


@pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"huge pages: {_UNAVAILABLE}")
def test_restart_sets_the_tunable_once_and_removes_the_per_call_page_faults():
  starts, on = _run()
  off_starts, off = _run("--nohuge_pages")
  # One restart, in the same process (same pid); none with --nohuge_pages.
  assert len(starts) == 2 and starts[0] == starts[1] == on["pid"], starts
  assert on["tunables"] == huge_pages.TUNABLE and on["describe"].startswith("on")
  assert off_starts == [off["pid"]] and off["tunables"] is None
  assert off["describe"] == "off (--nohuge_pages)"
  pages = off["temp_bytes"] // 4096
  assert pages >= 16384   # the 64 MiB temporary is one block, above glibc's 32 MiB mmap limit
  if min(off["faults"]) < pages // 2:
    pytest.skip(f"this allocator reuses the block by itself ({off['faults']} faults per call)")
  assert min(off["faults"]) >= pages                       # every 4 KiB page, every call
  assert max(on["faults"]) < pages // 16, (on["faults"], pages)
  assert on["out"] == off["out"]                           # bit for bit


@pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"huge pages: {_UNAVAILABLE}")
def test_restart_keeps_other_tunables_and_does_not_repeat_when_set():
  starts, result = _run(tunables="glibc.malloc.arena_max=4")
  assert len(starts) == 2
  assert result["tunables"] == f"glibc.malloc.arena_max=4:{huge_pages.TUNABLE}"
  starts, result = _run(tunables=huge_pages.TUNABLE)
  assert len(starts) == 1 and result["tunables"] == huge_pages.TUNABLE


def test_the_command_line_can_turn_it_off():
  for argv in (["--nohuge_pages"], ["-nohuge_pages"], ["--huge_pages=false"],
               ["--huge_pages=False"], ["--huge_pages=0"], ["--config=c.py", "--huge_pages=f"]):
    assert not huge_pages.requested(argv), argv
  for argv in ([], ["--huge_pages"], ["--huge_pages=true"], ["--huge_pages=1"],
               ["--", "--nohuge_pages"], ["--nohuge_pages_x"], ["nohuge_pages"]):
    assert huge_pages.requested(argv), argv


def test_unavailable_reasons_name_the_cause(tmp_path):
  never = tmp_path / "enabled"
  never.write_text("always madvise [never]\n")
  madvise = tmp_path / "madvise"
  madvise.write_text("always [madvise] never\n")
  if sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
    assert "[never]" in huge_pages.unavailable_reason(str(never))
    assert "is missing" in huge_pages.unavailable_reason(str(tmp_path / "absent"))
    version = tuple(int(p) for p in os.confstr("CS_GNU_LIBC_VERSION").split()[1].split(".")[:2])
    assert (huge_pages.unavailable_reason(str(madvise)) is None) == (version >= (2, 35))
  else:
    assert huge_pages.unavailable_reason(str(madvise)) is not None


def test_environment_with_tunable_appends_to_glibc_tunables():
  assert huge_pages.environment_with_tunable({})["GLIBC_TUNABLES"] == huge_pages.TUNABLE
  env = huge_pages.environment_with_tunable({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4",
                                             "HOME": "/h"})
  assert env == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=4:{huge_pages.TUNABLE}", "HOME": "/h"}
  assert huge_pages.active(env) and not huge_pages.active({"GLIBC_TUNABLES": "x=1"})
