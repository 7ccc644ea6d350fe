"""Memorization labels, A(z) against dense exact influence, the removal loop, and the jobs (float64, tiny)."""

import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from influence_jax.eigenspace import fit_eigenspace
from influence_jax.examples import models
from influence_jax.methods import classification as cl
from influence_jax.methods import last_layer as ll
from influence_jax.methods import memorization as mz
from influence_jax.methods import selective_removal as sr
from tests import toy_problems

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C, PER_CLASS, L2 = 3, 6, 1e-3
CENTERS = np.array([[3.0, 0.0], [-1.5, 2.6], [-1.5, -2.6]])


def _memorization_problem(mislabelled=(0,), seed=0):
  """Blobs of 3 classes in 2-D plus one "identity" feature per training point (memorization capacity).

  The points in `mislabelled` lie in their true class's blob but carry the next class's label;
  their identity feature lets a linear model fit them anyway. Reference points have no identity feature.
  """
  rng = np.random.default_rng(seed)
  n = C * PER_CLASS
  y_true = np.repeat(np.arange(C), PER_CLASS).astype(np.int32)
  pos = CENTERS[y_true] + 0.6 * rng.normal(size=(n, 2))
  x = np.concatenate([pos, 2.0 * np.eye(n)], axis=1)
  y = y_true.copy()
  y[list(mislabelled)] = (y[list(mislabelled)] + 1) % C
  ry = np.repeat(np.arange(C), 4).astype(np.int32)
  rx = np.concatenate([CENTERS[ry] + 0.6 * rng.normal(size=(ry.size, 2)), np.zeros((ry.size, n))], axis=1)
  return x, y, y_true, rx, ry


def _logits(params, batch):
  return batch["x"] @ params["kernel"] + params["bias"]


def _per_example_ce(params, batch):
  return models.softmax_cross_entropy(_logits(params, batch), batch["y"])


def _loss(params, batch):
  return jnp.mean(_per_example_ce(params, batch)) + 0.5 * L2 * jnp.sum(ravel_pytree(params)[0] ** 2)


def _newton_fit(x, y):
  flat0, unravel = ravel_pytree({"bias": np.zeros(C), "kernel": np.zeros((x.shape[1], C))})
  batch = {"x": x, "y": y}
  objective = lambda f: _loss(unravel(f), batch)
  return unravel(toy_problems.newton_to_tolerance(objective, flat0, tol=1e-14, final_tol=1e-12))


MISLABELLED = (0, 7)


@pytest.fixture(scope="module")
def fitted():
  """(x, y, rx, ry, params): the problem with points 0 and 7 mislabelled, fitted by Newton (float64)."""
  x, y, _, rx, ry = _memorization_problem(mislabelled=MISLABELLED)
  return x, y, rx, ry, _newton_fit(x, y)


def test_mislabelled_points_are_memorized_and_clean_points_generalize(fitted):
  x, y, rx, ry, params = fitted
  mem = mz.last_layer_memorization(x, y, rx, ry, params["kernel"], params["bias"], l2=L2)
  bad = np.isin(np.arange(y.size), MISLABELLED)
  assert np.all(mem.own_margin[bad] > 0)  # the mislabelled points are fitted (through their identity features)
  assert np.all(mem.influence[bad] <= 0) and np.all(mem.label[bad] == mz.MEMORIZED)
  assert np.all(mem.influence[~bad] > 0) and np.all(mem.label[~bad] == mz.GENERALIZES)
  np.testing.assert_array_equal(mem.strength, np.abs(mem.influence))
  assert np.all(mem.self_influence > 0)
  np.testing.assert_array_equal(np.sort(sr.removal_ranking(mem)), MISLABELLED)


def test_labels_follow_the_documented_rule():
  a = np.array([0.5, -0.2, -0.1, 0.0, -0.3, 0.2])
  m = np.array([1.0, 2.0, -1.0, 0.5, 0.3, -2.0])
  s = np.array([1.0, 5.0, 9.0, 0.1, 2.0, 3.0])
  mem = mz.memorization_labels(a, m, s)
  np.testing.assert_array_equal(mem.label, [0, 1, 2, 1, 1, 0])  # A = 0 and fitted counts as memorized
  mem = mz.memorization_labels(a, m, s, min_self_influence=1.5)
  np.testing.assert_array_equal(mem.label, [0, 1, 2, 2, 1, 0])
  np.testing.assert_array_equal(sr.removal_ranking(mem), [4, 1])
  np.testing.assert_array_equal(sr.removal_ranking(mem, np.array([10, 11, 12, 13, 14, 15])), [14, 11])
  with pytest.raises(ValueError, match="one length"):
    mz.memorization_labels(a, m[:3], s)
  with pytest.raises(ValueError, match="influence"):
    mz.memorization_labels(np.array([np.nan]), np.ones(1), np.ones(1))


@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_A_is_the_mean_exact_classification_influence(fitted, damping):
  x, y, rx, ry, params = fitted
  mem = mz.last_layer_memorization(x, y, rx, ry, params["kernel"], params["bias"], l2=L2, damping=damping)
  train, ref = {"x": x, "y": y}, {"x": rx, "y": ry}
  cls = cl.exact_classification_influence(_loss, _per_example_ce, _logits, params, [ref], [train], damping=damping)
  np.testing.assert_allclose(mem.influence, np.mean(np.asarray(cls), axis=0), rtol=1e-9, atol=1e-12)
  hess = jax.hessian(lambda f: _loss(ravel_pytree(params)[1](f), train))(ravel_pytree(params)[0])
  g = jax.vmap(lambda xi, yi: jax.grad(lambda f: _per_example_ce(ravel_pytree(params)[1](f),
                                                                  {"x": xi[None], "y": yi[None]})[0])(
      ravel_pytree(params)[0]))(jnp.asarray(x), jnp.asarray(y))
  s = np.einsum("np,np->n", g, np.linalg.solve(hess + damping * np.eye(hess.shape[0]), g.T).T)
  np.testing.assert_allclose(mem.self_influence, s, rtol=1e-9)
  np.testing.assert_allclose(mem.own_margin, cl.margin(_logits(params, train), y), rtol=1e-12)
  curv = ll.fit_last_layer(x, y, params["kernel"], params["bias"], l2=L2, damping=damping,
                           factorization="eigh")
  by_eigh = mz.last_layer_memorization(x, y, rx, ry, params["kernel"], params["bias"], l2=L2, curvature=curv)
  np.testing.assert_allclose(by_eigh.influence, mem.influence, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(by_eigh.self_influence, mem.self_influence, rtol=1e-9)


def test_eigenspace_path_equals_exact_with_the_full_spectrum():
  x, y, _, rx, ry = _memorization_problem(mislabelled=(0, 7))
  x, rx = x[:, :6], rx[:, :6]  # 2 blob + 4 identity features: p = 7·3 = 21 parameters
  params = _newton_fit(x, y)
  train, ref = {"x": x, "y": y}, {"x": rx, "y": ry}
  p = ravel_pytree(params)[0].size
  es = fit_eigenspace(_loss, params, [train], n_iters=p, top_k=p, damping=0.02)
  mem = mz.eigenspace_memorization(es, _per_example_ce, _logits, params, [train], [ref])
  cls = cl.exact_classification_influence(_loss, _per_example_ce, _logits, params, [ref], [train], damping=0.02)
  np.testing.assert_allclose(mem.influence, np.mean(np.asarray(cls), axis=0), rtol=1e-7, atol=1e-10)
  closed = mz.last_layer_memorization(x, y, rx, ry, params["kernel"], params["bias"], l2=L2, damping=0.02)
  np.testing.assert_allclose(mem.self_influence, closed.self_influence, rtol=1e-7)
  np.testing.assert_array_equal(mem.label, closed.label)


def test_eigenspace_path_with_top_k_and_tail_matches_its_formula(fitted):
  x, y, rx, ry, params = fitted
  train, ref = {"x": x, "y": y}, {"x": rx, "y": ry}
  es = fit_eigenspace(_loss, params, [train], n_iters=20, top_k=8, damping=0.01)
  u, lam = np.asarray(es.eigenvectors), np.asarray(es.eigenvalues)
  c = lam.min() + 0.01
  h_inv = u.T @ np.diag(1 / (lam + 0.01)) @ u + (np.eye(u.shape[1]) - u.T @ u) / c
  flat, unravel = ravel_pytree(params)
  g_ref = jax.vmap(lambda xi, yi: jax.grad(lambda f: cl.margin(_logits(unravel(f), {"x": xi[None]}), yi[None])[0])(
      flat))(jnp.asarray(rx), jnp.asarray(ry))
  g = jax.vmap(lambda xi, yi: jax.grad(lambda f: _per_example_ce(unravel(f), {"x": xi[None], "y": yi[None]})[0])(
      flat))(jnp.asarray(x), jnp.asarray(y))
  for tail in (False, True):
    hi = h_inv if tail else u.T @ np.diag(1 / (lam + 0.01)) @ u
    mem = mz.eigenspace_memorization(es, _per_example_ce, _logits, params, [train], [ref], tail=tail)
    np.testing.assert_allclose(mem.influence, -np.mean(g_ref, 0) @ hi @ np.asarray(g).T, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mem.self_influence, np.einsum("np,pq,nq->n", g, hi, g), rtol=1e-9)


def test_split_linen_last_layer_reproduces_the_logits():
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(5, 64)))
  for module in (models.MLP(features=(7, 5)), models.CNN(features=(2, 3))):
    variables = module.init(jax.random.key(0), x[:2])
    split = mz.split_linen_last_layer(module, variables)
    h = split.features_fn(x)
    assert h.ndim == 2 and h.shape[1] == split.kernel.shape[0]
    np.testing.assert_allclose(h @ split.kernel + split.bias, module.apply(variables, x), rtol=1e-12)
  with pytest.raises(ValueError, match="no top-level layer 'head'"):
    mz.split_linen_last_layer(models.MLP(features=(3,)), variables, layer="head")
  with pytest.raises(ValueError, match="not a Dense layer"):
    mz.split_linen_last_layer(module, variables, layer="conv_0")


def test_select_removals_takes_the_budget_in_order_and_never_twice():
  removed = np.zeros(10, bool)
  removed[[3]] = True
  np.testing.assert_array_equal(sr.select_removals([5, 3, 1, 8, 2], 3, removed), [5, 1, 8])
  np.testing.assert_array_equal(sr.select_removals([5, 3], 4, removed), [5])
  assert sr.select_removals([5, 3], 0, removed).size == 0
  with pytest.raises(ValueError, match="repeats"):
    sr.select_removals([5, 5], 1, removed)
  with pytest.raises(ValueError, match="outside"):
    sr.select_removals([10], 1, removed)


def test_removal_loop_drops_the_budgeted_most_negative_points():
  x, y, _, rx, ry = _memorization_problem(mislabelled=(0, 1, 7, 8, 13, 14), seed=1)
  params = {"bias": jnp.zeros(C), "kernel": jnp.zeros((x.shape[1], C))}
  seen = []

  def rank(params, kept, event):
    mem = mz.last_layer_memorization(x[kept], y[kept], rx, ry, params["kernel"], params["bias"], l2=L2)
    seen.append((kept, mem))
    return sr.removal_ranking(mem, kept)

  budgets = (2, 3)
  _, hist = sr.train_with_removal(_loss, params, {"x": x, "y": y}, optimizer=optax.adam(0.1), num_epochs=60,
                                  batch_size=6, removal_epochs=(30, 45), rank_fn=rank, budgets=budgets)
  assert len(hist.removed) == 2
  assert any((mem.label == mz.MEMORIZED).sum() > b for (_, mem), b in zip(seen, budgets))  # a budget binds
  for (kept, mem), dropped, budget in zip(seen, hist.removed, budgets):
    candidates = mem.label == mz.MEMORIZED
    assert candidates.sum() >= 1  # the check below is not vacuous
    want = kept[candidates][np.argsort(mem.influence[candidates], kind="stable")][:budget]
    np.testing.assert_array_equal(dropped, want)
    assert np.all(mem.influence[np.isin(kept, dropped)] <= 0)
  all_removed = np.concatenate(hist.removed)
  assert np.unique(all_removed).size == all_removed.size
  assert not np.any(np.isin(all_removed, seen[1][0]) & np.isin(all_removed, hist.removed[0]))
  assert hist.kept.sum() == x.shape[0] - all_removed.size and not hist.kept[all_removed].any()
  n1 = x.shape[0] - hist.removed[0].size
  np.testing.assert_array_equal(hist.kept_per_epoch, [x.shape[0]] * 30 + [n1] * 15 + [hist.kept.sum()] * 15)
  assert hist.example_epochs == hist.kept_per_epoch.sum()
  with pytest.raises(ValueError, match="removal_epochs"):
    sr.train_with_removal(_loss, params, {"x": x, "y": y}, optimizer=optax.adam(0.1), num_epochs=10,
                          batch_size=6, removal_epochs=(10,), rank_fn=rank, budgets=1)


def _run(script, config, workdir, *extra):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  small = ["--config.data.num_train=150", "--config.data.num_test=60", "--config.train.num_epochs=30",
           "--config.train.batch_size=32", "--config.model.features=(16,)"]
  cmd = [sys.executable, os.path.join(ROOT, "scripts", script), f"--config={os.path.join(ROOT, 'configs', config)}",
         f"--workdir={workdir}", "--quiet", *small, *extra]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_memorization_job_writes_its_outputs(tmp_path):
  workdir = str(tmp_path / "m")
  _run("memorization.py", "memorization_digits.py", workdir)
  metrics = json.load(open(os.path.join(workdir, "metrics.json")))
  assert metrics["num_train"] == 150 and metrics["num_flipped"] == 30
  for key in ("auc_minus_A", "auc_self_influence", "precision_memorized", "recall_memorized"):
    assert 0.0 <= metrics[key] <= 1.0
  rows = list(csv.DictReader(open(os.path.join(workdir, "memorization.csv"))))
  assert len(rows) == 150 and sum(int(r["flipped"]) for r in rows) == 30
  assert {r["memorization_label"] for r in rows} <= set(mz.LABEL_NAMES)
  a = [float(r["A"]) for r in rows]
  assert a == sorted(a)
  assert all((r["memorization_label"] == "generalizes") == (float(r["A"]) > 0) for r in rows)
  assert metrics["num_memorized"] == sum(r["memorization_label"] == "memorized" for r in rows)
  with open(os.path.join(workdir, "histogram.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_selective_removal_job_writes_its_table(tmp_path):
  workdir = str(tmp_path / "r")
  proc = _run("selective_removal.py", "selective_removal_digits.py", workdir, "--config.removal.num_seeds=2",
              "--config.removal.epochs=(10,20)", "--config.removal.budgets=(5,5)")
  table = open(os.path.join(workdir, "removal.md")).read()
  assert "Over 2 seeds" in table and table in proc.stdout and table.count("\n| ") == 6  # header + 5 arms
  runs = json.load(open(os.path.join(workdir, "removal.json")))["runs"]
  assert [r["seed"] for r in runs] == [0, 1]
  for r in runs:
    assert r["none"]["num_removed"] == 0 and r["none"]["example_epochs"] == 150 * 30
    assert r["influence"]["num_removed"] <= 10
    for arm in ("random", "lowest_A", "self_influence"):
      assert r[arm]["removed_per_event"] == r["influence"]["removed_per_event"]
    assert r["influence"]["example_epochs"] == 150 * 30 - 20 * r["influence"]["removed_per_event"][0] - \
        10 * r["influence"]["removed_per_event"][1]
