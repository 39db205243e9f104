"""The workdir lock: WORKDIR/lock keeps a second training run out of a workdir."""

import json
import logging
import os
import socket
import time
from typing import Optional

from omni_jax.errors import ConfigError


log = logging.getLogger(__name__)


class WorkdirLocked(ConfigError):
  """Another run holds the workdir."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    return True
  return True


class WorkdirLock:
  """WORKDIR/lock, holding {"pid", "host"} of the run that owns the workdir; created atomically (O_EXCL).

  A second run exits at once (WorkdirLocked naming the workdir and the holder); a lock left by a killed run
  on this host (its pid is gone) is taken over with a warning. A lock from another host is never taken over:
  remove the file by hand once that run is known to be dead."""

  def __init__(self, workdir: str):
    self.path = os.path.join(os.path.abspath(workdir), "lock")
    self.held = False

  def _mine(self) -> dict:
    return dict(pid=os.getpid(), host=socket.gethostname())

  def acquire(self) -> "WorkdirLock":
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._read()
        if holder == {}:  # released meanwhile
          continue
        if holder is None:  # being written right now, or garbage: look again, then take it if still garbage
          time.sleep(0.2)
          holder = self._read()
          if holder is None:
            log.warning("%s: unreadable lock file; taking it over", self.path)
            self._remove()
            continue
        host, pid = holder.get("host"), holder.get("pid")
        if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
          log.warning("%s: taking over the stale lock of process %d on %s (no longer running)", self.path, pid,
                      host)
          self._remove()
          continue
        raise WorkdirLocked(
            f"workdir {os.path.dirname(self.path)} is in use by another run (pid {pid} on host {host}, see "
            f"{self.path}); wait for it to end or pick another --workdir. If that run is dead, delete the lock "
            f"file.")
      with os.fdopen(fd, "w") as f:
        json.dump(self._mine(), f)
      self.held = True
      return self
    raise WorkdirLocked(f"workdir {os.path.dirname(self.path)}: could not take {self.path} (another run keeps "
                        f"taking it)")

  def _read(self) -> Optional[dict]:
    """The holder's {"pid", "host"}; {} when there is no lock file, None when it does not parse."""
    try:
      with open(self.path) as f:
        out = json.load(f)
      return out if isinstance(out, dict) else None
    except FileNotFoundError:
      return {}
    except (OSError, ValueError):
      return None

  def _remove(self) -> None:
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass

  def release(self) -> None:
    if self.held and self._read() == self._mine():
      self._remove()
    self.held = False

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
    return False
