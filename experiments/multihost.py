"""Multi-host flags shared by the entry points (`experiments.train`, `experiments.evaluate`).

  python -m experiments.evaluate ... --distributed                 # a TPU pod: arguments detected
  python -m experiments.evaluate ... --coordinator_address=HOST:PORT --num_processes=2 \\
      --process_id=I [--cpu_collectives=gloo]                      # elsewhere, one per process

`define_flags()` defines them (call it at most once per program); `initialize()` reads them and
calls `jax.distributed.initialize` when asked, before the first JAX computation.

References: JAX docs, "Multi-host and multi-process environments"
(jax.readthedocs.io/en/latest/multi_process.html).
"""
from __future__ import annotations

import jax


def define_flags() -> None:
  """--distributed, --coordinator_address, --num_processes, --process_id, --cpu_collectives."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (arguments "
                    "auto-detected on TPU pods).")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host); "
                      "implies --distributed.")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
  flags.DEFINE_string("cpu_collectives", None, "CPU collectives implementation, e.g. 'gloo' "
                      "(needed for several processes on CPU).")


def initialize(flag_values=None) -> None:
  """Applies the flags of `define_flags` (default: absl's FLAGS): the CPU collectives, then
  `jax.distributed.initialize` if --distributed or --coordinator_address is given."""
  if flag_values is None:
    from absl import flags  # pylint: disable=g-import-not-at-top
    flag_values = flags.FLAGS
  if flag_values.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", flag_values.cpu_collectives)
  if flag_values.distributed or flag_values.coordinator_address:
    jax.distributed.initialize(coordinator_address=flag_values.coordinator_address,
                               num_processes=flag_values.num_processes,
                               process_id=flag_values.process_id)
