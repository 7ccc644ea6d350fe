"""Orbax checkpoints: eigenspace round trip, fingerprint refusal, Arnoldi resumed from a saved step."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import influence_jax as ij
from influence_jax import arnoldi, checkpoint, curvature
from influence_jax import io as io_lib
from tests import toy_problems


def test_eigenspace_round_trip(tmp_path):
  params, loss, _, batches = toy_problems.small_mlp_problem()
  es = ij.fit_eigenspace(loss, params, batches, n_iters=12, top_k=5, damping=0.1)
  checkpoint.save_eigenspace(str(tmp_path / "es"), es, fingerprint="abc")
  back = checkpoint.load_eigenspace(str(tmp_path / "es"), fingerprint="abc")
  for name in ("eigenvalues", "eigenvectors", "residuals", "ritz_estimates"):
    np.testing.assert_array_equal(getattr(back, name), getattr(es, name))
  assert back.damping == 0.1 and back.info == es.info
  with pytest.raises(checkpoint.FingerprintMismatch, match="different model"):
    checkpoint.load_eigenspace(str(tmp_path / "es"), fingerprint="xyz")
  with pytest.raises(FileNotFoundError):
    checkpoint.load_eigenspace(str(tmp_path / "nothing"))


def test_fingerprint_depends_on_config_and_data():
  a = io_lib.digest({"lr": 0.1}, np.arange(5))
  assert a == io_lib.digest({"lr": 0.1}, np.arange(5))
  assert a != io_lib.digest({"lr": 0.2}, np.arange(5))
  assert a != io_lib.digest({"lr": 0.1}, np.arange(5) + 1)
  # Keys and None entries are part of what is hashed, not only the leaf values.
  assert a != io_lib.digest({"momentum": 0.1}, np.arange(5))
  assert io_lib.digest({"k": None}) != io_lib.digest({})


def test_arnoldi_resumes_bit_identically(tmp_path):
  params, loss, _, batches = toy_problems.small_mlp_problem()
  op = curvature.curvature_operator(loss, params, batches)
  start = jax.random.normal(jax.random.key(0), (op.dim,), jnp.float64)
  whole = arnoldi.run(op, arnoldi.init(start, 15))

  store = checkpoint.CheckpointDir(str(tmp_path / "progress"), "fp1")
  state = arnoldi.run(op, arnoldi.init(start, 15), num_steps=7)
  store.save(7, state._asdict())
  store.close()
  # A new process would do this: rebuild the target, restore the latest step, go on.
  store = checkpoint.CheckpointDir(str(tmp_path / "progress"), "fp1")
  step, restored, _ = store.restore_latest(target=arnoldi.init(start, 15)._asdict())
  assert step == 7
  resumed = arnoldi.run(op, arnoldi.ArnoldiState(**restored))
  np.testing.assert_array_equal(resumed.basis, whole.basis)
  np.testing.assert_array_equal(resumed.hessenberg, whole.hessenberg)
  with pytest.raises(checkpoint.FingerprintMismatch):
    checkpoint.CheckpointDir(str(tmp_path / "progress"), "fp2").restore_latest()
  # No temporary directories are left behind.
  assert not [d for d in os.listdir(tmp_path / "progress") if "tmp" in d]


def test_residual_basis_saved_on_one_mesh_loads_on_another(tmp_path):
  """V (r, P) saved split over 'model' on (1, 8) (p = 125: 128 columns) loads split on (2, 4), on one device
  (125 columns), and again on (1, 8) after being saved there from one device; other inputs are refused."""
  from influence_jax import sharding  # noqa: PLC0415
  v = np.random.default_rng(0).standard_normal((6, 125))
  on8 = sharding.to_flat_layout(v, 125, sharding.make_mesh((1, 8)))
  path = str(tmp_path / "basis")
  assert checkpoint.load_residual_basis(path, "fp") is None  # nothing saved yet
  checkpoint.save_residual_basis(path, on8, 125, "fp")
  for mesh, columns in ((sharding.make_mesh((2, 4)), 128), (None, 125)):
    back = checkpoint.load_residual_basis(path, "fp", mesh=mesh)
    assert back.shape == (6, columns) and back.sharding == sharding.flat_sharding(sharding.mesh_or_default(mesh), 2)
    np.testing.assert_array_equal(np.asarray(back)[:, :125], v)
  checkpoint.save_residual_basis(path, back, 125, "other")  # replaces the step saved from other inputs
  with pytest.raises(checkpoint.FingerprintMismatch, match="other inputs"):
    checkpoint.load_residual_basis(path, "fp")
  again = checkpoint.load_residual_basis(path, "other", mesh=sharding.make_mesh((1, 8)))
  np.testing.assert_array_equal(np.asarray(again), np.asarray(on8))
