"""Fault injection over the jobs (subprocesses on tests/user_task.py, a small config): a kill between
commits, damaged files, two jobs on one work directory, bad values in the data and the config. Each
job either ends with exactly an uninterrupted run's outputs or refuses with a named error and a
non-zero exit; none exits 0 with missing or different results."""

import os
import shutil

import pytest

from influence_jax.jobs import lock
from tests.user_task_jobs import run, table


def read(path):
  with open(path) as f:
    return f.read()


def flip_byte(path, offset=None):
  data = bytearray(read_bytes(path))
  data[len(data) // 2 if offset is None else offset] ^= 0x10
  with open(path, "wb") as f:
    f.write(bytes(data))


def read_bytes(path):
  with open(path, "rb") as f:
    return f.read()


def largest_file(directory):
  files = [os.path.join(d, n) for d, _, names in os.walk(directory) for n in names]
  return max(files, key=os.path.getsize)


def copy(reference, workdir, *names):
  for name in names:
    shutil.copytree(os.path.join(reference, name), os.path.join(workdir, name))


def refused(proc, *phrases):
  """True when the job exited 1 with one line naming the problem (no traceback)."""
  text = proc.stderr
  return (proc.returncode == 1 and "Traceback" not in text and all(p in text for p in phrases)), text[-2000:]


def test_kill_between_the_eigenspace_and_its_reports_then_rerun_writes_them(reference, data_dir, tmp_path):
  w = str(tmp_path / "w")
  proc = run("fit_eigenspace.py", w, data_dir, "--fault_injection=fit_saved:0", check=False)
  assert proc.returncode == -9 and os.path.isdir(os.path.join(w, "eigenspace"))
  assert not os.path.exists(os.path.join(w, "eigenvalues.json"))
  assert os.path.exists(os.path.join(w, lock.LOCK_FILE))  # Left by the killed job: it must not block.
  run("fit_eigenspace.py", w, data_dir)
  want = read(os.path.join(reference, "eigenvalues.json"))
  assert read(os.path.join(w, "eigenvalues.json")) == want and os.path.exists(os.path.join(w, "spectrum.png"))
  # A garbled or deleted report is rewritten from the committed eigenspace by the next run.
  with open(os.path.join(w, "eigenvalues.json"), "w") as f:
    f.write('{"eigenvalues": [1.0')
  os.remove(os.path.join(w, "spectrum.png"))
  run("fit_eigenspace.py", w, data_dir)
  assert read(os.path.join(w, "eigenvalues.json")) == want and os.path.exists(os.path.join(w, "spectrum.png"))


def test_a_flipped_byte_in_the_eigenspace_is_refused(reference, data_dir, tmp_path):
  w = str(tmp_path / "w")
  copy(reference, w, "eigenspace", "store")
  flip_byte(largest_file(os.path.join(w, "eigenspace")))
  ok, text = refused(run("score.py", w, data_dir, check=False), "eigenspace", "Delete it and rerun")
  assert ok, text
  assert not os.path.exists(os.path.join(w, "scores"))


def test_damaged_arnoldi_progress_is_recomputed(reference, data_dir, tmp_path):
  w = str(tmp_path / "w")
  proc = run("fit_eigenspace.py", w, data_dir, "--fault_injection=arnoldi:25", check=False)
  assert proc.returncode == -9
  progress = os.path.join(w, "arnoldi_progress")
  steps = sorted((n for n in os.listdir(progress) if n.isdigit()), key=int)
  assert steps == ["10", "20"], steps
  flip_byte(largest_file(os.path.join(progress, "20")))  # The newest step, the one a resume reads.
  run("fit_eigenspace.py", w, data_dir)
  assert read(os.path.join(w, "eigenvalues.json")) == read(os.path.join(reference, "eigenvalues.json"))


def test_a_damaged_or_missing_store_chunk_is_named_then_reprojected(reference, data_dir, tmp_path):
  w = str(tmp_path / "w")
  copy(reference, w, "eigenspace", "store")
  flip_byte(os.path.join(w, "store", "projections", "c", "1", "0"))
  os.remove(os.path.join(w, "store", "sq_norms", "c", "1"))
  ok, text = refused(run("score.py", w, data_dir, check=False), "damaged: chunk(s) [1]", "scripts/project.py")
  assert ok, text
  assert not os.path.exists(table(w, "top_k.csv"))
  run("project.py", w, data_dir)  # Re-projects chunk 1 only.
  run("score.py", w, data_dir)
  for name in ("top_k.csv", "self_influence.csv"):
    assert read(table(w, name)) == read(table(reference, name))


def test_a_second_job_on_a_held_workdir_is_refused(reference, data_dir, tmp_path):
  w = str(tmp_path / "w")
  copy(reference, w, "eigenspace", "store")
  with lock.workdir_lock(w):
    ok, text = refused(run("score.py", w, data_dir, check=False), "in use by another job", f"pid {os.getpid()}")
    assert ok, text
  assert not os.path.exists(os.path.join(w, "scores"))
  run("score.py", w, data_dir)  # Released: the lock file left behind does not block.
  assert read(table(w, "top_k.csv")) == read(table(reference, "top_k.csv"))


@pytest.mark.parametrize("bad", ["nan", "label"])
def test_a_bad_training_example_is_named_not_projected(data_dir, tmp_path, bad):
  w = str(tmp_path / "w")
  extra = ("--config.task=user_task_config:bad_row_task", "--config.user.bad_row=70", f"--config.user.bad={bad}")
  run("fit_eigenspace.py", w, data_dir, *extra)
  ok, text = refused(run("project.py", w, data_dir, *extra, check=False), "Training set", "rows [70]")
  assert ok, text
  assert 70 // 64 not in [int(n[len("chunk_"):]) for n in os.listdir(os.path.join(w, "store", "done"))]


@pytest.mark.parametrize("extra, key", [
    (["--config.project.method=jvp"], "method"),  # No such key: the store needs per-example gradients.
    (["--config.arnoldi.damping=-1"], "arnoldi.damping"),
    (["--config.arnoldi.damping=nan"], "arnoldi.damping"),
    (["--config.score.batch_size=0"], "score.batch_size"),
    (["--config.arnoldi.block_size=0"], "arnoldi.block_size"),
    (["--config.score.top_k=-2"], "score.top_k"),
    (["--config.score.preconditioner=exact"], "score.preconditioner"),
    (["--config.score.solve_block=0"], "score.solve_block"),
])
def test_bad_config_values_are_refused_naming_the_key(reference, data_dir, tmp_path, extra, key):
  proc = run("score.py", str(tmp_path / "w"), data_dir, *extra, check=False)
  assert proc.returncode != 0 and key in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert not os.path.exists(os.path.join(tmp_path, "w", "scores"))
