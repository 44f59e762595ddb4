"""host_memory.keep_freed_memory: XLA:CPU's per-call temporary block is no longer faulted in
again on every call, and results do not change.

Each variant runs in a fresh process (malloc settings are per process and must come before JAX's
threads allocate). The child jits a computation whose only large buffer is a 64 MiB temporary
(sin of an outer product, feeding a matrix-vector product), calls it 10 times to warm up and
then counts the minor page faults of 10 more calls. Without the setting, glibc mmaps the block
afresh each call, so each call faults in every one of its 16,384 pages. With it, freed blocks
are reused. The heap still grows by a block now and then until the holes between small
allocations fit (in one run it grew 3 times in the first 8 calls and never after), so the test
allows 3 of the 10 measured calls to fault in a fresh block.
"""
import json
import subprocess
import sys
import textwrap

import pytest

from diffusion_jax import host_memory
import training_testlib as tl

_CHILD = textwrap.dedent("""
    import json, sys
    from diffusion_jax import host_memory
    kept = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else False
""") + tl.FAULT_PROBE + textwrap.dedent("""
    print("RESULT " + json.dumps({"kept": kept, "temp_bytes": temp_bytes, "faults": faults,
                                  "out": np.asarray(out).tolist()}))
""")


def _run(mode: str) -> dict:
  env = {k: v for k, v in tl.subprocess_env(1).items() if not k.startswith("MALLOC_")}
  proc = subprocess.run([sys.executable, "-c", _CHILD, mode], cwd=tl.REPO, env=env,
                        capture_output=True, text=True, check=True)
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


@pytest.mark.skipif(host_memory._glibc() is None, reason="keep_freed_memory needs glibc")
def test_kept_memory_removes_the_per_call_page_faults_and_changes_no_result():
  released, kept = _run("release"), _run("keep")
  assert kept["kept"] and not released["kept"]
  pages = released["temp_bytes"] // 4096
  assert pages >= 16384   # the 64 MiB temporary is one block, above glibc's 32 MiB mmap limit
  if min(released["faults"]) < pages // 2:
    pytest.skip(f"this allocator reuses the block by itself ({released['faults']} faults per "
                f"call for {pages} pages)")
  # Without the setting: one fault per page of the block, every call.
  assert sum(released["faults"]) >= 10 * pages
  # With it: at most 3 fresh blocks in 10 calls, against 10 without.
  assert sum(kept["faults"]) < 3 * pages + 3 * pages // 20, (kept["faults"], pages)
  assert kept["out"] == released["out"]   # bit for bit


def test_without_glibc_it_changes_nothing(monkeypatch):
  monkeypatch.setattr(host_memory, "_glibc", lambda: None)
  assert host_memory.keep_freed_memory() is False


@pytest.mark.skipif(host_memory._glibc() is None, reason="keep_freed_memory needs glibc")
def test_a_call_after_jax_started_warns():
  code = ("import jax.numpy as jnp\n"
          "jnp.ones(2).block_until_ready()\n"
          "from diffusion_jax import host_memory\n"
          "host_memory.keep_freed_memory()\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=tl.REPO, env=tl.subprocess_env(1),
                        capture_output=True, text=True, check=True)
  assert "called after JAX created its backends" in proc.stderr
