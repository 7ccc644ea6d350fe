"""What every job process does: fault injection for resume tests, which process writes shared outputs,
glibc's mmap threshold. (Atomic writes and digests: influence_jax.io.)"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
from typing import Optional


def maybe_kill(fault: Optional[str], stage: str, count: int) -> None:
  """Fault injection for resume tests: SIGKILL this process when fault == f"{stage}:{count}"."""
  if fault and fault == f"{stage}:{count}":
    from absl import logging  # noqa: PLC0415

    logging.warning("Fault injection: killing the process at %s", fault)
    logging.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def is_writer() -> bool:
  """Returns True on the process that writes shared outputs (process 0)."""
  import jax  # noqa: PLC0415

  return jax.process_index() == 0


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h).


def release_freed_blocks(threshold_bytes: int = 1 << 20) -> bool:
  """Makes glibc serve allocations of ≥ `threshold_bytes` with mmap, so freeing one returns it to the OS.

  Scoring allocates and frees block-sized buffers (store reads, score tiles) for every block of the
  store. By default glibc raises its mmap threshold to the largest block freed so far (up to 32 MiB),
  after which such buffers come from the heap and fragment it: peak memory then grows with the
  number of blocks, i.e. with N. (Not set for every job: the projection loop, whose memory stays
  flat anyway, runs measurably slower with it.) Returns whether the threshold was set (False off
  glibc: no-op).
  """
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
