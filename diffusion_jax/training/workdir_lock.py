"""One trainer per workdir: `<workdir>/.lock`, created with O_EXCL by host 0 and removed on exit.

The file holds JSON {pid, host, start, created}; `start` is the process start time read from
/proc (Linux), so a pid reused by an unrelated process is not mistaken for the holder. A lock
left by a process that died on this host (SIGKILL, power loss of a container) is taken over with
a warning; a lock held by a live process, or by any process on another host, is refused with a
`WorkdirLockedError` naming the holder. Paths that are not local files (gs://...) are not locked.

References: POSIX open(2) O_CREAT|O_EXCL (atomic creation).
"""
from typing import Any
import json
import os
import socket
import time

from absl import logging
from etils import epath

LOCK_NAME = ".lock"
# An unparsable lock (its writer died between create and write) counts as stale after this long.
_UNPARSABLE_GRACE_S = 30.0


class WorkdirLockedError(RuntimeError):
  """Another live trainer holds the workdir's lock."""


def _proc_stat(pid: int) -> list[str] | None:
  """The fields of /proc/<pid>/stat after the command name (state first), or None (not Linux,
  or no such process)."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      return f.read().rsplit(")", 1)[1].split()
  except (OSError, IndexError):
    return None


def _process_start(pid: int) -> str | None:
  """The start time of `pid` in clock ticks since boot (Linux /proc), or None if unknown."""
  fields = _proc_stat(pid)
  return fields[19] if fields and len(fields) > 19 else None


def _alive(pid: int, start: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # exists, owned by someone else
    return True
  fields = _proc_stat(pid)
  # A killed process that nobody has reaped yet (a zombie, 'Z', or dying, 'X') still answers
  # kill(pid, 0) but holds nothing: seen after SIGKILL of a process group whose parent died too.
  if fields and fields[0] in ("Z", "X"):
    return False
  now_start = fields[19] if fields and len(fields) > 19 else None
  return start is None or now_start is None or now_start == start


class WorkdirLock:
  """Context manager holding `<workdir>/.lock` (a no-op when `active` is False)."""

  def __init__(self, workdir: str | epath.Path, active: bool = True):
    self.path = epath.Path(workdir) / LOCK_NAME
    self.active = active and "://" not in str(workdir)
    self._held = False

  def __enter__(self) -> "WorkdirLock":
    if self.active:
      self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def acquire(self) -> None:
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
          "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        self._take_over_if_stale(me["host"])
        continue
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(me, f)
      self._held = True
      return
    raise WorkdirLockedError(f"Could not create the lock {self.path}: another trainer keeps "
                             "taking it.")

  def _take_over_if_stale(self, my_host: str) -> None:
    if not self.path.exists():   # released meanwhile: try again
      return
    holder = self._read()
    if holder is None:
      age = time.time() - os.path.getmtime(self.path)
      if age < _UNPARSABLE_GRACE_S:
        raise WorkdirLockedError(f"The workdir lock {self.path} is being written by another "
                                 "trainer; try again in a minute.")
      logging.warning("Taking over the unreadable workdir lock %s (%.0f s old).", self.path, age)
    elif holder.get("host") == my_host and not _alive(int(holder["pid"]), holder.get("start")):
      logging.warning("Taking over the workdir lock %s: its holder (pid %s on %s, since %s) is "
                      "no longer running.", self.path, holder["pid"], holder["host"],
                      holder.get("created", "?"))
    else:
      raise WorkdirLockedError(
          f"Another trainer is using this workdir: pid {holder.get('pid')} on host "
          f"{holder.get('host')} (since {holder.get('created', '?')}) holds {self.path}. Wait "
          "for it to finish or stop it; if that process is gone (e.g. its host crashed), delete "
          "the lock file and rerun.")
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass

  def _read(self) -> dict[str, Any] | None:
    try:
      holder = json.loads(self.path.read_text())
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
      return None
    return holder if isinstance(holder, dict) and "pid" in holder else None

  def release(self) -> None:
    """Removes the lock if this process holds it."""
    if not self._held:
      return
    self._held = False
    holder = self._read()
    if holder is not None and holder.get("pid") == os.getpid():
      os.remove(self.path)
