"""Sharded Arnoldi, projections and scores on 8 virtual CPU devices against the one-device results."""

import os
import re
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

import influence_jax as ij
from influence_jax import arnoldi, curvature, eigenspace, sharding, sources
from influence_jax.jobs import input as input_lib
from tests import sharding_problem, toy_problems

MESHES = [(8, 1), (1, 8), (2, 4)]
TOL = dict(rtol=1e-6, atol=1e-8)


def _single_device(problem):
  """The problem and its one-device results (no mesh anywhere)."""
  params, loss, per_example, batches, test, kw = problem
  es = ij.fit_eigenspace(loss, params, batches, **kw)
  return dict(
      problem=problem,
      es=es,
      proj=np.asarray(ij.project(es, per_example, params, batches)),
      scores=np.asarray(ij.influence(es, per_example, params, test, batches)),
  )


@pytest.fixture(scope="module")
def single():
  return _single_device(sharding_problem.problem())  # p = 136 = 8 × 17


@pytest.fixture(scope="module")
def single_uneven():
  return _single_device(sharding_problem.uneven_problem())  # p = 125: padded to 128 on 'model' 4 or 8


def _signs(u, ref):
  """Returns ±1 per row aligning eigenvectors u with ref (an eigenvector's sign is arbitrary)."""
  return np.sign(np.sum(np.asarray(u) * np.asarray(ref), axis=1))


def _check_split_over_model(x, num_params, model):
  """Asserts that the flat array x (k, P) is split over 'model': each device holds ⌈p / model⌉ columns."""
  cols = -(-num_params // model)
  assert x.shape[1] == cols * model and x.sharding.spec == sharding.BASIS_SPEC
  assert {s.data.shape for s in x.addressable_shards} == {(x.shape[0], cols)}
  assert sorted({s.index[1].start or 0 for s in x.addressable_shards}) == list(range(0, cols * model, cols))
  np.testing.assert_array_equal(np.asarray(x)[:, num_params:], 0.0)  # the padding is exactly zero


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_results_equal_single_device(single_uneven, shape):
  """p = 125, a multiple of no 'model' size here (the padded case; p a multiple of it is the simpler
  one, exercised by the other tests of this module)."""
  single = single_uneven
  params, loss, per_example, batches, test, kw = single["problem"]
  p = single["es"].num_params
  mesh = sharding.make_mesh(shape)
  es = ij.fit_eigenspace(loss, params, batches, mesh=mesh, **kw)
  assert es.mesh == mesh and es.num_params == p
  np.testing.assert_allclose(es.eigenvalues, single["es"].eigenvalues, **TOL)
  np.testing.assert_allclose(es.residuals, single["es"].residuals, atol=1e-8)
  _check_split_over_model(es.eigenvectors, p, shape[1])
  signs = _signs(es.host_eigenvectors(), single["es"].eigenvectors)
  np.testing.assert_allclose(es.host_eigenvectors() * signs[:, None], single["es"].eigenvectors, **TOL)

  proj = ij.project(es, per_example, params, batches)  # on the eigenvectors' mesh
  np.testing.assert_allclose(np.asarray(proj) * signs, single["proj"], **TOL)
  # 58 and 40 examples are not multiples of 8: where the count is, the result is sharded by example.
  even = ij.project(es, per_example, params, [{k: v[:16] for k, v in batches[0].items()}], mesh=mesh)
  assert even.sharding.spec == sharding.PROJECTIONS_SPEC
  assert {s.data.shape[0] for s in even.addressable_shards} == {16 // shape[0]}

  scores = ij.influence(es, per_example, params, test, batches)
  np.testing.assert_allclose(scores, single["scores"], **TOL)
  tail = ij.influence(es, per_example, params, test, batches, tail=True)
  want = ij.influence(single["es"], per_example, params, test, batches, tail=True)
  np.testing.assert_allclose(tail, want, **TOL)


def test_tail_scores_and_jvp_projections_on_a_mesh(single):
  params, loss, per_example, batches, test, kw = single["problem"]
  es = single["es"]  # fitted on one device: a mesh only for scoring works too.
  mesh = sharding.make_mesh((2, 4))
  want = ij.influence(es, per_example, params, test, batches, tail=True)
  got = ij.influence(es, per_example, params, test, batches, tail=True, mesh=mesh)
  np.testing.assert_allclose(got, want, **TOL)
  jvp = ij.project(es, per_example, params, batches, method="jvp", microbatch_size=3, mesh=mesh)
  np.testing.assert_allclose(jvp, single["proj"], **TOL)


@pytest.mark.parametrize("shape", [(1, 8), (2, 4)])
def test_basis_is_split_along_parameters(single, shape):
  params, loss, _, batches, _, _ = single["problem"]
  mesh = sharding.make_mesh(shape)
  model = shape[1]
  op = curvature.curvature_operator(loss, params, batches, mesh=mesh)
  assert op.dim % model == 0
  state = arnoldi.init(eigenspace.start_vector(op.dim, op.dtype, 0, mesh=op.mesh), 12, block_size=8)
  state = arnoldi.run(op, state, block_size=8)
  shards = state.basis.addressable_shards
  assert len(shards) == 8
  cols = op.dim // model
  for s in shards:
    assert s.data.shape == (16, cols)  # every device: all rows, p / model columns
  starts = sorted({s.index[1].start for s in shards})
  assert starts == list(range(0, op.dim, cols))  # together the shards cover every column once per replica
  assert state.hessenberg.sharding.is_fully_replicated
  # The step's program never gathers the basis or a block of it: the only p-sized
  # collective is the one vector handed to the operator, and the Gram-Schmidt
  # reductions carry block-size (8) coefficient vectors.
  hlo = arnoldi._step.lower(op.matvec, 8, op.dim, mesh, op.operands, state, np.asarray(1e-8)).compile().as_text()
  collectives = [(kind, tuple(int(d) for d in dims.split(",") if d))
                 for dims, kind in re.findall(r"= f64\[([\d,]*)\]\S* (all-gather|all-reduce|all-to-all)\(", hlo)]
  assert ("all-gather", (op.dim,)) in collectives
  assert not [c for c in collectives if op.dim in c[1] and np.prod(c[1]) > op.dim]
  assert ("all-reduce", (8,)) in collectives


def test_parameters_not_a_multiple_of_model_are_padded_and_stripped():
  params, loss, per_example, batches = toy_problems.small_mlp_problem()
  p = 51
  mesh = sharding.make_mesh((1, 8))
  seen = []

  def callback(state):  # the basis has 56 columns and the padding stays exactly zero
    seen.append((state.basis.shape, float(np.abs(np.asarray(state.basis)[:, p:]).max())))

  es = ij.fit_eigenspace(loss, params, batches, n_iters=20, top_k=5, selection="magnitude", mesh=mesh,
                         callback=callback)
  assert seen and all(s == ((32, 56), 0.0) for s in seen)
  ref = ij.fit_eigenspace(loss, params, batches, n_iters=20, top_k=5, selection="magnitude")
  _check_split_over_model(es.eigenvectors, p, 8)  # 7 columns a device, not 51 on every device
  assert es.host_eigenvectors().shape == (5, p) and ref.eigenvectors.shape == (5, p)
  np.testing.assert_allclose(es.eigenvalues, ref.eigenvalues, **TOL)
  signs = _signs(es.host_eigenvectors(), ref.eigenvectors)
  np.testing.assert_allclose(
      np.asarray(ij.project(es, per_example, params, batches)) * signs,
      ij.project(ref, per_example, params, batches), **TOL)
  # The one-device eigenspace laid out on the mesh, and back: the same values, the mesh's layout.
  moved = eigenspace.on_mesh(ref, mesh)
  _check_split_over_model(moved.eigenvectors, p, 8)
  back = eigenspace.on_mesh(moved, sharding.single_device_mesh())
  assert back.eigenvectors.shape == (5, p)
  np.testing.assert_array_equal(back.eigenvectors, ref.eigenvectors)
  op = curvature.curvature_operator(loss, params, batches, mesh=mesh)
  assert op.mesh == mesh and jax.tree.leaves(op) == jax.tree.leaves(op.operands)
  with pytest.raises(ValueError, match="operator's mesh"):
    arnoldi.run(op, arnoldi.init(eigenspace.start_vector(p, op.dtype, 0), 10, block_size=8), block_size=8)


def test_flat_layout_pads_splits_and_moves_between_meshes():
  x = np.arange(3 * 51, dtype=np.float64).reshape(3, 51)
  one = sharding.to_flat_layout(x, 51, sharding.single_device_mesh())
  assert one.shape == (3, 51) and sharding.mesh_of(one) == sharding.single_device_mesh()
  mesh8, mesh4 = sharding.make_mesh((1, 8)), sharding.make_mesh((2, 4))
  on8 = sharding.to_flat_layout(one, 51, mesh8)
  _check_split_over_model(on8, 51, 8)
  assert sharding.to_flat_layout(on8, 51, mesh8) is on8
  on4 = sharding.to_flat_layout(on8, 51, mesh4)  # 56 columns → 52
  _check_split_over_model(on4, 51, 4)
  np.testing.assert_array_equal(np.asarray(on4)[:, :51], x)
  vec = sharding.to_flat_layout(x[0], 51, mesh8)
  assert vec.shape == (56,) and vec.sharding.spec == sharding.VECTOR_SPEC
  with pytest.raises(ValueError, match="at least 52 columns"):
    sharding.to_flat_layout(x, 52, mesh8)
  assert sharding.mesh_of(np.zeros(3)) == sharding.single_device_mesh()
  assert sharding.mesh_of(on4) == mesh4


def test_sharded_params_keep_their_layout(single):
  params, loss, per_example, batches, test, kw = single["problem"]
  mesh = sharding.make_mesh((2, 4))
  w = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.MODEL))
  laid_out = [{"w": jax.device_put(layer["w"], w), "b": layer["b"]} for layer in params]
  placed = sharding.place_params(laid_out, mesh)
  assert placed[0]["w"].sharding == w and placed[0]["b"].sharding.is_fully_replicated
  es = ij.fit_eigenspace(loss, laid_out, batches, mesh=mesh, **kw)
  np.testing.assert_allclose(es.eigenvalues, single["es"].eigenvalues, **TOL)
  np.testing.assert_allclose(ij.influence(es, per_example, laid_out, test, batches, mesh=mesh),
                             single["scores"], **TOL)


def test_make_mesh_shapes_and_errors():
  assert sharding.make_mesh().shape == {"data": 8, "model": 1}
  assert sharding.make_mesh((2, -1)).shape == {"data": 2, "model": 4}
  config = ml_collections.ConfigDict({"mesh_shape": (4, 2)})
  assert sharding.make_mesh(config).shape == {"data": 4, "model": 2}
  assert sharding.make_mesh((1, 2), devices=jax.devices()[:2]).shape == {"data": 1, "model": 2}
  with pytest.raises(ValueError, match="needs 6 devices, but 8"):
    sharding.make_mesh((3, 2))
  with pytest.raises(ValueError, match="two entries"):
    sharding.make_mesh((8,))
  with pytest.raises(ValueError, match="not a multiple of 3"):
    sharding.make_mesh((3, -1))
  assert sharding.padded_dim(51, sharding.make_mesh((1, 8))) == 56
  assert sharding.padded_dim(51, None) == 51


def test_global_batches_pad_the_last_batch():
  mesh = sharding.make_mesh((8, 1))
  x = np.arange(20.0)[:, None] * np.ones((1, 3))
  out = list(input_lib.global_batches(sources.ArraySource({"x": x}), np.arange(20), 8, mesh, "x", num_threads=1))
  assert len(out) == 3
  for _, batch in out:
    assert batch["x"].shape == (8, 3) and batch["x"].sharding.spec == sharding.BATCH_SPEC
  np.testing.assert_array_equal(np.concatenate([ids for ids, _ in out]), np.arange(20))
  rows = np.concatenate([np.asarray(b["x"]) for _, b in out])
  np.testing.assert_array_equal(rows[:20], x)
  np.testing.assert_array_equal(rows[20:], np.repeat(x[16:17], 4, axis=0))  # Padding repeats an example.
  with pytest.raises(ValueError, match="multiple of the 'data' axis"):
    next(input_lib.global_batches(sources.ArraySource({"x": x}), np.arange(20), 12, mesh, "x", num_threads=1))


def test_global_batches_project_like_host_batches(single):
  params, _, per_example, batches, _, _ = single["problem"]
  mesh = sharding.make_mesh((2, 4))
  whole = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  out = list(input_lib.global_batches(sources.ArraySource(whole), np.arange(58), 16, mesh, "train", num_threads=1))
  proj = np.asarray(ij.project(single["es"], per_example, params, [b for _, b in out], mesh=mesh))
  np.testing.assert_allclose(proj[:58], single["proj"], **TOL)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_single_process(single, tmp_path):
  """2 processes × 4 CPU devices (gloo) on a global (2, 4) mesh, each reading its own examples."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  port, out = _free_port(), tmp_path / "result.npz"
  env = dict(os.environ, PYTHONPATH=root)
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, os.path.join(root, "tests", "multiprocess_worker.py"),
                             str(port), str(i), "2", str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=240)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  r = np.load(out)
  assert int(r["num_steps"]) == 4  # 29 examples a process, 8 a step: the last step padded and masked
  np.testing.assert_array_equal(r["ids"], np.arange(58))
  np.testing.assert_allclose(r["eigenvalues"], single["es"].eigenvalues, **TOL)
  signs = _signs(r["eigenvectors"], single["es"].eigenvectors)
  np.testing.assert_allclose(r["projections"] * signs, single["proj"], **TOL)
  np.testing.assert_allclose(r["scores"], single["scores"], **TOL)


@pytest.mark.parametrize("p, dim", [(125, 30), (51, 1000), (1210, 1024)])
def test_sketch_of_flat_vectors_split_over_model_equals_the_dense_map(p, dim):
  """R = A ⊗ B applied where the columns are (each device its own piece, summed over 'model') equals the
  dense Kronecker product on the zero-padded vectors, on every mesh, inside jit and out."""
  sk = ij.sketch.make_sketch(p, dim, seed=0, dtype=np.float64)
  dense = np.kron(np.asarray(sk.left), np.asarray(sk.right))  # (m, p₁p₂)
  v = np.random.default_rng(p).standard_normal((8, p))
  want = np.pad(v, ((0, 0), (0, dense.shape[1] - p))) @ dense.T
  np.testing.assert_allclose(ij.sketch.apply_sketch(sk, v), want, atol=1e-10)
  for shape in MESHES:
    mesh = sharding.make_mesh(shape)
    x = sharding.to_flat_layout(v, p, mesh)
    np.testing.assert_allclose(jax.jit(lambda x, mesh=mesh: ij.sketch.apply_sketch(sk, x, mesh))(x), want, atol=1e-10)
    np.testing.assert_allclose(ij.sketch.apply_sketch(sk, x[:5], mesh), want[:5], atol=1e-10)  # rows not over 'data'


def test_residual_basis_of_split_params_is_split_over_model(single_uneven):
  """p = 125 on a (2, 4) mesh, the (11, 4) kernel split over 'model': V equals one device's, shard by shard."""
  params, _, per_example, batches, _, _ = single_uneven["problem"]
  es = single_uneven["es"]
  want = np.asarray(ij.residual_basis.fit_residual_basis(es.eigenvectors, per_example, params, batches, 8))
  mesh = sharding.make_mesh((2, 4))
  split = jax.sharding.NamedSharding(mesh, sharding.BASIS_SPEC)
  laid_out = [params[0], dict(params[1], w=jax.device_put(params[1]["w"], split))]
  v = ij.residual_basis.fit_residual_basis(eigenspace.on_mesh(es, mesh).eigenvectors, per_example, laid_out, batches, 8)
  _check_split_over_model(v, 125, 4)
  np.testing.assert_allclose(np.asarray(v)[:, :125], want, **TOL)
  assert laid_out[1]["w"].sharding == split
