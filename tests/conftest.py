"""Test set-up: 8 virtual CPU devices (before JAX starts), float64 available, one XLA compilation cache per run."""

import os
import tempfile
import uuid

os.environ.setdefault("XLA_FLAGS", "")
# One persistent XLA compilation cache per test run, shared by its workers and the jobs they start
# (inherited through the environment): a job run again (kill and resume, a second query set) loads
# its programs instead of compiling them, which halves a small job's time. JAX writes an entry with
# a plain non-atomic write and, without a size limit, reads it without a lock, so a process reading
# an entry another one is still writing deserialises a truncated executable and crashes (seen as a
# test worker's segfault); a size limit makes JAX take a file lock around every read and write. With
# it every write also lists the whole cache (to evict), so only programs that took a second or more
# to compile are kept: the few hundred that make a job's rerun fast, not the thousands of small ones
# that made each write slower than the compile it saved. The
# directory is the run's own (named by the first process, inherited by the xdist workers it starts),
# so an entry left half-written by a killed run is never read by a later one; the process that named
# it removes it when the run ends.
_OWNS_CACHE = "INFLUENCE_JAX_TEST_RUN" not in os.environ
_RUN = os.environ.setdefault("INFLUENCE_JAX_TEST_RUN", uuid.uuid4().hex)
XLA_CACHE_DIR = os.path.join(tempfile.gettempdir(), "influence_jax_test_xla_cache", _RUN)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", XLA_CACHE_DIR)
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", True)


import shutil  # noqa: E402

import pytest  # noqa: E402


def pytest_sessionfinish(session):
  """The process that named the run's compilation cache (xdist's controller, or pytest alone) removes it."""
  del session
  if _OWNS_CACHE:
    shutil.rmtree(XLA_CACHE_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """tests/user_task.py's on-disk data set (one per test worker)."""
  from tests import user_task_jobs  # noqa: PLC0415
  return user_task_jobs.make_data_dir(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="session")
def reference(tmp_path_factory, data_dir):
  """An uninterrupted fit → project → score of tests/user_task.py (one per test worker)."""
  from tests import user_task_jobs  # noqa: PLC0415
  return user_task_jobs.make_reference(str(tmp_path_factory.mktemp("reference")), data_dir)
