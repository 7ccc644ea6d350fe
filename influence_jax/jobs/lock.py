"""One job per work directory, held while the job runs: WORKDIR/.lock.

Local directory: an exclusive `fcntl.flock` on the file. The kernel drops it when its holder exits,
however it exits, so a lock file left by a killed job does not block the next one. flock needs a file
system that supports it (local disks and most NFS setups do; some FUSE mounts do not: there the lock
is only advisory).

Cloud object storage (gs://): a lease object. It is created only if absent (GCS `ifGenerationMatch=0`)
and renewed, while the job runs, only if it is still the generation this job wrote
(`ifGenerationMatch=<generation>`), so two jobs never both hold it. It expires `lease_seconds` after
its last renewal (by the storage service's clock): a killed job blocks the next one at most that long,
after which the next job takes it over, again with a generation precondition. A job that loses its
lease (it stalled past the expiry and another job took it) is interrupted.

Either way the lock records its holder (pid, host, command line) for the refusal message. In a
multi-process job, process 0 holds the lock for the job as a whole and tells the other processes
whether they may go on.
"""

from __future__ import annotations

import _thread
import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import threading
import time
from typing import Iterator, Optional

import jax
import numpy as np
from absl import logging

from influence_jax import paths

LOCK_FILE = ".lock"
LEASE_SECONDS = 60.0  # Default expiry of a gs:// lease; renewed every third of it.


class WorkdirBusy(RuntimeError):
  """Another job holds the work directory."""


def _record() -> dict:
  return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": " ".join(sys.argv)}


def _describe(raw: bytes) -> str:
  """Returns who holds a lock from its record's bytes."""
  try:
    record = json.loads(raw.decode() or "{}")
    return f"pid {record['pid']} on host {record['host']} (started {record['started']}: {record['command']})"
  except (ValueError, KeyError, UnicodeDecodeError):
    return "another process (no readable record)"


# ---------------------------------------------------------------------------------------------- local


def _acquire_flock(path: str) -> tuple[Optional[int], str]:
  """Returns (fd, "") holding the lock, or (None, who holds it)."""
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.lseek(fd, 0, os.SEEK_SET)
    who = _describe(os.read(fd, 1 << 16))
    os.close(fd)
    return None, who
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(_record()).encode(), 0)
  os.fsync(fd)
  return fd, ""


# ---------------------------------------------------------------------------------------------- gs://


def _blob(path: str):
  """Returns the google-cloud-storage Blob of a gs:// path (the client reads STORAGE_EMULATOR_HOST)."""
  from google.cloud import storage  # noqa: PLC0415 (only for gs:// workdirs)

  bucket, key = paths.split_bucket(path)
  return storage.Client().bucket(bucket).blob(key)


class Lease:
  """The lease object at `path` (gs://): `acquire()`, renewed by a thread while held, `release()`."""

  def __init__(self, path: str, seconds: float = LEASE_SECONDS):
    if seconds <= 0:
      raise ValueError(f"A workdir lease must last a positive time, not {seconds} s.")
    self.path, self.seconds = path, float(seconds)
    self.generation: Optional[int] = None
    self.lost = False
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def _write(self, if_generation_match: int) -> int:
    """Uploads this job's record if the object's generation is `if_generation_match` (0: absent); returns
    the new generation; raises google.api_core.exceptions.PreconditionFailed otherwise."""
    blob = _blob(self.path)
    blob.metadata = {"lease_seconds": str(self.seconds)}
    blob.upload_from_string(json.dumps(_record()), content_type="application/json",
                            if_generation_match=if_generation_match)
    return int(blob.generation)

  def holder(self) -> tuple[Optional[int], str, bool]:
    """Returns (generation or None when absent, who holds it, whether it has expired)."""
    blob = _blob(self.path)
    bucket = blob.bucket
    found = bucket.get_blob(blob.name)
    if found is None:
      return None, "", True
    seconds = float((found.metadata or {}).get("lease_seconds", LEASE_SECONDS))
    updated = found.updated or datetime.datetime.now(datetime.timezone.utc)
    age = (datetime.datetime.now(datetime.timezone.utc) - updated).total_seconds()
    who = f"{_describe(found.download_as_bytes())}; its lease expires in {max(seconds - age, 0):.0f} s"
    return int(found.generation), who, age > seconds

  def acquire(self) -> str:
    """Takes the lease: returns "" when held, else who holds it (a lease that expired is taken over)."""
    from google.api_core import exceptions  # noqa: PLC0415

    generation, who, expired = self.holder()
    if generation is not None and not expired:
      return who
    if generation is not None:
      logging.warning("%s: taking over the expired lease of %s.", self.path, who)
    try:
      self.generation = self._write(0 if generation is None else generation)
    except exceptions.PreconditionFailed:  # Another job took it between our read and write.
      return self.holder()[1] or "another job (it took the lease at the same moment)"
    self._thread = threading.Thread(target=self._renew, name="workdir-lease", daemon=True)
    self._thread.start()
    return ""

  def _renew(self) -> None:
    from google.api_core import exceptions  # noqa: PLC0415

    while not self._stop.wait(self.seconds / 3):
      try:
        self.generation = self._write(self.generation)
      except exceptions.PreconditionFailed:
        self.lost = True
        logging.error("%s: this job's lease was taken over by %s; stopping the job.", self.path, self.holder()[1])
        _thread.interrupt_main()
        return
      except Exception as e:  # noqa: BLE001 (a transient error: retried at the next renewal)
        logging.warning("%s: renewing the lease failed (%s); retrying.", self.path, e)

  def release(self) -> None:
    """Stops renewing and deletes the lease if it is still this job's."""
    from google.api_core import exceptions  # noqa: PLC0415

    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self.generation is not None and not self.lost:
      with contextlib.suppress(exceptions.PreconditionFailed, exceptions.NotFound):
        _blob(self.path).delete(if_generation_match=self.generation)


# ---------------------------------------------------------------------------------------------- both


def _all_agree(ok: bool) -> bool:
  """Returns process 0's `ok` on every process (a collective when there are several)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # noqa: PLC0415
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(ok, np.int32)))


@contextlib.contextmanager
def _held(workdir: str, lease_seconds: float) -> Iterator[str]:
  """Holds WORKDIR/.lock (flock or lease) on this process for the body; yields "" or who holds it."""
  path = paths.join(workdir, LOCK_FILE)
  if paths.is_remote(workdir):
    lease = Lease(path, lease_seconds)
    who = lease.acquire()
    try:
      yield who
    finally:
      if not who:
        lease.release()
      if lease.lost:
        raise WorkdirBusy(f"The work directory {workdir} was taken over by another job while this one ran "
                          "(its lease expired): this job's outputs may be incomplete; rerun it.")
  else:
    paths.makedirs(workdir)
    fd, who = _acquire_flock(path)
    try:
      yield who
    finally:
      if fd is not None:
        os.close(fd)  # Closing the descriptor releases the flock.


@contextlib.contextmanager
def workdir_lock(workdir: str, lease_seconds: float = LEASE_SECONDS) -> Iterator[None]:
  """Holds WORKDIR/.lock for the body; raises WorkdirBusy naming the holder when another job has it.

  Every process of a job calls it (process 0 takes the lock). `lease_seconds`: the expiry of a gs://
  lease (see the module docstring).
  """
  with (_held(workdir, lease_seconds) if jax.process_index() == 0 else contextlib.nullcontext("")) as who:
    if not _all_agree(not who):
      raise WorkdirBusy(f"The work directory {workdir} is in use by another job: {who or 'see process 0'}. "
                        "Wait for it to finish or use another --workdir.")
    yield
