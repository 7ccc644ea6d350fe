"""The absl jobs as subprocesses: outputs, resume after SIGKILL, refusal of foreign checkpoints."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import influence_jax as ij
from tests.user_task_jobs import table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "--config.data.num_train=160", "--config.data.num_test=12", "--config.train.num_epochs=10",
    "--config.train.batch_size=32", "--config.model.features=(16,)", "--config.arnoldi.n_iters=24",
    "--config.arnoldi.top_k=12", "--config.arnoldi.checkpoint_every=5", "--config.arnoldi.block_size=8",
    "--config.project.batch_size=32", "--config.project.chunk_rows=32", "--config.score.top_k=4",
    "--config.score.rows_per_block=32", "--config.score.checkpoint_every=2",
]


def run_job(script, workdir, *extra, check=True):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, os.path.join(ROOT, "scripts", script), "--config", os.path.join(ROOT, "configs/digits_mlp.py"),
         f"--workdir={workdir}", "--quiet", *SMALL, *extra]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return proc


def read(path):
  with open(path) as f:
    return f.read()


def stored(workdir):
  """Returns every array of the workdir's projection store."""
  store = ij.open_store(os.path.join(workdir, "store"))
  return store.read(0, store.meta.num_rows)


def outputs(workdir):
  """Returns the deterministic outputs of fit, project and score."""
  ev = json.loads(read(os.path.join(workdir, "eigenvalues.json")))
  return (ev, read(table(workdir, "top_k.csv")), read(table(workdir, "self_influence.csv")), stored(workdir))


def assert_same_outputs(got, ref):
  assert got[0] == ref[0] and got[1] == ref[1] and got[2] == ref[2]
  assert got[3].keys() == ref[3].keys()
  for name in ref[3]:
    np.testing.assert_array_equal(got[3][name], ref[3][name])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reference"))
  proc = run_job("run_all.py", workdir)
  assert "Done. Results in" in proc.stdout
  return workdir


def test_jobs_write_their_outputs(reference):
  ev = json.loads(read(os.path.join(reference, "eigenvalues.json")))
  assert len(ev["eigenvalues"]) == 12 and ev["eigenvalues"] == sorted(ev["eigenvalues"], reverse=True)
  assert all(r < 1e-2 * ev["eigenvalues"][0] for r in ev["residuals"][:3])
  for path in (os.path.join(reference, "spectrum.png"), table(reference, "influence_grid.png")):
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  rows = list(csv.DictReader(open(table(reference, "top_k.csv"))))
  assert len(rows) == 12 * 2 * 4
  pro = [float(r["score"]) for r in rows if r["kind"] == "proponent" and r["rank"] == "1"]
  opp = [float(r["score"]) for r in rows if r["kind"] == "opponent" and r["rank"] == "1"]
  assert min(pro) > 0 > max(opp)
  selfs = [float(r["self_influence"]) for r in csv.DictReader(open(table(reference, "self_influence.csv")))]
  assert len(selfs) == 160 and selfs == sorted(selfs, reverse=True) and selfs[-1] >= 0


def test_separate_jobs_equal_run_all(reference, tmp_path):
  workdir = str(tmp_path / "w")
  for script in ("train.py", "fit_eigenspace.py", "project.py", "score.py"):
    run_job(script, workdir)
  assert_same_outputs(outputs(workdir), outputs(reference))


# Kills inside project and score are tested on a user task (tests/test_user_task.py, test_faults.py)
# and on two processes (test_multihost_jobs.py); here, the demo's fit, resumed from saved progress.
@pytest.mark.parametrize("fault", ["arnoldi:13"])
def test_sigkill_then_rerun_equals_uninterrupted(reference, tmp_path, fault):
  workdir = str(tmp_path / "w")
  shutil.copytree(os.path.join(reference, "model"), os.path.join(workdir, "model"))
  if not fault.startswith("arnoldi"):
    shutil.copytree(os.path.join(reference, "eigenspace"), os.path.join(workdir, "eigenspace"))
  if fault.startswith("score"):
    shutil.copytree(os.path.join(reference, "store"), os.path.join(workdir, "store"))
  proc = run_job("run_all.py", workdir, f"--fault_injection={fault}", check=False)
  assert proc.returncode == -9, proc.stderr[-2000:]
  run_job("run_all.py", workdir)
  assert_same_outputs(outputs(workdir), outputs(reference))


def test_foreign_checkpoint_is_refused(reference, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(reference, workdir)
  shutil.rmtree(os.path.join(workdir, "eigenspace"))
  # The saved model was trained with another L2: refused, not silently used.
  proc = run_job("fit_eigenspace.py", workdir, "--config.train.l2=0.5", check=False)
  assert proc.returncode != 0 and "different model, config or data set" in proc.stderr
  # Same model, other Arnoldi settings: the old progress must not be mixed in.
  shutil.rmtree(os.path.join(workdir, "arnoldi_progress"), ignore_errors=True)  # The reference's, if any.
  proc = run_job("fit_eigenspace.py", workdir, "--fault_injection=arnoldi:7", check=False)
  assert proc.returncode == -9, proc.stderr[-2000:]
  proc = run_job("fit_eigenspace.py", workdir, "--config.arnoldi.top_k=10", check=False)
  assert proc.returncode != 0 and "different model, config or data set" in proc.stderr


def _tree_state(directory):
  """Returns {relative path: (size, mtime_ns)} of every file under `directory`."""
  out = {}
  for base, _, files in os.walk(directory):
    for name in files:
      st = os.stat(os.path.join(base, name))
      out[os.path.relpath(os.path.join(base, name), directory)] = (st.st_size, st.st_mtime_ns)
  return out


def test_a_new_damping_rescores_from_the_same_eigenspace_and_store(reference, tmp_path):
  # δ is a scoring setting: the eigenspace and the store are reused untouched, and the tables equal
  # those of a fresh run at the new δ (same seed: the same Arnoldi basis, eigenspace and store).
  workdir = str(tmp_path / "w")
  shutil.copytree(reference, workdir)
  before = {d: _tree_state(os.path.join(workdir, d)) for d in ("eigenspace", "store")}
  run_job("score.py", workdir, "--config.arnoldi.damping=0.5")
  assert {d: _tree_state(os.path.join(workdir, d)) for d in ("eigenspace", "store")} == before
  fresh = str(tmp_path / "fresh")
  run_job("run_all.py", fresh, "--config.arnoldi.damping=0.5")
  for name in ("top_k.csv", "self_influence.csv"):
    got, want = read(table(workdir, name)), read(table(fresh, name))
    assert got == want, name
    assert got != read(table(reference, name)), f"{name} did not change with δ"
  summary = json.loads(read(table(workdir, "summary.json")))
  assert summary["damping"] == 0.5


def test_unknown_config_key_is_an_error(tmp_path):
  proc = run_job("train.py", str(tmp_path / "w"), "--config.train.learning_rat=0.1", check=False)
  assert proc.returncode != 0 and "learning_rat" in proc.stderr


@pytest.mark.parametrize("config, extra", [
    ("digits_cnn.py", ["--config.model.features=(4,4)"]),
    ("seq2seq_transformer.py", ["--config.data.num_examples=120", "--config.data.num_test=6",
                                "--config.model.d_model=8", "--config.model.d_ff=16"]),
])
def test_cnn_and_transformer_examples_run_end_to_end(tmp_path, config, extra):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  small = ["--config.train.num_epochs=2", "--config.arnoldi.n_iters=8", "--config.arnoldi.top_k=4",
           "--config.arnoldi.checkpoint_every=4", "--config.arnoldi.block_size=8", "--config.score.top_k=3",
           "--config.data.num_train=96", "--config.project.batch_size=48", "--config.score.tail=False",
           "--config.project.sketch_dim=0"]
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "run_all.py"), "--config", os.path.join(ROOT, "configs", config),
         f"--workdir={tmp_path}", "--quiet", *small, *extra]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = list(csv.DictReader(open(table(str(tmp_path), "top_k.csv"))))
  assert rows and all(np.isfinite(float(r["score"])) for r in rows)
  assert len(json.loads(read(tmp_path / "eigenvalues.json"))["eigenvalues"]) == 4
