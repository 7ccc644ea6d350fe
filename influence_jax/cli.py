"""Flags shared by the absl jobs in scripts/: --config, --workdir, --quiet, --fault_injection."""

from __future__ import annotations

import logging as py_logging
import os

from absl import flags, logging
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file (configs/*.py); override keys with "
    "--config.a.b=value. An unknown key is an error.", lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and outputs (created if needed).")
QUIET = flags.DEFINE_bool("quiet", False, "Log only warnings and the final result (no progress).")
FAULT = flags.DEFINE_string(
    "fault_injection", None, "For resume tests: 'arnoldi:N' or 'score:N' SIGKILLs the job after "
    "Arnoldi step N or scoring batch N.")

flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(py_logging.Filter):
  """Drops INFO records of orbax and other libraries: the job's own progress stays readable."""

  NOISY = ("orbax", "etils", "tensorstore", "jax/_src")

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or not any(n in record.pathname for n in self.NOISY)


def setup() -> tuple:
  """Returns (config, workdir, quiet, fault) after creating the workdir and setting log verbosity."""
  workdir = os.path.abspath(WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if QUIET.value:
    logging.set_verbosity(logging.WARNING)
  else:
    logging.set_verbosity(logging.INFO)
  return CONFIG.value, workdir, QUIET.value, FAULT.value
