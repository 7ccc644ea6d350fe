"""Test set-up: 8 virtual CPU devices (before JAX starts) and float64 available."""

import os

os.environ.setdefault("XLA_FLAGS", "")
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
