"""`xla_cpu.use_xla_convolutions()`: the flag reaches XLA (a convolution compiles without a
YNNPACK fusion, and with one when the flag is absent), a user's own setting wins, and a call
after JAX created its backend says it came too late."""
import json
import subprocess
import sys

import pytest

import training_testlib as tl

_CONV_HLO = (
    "import json, os, sys\n"
    "import jax, jax.numpy as jnp\n"
    "{setup}\n"
    "conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',\n"
    "    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))\n"
    "x, w = jnp.ones((2, 16, 16, 32)), jnp.ones((3, 3, 32, 32))\n"
    "fwd = jax.jit(conv).lower(x, w).compile().as_text()\n"
    "kgrad = jax.jit(jax.grad(lambda w: conv(x, w).sum())).lower(w).compile().as_text()\n"
    "print(json.dumps({{'flags': os.environ.get('XLA_FLAGS', ''),\n"
    "                  'ynn': ['__ynn_fusion' in fwd, '__ynn_fusion' in kgrad]}}))\n")


def _run(setup: str, xla_flags: str | None) -> dict:
  env = {k: v for k, v in tl.subprocess_env(1).items() if k != "XLA_FLAGS"}
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  proc = subprocess.run([sys.executable, "-c", _CONV_HLO.format(setup=setup)], cwd=tl.REPO,
                        env=env, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_flag_moves_convolutions_off_ynnpack():
  ours = _run("from diffusion_jax import xla_cpu\nassert xla_cpu.use_xla_convolutions()", None)
  assert ours["ynn"] == [False, False]
  assert xla_cpu_flag() in ours["flags"].split()
  default = _run("", None)
  if default["ynn"] != [True, True]:   # e.g. a CPU YNNPACK does not serve: nothing to move
    pytest.skip(f"JAX's default does not use YNNPACK for these convolutions here: {default}")


def test_users_own_setting_wins():
  own = "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution"
  result = _run("from diffusion_jax import xla_cpu\nassert not xla_cpu.use_xla_convolutions()",
                own)
  assert result["flags"] == own and result["ynn"] == [True, True]


def test_too_late_after_the_backend_exists():
  code = ("import logging, os\n"
          "import jax.numpy as jnp\n"
          "jnp.ones(1).block_until_ready()\n"
          "from diffusion_jax import xla_cpu\n"
          "print(xla_cpu.use_xla_convolutions(), os.environ.get('XLA_FLAGS', ''))\n")
  env = {k: v for k, v in tl.subprocess_env(1).items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-c", code], cwd=tl.REPO, env=env, capture_output=True,
                        text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ["False"]
  assert "after JAX created its backends" in proc.stderr


def xla_cpu_flag() -> str:
  from diffusion_jax import xla_cpu  # pylint: disable=g-import-not-at-top
  return xla_cpu.FLAG
