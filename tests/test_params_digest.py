"""The parameters' digest (`io.params_digest`, the jobs' params fingerprint) is the same for a numpy tree, a tree
on one device and trees split over 'model' on meshes of 8 devices or over 2 processes' devices, and changes with
any one value; an eigenspace of parameters split over 2 processes is fitted (it hung)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from influence_jax import io as io_lib
from influence_jax import eigenspace, sharding


def _params():
  rng = np.random.default_rng(0)
  return {"dense": {"kernel": rng.normal(size=(6, 8)).astype(np.float32), "bias": np.zeros(8, np.float32)},
          "half": rng.normal(size=(8, 8)).astype(jnp.bfloat16), "step": np.int32(3)}


def _split(params, shape):
  mesh = sharding.make_mesh(shape)
  spec = {"dense": {"kernel": P(None, "model"), "bias": P("model")}, "half": P("data", "model"), "step": P()}
  return jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, spec)


@pytest.mark.parametrize("shape", [(8, 1), (2, 4), (1, 8)])
def test_the_digest_does_not_depend_on_the_layout(shape):
  params = _params()
  want = io_lib.params_digest(params)
  assert io_lib.params_digest(jax.tree.map(jnp.asarray, params)) == want
  split = _split(params, shape)
  assert not split["dense"]["kernel"].sharding.is_fully_replicated or shape[1] == 1
  assert io_lib.params_digest(split) == want


def test_the_digest_changes_with_one_value_and_with_the_dtype():
  params = _params()
  want = io_lib.params_digest(params)
  params["dense"]["kernel"][5, 7] += 1e-6
  assert io_lib.params_digest(params) != want
  params = _params()
  params["step"] = np.float32(3)
  assert io_lib.params_digest(params) != want


def split_mlp(place):
  """Returns (params, loss, batch) of a small L2-regularised MLP whose kernels `place(value, spec)` splits over
  'model' (w1 by columns, w2 by rows)."""
  rng = np.random.default_rng(1)
  params = {"w1": place(rng.normal(size=(5, 8)).astype(np.float32), P(None, "model")),
            "b1": place(np.zeros(8, np.float32), P()),
            "w2": place(rng.normal(size=(8, 3)).astype(np.float32), P("model", None))}
  batch = {"x": rng.normal(size=(16, 5)).astype(np.float32), "y": rng.normal(size=(16, 3)).astype(np.float32)}

  def loss(p, b):
    out = jnp.tanh(b["x"] @ p["w1"] + p["b1"]) @ p["w2"]
    return jnp.mean((out - b["y"]) ** 2) + 1e-2 * sum(jnp.vdot(x, x) for x in jax.tree.leaves(p))

  return params, loss, batch


def test_two_processes_with_split_parameters_agree_with_one(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with __import__("socket").socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, os.path.join(root, "tests", "split_params_worker.py"), str(port), str(i),
                             str(tmp_path / "out")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  try:
    logs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert all(p.returncode == 0 for p in procs), [log[-2000:] for log in logs]
  params, loss, batch = split_mlp(lambda value, spec: value)
  es = eigenspace.fit_eigenspace(loss, params, [batch], n_iters=4, top_k=2, damping=0.1)
  for i in range(2):
    digest, eigenvalues = (tmp_path / f"out{i}.txt").read_text().splitlines()
    assert digest == io_lib.params_digest(params)
    np.testing.assert_allclose(eval(eigenvalues), np.asarray(es.eigenvalues), rtol=1e-5)
