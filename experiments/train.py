"""Train a diffusion model.

  python -m experiments.train --config=experiments/configs/digits.py --workdir=runs/digits
  python -m experiments.train --config=experiments/configs/ddpm_cifar10.py --workdir=runs/c10 \
      --config.optim.lr=1e-4 --config.train.batch_size=64

Rerunning the same command with the same workdir resumes from its newest checkpoint (see the
README's "Reliability" section for what a resume checks). Exit codes: 0 done, 1 non-finite loss
(the message names the step), 2 refused (the config changes keys the run must keep, another
trainer holds the workdir, the checkpoints do not match or none is readable), 143 preempted
(SIGTERM; a checkpoint was written). Library INFO lines (orbax, TFDS) are hidden unless
`--verbosity=1` (or `-v 1`). Multi-host: `--distributed` calls `jax.distributed.initialize()` (arguments are
auto-detected on TPU pods; give `--coordinator_address/--num_processes/--process_id` elsewhere).
"""
import sys

from experiments import huge_pages   # the standard library only

if __name__ == "__main__":
  # glibc reads its malloc tunables only at process start: restart before JAX is imported.
  huge_pages.restart_with_huge_pages(sys.argv[1:])

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from diffusion_jax import compile_cache
from diffusion_jax import host_memory
from diffusion_jax.training import checkpoint
from diffusion_jax.training import console
from diffusion_jax.training import run_config
from diffusion_jax.training import trainer
from diffusion_jax.training import workdir_lock
from experiments import multihost
from experiments import paths
from experiments.configs import overrides

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags, defined only when run as a program (never at import, so importing
  this module beside another entry point cannot collide)."""
  config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
  multihost.define_flags()
  compile_cache.define_flag()
  host_memory.define_flag()
  flags.DEFINE_bool(huge_pages.FLAG, True, huge_pages.FLAG_HELP)
  flags.mark_flags_as_required(["config", "workdir"])


# Errors that refuse a launch with a message saying what to do: printed without a traceback.
_REFUSALS = (run_config.ConfigChangeError, workdir_lock.WorkdirLockedError,
             checkpoint.CheckpointMismatchError, checkpoint.NoReadableCheckpointError)


def main(argv):
  del argv
  console.quiet_libraries(FLAGS.verbosity)
  if FLAGS.keep_host_memory:
    kept = host_memory.keep_freed_memory()
    logging.info("--keep_host_memory: %s", "freed host memory is kept in the process" if kept
                 else "not available (needs glibc's malloc)")
  logging.info("Transparent huge pages for host buffers: %s",
               huge_pages.describe(FLAGS.huge_pages))
  compile_cache.enable(FLAGS.compile_cache)
  multihost.initialize(FLAGS)
  logging.info("JAX process %d/%d, %d local devices of %d: %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  try:
    trainer.train_and_evaluate(paths.resolve_config_paths(FLAGS.config),
                               paths.absolute(FLAGS.workdir))
  except trainer.NonFiniteError as e:
    logging.error("%s", e)
    print(f"ERROR: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  except _REFUSALS as e:
    logging.error("%s", e)
    print(f"ERROR: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  except trainer.Preempted as e:
    logging.warning("%s", e)
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(143)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=overrides.parse_flags)
