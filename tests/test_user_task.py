"""A user's own model and on-disk data through the task interface: fit → project → score as jobs,
tables against in-memory influence, a second query set from the same store, kills, bad inputs."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import influence_jax as ij
from influence_jax import checkpoint, galerkin, sharding, sources
from influence_jax.jobs import context
from influence_jax.jobs import workdir as workdir_lib
from tests import user_task, user_task_config
from tests.user_task_jobs import REFERENCE_COMPILATIONS, compilations, rows, run
from tests.user_task_jobs import table as table_path


def in_memory_scores(workdir, data_dir, queries_prefix):
  """Returns (scores (T, N), self-influence (N,)) from influence_jax.influence on the same data."""
  train = user_task.NpySource(data_dir, "train")
  queries = user_task.NpySource(data_dir, queries_prefix)
  batch = lambda s: {"x": np.asarray(s.x, np.float32), "y": np.asarray(s.y, np.int32)}
  params = user_task.trained_params(train)
  es = checkpoint.load_eigenspace(os.path.join(workdir, "eigenspace"))
  # The score job's default: each query solved by the Galerkin solve on the stored directions W = [U; V]
  # over the curvature sample (jobs/queries.py), x̂ = Wᵀ(W C Wᵀ + δI)⁻¹W∇ℓ(x) + (I − WᵀW)∇ℓ(x)/c, here dotted
  # with the training gradients themselves (no store, no sketch).
  sample = curvature_sample(len(train))
  curvature = {"x": np.asarray(train.x, np.float32)[sample], "y": np.asarray(train.y, np.int32)[sample]}
  basis = saved_residual_basis(workdir, data_dir, es)[:, :es.num_params]
  w = ij.residual_basis.stored_directions(es.eigenvectors, basis)
  es = es.replace(damping=user_task_config.get_config().arnoldi.damping)
  c = ij.eigenspace.default_tail_constant(es)
  h_w = galerkin.restricted_curvature(ij.curvature.curvature_operator(user_task.loss, params, [curvature]), w)
  inverse = galerkin.galerkin_inverse(h_w, es.damping, c).inverse
  solved = ij.preconditioning.apply_tail_inverse(w, jnp.asarray(inverse, w.dtype), c, ij.projection.gradients(
      user_task.per_example_loss, params, [batch(queries)]))
  scores = solved @ ij.projection.gradients(user_task.per_example_loss, params, [batch(train)]).T
  proj = ij.project(es, user_task.per_example_loss, params, [batch(train)])
  grads = ij.projection.gradients(user_task.per_example_loss, params, [batch(train)])
  self_infl = ij.self_influence(es, proj, sq_norms=np.sum(np.asarray(grads) ** 2, axis=1))
  return np.asarray(scores), np.asarray(self_infl)


def saved_residual_basis(workdir, data_dir, es):
  """Returns the store's residual basis V as the jobs saved it (orbax), on the host (r, P)."""
  config = user_task_config.get_config()
  config.user.data_dir = data_dir
  ctx = context.prepare(config, str(workdir), task=user_task.get_task(config))
  return np.asarray(sharding.to_host(workdir_lib.load_residual_basis(ctx, es)))


def curvature_sample(num_train):
  """Returns the rows of the jobs' curvature sample (config.arnoldi.num_examples of them, config.seed)."""
  config = user_task_config.get_config()
  return sources.sample_indices(num_train, config.arnoldi.num_examples, config.seed)


def assert_tables_match(workdir, query_set, scores, self_infl, k=5):
  table = rows(table_path(workdir, "top_k.csv", query_set))
  assert len(table) == scores.shape[0] * 2 * k
  tol = 1e-5 * np.abs(scores).max()  # Float rounding: rows whose scores tie to it may swap ranks.
  seen = set()
  for r in table:
    t, j, rank = int(r["test_id"]), int(r["train_id"]), int(r["rank"]) - 1
    order = np.argsort(-scores[t] if r["kind"] == "proponent" else scores[t], kind="stable")
    assert order[rank] == j or abs(scores[t, j] - scores[t, order[rank]]) <= tol, r
    assert (t, r["kind"], j) not in seen, r
    seen.add((t, r["kind"], j))
    np.testing.assert_allclose(float(r["score"]), scores[t, j], rtol=2e-3, atol=1e-4 * np.abs(scores).max())
  table = rows(table_path(workdir, "self_influence.csv", query_set))
  assert [int(r["train_id"]) for r in table] == list(np.argsort(-self_infl, kind="stable"))
  np.testing.assert_allclose([float(r["self_influence"]) for r in table], np.sort(self_infl)[::-1], rtol=2e-3)


def test_tables_equal_in_memory_influence(reference, data_dir):
  scores, self_infl = in_memory_scores(reference, data_dir, "queries")
  assert_tables_match(reference, "queries", scores, self_infl)
  labels = {r["train_id"]: r["train_label"] for r in rows(table_path(reference, "top_k.csv"))}
  y = np.load(os.path.join(data_dir, "train_y.npy"))
  assert all(int(label) == y[int(j)] for j, label in labels.items())


def test_second_query_set_reuses_the_store(reference, data_dir, tmp_path):
  chunk = os.path.join(reference, "store", "projections", "c", "0", "0")
  before = os.stat(chunk).st_mtime_ns
  log = str(tmp_path / "reads.log")
  run("score.py", reference, data_dir, "--config.score.queries=user_task:other_queries",
      "--config.score.name=other", f"--config.user.read_log={log}")
  assert os.stat(chunk).st_mtime_ns == before  # The store was not rewritten ...
  with open(log) as f:
    read = {int(line) for line in f}
  # ... nor the training set projected again: the reads are at most the curvature sample (its digest;
  # H_W was saved with the store by the first query set) and a few rows for labels and a fingerprint.
  assert len(read - set(curvature_sample(300).tolist())) < 60
  scores, self_infl = in_memory_scores(reference, data_dir, "other")
  assert_tables_match(reference, "other", scores, self_infl)


def test_compilations_do_not_grow_with_the_data(reference, tmp_path):
  data_dir = str(tmp_path / "data")
  os.makedirs(data_dir)
  user_task.write_data(data_dir, num_train=900)  # 3 × the reference's rows, chunks and batches.
  counts = {s: compilations(run(s, str(tmp_path / "w"), data_dir))
            for s in ("fit_eigenspace.py", "project.py", "score.py")}
  assert counts == REFERENCE_COMPILATIONS[reference]


@pytest.mark.parametrize("stage, fault", [("project.py", "project:2"), ("score.py", "score:2")])
def test_sigkill_then_rerun_gives_identical_outputs(reference, data_dir, tmp_path, stage, fault):
  workdir = str(tmp_path / "w")
  shutil.copytree(os.path.join(reference, "eigenspace"), os.path.join(workdir, "eigenspace"))
  if stage == "score.py":
    shutil.copytree(os.path.join(reference, "store"), os.path.join(workdir, "store"))
  else:
    run("project.py", workdir, data_dir, f"--fault_injection={fault}", check=False)
    assert 0 < len(os.listdir(os.path.join(workdir, "store", "done"))) < 5
    run("project.py", workdir, data_dir)
  proc = run("score.py", workdir, data_dir, f"--fault_injection={'score:2' if stage == 'score.py' else 'none'}",
             check=False)
  if stage == "score.py":
    assert proc.returncode == -9 and not os.path.exists(table_path(workdir, "top_k.csv"))
    run("score.py", workdir, data_dir)
  want, got = ij.open_store(os.path.join(reference, "store")), ij.open_store(os.path.join(workdir, "store"))
  for name, value in want.read(0, 300).items():
    np.testing.assert_array_equal(got.read(0, 300)[name], value)
  for table in ("top_k.csv", "self_influence.csv"):
    with open(table_path(workdir, table)) as f, open(table_path(reference, table)) as g:
      assert f.read() == g.read()


def test_solves_killed_between_blocks_resume_with_identical_tables(reference, data_dir, tmp_path):
  """CG iterations over the curvature sample in blocks of 2 of the 7 queries: killed after the second
  block (its progress saved), the rerun resumes there and writes the uninterrupted run's tables."""
  workdir = str(tmp_path / "w")
  for part in ("eigenspace", "store"):
    shutil.copytree(os.path.join(reference, part), os.path.join(workdir, part))
  solve = ["--config.score.cg_iters=2", "--config.score.solve_block=2"]
  run("score.py", workdir, data_dir, *solve, "--config.score.name=whole")
  proc = run("score.py", workdir, data_dir, *solve, "--fault_injection=solve:2", check=False)
  assert proc.returncode == -9 and not os.path.exists(table_path(workdir, "top_k.csv"))
  assert os.path.exists(os.path.join(workdir, "scores", "queries", "progress", "solves_process_0000.npz"))
  proc = run("score.py", workdir, data_dir, *solve, "--verbosity=0", "--noquiet")
  assert "solving queries: resuming at 4/7" in proc.stderr
  for name in ("top_k.csv", "self_influence.csv"):
    with open(table_path(workdir, name)) as f, open(table_path(workdir, name, "whole")) as g:
      assert f.read() == g.read()
  with open(table_path(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["cg"]["queries"] == 7 and summary["cg"]["iterations"] == 2
  assert summary["galerkin"]["directions"] == summary["k"] + summary["residual_rank"]
  assert summary["solve_examples"] == 100 and summary["preconditioner"] == "galerkin"
  # A smaller query-side sample (score.solve_examples) is another H_W and other scores, never the saved ones.
  run("score.py", workdir, data_dir, *solve, "--config.score.solve_examples=40", "--config.score.name=small")
  with open(table_path(workdir, "summary.json", "small")) as f:
    assert json.load(f)["solve_examples"] == 40
  with open(table_path(workdir, "top_k.csv", "small")) as f, open(table_path(workdir, "top_k.csv", "whole")) as g:
    assert f.read() != g.read()


def test_store_from_other_settings_is_refused(reference, data_dir, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(reference, workdir)
  proc = run("project.py", workdir, data_dir, "--config.project.sketch_dim=16", check=False)
  assert proc.returncode == 1 and "other inputs" in proc.stderr and "store" in proc.stderr
  proc = run("score.py", workdir, data_dir, "--config.project.sketch_dim=16", check=False)
  assert proc.returncode == 1 and "another eigenspace or training set" in proc.stderr


@pytest.mark.parametrize("extra, message", [
    (["--config.score.queries=user_task_config:empty_queries"], "is empty"),
    (["--config.score.queries=user_task_config:ragged_queries"], "differs from"),
    (["--config.score.top_k=0"], "config.score.top_k = 0"),
    (["--config.task=user_task:no_such_factory"], "has no attribute 'no_such_factory'"),
])
def test_bad_inputs_are_refused_with_a_sentence(reference, data_dir, extra, message):
  proc = run("score.py", reference, data_dir, *extra, check=False)
  assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
