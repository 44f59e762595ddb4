"""Importing the entry points defines no command-line flags: each defines its flags only when
run as a program (`define_flags()` under `__main__`), so a test or notebook can import any two
of them in one process without absl's DuplicateFlagError."""
import json
import subprocess
import sys

import training_testlib as tl

ENTRY_POINTS = ("train", "sample", "evaluate", "evaluate_bpd", "evaluate_text", "sweep",
                "train_autoencoder", "encode_latents", "prepare_text")


def test_importing_every_entry_point_defines_no_flags():
  code = ("import importlib, json\n"
          "from absl import flags\n"
          f"for name in {ENTRY_POINTS!r}:\n"
          "  importlib.import_module('experiments.' + name)\n"
          "ours = {m: [f.name for f in fs] for m, fs in flags.FLAGS.flags_by_module_dict().items()\n"
          "        if m.split('.')[0] in ('experiments', 'diffusion_jax')}\n"
          "print(json.dumps(ours))\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=tl.REPO, capture_output=True,
                        text=True, check=False, env=tl.subprocess_env())
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Flags of the libraries imported on the way (absl, grain, orbax, tfds) are theirs; ours are
  # registered under the module that defined them.
  ours = json.loads(proc.stdout.strip().splitlines()[-1])
  assert ours == {}, f"flags defined at import: {ours}"
