"""The command-line jobs sharded and on several processes: 2 processes × 4 CPU devices (gloo) against
the one-process outputs; eigenspaces saved on one mesh and loaded on another."""

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

import influence_jax as ij
from influence_jax import checkpoint, sharding
from tests import sharding_problem
from tests.test_jobs import ROOT, SMALL, run_job
from tests.user_task_jobs import table

REL = 2e-5  # float32 jobs, sums reordered by sharding (measured: 5e-7 of the largest score).
TIE = 1e-5


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# p = 75 × 18 + 10 = 1360 = 8 × 170 parameters: eigenvectors split over a 'model' axis of 8 unpadded.
FEATURES = "--config.model.features=(18,)"


def run_processes(script, workdir, *extra, num_processes=2, timeout=240, check=True):
  """Runs `script` in `num_processes` processes of 4 CPU devices joined on 127.0.0.1; returns them
  (with .log) once all ended. When one fails the others get 30 s, then are killed (no hang)."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4")
  env.pop("XLA_FLAGS", None)
  port = _free_port()
  logs = [tempfile.TemporaryFile("w+") for _ in range(num_processes)]
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "scripts", script), "--config", os.path.join(ROOT, "configs/digits_mlp.py"),
       f"--workdir={workdir}", "--quiet", *SMALL, *extra, f"--coordinator_address=127.0.0.1:{port}",
       f"--num_processes={num_processes}", f"--process_id={i}"],
      env=env, stdout=log, stderr=subprocess.STDOUT, text=True) for i, log in enumerate(logs)]
  deadline = time.monotonic() + timeout
  try:
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
      if any(p.returncode for p in procs):
        deadline = min(deadline, time.monotonic() + 30)
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, log in zip(procs, logs):
    log.seek(0)
    p.log = log.read()
    log.close()
  for i, p in enumerate(procs):
    assert not check or p.returncode == 0, f"{script} process {i} failed ({p.returncode}):\n{p.log[-3000:]}"
  return procs


def _rows(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def _assert_same_ranking(got, want, key, score):
  """Same rows in the same order, scores to REL; ids may swap only between scores tied within TIE."""
  assert len(got) == len(want)
  g = np.array([float(r[score]) for r in got])
  w = np.array([float(r[score]) for r in want])
  np.testing.assert_allclose(g, w, rtol=REL, atol=REL * np.abs(w).max())
  for i, (a, b) in enumerate(zip(got, want)):
    same = lambda r: {k: v for k, v in r.items() if k not in (key, score, "train_label")}
    assert same(a) == same(b)
    if a[key] != b[key]:  # a different example here must be one whose reference score ties with this one
      tied = [r[key] for r in want if abs(float(r[score]) - w[i]) <= TIE * max(1.0, abs(w[i]))
              and all(r[c] == b[c] for c in b if c not in (key, score, "rank", "train_label"))]
      assert a[key] in tied, f"row {i}: {a} instead of {b}"


def _compare_outputs(got_dir, want_dir):
  got_ev = json.load(open(os.path.join(got_dir, "eigenvalues.json")))
  want_ev = json.load(open(os.path.join(want_dir, "eigenvalues.json")))
  np.testing.assert_allclose(got_ev["eigenvalues"], want_ev["eigenvalues"], rtol=REL)
  assert got_ev["num_steps"] == want_ev["num_steps"] and got_ev["num_params"] == want_ev["num_params"]
  _assert_same_ranking(_rows(table(got_dir, "top_k.csv")), _rows(table(want_dir, "top_k.csv")), "train_id", "score")
  _assert_same_ranking(_rows(table(got_dir, "self_influence.csv")), _rows(table(want_dir, "self_influence.csv")),
                       "train_id", "self_influence")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
  """Train, fit and score in one process on one device (the reference)."""
  workdir = str(tmp_path_factory.mktemp("single"))
  run_job("run_all.py", workdir, FEATURES)
  return workdir


def test_two_processes_match_one_process(single, tmp_path):
  workdir = str(tmp_path / "multi")
  shutil.copytree(os.path.join(single, "model"), os.path.join(workdir, "model"))
  # Fit on a (1, 8) mesh: the Krylov basis is split over 'model' across both processes, so each
  # process saves its own columns. Both die after Arnoldi step 13 (progress saved at step 10).
  procs = run_processes("fit_eigenspace.py", workdir, FEATURES, "--config.mesh_shape=(1,8)",
                        "--fault_injection=arnoldi:13", check=False)
  assert all(p.returncode != 0 for p in procs), [p.log[-2000:] for p in procs]
  progress = os.path.join(workdir, "arnoldi_progress")
  assert sorted(os.listdir(progress), key=int) == ["5", "10"]
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(os.path.join(progress, "10", "state")))
  assert not os.path.exists(os.path.join(workdir, "eigenvalues.json"))
  # Resume on another mesh, (2, 4): the progress is restored onto this layout; then project, each
  # process projecting and writing its own chunks of the store; both die after projection batch 2
  # (chunks of 32 rows, 16 rows a process a batch: each has finished its first chunk).
  procs = run_processes("run_all.py", workdir, FEATURES, "--config.mesh_shape=(2,4)",
                        "--fault_injection=project:2", check=False)
  assert all(p.returncode != 0 for p in procs), [p.log[-2000:] for p in procs]
  assert os.path.exists(os.path.join(workdir, "eigenvalues.json"))
  assert sorted(os.listdir(os.path.join(workdir, "store", "done"))) == ["chunk_00000000", "chunk_00000002"]
  assert not os.path.exists(table(workdir, "top_k.csv"))
  # Score, killed after the first block of each process, then resumed.
  procs = run_processes("run_all.py", workdir, FEATURES, "--config.mesh_shape=(2,4)",
                        "--fault_injection=score:1", check=False)
  assert all(p.returncode != 0 for p in procs), [p.log[-2000:] for p in procs]
  run_processes("score.py", workdir, FEATURES, "--config.mesh_shape=(2,4)")
  _compare_outputs(workdir, single)
  # CG iterations on the mesh (12 queries in blocks of 4: vectors over 'model', queries over 'data'),
  # both processes killed after their second block, resumed: the one process's tables.
  solve = ["--config.score.cg_iters=2", "--config.score.solve_block=4", "--config.score.name=solved",
           "--config.score.checkpoint_every=1"]
  run_job("score.py", single, FEATURES, *solve)
  procs = run_processes("score.py", workdir, FEATURES, "--config.mesh_shape=(2,4)", *solve,
                        "--fault_injection=solve:2", check=False)
  assert all(p.returncode != 0 for p in procs), [p.log[-2000:] for p in procs]
  run_processes("score.py", workdir, FEATURES, "--config.mesh_shape=(2,4)", *solve)
  _assert_same_ranking(_rows(table(workdir, "top_k.csv", "solved")), _rows(table(single, "top_k.csv", "solved")),
                       "train_id", "score")
  got, want = ij.open_store(os.path.join(workdir, "store")), ij.open_store(os.path.join(single, "store"))
  for name, rows in want.read(0, 160).items():
    # The residual basis's trailing directions move with rounding (a float32 randomized SVD of a
    # slightly different eigenspace's remainders): its coordinates and the sketch of what is left
    # agree to 6e-5 of the largest (measured), the scores above to REL.
    rel = 1e-3 if name in ("residual", "sketch") else REL
    np.testing.assert_allclose(got.read(0, 160)[name], rows, rtol=rel, atol=rel * np.abs(rows).max())


def test_distributed_flags_come_together(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config",
                         os.path.join(ROOT, "configs/digits_mlp.py"), f"--workdir={tmp_path}",
                         "--coordinator_address=127.0.0.1:1"], env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode != 0 and "missing --num_processes, --process_id" in proc.stderr


@pytest.mark.parametrize("load_on", [(8, 1), (2, 4), None])
def test_eigenspace_saved_on_one_mesh_loads_on_another(tmp_path, load_on):
  params, loss, per_example, batches, _, _ = sharding_problem.problem()  # p = 136 = 8 × 17
  es = ij.fit_eigenspace(loss, params, batches, n_iters=16, top_k=6, damping=0.1,
                         mesh=sharding.make_mesh((1, 8)))
  assert es.eigenvectors.sharding.spec == sharding.BASIS_SPEC
  checkpoint.save_eigenspace(str(tmp_path / "es"), es, fingerprint="fp")
  mesh = None if load_on is None else sharding.make_mesh(load_on)
  back = checkpoint.load_eigenspace(str(tmp_path / "es"), fingerprint="fp", mesh=mesh)
  for name in ("eigenvalues", "eigenvectors", "residuals", "ritz_estimates"):
    np.testing.assert_array_equal(np.asarray(getattr(back, name)), np.asarray(getattr(es, name)))
  assert back.damping == 0.1 and back.info == es.info
  want = sharding.flat_sharding(sharding.mesh_or_default(mesh), 2)
  assert back.eigenvectors.sharding == want and back.eigenvalues.sharding.is_fully_replicated
  # The loaded eigenspace projects like the saved one.
  np.testing.assert_allclose(ij.project(back, per_example, params, batches, mesh=mesh),
                             ij.project(es, per_example, params, batches), rtol=1e-6, atol=1e-10)
