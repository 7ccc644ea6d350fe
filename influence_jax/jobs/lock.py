"""One job per work directory: an exclusive `fcntl.flock` on WORKDIR/.lock, held while the job runs.

The kernel drops the lock when its holder exits, however it exits, so a lock file left by a killed
job does not block the next one. In a multi-process job, process 0 holds the lock for the job as
a whole and tells the other processes whether they may go on. The file records its holder (pid,
host, command line) for the refusal message. flock needs a file system that supports it (local
disks and most NFS setups do; some FUSE mounts do not: there the lock is only advisory).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from typing import Iterator

import jax
import numpy as np

LOCK_FILE = ".lock"


class WorkdirBusy(RuntimeError):
  """Another job holds the work directory."""


def _holder(fd: int) -> str:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    record = json.loads(os.read(fd, 1 << 16).decode() or "{}")
    return f"pid {record['pid']} on host {record['host']} (started {record['started']}: {record['command']})"
  except (ValueError, KeyError, OSError):
    return "another process (no readable record)"


def _acquire(path: str) -> tuple[int | None, str]:
  """Returns (fd, "") holding the lock, or (None, who holds it)."""
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    who = _holder(fd)
    os.close(fd)
    return None, who
  record = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(record).encode(), 0)
  os.fsync(fd)
  return fd, ""


def _all_agree(ok: bool) -> bool:
  """Returns process 0's `ok` on every process (a collective when there are several)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # noqa: PLC0415
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(ok, np.int32)))


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
  """Holds WORKDIR/.lock for the body; raises WorkdirBusy naming the holder when another job has it.

  Every process of a job calls it (process 0 takes the lock).
  """
  fd, who = (None, "")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    fd, who = _acquire(os.path.join(workdir, LOCK_FILE))
  if not _all_agree(fd is not None if jax.process_index() == 0 else True):
    raise WorkdirBusy(f"The work directory {workdir} is in use by another job: {who or 'see process 0'}. "
                      "Wait for it to finish or use another --workdir.")
  try:
    yield
  finally:
    if fd is not None:
      os.close(fd)  # Closing the descriptor releases the flock.
