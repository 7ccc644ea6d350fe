"""Data that change between jobs (subprocesses on tests/user_task.py): an edited training example, an
edited query, a second query set with other settings, a NaN in a curvature batch. Each job either
refuses naming what changed and what to do, or gives exactly a fresh run's outputs; none exits 0
with outputs of the old data, of mixed data, or of another run's settings."""

import json
import os
import shutil

import numpy as np
import pytest

from influence_jax import sources
from tests import user_task_config
from tests.test_faults import read, refused
from tests.user_task_jobs import rows, run, table


def copy_stages(reference, workdir, *names):
  """Copies the reference's eigenspace (with the curvature sample's digest) and `names` into `workdir`."""
  for name in ("eigenspace", *names):
    shutil.copytree(os.path.join(reference, name), os.path.join(workdir, name))
  shutil.copy(os.path.join(reference, "curvature_digest.json"), workdir)


def edit_row(path, row):
  """Reverses example `row` of the .npy file at `path` in place (a new modification time)."""
  x = np.load(path)
  x[row] = x[row][::-1].copy()
  np.save(path, x)


def chunk_files(workdir):
  """Returns {chunk: modification time} of the store's projection chunk files."""
  base = os.path.join(workdir, "store", "projections", "c")
  return {int(c): os.stat(os.path.join(base, c, "0")).st_mtime_ns for c in os.listdir(base)}


def test_an_edited_training_example_is_detected_then_only_its_chunk_reprojected(reference, data_dir, tmp_path):
  config = user_task_config.get_config()
  row = 200  # Outside the curvature sample and the 8 sampled examples: seen only by file identity and digests.
  assert row not in sources.sample_indices(300, config.arnoldi.num_examples, config.seed)
  data, w, fresh = str(tmp_path / "data"), str(tmp_path / "w"), str(tmp_path / "fresh")
  shutil.copytree(data_dir, data)  # Same content, same modification times: the reference's store holds.
  copy_stages(reference, w, "store")
  keep_model = (f"--config.user.params_data_dir={data_dir}",)  # The model stays the one trained before the edit.
  edit_row(os.path.join(data, "train_x.npy"), row)
  for script in ("score.py", "project.py"):
    ok, text = refused(run(script, w, data, *keep_model, check=False), "training set changed",
                       "--config.project.verify=True")
    assert ok, text
  before = chunk_files(w)
  run("project.py", w, data, *keep_model, "--config.project.verify=True")
  after = chunk_files(w)
  assert [c for c in before if after[c] != before[c]] == [row // config.project.chunk_rows]
  run("score.py", w, data, *keep_model)
  copy_stages(reference, fresh)
  run("project.py", fresh, data, *keep_model)
  run("score.py", fresh, data, *keep_model)
  for name in ("top_k.csv", "self_influence.csv"):
    assert read(table(w, name)) == read(table(fresh, name)), name
  self_influence = lambda d: {r["train_id"]: r["self_influence"] for r in rows(table(d, "self_influence.csv"))}
  assert self_influence(w)[str(row)] != self_influence(reference)[str(row)]  # The edit is in the tables.


def test_an_edited_query_is_rescored_never_mixed_with_its_old_progress(reference, data_dir, tmp_path):
  data, w, fresh = str(tmp_path / "data"), str(tmp_path / "w"), str(tmp_path / "fresh")
  shutil.copytree(data_dir, data)
  x, y = np.load(os.path.join(data_dir, "train_x.npy")), np.load(os.path.join(data_dir, "train_y.npy"))
  np.save(os.path.join(data, "many_x.npy"), x[:50]), np.save(os.path.join(data, "many_y.npy"), y[:50])
  queries = ("--config.score.queries=user_task_config:unversioned_queries",)  # 50 queries, no file identity.
  copy_stages(reference, w, "store")
  proc = run("score.py", w, data, *queries, "--fault_injection=score:2", check=False)
  assert proc.returncode == -9 and os.listdir(os.path.join(w, "scores", "queries", "progress"))
  edit_row(os.path.join(data, "many_x.npy"), 20)  # Not one of the 8 examples a sampled fingerprint reads.
  run("score.py", w, data, *queries)
  copy_stages(reference, fresh, "store")
  run("score.py", fresh, data, *queries)
  assert read(table(w, "top_k.csv")) == read(table(fresh, "top_k.csv"))
  summary = json.loads(read(table(w, "summary.json")))
  assert summary["queries_digest"] == json.loads(read(table(fresh, "summary.json")))["queries_digest"]


def test_two_query_sets_with_other_settings_keep_their_own_outputs(reference, data_dir, tmp_path):
  w = str(tmp_path / "w")
  shutil.copytree(reference, w)
  scores = os.path.join(w, "scores")
  before = {os.path.join(d, n): read(os.path.join(d, n)) for d, _, names in os.walk(scores) for n in names
            if "progress" not in d and not n.endswith(".png")}
  run("score.py", w, data_dir, "--config.score.name=no_tail", "--config.score.tail=False",
      "--config.score.queries=user_task:other_queries")
  assert {path: read(path) for path in before} == before  # Nothing of the first query set was rewritten.
  first, other = (json.loads(read(table(w, "summary.json", name))) for name in ("queries", "no_tail"))
  assert (first["tail"], other["tail"]) == (True, False)
  assert first["self_influence"] != other["self_influence"]
  for summary in (first, other):  # Each ranking's own summary says how it was computed.
    record = json.loads(read(os.path.join(scores, summary["self_influence"][:-len(".csv")] + ".json")))
    assert (record["tail"], record["damping"], record["store_fingerprint"]) == (
        summary["tail"], summary["damping"], summary["store_fingerprint"])
  tail, no_tail = (read(table(w, "self_influence.csv", name)) for name in ("queries", "no_tail"))
  assert tail != no_tail
  assert len(rows(table(w, "top_k.csv", "no_tail"))) == 5 * 2 * 5  # 5 queries, 5 proponents and 5 opponents.


@pytest.mark.parametrize("row", [10, 70])  # In the first curvature batch (of 32), and in a later one.
def test_a_nan_in_a_curvature_batch_is_named_and_leaves_no_progress(data_dir, tmp_path, row):
  w = str(tmp_path / "w")
  bad = ("--config.task=user_task_config:bad_curvature_task", "--config.arnoldi.batch_size=32", "--config.user.bad=nan")
  ok, text = refused(run("fit_eigenspace.py", w, data_dir, *bad, f"--config.user.bad_row={row}", check=False),
                     f"rows [{row}]", "Task.curvature", "no Arnoldi progress was saved")
  assert ok, text
  progress = os.path.join(w, "arnoldi_progress")
  assert not os.path.isdir(progress) or not [n for n in os.listdir(progress) if n.isdigit()]
  if row == 70:  # The data fixed, the fit runs through.
    run("fit_eigenspace.py", w, data_dir, *bad, "--config.user.bad_row=-1")
    assert os.path.isdir(os.path.join(w, "eigenspace"))
