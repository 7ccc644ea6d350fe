"""Issue 27: answers a user can trust on their own model.

On a small ReLU net fitted to flipped labels (tests/relu_task.py), run in-process through the stages:
the default curvature is Gauss-Newton and nothing warns; the Hessian with a small damping is reported
indefinite by the fit, and CG's non-positive curvature by the score job; the normalised tables rank
same-label proponents first where the plain table ranks flipped labels first. Also the fit's
diagnostics (k kept and why, unconverged pairs, spectrum.png) and the config key checks.
"""

import csv
import json
import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest

import influence_jax as ij
from influence_jax import diagnostics as diagnostics_lib
from influence_jax import eigenspace as eigenspace_lib
from influence_jax import store as store_lib
from influence_jax.jobs import config as config_lib
from influence_jax.jobs import context, plots, queries, score, stages
from influence_jax.jobs import task as task_lib
from influence_jax.jobs import workdir as workdir_lib
from tests import relu_task


def _config(**arnoldi):
  c = relu_task.get_config()
  c.arnoldi.damping = 1e-5  # Small: below the Hessian's most negative eigenvalue (≈ −8e-4).
  for key, value in arnoldi.items():
    c.arnoldi[key] = value
  c.score.normalize = "none,relative,cosine"
  return c


def _proponents(path):
  with open(path) as f:
    return [r for r in csv.DictReader(f) if r["kind"] == "proponent"]


def _rates(path, flipped):
  """Returns (share of proponents with the query's label, share of proponents with a flipped label)."""
  rows = _proponents(path)
  return (float(np.mean([r["test_label"] == r["train_label"] for r in rows])),
          float(np.mean([flipped[int(r["train_id"])] for r in rows])))


@pytest.fixture(scope="module")
def gauss_newton_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("relu_gn"))
  ctx = context.prepare(_config(), workdir)
  return ctx, stages.all_stages(ctx, quiet=True)


def test_default_is_gauss_newton_and_nothing_warns(gauss_newton_run):
  ctx, paths = gauss_newton_run
  assert ctx.config.arnoldi.curvature == "auto" and ctx.curvature == "gauss_newton"
  with open(paths["eigenvalues"]) as f:
    record = json.load(f)
  assert record["curvature"] == "gauss_newton" and "SplitLoss" in record["curvature_choice"]
  diag = record["diagnostics"]
  assert diag["positive_definite"] is True and diag["warning"] is None
  assert diag["min_ritz_value"] > 0 and diag["num_negative_ritz"] == 0
  assert diag["top_k"] == diag["k"] == 80 and diag["why_fewer"] == ""
  with open(paths["summary"]) as f:
    summary = json.load(f)
  assert summary["curvature"] == "gauss_newton"
  # The default query side, the Galerkin solve on W = [U; V]: W(C + δI)Wᵀ positive definite, nothing raised.
  assert summary["galerkin"]["min_eigenvalue"] > 0 and summary["galerkin"]["raised_to_tail_constant"] == 0


def test_normalised_tables_rank_same_label_proponents_first(gauss_newton_run):
  ctx, paths = gauss_newton_run
  u = ctx.config.user
  flipped = relu_task.make_data(u.num_train, u.num_queries, u.flip_fraction, u.seed)["flipped"]
  plain, relative, cosine = (_rates(paths[k], flipped) for k in ("top_k", "top_k_relative", "top_k_cosine"))
  # The plain table: flipped labels (15 % of the training set) fill ≥ 30 % of the proponents' places,
  # about half of them share the query's label. Normalised: flipped labels nearly vanish.
  assert plain[1] >= 0.3 and plain[0] <= 0.6, plain
  for rates in (relative, cosine):
    assert rates[1] <= 0.1, rates
    assert rates[0] >= plain[0] + 0.2, (rates, plain)


def test_relative_table_is_the_library_relative_influence(gauss_newton_run):
  """The relative table is `ij.relative_influence` of the scores against every stored row, with the
  floor the job used (summary.json), ranked."""
  ctx, paths = gauss_newton_run
  with open(paths["summary"]) as f:
    summary = json.load(f)
  es = workdir_lib.load_eigenspace(ctx)
  store = store_lib.open_store(ctx.path("store"), workdir_lib.store_fingerprint(ctx))
  vectors = queries.project_queries(ctx, es, store, task_lib.query_source(ctx.task, ctx.config))
  rows = store.read(0, store.meta.num_rows, ("projections", "sketch", "sq_norms"))
  scores = vectors.vectors.astype(np.float64) @ np.concatenate([rows["projections"], rows["sketch"]], 1).T.astype(np.float64)
  inverse = np.asarray(eigenspace_lib.inverse_eigenvalues(es), np.float64)
  selfs = score.stored_self_influence(rows, inverse, eigenspace_lib.default_tail_constant(es))
  relative = np.asarray(ij.relative_influence(jnp.asarray(scores), jnp.asarray(selfs),
                                              floor=summary["normalization_floors"]["relative"]))
  table = _proponents(paths["top_k_relative"])
  for t in range(0, 40, 7):
    ids = [int(r["train_id"]) for r in table if int(r["test_id"]) == t]
    np.testing.assert_array_equal(ids[:3], np.argsort(-relative[t], kind="stable")[:3])


@pytest.mark.parametrize("tail,cg_iters", [(False, 0), (True, 0)])
def test_normalised_tables_without_solves(gauss_newton_run, tail, cg_iters):
  """Every query side (no tail, the plain tail) gives the normalised tables; no solves, no "cg" report."""
  ctx, paths = gauss_newton_run
  c = _config()
  c.score.tail, c.score.cg_iters, c.score.normalize, c.score.name = tail, cg_iters, "cosine,relative", f"t{tail:d}"
  out = stages.score_stage(context.prepare(c, ctx.workdir, task=ctx.task), quiet=True)
  assert "top_k" not in out and os.path.exists(out["top_k_cosine"]) and os.path.exists(out["top_k_relative"])
  with open(out["summary"]) as f:
    summary = json.load(f)
  assert summary["normalize"] == ["cosine", "relative"] and "cg" not in summary
  u = ctx.config.user
  flipped = relu_task.make_data(u.num_train, u.num_queries, u.flip_fraction, u.seed)["flipped"]
  assert _rates(out["top_k_relative"], flipped)[1] <= 0.1


def test_hessian_with_small_damping_warns_in_fit_and_score(tmp_path, caplog):
  ctx = context.prepare(_config(curvature="hessian"), str(tmp_path))
  with caplog.at_level(logging.WARNING):
    stages.all_stages(ctx, quiet=True)
  with open(ctx.path("eigenvalues.json")) as f:
    diag = json.load(f)["diagnostics"]
  assert diag["positive_definite"] is False and diag["min_ritz_value"] < -1e-5
  assert "gauss_newton" in diag["warning"] and "indefinite" in caplog.text
  # More CG iterations: the solves reach the negative directions; the score job says which, where.
  ctx.config.score.cg_iters = 20
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    paths = stages.score_stage(ctx, quiet=True)
  with open(paths["summary"]) as f:
    report = json.load(f)["cg"]["non_positive_curvature"]
  assert report["queries"] > 0 and report["at_iteration"] and len(report["query_ids"]) == report["queries"]
  assert sum(report["at_iteration"].values()) == report["queries"]
  assert "non-positive curvature" in caplog.text and f"on {report['queries']} of 40 queries" in caplog.text


def test_gauss_newton_needs_a_split_loss(tmp_path, data_dir):
  from tests import user_task_config  # noqa: PLC0415

  c = user_task_config.get_config()
  c.user.data_dir = data_dir
  c.task = "tests.user_task:get_task"
  ctx = context.prepare(c, str(tmp_path))
  assert ctx.curvature == "hessian" and "not a SplitLoss" in ctx.curvature_choice[1]  # "auto": the plain loss
  c.arnoldi.curvature = "gauss_newton"
  with pytest.raises(ValueError, match="needs Task.loss_fn as an influence_jax.SplitLoss"):
    context.prepare(c, str(tmp_path))


# ----------------------------------------------------------------------------- fit diagnostics


def test_diagnose_names_why_fewer_pairs_were_kept():
  # An indefinite quadratic: 6 positive and 4 negative eigenvalues, 10 Arnoldi steps, 8 asked for.
  values = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.5, -0.1, -0.2, -0.3, -0.4])
  q = np.linalg.qr(np.random.default_rng(0).normal(size=(10, 10)))[0]
  h = jnp.asarray(q @ np.diag(values) @ q.T)
  loss = lambda p, batch: 0.5 * p @ h @ p
  es = ij.fit_eigenspace(loss, jnp.zeros(10), [{"x": np.zeros((1,))}], n_iters=10, top_k=8, damping=0.2)
  diag = diagnostics_lib.diagnose(es)
  assert diag.k == 6 and diag.top_k == 8
  assert "only 6 of the 10 Ritz values are positive" in diag.why_fewer and "4 are negative" in diag.why_fewer
  assert diag.min_ritz_value == pytest.approx(-0.4, abs=1e-4) and diag.positive_definite is False
  assert "damping above 0.4" in diag.indefinite_warning()
  assert diagnostics_lib.diagnose(es, damping=0.5).positive_definite is True
  assert [level for level, _ in diag.notes()] == ["warning", "warning"]


def test_diagnose_flags_unconverged_pairs():
  values = jnp.array([3.0, 2.0, 1.0])
  es = eigenspace_lib.Eigenspace(values, jnp.eye(3), jnp.array([1e-6, 1e-3, 0.5]), jnp.zeros(3), num_params=3)
  diag = diagnostics_lib.diagnose(es, residual_tol=1e-2)
  assert diag.unconverged == (2,) and diag.max_relative_residual == pytest.approx(0.5)
  assert diagnostics_lib.diagnose(es, residual_tol=1e-4).unconverged == (1, 2)


def test_spectrum_marks_unconverged_pairs():
  fig = plots.spectrum_figure(np.array([3.0, 2.0, 1.0, 0.5]), np.array([1e-7, 1e-7, 1e-2, 5e-2]), 1e-3,
                              unconverged=(2, 3), residual_tol=1e-2, min_ritz_value=-0.05)
  labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
  assert "unconverged pair (2)" in labels and "residual, unconverged" in labels
  assert any(label.startswith("tolerance 0.01") for label in labels)
  assert any("most negative Ritz value" in label for label in labels)
  marked = [line for line in fig.axes[0].get_lines() if line.get_label() == "unconverged pair (2)"][0]
  np.testing.assert_array_equal(marked.get_xdata(), [3, 4])  # 1-based positions of pairs 2 and 3


# ----------------------------------------------------------------------------- config keys


def test_unknown_keys_are_named_with_a_suggestion():
  c = config_lib.default_config()
  c.arnoldi.topk = 5
  with pytest.raises(ValueError, match=r"config\.arnoldi\.topk is not a key .* Did you mean config\.arnoldi\.top_k\?"):
    config_lib.check_job_keys(c)
  c = config_lib.default_config()
  c.scores = {"top_k": 3}  # A near miss of a job section.
  with pytest.raises(ValueError, match=r"Did you mean config\.score\?"):
    config_lib.check_job_keys(c)
  c = config_lib.default_config()
  c.model = {"anything": 1}  # A task's own section, and config.user, are free.
  c.user.whatever = 2
  config_lib.check_job_keys(c)


def test_normalize_values():
  assert config_lib.normalizations("none") == ("none",)
  assert config_lib.normalizations("none, cosine") == ("none", "cosine")
  for bad in ("", "rel", "none,none", 3):
    assert config_lib.normalizations(bad) == ()
  c = relu_task.get_config()
  c.score.normalize = "cosinus"
  with pytest.raises(ValueError, match="config.score.normalize"):
    config_lib.validate(c)


def test_without_measured_residuals_arnoldi_estimates_flag_the_same_pairs():
  """arnoldi.residuals off: the pairs flagged by Arnoldi's own estimates are those the measured residuals flag."""
  values = np.geomspace(10.0, 0.01, 40)
  q = np.linalg.qr(np.random.default_rng(1).normal(size=(40, 40)))[0]
  h = jnp.asarray(q @ np.diag(values) @ q.T)
  loss = lambda p, batch: 0.5 * p @ h @ p
  fit = lambda residuals: ij.fit_eigenspace(loss, jnp.zeros(40), [{"x": np.zeros((1,))}], n_iters=14, top_k=12,
                                            compute_residuals=residuals)
  measured, estimated = (diagnostics_lib.diagnose(fit(r), residual_tol=1e-3) for r in (True, False))
  assert measured.residuals_measured and not estimated.residuals_measured
  assert 0 < len(measured.unconverged) < 12 and estimated.unconverged == measured.unconverged
  assert "by Arnoldi's estimate" in dict((m, l) for l, m in estimated.notes() if l == "warning").popitem()[0]
