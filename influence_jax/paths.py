"""Where the jobs' files live: a local directory or cloud object storage (`gs://BUCKET/PATH`), one API.

Every file a job reads or writes goes through these functions (`io` and `store` build on them):
local paths through the operating system, `gs://` paths through etils `epath` (the fsspec/gcsfs backend
that orbax uses too) and, for the store's arrays, tensorstore's `gcs` kvstore (`kvstore_spec`).

On object storage an object appears whole when its upload finishes, so `write_bytes` is atomic there
as it is locally (a temporary file renamed over the target). Directories do not exist on object
storage: `makedirs` is a no-op there and `isdir` means "some object lies under this prefix".

Emulators (tests, local development): gcsfs and google-cloud-storage read STORAGE_EMULATOR_HOST,
tensorstore (the store's arrays, orbax's arrays) TENSORSTORE_GCS_HTTP_URL; both must name the same
server (`check_endpoints`), or markers and arrays would land on different services.
"""

from __future__ import annotations

import os
import posixpath
from typing import Optional

REMOTE_SCHEMES = ("gs://",)


def is_remote(path: str) -> bool:
  """Returns True for a path on cloud object storage (gs://...)."""
  return str(path).startswith(REMOTE_SCHEMES)


def absolute(path: str) -> str:
  """Returns `path` made absolute (a local path against the working directory; gs:// as it is, without a
  trailing slash)."""
  path = str(path)
  return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def join(base: str, *parts: str) -> str:
  """Returns `base` joined with `parts` ('/' on object storage, the OS's separator locally)."""
  return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def basename(path: str) -> str:
  return posixpath.basename(str(path).rstrip("/"))


def dirname(path: str) -> str:
  return posixpath.dirname(str(path).rstrip("/")) if is_remote(path) else os.path.dirname(os.path.abspath(path))


def relative(path: str, start: str) -> str:
  """Returns `path` relative to `start` (both local or both on the same bucket)."""
  if is_remote(path):
    return posixpath.relpath(path[len("gs:/"):], start[len("gs:/"):])
  return os.path.relpath(path, start)


def _remote(path: str):
  """Returns the epath.Path of a gs:// path, with gcsfs's listing cache dropped (other processes and jobs
  write the same prefixes: a cached listing would hide their objects)."""
  from etils import epath  # noqa: PLC0415 (gcsfs is only needed for gs://)

  try:
    import gcsfs  # noqa: F401, PLC0415
  except ImportError as e:
    raise ValueError(f"{path}: a gs:// workdir needs gcsfs (pip install 'influence_jax[jobs]').") from e
  p = epath.Path(path)
  p._backend.fs(p).invalidate_cache()  # noqa: SLF001 (the fsspec filesystem epath holds)
  return p


def exists(path: str) -> bool:
  """Returns whether a file (or, on object storage, any object under the prefix) exists at `path`."""
  return _remote(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  """Returns whether `path` is a directory (object storage: a prefix some object lies under)."""
  return _remote(path).is_dir() if is_remote(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
  """Creates the directory `path` and its parents locally; nothing to do on object storage."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  """Returns the names directly under `path` ([] when there is nothing)."""
  if is_remote(path):
    p = _remote(path)
    return [c.name for c in p.iterdir()] if p.is_dir() else []
  return os.listdir(path) if os.path.isdir(path) else []


def read_bytes(path: str) -> bytes:
  """Returns the bytes of the file at `path`; raises FileNotFoundError when there is none."""
  if is_remote(path):
    p = _remote(path)
    if not p.exists():
      raise FileNotFoundError(path)
    return p.read_bytes()
  with open(path, "rb") as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode()


def write_bytes(path: str, data: bytes) -> str:
  """Writes `data` to `path` atomically (readers see the old file or the new one, never a part); returns
  `path`. Locally: a temporary file beside it, flushed, renamed over it."""
  if is_remote(path):
    _remote(path).write_bytes(data)
    return path
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def remove(path: str) -> None:
  """Deletes the file at `path` (nothing when there is none)."""
  try:
    if is_remote(path):
      p = _remote(path)
      if p.exists():
        p.unlink()
    else:
      os.remove(path)
  except FileNotFoundError:
    pass


def split_bucket(path: str) -> tuple[str, str]:
  """Returns (bucket, object prefix) of a gs:// path."""
  bucket, _, key = path[len("gs://"):].partition("/")
  if not bucket:
    raise ValueError(f"{path}: a gs:// path needs a bucket (gs://BUCKET/PATH).")
  return bucket, key.strip("/")


def kvstore_spec(path: str) -> dict:
  """Returns the tensorstore kvstore spec of the directory `path`: the "file" driver locally, "gcs" on
  object storage (it reaches TENSORSTORE_GCS_HTTP_URL when that is set)."""
  if is_remote(path):
    bucket, key = split_bucket(path)
    return {"driver": "gcs", "bucket": bucket, "path": key + "/"}
  return {"driver": "file", "path": os.path.abspath(path)}


def check_endpoints(path: str, environ: Optional[dict] = None) -> None:
  """Raises ValueError when `path` is on object storage and the emulator variables disagree: one client
  would write to an emulator and another to the real service (see the module docstring)."""
  if not is_remote(path):
    return
  env = os.environ if environ is None else environ
  emulator, tensorstore_url = env.get("STORAGE_EMULATOR_HOST"), env.get("TENSORSTORE_GCS_HTTP_URL")
  normal = lambda url: url if url is None or "://" in url else f"http://{url}"
  if normal(emulator) != normal(tensorstore_url):
    raise ValueError(
        f"--workdir={path}: STORAGE_EMULATOR_HOST ({emulator or 'unset'}) and TENSORSTORE_GCS_HTTP_URL "
        f"({tensorstore_url or 'unset'}) name different storage services; set both to the same emulator URL, "
        "or neither for Google Cloud Storage.")
  split_bucket(path)
