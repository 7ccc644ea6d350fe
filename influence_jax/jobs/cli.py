"""The one way every script in scripts/ runs: `cli.run(job, check_config)`, with the flags shared by all
of them (--config, --workdir (local or gs://), --lease_seconds, --quiet, --fault_injection, and the multi-process flags
--coordinator_address, --num_processes, --process_id for jax.distributed). `check_config` checks the
config file's keys against the job's own defaults before the job starts."""

from __future__ import annotations

import dataclasses
import logging as py_logging
import os
import sys
from typing import Any, Callable, Optional

from absl import app, flags, logging
from ml_collections import config_flags

from influence_jax import paths
from influence_jax.jobs import config as config_lib

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file (configs/*.py); override keys with "
    "--config.a.b=value. An unknown key, in the file or an override, is an error.", lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and outputs (created if needed), local "
                              "or gs://BUCKET/PATH; required unless the config names its own workdir.")
LEASE_SECONDS = flags.DEFINE_float(
    "lease_seconds", 60.0, "With a gs:// workdir: how long the job's lease on it lasts unless renewed (it is "
    "renewed every third of that while the job runs): how long a killed job blocks the next one.")
QUIET = flags.DEFINE_bool("quiet", False, "Log only warnings and the final result (no progress).")
FAULT = flags.DEFINE_string(
    "fault_injection", None, "For resume tests: 'arnoldi:N', 'project:N' or 'score:N' SIGKILLs the job "
    "after Arnoldi step N, projection batch N or scoring block N; 'fit_saved:0' after the eigenspace "
    "is saved, before its reports.")

COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for a multi-process run (jax.distributed); "
    "unset: one process. Every process gets the same --config and --workdir (a shared directory).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")

flags.mark_flags_as_required(["config"])


class _QuietLibraries(py_logging.Filter):
  """Drops INFO records of orbax and other libraries: the job's own progress stays readable."""

  NOISY = ("orbax", "etils", "tensorstore", "jax/_src")

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or not any(n in record.pathname for n in self.NOISY)


def initialize_distributed() -> None:
  """Joins a multi-process run when --coordinator_address is given (before any JAX computation).

  On CPU the cross-process collectives use gloo. Raises ValueError naming
  the missing flag when the three flags are not given together.
  """
  given = {"--coordinator_address": COORDINATOR.value, "--num_processes": NUM_PROCESSES.value,
           "--process_id": PROCESS_ID.value}
  if all(v is None for v in given.values()):
    return
  missing = [name for name, v in given.items() if v is None]
  if missing:
    raise ValueError(f"A multi-process run needs --coordinator_address, --num_processes and --process_id "
                     f"together; missing {', '.join(missing)}.")
  from influence_jax import sharding  # noqa: PLC0415 (imports jax; no computation yet)
  sharding.initialize_distributed(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)


@dataclasses.dataclass(frozen=True)
class Invocation:
  """What a job runs with: the config file's config (with its overrides), the workdir (absolute, created),
  --quiet and --fault_injection."""

  config: Any
  workdir: str
  quiet: bool
  fault: Optional[str]

  def context(self):
    """Returns the stages' Context (`jobs.context.prepare`): the config checked, the task loaded."""
    from influence_jax.jobs import context  # noqa: PLC0415 (jax after the flags)

    return context.prepare(self.config, self.workdir)


def _setup() -> Invocation:
  """Joins a multi-process run (if asked), creates the workdir, sets log verbosity."""
  initialize_distributed()
  config = CONFIG.value
  workdir = WORKDIR.value or (config.get("workdir", None) if hasattr(config, "get") else None)
  if not workdir:
    raise ValueError("--workdir is required (this config has no workdir of its own).")
  workdir = paths.absolute(workdir)
  paths.check_endpoints(workdir)
  paths.makedirs(workdir)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  logging.set_verbosity(logging.WARNING if QUIET.value else logging.INFO)
  if "workdir" in config:
    config.workdir = workdir
  return Invocation(config, workdir, QUIET.value, FAULT.value)


# Errors that mean "this input cannot be used" (bad config, foreign or damaged store, missing stage):
# reported as one line naming the problem, exit status 1, no traceback (INFLUENCE_JAX_DEBUG=1 shows it).
USER_ERRORS = (ValueError, TypeError, FileNotFoundError)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad --config override (an unknown key, a value of the wrong type)
  reported as one line naming it and exit status 1 instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.stderr.write(f"Error: {e}\nPass --helpfull to see the flags.\n")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    sys.stderr.write(f"Error: a --config override names an unknown key or has a value of the wrong type "
                     f"({type(e).__name__}: {e}); overrides given: {' '.join(bad) or 'none'}.\n")
  sys.exit(1)


def run(job: Callable[[Invocation], Any],
        check_config: Callable[[Any], None] = config_lib.check_job_keys) -> None:
  """Runs `job(invocation)` as an absl program: every script's one entry point.

  `check_config(config)` runs first and raises ValueError for a key the job does not know (set in
  the config file: ml_collections checks only the overrides); the default checks against
  `jobs.default_config()` (fit, project, score, train, run_all); a job with other keys passes its own
  (`config.check_keys` against its defaults). The workdir is locked for the job's lifetime (a second
  job on it is refused), a user error (bad config, foreign or damaged files, a missing stage) ends as
  one line naming it with exit status 1 (INFLUENCE_JAX_DEBUG=1 shows the traceback), and the job's
  XLA compilations are counted and logged.
  """

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from influence_jax.jobs import compilations, lock  # noqa: PLC0415 (jax after the flags)

    try:
      check_config(CONFIG.value)
      invocation = _setup()
      with lock.workdir_lock(invocation.workdir, LEASE_SECONDS.value), compilations.counting() as count:
        job(invocation)
        logging.warning("%s: %s", os.path.basename(sys.argv[0]), count.describe())
    except USER_ERRORS + (lock.WorkdirBusy,) as e:
      if os.environ.get("INFLUENCE_JAX_DEBUG"):
        raise
      sys.stderr.write(f"Error: {e}\n")
      sys.exit(1)

  app.run(main, flags_parser=parse_flags)
