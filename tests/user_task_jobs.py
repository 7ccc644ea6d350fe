"""Running tests/user_task.py's jobs as a user would (subprocesses from tests/), for the job tests."""

import csv
import json
import os
import re
import subprocess
import sys

from tests import user_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
CONFIG = os.path.join(TESTS, "user_task_config.py")


def run(script, workdir, data_dir, *extra, check=True):
  """Runs a job the way a user would: from the directory holding their task module."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, os.path.join(ROOT, "scripts", script), f"--config={CONFIG}", f"--workdir={workdir}",
         "--quiet", f"--config.user.data_dir={data_dir}", *extra]
  proc = subprocess.run(cmd, env=env, cwd=TESTS, capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return proc


def table(workdir, name, query_set="queries"):
  """Returns the path of a query set's output `name` (top_k.csv, summary.json, influence_grid.png) in
  scores/<query_set>/, or for "self_influence.csv" the store's ranking that the set's summary names."""
  directory = os.path.join(workdir, "scores", query_set)
  if name != "self_influence.csv":
    return os.path.join(directory, name)
  with open(os.path.join(directory, "summary.json")) as f:
    return os.path.join(workdir, "scores", json.load(f)["self_influence"])


def rows(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def make_data_dir(directory):
  user_task.write_data(directory)
  return directory


def compilations(proc):
  """Returns the XLA compilation count a job reported on its last line."""
  return int(re.search(r"(\d+) XLA compilations", proc.stderr).group(1))


# {workdir: {script: XLA compilations}} of the pipelines make_reference ran in this process.
REFERENCE_COMPILATIONS = {}


def make_reference(workdir, data_dir):
  """Runs fit → project → score uninterrupted in `workdir`; returns it."""
  counts = REFERENCE_COMPILATIONS.setdefault(workdir, {})
  for script in ("fit_eigenspace.py", "project.py", "score.py"):
    counts[script] = compilations(run(script, workdir, data_dir))
  return workdir
