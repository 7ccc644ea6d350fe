"""Test set-up: 8 virtual CPU devices (before JAX starts), float64 available, one XLA compilation cache per run."""

import os
import tempfile
import uuid

os.environ.setdefault("XLA_FLAGS", "")
# One persistent XLA compilation cache per test run for the jobs the tests start (inherited through
# the environment): the suite runs the same small jobs over and over (kill and resume, a second query
# set, the same config in many tests), and a job that loads its programs instead of compiling them
# takes a third of the time. Every program is kept. JAX writes an entry with a plain non-atomic write
# and, without a size limit, reads it without a lock, so a process reading an entry another one is
# still writing deserialises a truncated executable and crashes; a size limit makes JAX take a file
# lock around every read and write. With it every write also lists the whole cache (to evict), so the
# test processes themselves, which compile thousands of programs that no other process runs, keep
# theirs out of it. The directory is the run's own (named by the first process, inherited by the
# xdist workers it starts), so an entry left half-written by a killed run is never read by a later
# one; the process that named it removes it when the run ends.
_OWNS_CACHE = "INFLUENCE_JAX_TEST_RUN" not in os.environ
_RUN = os.environ.setdefault("INFLUENCE_JAX_TEST_RUN", uuid.uuid4().hex)
XLA_CACHE_DIR = os.path.join(tempfile.gettempdir(), "influence_jax_test_xla_cache", _RUN)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", XLA_CACHE_DIR)
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
import jax  # noqa: E402

jax.config.update("jax_enable_compilation_cache", False)  # This process's programs: see above.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", True)


import gc  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops JAX's compiled programs after each test module. Every program the CPU backend compiles keeps a
  few memory mappings of its code (about 6) for as long as JAX caches it; a test worker that ran a few
  hundred test files' programs reached Linux's 65,530 mappings per process (vm.max_map_count), and LLVM
  then failed to compile with "Cannot allocate memory" (CI, one worker lost)."""
  yield
  jax.clear_caches()
  gc.collect()


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
