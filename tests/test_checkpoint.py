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
