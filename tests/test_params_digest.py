"""The parameters' digest (`io.params_digest`, the jobs' params fingerprint) is the same for a numpy tree, a tree
on one device and trees split over 'model' on meshes of 8 devices, and changes with any one value."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from influence_jax import io as io_lib
from influence_jax import sharding


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
