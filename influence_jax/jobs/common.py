"""What every job does: atomic file writes, the optimizer from a config, fault injection, writers,
glibc's mmap threshold.

Atomic writes go to a temporary name in the same directory, are flushed, then renamed over the
target, so a reader (or a job killed half-way) never sees a half-written file.
"""

from __future__ import annotations

import csv
import ctypes
import io
import json
import os
import platform
import signal
from typing import Any, Callable, Optional

import numpy as np


def atomic_write(path: str, write: Callable[[Any], None], *, binary: bool = False) -> str:
  """Calls write(file) on a temporary file beside `path`, then renames it to `path`; returns `path`."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
  try:
    with open(tmp, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def save_checked_npz(path: str, fingerprint: str, arrays: dict) -> str:
  """Writes `arrays` atomically as .npz with their checksum and `fingerprint` (what they belong to)."""
  from influence_jax import checkpoint  # noqa: PLC0415 (jax after the flags)

  record = dict(arrays, checksum=np.asarray(checkpoint.fingerprint(arrays)), fingerprint=np.asarray(fingerprint))
  buffer = io.BytesIO()
  np.savez(buffer, **record)
  return atomic_write(path, lambda f: f.write(buffer.getvalue()), binary=True)


def load_checked_npz(path: str, fingerprint: str) -> Optional[dict]:
  """Returns the arrays of `save_checked_npz` when the file exists, is intact and belongs to
  `fingerprint`; else None (missing, damaged, or from other inputs)."""
  from influence_jax import checkpoint  # noqa: PLC0415

  try:
    with np.load(path) as f:
      record = {k: f[k] for k in f.files}
  except (OSError, ValueError, EOFError):
    return None
  checksum, owner = str(record.pop("checksum", "")), str(record.pop("fingerprint", ""))
  if owner != fingerprint or checkpoint.fingerprint(record) != checksum:
    return None
  return record


def atomic_write_text(path: str, text: str) -> str:
  """Writes `text` to `path` atomically; returns `path`."""
  return atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: str, obj: Any) -> str:
  """Writes `obj` as indented JSON to `path` atomically; returns `path`."""
  return atomic_write_text(path, json.dumps(obj, indent=1, default=_json_default) + "\n")


def atomic_write_csv(path: str, rows: list) -> str:
  """Writes `rows` (lists, the first the header) as CSV to `path` atomically; returns `path`."""
  return atomic_write(path, lambda f: csv.writer(f).writerows(rows))


def atomic_save_npy(path: str, array: np.ndarray) -> str:
  """Saves `array` as .npy to `path` atomically; returns `path`."""
  buffer = io.BytesIO()
  np.save(buffer, np.asarray(array))
  return atomic_write(path, lambda f: f.write(buffer.getvalue()), binary=True)


def _json_default(x):
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, (set, tuple)):
    return list(x)
  raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def optimizer_from_config(train_config):
  """Returns the optax optimizer named by config.train: optimizer ('adam' | 'sgd'), learning_rate, momentum."""
  import optax  # noqa: PLC0415 (the core never imports optax)

  name = train_config.get("optimizer", "adam")
  if name == "adam":
    return optax.adam(train_config.learning_rate)
  if name == "sgd":
    return optax.sgd(train_config.learning_rate, momentum=train_config.get("momentum", 0.9))
  raise ValueError(f"Unknown config.train.optimizer {name!r}; expected 'adam' or 'sgd'.")


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
