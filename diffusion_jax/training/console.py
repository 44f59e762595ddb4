"""What a user sees in the terminal: this project's INFO lines, the libraries' warnings only.

orbax, tensorflow_datasets, grain and jax log through absl at INFO (about 15 lines of handler
registration before the first training step). `quiet_libraries(verbosity)` adds a filter to the
absl handler that lets INFO records through only from this project's code (`diffusion_jax/`,
`experiments/`) unless `verbosity >= 1` (absl's `--verbosity` / `-v`). Warnings and errors of
every library always pass.

References: absl.logging (`get_absl_handler`, `--verbosity`).
"""
import logging as pylogging
import os

from absl import logging

_OWN_PACKAGES = tuple(os.sep + name + os.sep for name in ("diffusion_jax", "experiments"))


class _OwnInfoOnly(pylogging.Filter):
  """Passes WARNING and above from anywhere, lower levels only from this project's modules."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or any(p in record.pathname
                                                       for p in _OWN_PACKAGES)


_FILTER = _OwnInfoOnly()


def quiet_libraries(verbosity: int) -> None:
  """Hides the libraries' INFO lines unless `verbosity >= 1` (idempotent)."""
  handler = logging.get_absl_handler()
  handler.removeFilter(_FILTER)
  if verbosity < 1:
    handler.addFilter(_FILTER)
