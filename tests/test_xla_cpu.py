"""`xla_cpu.use_xla_convolutions()`: the flag reaches XLA (a convolution compiles without a
YNNPACK fusion, and with one when the flag is absent), a user's own setting wins, and a call
after JAX created its backend says it came too late. `xla_cpu.compiler_options('xla')`: the same
program for one `jax.jit` as the flag gives, and it reaches the trainer's parallel step."""
import json
import re
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


# ---------------------------------------------------------------- one program: compiler_options
_CONV_STEP_HLO = (
    "import hashlib, json, re, sys\n"
    "import jax, jax.numpy as jnp\n"
    "from diffusion_jax import xla_cpu\n"
    "conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',\n"
    "    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))\n"
    "x, w = jnp.ones((2, 16, 16, 32)), jnp.ones((3, 3, 32, 32))\n"
    "loss = lambda w, x: (conv(x, w).reshape(-1, 32) @ w[0, 0]).sum()\n"
    "options = xla_cpu.compiler_options(sys.argv[1]) if len(sys.argv) > 1 else None\n"
    "text = jax.jit(jax.grad(loss), compiler_options=options).lower(w, x).compile().as_text()\n"
    "body = re.sub(r'HloModule \\S+', '', text)\n"
    "print(json.dumps({'md5': hashlib.md5(body.encode()).hexdigest(), 'options': options}))\n")


def _step_hlo(xla_flags: str | None, *args: str) -> dict:
  env = {k: v for k, v in tl.subprocess_env(1).items() if k != "XLA_FLAGS"}
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  proc = subprocess.run([sys.executable, "-c", _CONV_STEP_HLO, *args], cwd=tl.REPO, env=env,
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_compiler_options_compile_the_program_the_flag_does():
  # The per-program list must equal jax's default list minus convolutions: the same compiled
  # program, instruction for instruction, as the process-wide flag (a jaxlib whose default list
  # differs fails here), and a different one from JAX's default.
  by_flag = _step_hlo(xla_cpu_flag())
  by_option = _step_hlo(None, "xla")
  default = _step_hlo(None)
  assert by_option["options"] is not None and by_flag["options"] is None
  assert by_option["md5"] == by_flag["md5"]
  assert default["md5"] != by_option["md5"]


def _ynn_convolutions(hlo: str) -> int:
  """How many YNNPACK fusions of a compiled HLO text compute a convolution."""
  bodies, name, lines = {}, None, []
  for line in hlo.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$", line)
    if header:
      name, lines = header.group(1), []
    elif line.startswith("}") and name:
      bodies[name], name = "\n".join(lines), None
    elif name:
      lines.append(line)
  called = re.findall(r'calls=%([\w.\-]+)[^\n]*"__ynn_fusion"', hlo)
  return sum("convolution(" in bodies.get(c, "") for c in called)


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_parallel_step_compiles_with_the_options(mode):
  # The trainer's step (train.cpu_convolutions='xla', the default) reaches jax.jit in the
  # 'shard_map' mode (and 'jit', one device): no convolution left in a YNNPACK fusion; without
  # options, or under pmap (which takes none), JAX's default kernels.
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np
  from diffusion_jax import xla_cpu
  from diffusion_jax.training import parallel

  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def step_fn(state, batch, rng):
    del rng
    loss, grad = jax.value_and_grad(lambda w: (conv(batch["x"], w) ** 2).mean())(state["w"])
    return {"w": state["w"] - 0.1 * grad}, {"loss": loss}

  devices = jax.local_device_count()
  state = {"w": np.full((3, 3, 32, 32), 0.01, np.float32)}
  batch = {"x": np.ones((1, devices, 2, 16, 16, 32), np.float32)}   # [k, L, b, ...]

  def hlo(options):
    ps = parallel.make_parallel_step(step_fn, mode, donate=False, compiler_options=options)
    return ps.step.lower(ps.put_state(state), ps.prepare_batch(batch),
                         jax.random.key(0)).compile().as_text()

  default = _ynn_convolutions(hlo(None))
  if default == 0:
    pytest.skip("JAX's default does not use YNNPACK for these convolutions here")
  assert default >= 2      # the forward and the kernel gradient
  with_options = _ynn_convolutions(hlo(xla_cpu.compiler_options("xla")))
  assert with_options == (default if mode == "pmap" else 0)


def test_compiler_options_choices(monkeypatch):
  from diffusion_jax import xla_cpu  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  assert xla_cpu.compiler_options("xla") == {xla_cpu.FLAG_NAME: xla_cpu.WITHOUT_CONVOLUTIONS}
  assert xla_cpu.compiler_options("ynnpack") is None
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=+individual_dot")
  assert xla_cpu.compiler_options("xla") is None      # the user's own setting wins
  with pytest.raises(ValueError, match="convolutions must be one of"):
    xla_cpu.compiler_options("eigen")
