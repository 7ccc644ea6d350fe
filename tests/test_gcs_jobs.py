"""The jobs on a gs:// workdir against a real GCS emulator (fake-gcs-server on 127.0.0.1, started here):
one process killed and resumed there, a second job refused naming the holder of the lease, two processes
writing one store; the tables equal a local one-process run's."""

import os
import time

import pytest

import influence_jax as ij
from influence_jax import io as io_lib
from influence_jax import paths
from influence_jax.jobs import lock
from tests.gcs_emulator import BUCKET, emulator_env, running_emulator
from tests.test_jobs import run_job
from tests.test_multihost_jobs import FEATURES, _compare_outputs, run_processes
from tests.user_task_jobs import table

OUTPUTS = ("eigenvalues.json", "scores/queries/top_k.csv", "scores/queries/summary.json")


@pytest.fixture(scope="module")
def bucket():
  """The emulator, with this process's environment (and so the jobs') pointed at it; yields gs://BUCKET."""
  with running_emulator() as url:
    saved = {k: os.environ.get(k) for k in emulator_env(url)}
    os.environ.update(emulator_env(url))
    try:
      yield f"gs://{BUCKET}"
    finally:
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v


@pytest.fixture(scope="module")
def local(tmp_path_factory):
  """Train, fit, project and score in one process on a local disk (the reference)."""
  workdir = str(tmp_path_factory.mktemp("local"))
  run_job("run_all.py", workdir, FEATURES)
  return workdir


def download(workdir: str, to: str) -> str:
  """Copies a gs:// workdir's reports and tables to the local directory `to`; returns it."""
  summary = paths.join(workdir, "scores", "queries", "summary.json")
  names = list(OUTPUTS) + ["scores/" + io_lib.read_json(summary)["self_influence"]]
  for name in names:
    os.makedirs(os.path.dirname(os.path.join(to, name)), exist_ok=True)
    with open(os.path.join(to, name), "wb") as f:
      f.write(paths.read_bytes(paths.join(workdir, name)))
  return to


def upload(directory: str, to: str) -> None:
  for d, _, names in os.walk(directory):
    for n in names:
      with open(os.path.join(d, n), "rb") as f:
        paths.write_bytes(paths.join(to, os.path.relpath(os.path.join(d, n), directory)), f.read())


def read(path):
  with open(path, "rb") as f:
    return f.read()


def test_a_job_killed_on_gs_resumes_and_a_second_job_is_refused(bucket, local, tmp_path):
  w = f"{bucket}/one"
  upload(os.path.join(local, "model"), paths.join(w, "model"))  # The same model (training is tested elsewhere).
  proc = run_job("run_all.py", w, FEATURES, "--fault_injection=project:2", "--lease_seconds=2", check=False)
  assert proc.returncode == -9, proc.stderr[-3000:]
  done = paths.listdir(paths.join(w, "store", "done"))
  assert done and len(done) < 5 and not paths.exists(paths.join(w, "scores")), done
  # The killed job's lease expires 2 s after its last renewal (before the kill); then this process takes
  # the workdir, and a job started now is refused naming it.
  time.sleep(2.5)
  with lock.workdir_lock(w, lease_seconds=60):
    proc = run_job("score.py", w, FEATURES, check=False)
    assert proc.returncode == 1 and "in use by another job" in proc.stderr and f"pid {os.getpid()}" in proc.stderr, \
        proc.stderr[-2000:]
  run_job("run_all.py", w, FEATURES)  # Resumes the store from the chunks done, then scores.
  got = download(w, str(tmp_path / "got"))
  for name in ("eigenvalues.json", "scores/queries/top_k.csv"):
    assert read(os.path.join(got, name)) == read(os.path.join(local, name)), name
  assert read(table(got, "self_influence.csv")) == read(table(local, "self_influence.csv"))
  assert not paths.exists(paths.join(w, lock.LOCK_FILE))  # Released at the end.


def test_two_processes_on_gs_match_one_local_process(bucket, local, tmp_path):
  w = f"{bucket}/two"
  upload(os.path.join(local, "model"), paths.join(w, "model"))  # Training is single-process.
  run_processes("run_all.py", w, FEATURES, "--config.mesh_shape=(2,4)")
  _compare_outputs(download(w, str(tmp_path / "got")), local)
  got, want = ij.open_store(paths.join(w, "store")), ij.open_store(os.path.join(local, "store"))
  assert got.done_chunks() == want.done_chunks() == list(range(5))  # Both processes' chunks.


def test_a_paper_job_on_gs_writes_what_it_writes_locally(bucket, tmp_path):
  from tests.test_memorization import _run  # noqa: PLC0415

  w, here = f"{bucket}/memorization", str(tmp_path / "m")
  _run("memorization.py", "memorization_digits.py", w)
  _run("memorization.py", "memorization_digits.py", here)
  assert paths.read_bytes(paths.join(w, "memorization.csv")) == read(os.path.join(here, "memorization.csv"))
  got, want = io_lib.read_json(paths.join(w, "metrics.json")), io_lib.read_json(os.path.join(here, "metrics.json"))
  assert got.pop("seconds") > 0 and want.pop("seconds") > 0 and got == want
  assert paths.read_bytes(paths.join(w, "histogram.png"))[:8] == b"\x89PNG\r\n\x1a\n"
