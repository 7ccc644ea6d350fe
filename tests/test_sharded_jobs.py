"""The jobs' stages with their defaults (residual basis, solved queries) on meshes of 8 CPU devices against one
device, in-process (float32, as the jobs run): p = 83, a multiple of no 'model' size; a model whose kernels are split over
'model' keeps them so inside the stages' programs."""

import csv
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from influence_jax import sharding, sources
from influence_jax import store as store_lib
from influence_jax.jobs import config as config_lib
from influence_jax.jobs import context, stages
from influence_jax.jobs import workdir as workdir_lib
from influence_jax.types import Task
from tests import toy_problems, user_task_jobs

SIZES = [6, 8, 3]  # p = 6·8 + 8 + 8·3 + 3 = 83
NUM_TRAIN, NUM_QUERIES = 48, 5
TOL = dict(rtol=2e-5, atol=2e-6)  # float32, sums reordered by sharding
MESHES = [(8, 1), (2, 4), (1, 8)]


def _data():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(NUM_TRAIN + NUM_QUERIES, SIZES[0])).astype(np.float32)
  y = rng.integers(0, SIZES[-1], size=NUM_TRAIN + NUM_QUERIES).astype(np.int32)
  return {"x": x[:NUM_TRAIN], "y": y[:NUM_TRAIN]}, {"x": x[NUM_TRAIN:], "y": y[NUM_TRAIN:]}


# The shardings XLA gave the first kernel inside every compiled program that evaluated a loss, by mesh.
SEEN = []


def _record(sharding_seen):
  SEEN.append(sharding_seen)


def _watched(fn):
  """Returns fn(params, batch) that also reports the first kernel's sharding inside each program it runs in."""

  def loss(params, batch):
    jax.debug.inspect_array_sharding(params[0]["w"], callback=_record)
    return fn(params, batch)

  return loss


LOSS, PER_EXAMPLE = toy_problems.mlp_classifier(l2=1e-2)
WATCHED_LOSS, WATCHED_PER_EXAMPLE = _watched(LOSS), _watched(PER_EXAMPLE)


def get_task(config) -> Task:
  """The task; with config.user.split_kernels its kernels are split over 'model' (the first along its output
  units, P(None, 'model'), the second along its inputs, P('model', None)) on the jobs' mesh."""
  params = toy_problems.mlp_init(SIZES, seed=5, dtype=jnp.float32)
  if config.user.get("split_kernels", False):
    mesh = context.job_mesh(config)
    params = [{"w": jax.device_put(layer["w"], NamedSharding(mesh, spec)), "b": layer["b"]}
              for layer, spec in zip(params, (P(None, "model"), P("model", None)))]
  train, queries = _data()
  return Task(params=params, loss_fn=WATCHED_LOSS, per_example_loss_fn=WATCHED_PER_EXAMPLE,
              train=sources.ArraySource(train), queries=sources.ArraySource(queries))


def _config(mesh_shape=None, split_kernels=False):
  c = config_lib.default_config()
  c.task = "tests.test_sharded_jobs:get_task"
  c.mesh_shape = mesh_shape
  c.user.split_kernels = split_kernels
  c.arnoldi.n_iters, c.arnoldi.top_k, c.arnoldi.num_examples, c.arnoldi.damping = 30, 6, -1, 1.0
  c.arnoldi.checkpoint_seconds = c.score.checkpoint_seconds = 1e6
  c.project.batch_size, c.project.chunk_rows, c.project.sketch_dim = 16, 16, 32  # sketch < p₁p₂ = 90: inexact
  c.project.residual_rank = 12  # the defaults' r > 0 and score.cg_iters = 3, as a user runs them
  c.score.top_k, c.score.rows_per_block, c.score.grid_examples = 4, 16, 0
  return c


def _run(workdir, mesh_shape=None, split_kernels=False):
  """Runs fit, project and score; returns (context, {stage: the first kernel's shardings seen inside it})."""
  config = _config(mesh_shape, split_kernels)
  ctx = context.prepare(config, str(workdir), task=get_task(config))
  seen = {}
  for name, stage in (("fit", stages.fit_stage), ("project", stages.project_stage), ("score", stages.score_stage)):
    SEEN.clear()
    stage(ctx, quiet=True)
    seen[name] = list(SEEN)
  return ctx, seen


def _table(workdir, name, query_set="queries"):
  with open(user_task_jobs.table(str(workdir), name, query_set)) as f:
    return list(csv.DictReader(f))


def _assert_same_table(got, want, score):
  assert [{k: v for k, v in r.items() if k != score} for r in got] == \
         [{k: v for k, v in r.items() if k != score} for r in want]
  np.testing.assert_allclose([float(r[score]) for r in got], [float(r[score]) for r in want], **TOL)


def _check_split_over_model(x, num_params, model):
  """Asserts that flat x (rows, P) is split over 'model', shard by shard: ⌈p / model⌉ columns each, every
  column once, the padding zero."""
  cols = -(-num_params // model)
  assert x.shape[1] == cols * model and x.sharding.spec == sharding.BASIS_SPEC
  for shard in x.addressable_shards:
    assert shard.data.shape == (x.shape[0], cols)
    start = shard.index[1].start or 0
    np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(x)[:, start:start + cols])
  assert sorted({s.index[1].start or 0 for s in x.addressable_shards}) == list(range(0, cols * model, cols))
  np.testing.assert_array_equal(np.asarray(x)[:, num_params:], 0.0)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("one_device")
  ctx = _run(workdir)[0]
  es = workdir_lib.load_eigenspace(ctx)
  return workdir, es, workdir_lib.load_residual_basis(ctx, es)


@pytest.mark.parametrize("shape", MESHES)
def test_defaults_on_a_mesh_equal_one_device(one_device, tmp_path, shape):
  want_dir, want_es, want_basis = one_device
  ctx, seen = _run(tmp_path, shape, split_kernels=shape[1] > 1)
  p = sharding.num_params(ctx.task.params)
  assert p == 83 and want_basis.shape[0] > 6
  for name, score in (("top_k.csv", "score"), ("self_influence.csv", "self_influence")):
    _assert_same_table(_table(tmp_path, name), _table(want_dir, name), score)
  got, want = (store_lib.open_store(os.path.join(w, "store")) for w in (tmp_path, want_dir))
  for name, rows in want.read(0, NUM_TRAIN).items():  # U's rows may flip sign; V's are signed (largest entry > 0).
    same = np.abs if name == "projections" else (lambda x: x)
    np.testing.assert_allclose(same(got.read(0, NUM_TRAIN)[name]), same(rows), **TOL)
  es = workdir_lib.load_eigenspace(ctx)
  basis = workdir_lib.load_residual_basis(ctx, es)
  for x in (es.eigenvectors, basis):
    _check_split_over_model(x, p, shape[1])
  np.testing.assert_allclose(np.asarray(basis)[:, :p], np.asarray(want_basis), **TOL)
  if shape == (2, 4):  # The plain tail (no solves): the queries projected on W = [U; V] and sketched on the mesh.
    for workdir, mesh_shape in ((want_dir, None), (tmp_path, shape)):
      config = _config(mesh_shape, split_kernels=mesh_shape is not None)
      config.score.cg_iters, config.score.name = 0, "plain"
      stages.score_stage(context.prepare(config, str(workdir), task=get_task(config)), quiet=True)
    _assert_same_table(_table(tmp_path, "top_k.csv", "plain"), _table(want_dir, "top_k.csv", "plain"), "score")
  if shape[1] > 1:
    # Inside every program of the fit and the projection (the residual basis, the rows, the queries' plain
    # side) that evaluated the loss, as XLA partitioned it, the kernel was split as the task laid it out.
    # (The score job's preconditioned solves still run on one device per process: not checked here.)
    for stage in ("fit", "project"):
      assert seen[stage], f"no program of the {stage} stage was compiled here (a cached program reports nothing)"
      for found in seen[stage]:
        assert isinstance(found, NamedSharding) and found.spec == P(None, "model"), (stage, found)
    assert ctx.task.params[0]["w"].sharding.spec == P(None, "model")
