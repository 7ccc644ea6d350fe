"""Test set-up: 8 virtual CPU devices (before JAX starts), float64 available, a shared XLA compilation cache."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
# One persistent XLA compilation cache for the test processes and the jobs they start (inherited
# through the environment): a job run again (kill and resume, a second query set) loads its
# programs instead of compiling them, which halves a small job's time. Entries are keyed by the
# program, the compile options and the JAX version, so a stale entry is never used.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "influence_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", True)


import pytest  # noqa: E402


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
