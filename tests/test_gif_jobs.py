"""The GIF editing jobs as subprocesses on tiny configs: outputs written, consistent, and bad configs refused."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from influence_jax.jobs.papers import gif_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALES = (0.0, 1.0, 2.0)
TINY = [
    "--config.seeds=1", "--config.data.num_train=160", "--config.data.num_test=120", "--config.train.num_epochs=4",
    "--config.train.batch_size=32", "--config.edit.cg_max_iters=3", "--config.edit.hessian_examples=64",
    "--config.edit.neumann_iters=4", f"--config.edit.scales={SCALES}", "--config.edit.walk_max_steps=6",
]


def run_job(task, model, workdir, *extra):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, os.path.join(ROOT, "scripts", f"gif_{task}.py"),
         f"--config={os.path.join(ROOT, 'configs', f'gif_{task}_{model}.py')}", f"--workdir={workdir}", "--quiet",
         *TINY, *extra]
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def read_outputs(workdir):
  rows = list(csv.DictReader(open(os.path.join(workdir, "results.csv"))))
  rows = {r["model"]: {k: float(v) for k, v in r.items() if k not in ("model", "seed") and v != ""} for r in rows}
  record = json.load(open(os.path.join(workdir, "results.json")))
  md = open(os.path.join(workdir, "results.md")).read()
  return rows, record, md


def check_common(rows, record, md, columns, gap_keys, labels):
  names = ["original", "retrained"] + [f"{n} {solver}" for solver in ("neumann", "cg") for n in
                                       ["IF (all)"] + [f"{m} ({l})" for l in labels for m in ("GIF", "FIF", "PIF")]]
  assert list(rows) == names
  assert md.count(f"| GIF ({labels[0]}) cg |") == 5  # One table per step rule.
  assert "selected parameters" in md and "solvers: neumann" in md
  for name, r in rows.items():
    assert all(0.0 <= r[c] <= 1.0 for c in columns if c in r), (name, r)
    # The JSON summary holds the same per-seed values (1 seed: mean = the value, std = 0).
    for k, v in r.items():
      s = record["summary"][name][k]
      assert (s["mean"] == pytest.approx(v, rel=1e-5, abs=1e-6) and s["std"] == 0.0) or not s["values"][0] == v
    if name in ("original", "retrained"):
      assert "paper_scale" not in r
      continue
    assert r["nearest_scale"] in SCALES and r["loss_scale"] in SCALES and r["first_order_scale"] == 1.0
    assert r["iters"] <= (4 if name.endswith("neumann") else 3) and r["rel_residual"] >= 0
    assert name.endswith("cg") != (r["normaliser"] == r["normaliser"])  # nan for CG
    for p in ("paper_", "practical_"):  # The walk's point is never worse than the start on its own score.
      assert r[p + "scale"] >= 0
    # The nearest-scale oracle minimises the gap to the retrained model over the grid, which holds two other steps.
    gap = lambda prefix: sum(abs(r[prefix + k] - rows["retrained"][k]) for k in gap_keys)
    assert gap("nearest_") <= gap("loss_") + 1e-5 and gap("nearest_") <= gap("first_order_") + 1e-5


def test_class_removal_job_on_the_mlp(tmp_path):
  proc = run_job("class_removal", "mlp", tmp_path, "--config.model.features=(8,)", "--config.edit.ratios=(0.1,)")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows, record, md = read_outputs(tmp_path)
  assert record["task"] == "class_removal" and record["seeds"] == 1
  check_common(rows, record, md, ("removed", "rest", "f1", "train_f1"), ("removed", "rest"),
               ("gradient 10%",))
  assert "hidden_0 52/520" in md  # int(0.1 · 520): exact budgets, partial units included
  for r in rows.values():
    for p in ("", "paper_", "practical_", "first_order_"):
      if p + "removed" in r:  # f1 is the harmonic mean of forgetting and keeping.
        f, k = 1 - r[p + "removed"], r[p + "rest"]
        assert r[p + "f1"] == pytest.approx(2 * f * k / (f + k), abs=1e-5)
    if "paper_f1" in r:  # Each walk maximises its own score: test f1 (oracle) and training f1 (label-free).
      assert r["paper_f1"] >= rows["original"]["f1"] - 1e-6 and r["practical_train_f1"] >= rows["original"]["train_f1"] - 1e-6


def test_label_change_job_on_the_cnn_with_a_trigger(tmp_path):
  # The corner patch on images of the other classes only: no triggered 7 is both relabelled and "attacked".
  proc = run_job("label_change", "cnn", tmp_path, "--config.model.features=(4,4)",
                 "--config.edit.solvers=('neumann','cg')", "--config.corruption.trigger=corner",
                 "--config.corruption.include_target=False")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows, record, md = read_outputs(tmp_path)
  assert record["task"] == "label_change" and record["config"]["corruption"]["kind"] == "trigger"
  check_common(rows, record, md, ("clean", "relabelled", "attack", "f1", "test_clean", "test_attack"),
               ("clean", "relabelled", "attack", "test_clean", "test_attack"), ("output 5%",))
  for r in rows.values():  # A prediction cannot be both the corrected and the wrong label.
    for p in ("", "paper_", "nearest_", "practical_", "loss_", "first_order_"):
      if p + "relabelled" in r:
        assert r[p + "relabelled"] + r[p + "attack"] <= 1.0 + 1e-5


def test_unknown_key_and_wrong_task_are_errors(tmp_path):
  proc = run_job("class_removal", "mlp", tmp_path, "--config.edit.ratoi=(0.2,)")
  assert proc.returncode != 0 and "ratoi" in proc.stderr
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "gif_label_change.py"),
         f"--config={os.path.join(ROOT, 'configs', 'gif_class_removal_mlp.py')}", f"--workdir={tmp_path}"]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode != 0 and "this job runs 'label_change'" in proc.stderr
  assert not os.path.exists(tmp_path / "results.csv")
  proc = run_job("label_change", "mlp", tmp_path, "--config.edit.partial_fill=last")
  assert proc.returncode != 0 and "config.edit.partial_fill = 'last'; expected one of ('first', 'random')" in proc.stderr
  assert not os.path.exists(tmp_path / "results.csv")


def test_label_change_redraws_edit_one_model(tmp_path):
  proc = run_job("label_change", "mlp", tmp_path, "--config.model.features=(8,)", "--config.edit.spread=redraws",
                 "--config.edit.redraws=2", "--config.edit.redraw_fraction=0.5", "--config.edit.methods=('gif','if')")
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.load(open(os.path.join(tmp_path, "results.json")))
  assert record["seeds"] == 2 and record["spread"] == "re-draws"
  assert "over 2 re-draws" in open(os.path.join(tmp_path, "results.md")).read()
  rows = list(csv.DictReader(open(os.path.join(tmp_path, "results.csv"))))
  by = {(r["seed"], r["model"]): r for r in rows}
  for name in ("original", "retrained"):  # One trained model: the same metrics in both draws.
    assert {k: v for k, v in by[("0", name)].items() if k != "seed"} == {k: v for k, v in by[("1", name)].items()
                                                                          if k != "seed"}
  # Two different halves of the corrupted examples edited: two different updates.
  assert by[("0", "GIF (output 5%) neumann")]["rel_residual"] != by[("1", "GIF (output 5%) neumann")]["rel_residual"]


def test_redraw_subset_is_seeded_and_inside_the_changed_rows():
  changed = np.zeros(50, bool)
  changed[::5] = True
  a = gif_job.redraw_subset(changed, 0.68, 3)
  assert a.sum() == round(0.68 * 10) and not np.any(a & ~changed)
  np.testing.assert_array_equal(a, gif_job.redraw_subset(changed, 0.68, 3))
  assert not np.array_equal(a, gif_job.redraw_subset(changed, 0.68, 4))


def test_spectrum_is_the_hessians_eigenvalues():
  from influence_jax.jobs.papers import gif_spectrum
  a = np.array([[2.0, 1.0, 0.0], [1.0, -3.0, 0.5], [0.0, 0.5, 1.0]])
  per_example = lambda p, b: 0.5 * p["w"] @ (a @ p["w"]) + 0.0 * b["x"][:, 0]
  s = gif_spectrum.spectrum(per_example, {"w": np.zeros(3)}, {"x": np.zeros((4, 1))})
  w = np.linalg.eigvalsh(a)
  assert s["min"] == pytest.approx(w[0]) and s["max"] == pytest.approx(w[-1])
  assert s["negative_sum"] == pytest.approx(w[w < 0].sum())
