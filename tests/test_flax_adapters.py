"""Tests for influence_jax.flax_adapters: Linen and NNX models as loss functions of their params."""

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import optax
import pytest
from flax import nnx

from influence_jax import flax_adapters, projection, solvers
from influence_jax.examples import datasets
from influence_jax.examples import models
from influence_jax.methods import training
from tests import toy_problems

L2 = 1e-2


@pytest.fixture(scope="module")
def data():
  d = datasets.load_digits(seed=0)
  as64 = lambda b, n: {"x": jnp.asarray(b["x"][:n], jnp.float64), "y": jnp.asarray(b["y"][:n])}
  return as64(d["train"], 24), as64(d["test"], 5)


@pytest.fixture(scope="module")
def twins(data):
  """A float64 Linen MLP (64 -> 3 -> 10, tanh; 235 params) and its NNX copy, as ModelFns."""
  train, _ = data
  model = models.MLP(features=(3,), activation="tanh")
  variables = jax.tree.map(lambda v: v.astype(jnp.float64), model.init(jax.random.key(0), train["x"][:1]))
  nnx_model = models.nnx_mlp_from_linen(model, variables["params"])
  linen = flax_adapters.linen_loss_fns(model, variables, models.softmax_cross_entropy, l2=L2)
  nnx_fns = flax_adapters.nnx_loss_fns(nnx_model, models.softmax_cross_entropy, l2=L2)
  return model, variables, nnx_model, linen, nnx_fns


def _reference_per_example_loss(params, batch):
  """Hand-written forward pass of the tanh MLP: the answer the adapters must reproduce."""
  h = jnp.tanh(batch["x"] @ params["hidden_0"]["kernel"] + params["hidden_0"]["bias"])
  logits = h @ params["output"]["kernel"] + params["output"]["bias"]
  return -jax.nn.log_softmax(logits)[jnp.arange(logits.shape[0]), batch["y"]]


def test_linen_losses_match_hand_written_reference(data, twins):
  train, _ = data
  _, variables, _, linen, _ = twins
  params = variables["params"]
  assert linen.params is params
  ref = _reference_per_example_loss(params, train)
  np.testing.assert_allclose(linen.per_example_loss_fn(params, train), ref, rtol=1e-12)
  sq = sum(float(jnp.sum(p ** 2)) for p in jax.tree.leaves(params))
  np.testing.assert_allclose(linen.loss_fn(params, train), jnp.mean(ref) + 0.5 * L2 * sq, rtol=1e-12)


def test_linen_and_nnx_twins_agree_on_losses_and_gradients(data, twins):
  train, _ = data
  _, variables, _, linen, nnx_fns = twins
  assert isinstance(nnx_fns.params, nnx.State)
  assert jax.tree.leaves(nnx_fns.params)[0].dtype == jnp.float64
  np.testing.assert_allclose(nnx_fns.per_example_loss_fn(nnx_fns.params, train),
                             linen.per_example_loss_fn(linen.params, train), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(nnx_fns.loss_fn(nnx_fns.params, train), linen.loss_fn(linen.params, train), rtol=1e-12)
  g_nnx = nnx.to_pure_dict(jax.grad(nnx_fns.loss_fn)(nnx_fns.params, train))
  g_linen = jax.grad(linen.loss_fn)(linen.params, train)
  assert jax.tree.structure(g_nnx) == jax.tree.structure(g_linen)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), g_nnx, g_linen)
  pe_nnx = projection.gradients(nnx_fns.per_example_loss_fn, nnx_fns.params, [train])
  pe_linen = projection.gradients(linen.per_example_loss_fn, linen.params, [train])
  assert pe_nnx.shape == (24, 235)
  np.testing.assert_allclose(pe_nnx, pe_linen, rtol=1e-6, atol=1e-6)
  # The Linen per-example gradients are those of the hand-written loss.
  pe_ref = projection.gradients(_reference_per_example_loss, variables["params"], [train])
  np.testing.assert_allclose(pe_linen, pe_ref, rtol=1e-10, atol=1e-12)


def test_linen_and_nnx_twins_give_identical_exact_influence(data, twins):
  train, test = data
  _, _, _, linen, nnx_fns = twins
  s_linen = solvers.exact_influence(linen.loss_fn, linen.per_example_loss_fn, linen.params, [test], [train],
                                    damping=1e-2)
  s_nnx = solvers.exact_influence(nnx_fns.loss_fn, nnx_fns.per_example_loss_fn, nnx_fns.params, [test], [train],
                                  damping=1e-2)
  assert s_linen.shape == (5, 24)
  assert np.abs(s_linen).max() > 1e-3
  np.testing.assert_allclose(s_nnx, s_linen, rtol=1e-6, atol=1e-6)


def test_nnx_params_written_back_after_training(data, twins):
  train, _ = data
  model, variables, _, _, _ = twins
  nnx_model = models.nnx_mlp_from_linen(model, variables["params"])
  fns = flax_adapters.nnx_loss_fns(nnx_model, models.softmax_cross_entropy, l2=L2)
  params, hist = training.train(fns.loss_fn, fns.params, train, optimizer=optax.adam(1e-2), num_steps=10)
  assert hist["final_loss"] < hist["loss"][0]
  before = nnx_model(train["x"])
  np.testing.assert_allclose(before, fns.outputs_fn(fns.params, train), rtol=1e-12)  # Untouched so far.
  np.testing.assert_allclose(fns.merge(params)(train["x"]), fns.outputs_fn(params, train), rtol=1e-12)
  assert flax_adapters.nnx_update(nnx_model, params) is nnx_model
  np.testing.assert_allclose(nnx_model(train["x"]), fns.outputs_fn(params, train), rtol=1e-12)
  assert np.abs(nnx_model(train["x"]) - before).max() > 1e-3


class _TrainByDefault(nn.Module):
  """A Linen net whose call defaults to training mode (BatchNorm on batch statistics, dropout on)."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
    x = nn.Dropout(0.5, deterministic=not train)(jax.nn.relu(x))
    return nn.Dense(10)(x)


def _with_batch_stats(model, x):
  variables = model.init({"params": jax.random.key(1), "dropout": jax.random.key(2)}, x)
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(3)})
  variables = {"params": variables["params"], **updates}
  assert np.abs(jax.tree.leaves(updates)[0]).max() > 0  # Non-trivial running statistics.
  return variables


@pytest.mark.parametrize("model", [models.CNN(features=(2, 3), use_batch_norm=True), _TrainByDefault()],
                         ids=["cnn", "train_by_default"])
def test_linen_batch_stats_are_closed_over_and_used_in_eval_mode(data, model):
  train, _ = data
  variables = _with_batch_stats(model, train["x"])
  fns = flax_adapters.linen_loss_fns(model, variables, models.softmax_cross_entropy)
  assert set(fns.params) == set(variables["params"]) and "batch_stats" not in fns.params
  expected = models.softmax_cross_entropy(model.apply(variables, train["x"], train=False), train["y"])
  per_example = fns.per_example_loss_fn(fns.params, train)
  np.testing.assert_allclose(per_example, expected, rtol=1e-12)
  # Eval mode: an example's loss does not depend on the rest of its batch.
  np.testing.assert_allclose(fns.per_example_loss_fn(fns.params, jax.tree.map(lambda a: a[3:5], train)),
                             per_example[3:5], rtol=1e-10)
  grads = jax.grad(fns.loss_fn)(fns.params, train)
  assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])
  merged = fns.merge(fns.params)
  assert set(merged) == {"params", "batch_stats"}
  jax.tree.map(np.testing.assert_array_equal, merged["batch_stats"], variables["batch_stats"])


class _NNXBatchNormNet(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(64, 4, rngs=rngs, param_dtype=jnp.float64)
    self.bn = nnx.BatchNorm(4, rngs=rngs, param_dtype=jnp.float64)
    self.bn.mean = nnx.BatchStat(jnp.zeros(4, jnp.float64))  # nnx.BatchNorm keeps float32 statistics.
    self.bn.var = nnx.BatchStat(jnp.ones(4, jnp.float64))
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.out = nnx.Linear(4, 10, rngs=rngs, param_dtype=jnp.float64)

  def __call__(self, x):
    return self.out(self.dropout(jax.nn.relu(self.bn(self.linear(x)))))


def test_nnx_batch_stats_and_rngs_closed_over_eval_mode(data):
  train, _ = data
  model = _NNXBatchNormNet(nnx.Rngs(0, dropout=1))
  model(train["x"])  # Train mode: updates the running statistics.
  fns = flax_adapters.nnx_loss_fns(model, models.softmax_cross_entropy)
  assert set(nnx.to_pure_dict(fns.params)) == {"linear", "bn", "out"}
  assert set(nnx.to_pure_dict(fns.params)["bn"]) == {"scale", "bias"}  # No mean/var: those are BatchStat.
  assert model.bn.use_running_average is False and model.dropout.deterministic is False  # Not modified.
  # Reference: an eval-mode copy of the model.
  ref = nnx.clone(model)
  ref.eval()
  expected = models.softmax_cross_entropy(ref(train["x"]), train["y"])
  per_example = fns.per_example_loss_fn(fns.params, train)
  np.testing.assert_allclose(per_example, expected, rtol=1e-12)
  np.testing.assert_allclose(fns.per_example_loss_fn(fns.params, train), per_example, rtol=0)  # No dropout.
  np.testing.assert_allclose(fns.per_example_loss_fn(fns.params, jax.tree.map(lambda a: a[:2], train)),
                             per_example[:2], rtol=1e-10)
  np.testing.assert_allclose(model.bn.mean[...], ref.bn.mean[...])  # Running statistics untouched.


def test_linen_bad_variables_raise(data, twins):
  model, variables, _, _, _ = twins
  with pytest.raises(ValueError, match="no 'params' collection"):
    flax_adapters.linen_loss_fns(model, variables["params"], models.softmax_cross_entropy)
  with pytest.raises(TypeError, match="module.init"):
    flax_adapters.linen_loss_fns(model, [variables], models.softmax_cross_entropy)
  with pytest.raises(ValueError, match="l2"):
    flax_adapters.linen_loss_fns(model, variables, models.softmax_cross_entropy, l2=-1.0)


def test_wrong_batch_keys_raise_clear_errors(data, twins):
  train, _ = data
  model, variables, nnx_model, _, _ = twins
  fns = flax_adapters.linen_loss_fns(model, variables, models.softmax_cross_entropy, input_key="image")
  with pytest.raises(KeyError, match=r"no input key 'image'.*input_key="):
    fns.loss_fn(fns.params, train)
  fns = flax_adapters.nnx_loss_fns(nnx_model, models.softmax_cross_entropy, label_key="label")
  with pytest.raises(KeyError, match=r"no label key 'label'.*label_key="):
    fns.per_example_loss_fn(fns.params, train)
  with pytest.raises(TypeError, match="nnx.Module"):
    flax_adapters.nnx_loss_fns(model, models.softmax_cross_entropy)


def test_linen_and_nnx_twins_give_identical_arnoldi_scores(data, twins):
  """The library's Arnoldi path (top-k < p, with and without the tail) sees the same network."""
  import influence_jax as ij

  train, test = data
  *_, linen, nnx_fns = twins
  results = []
  for fns in (linen, nnx_fns):
    es = ij.fit_eigenspace(fns.loss_fn, fns.params, [train], n_iters=40, top_k=20, damping=0.05)
    plain = ij.influence(es, fns.per_example_loss_fn, fns.params, [test], [train])
    tail = ij.influence(es, fns.per_example_loss_fn, fns.params, [test], [train], tail=True)
    results.append((np.asarray(es.eigenvalues), np.asarray(plain), np.asarray(tail)))
  for a, b in zip(*results):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_adapter_loss_supports_gauss_newton(data, twins):
  """loss_fn is a SplitLoss: the Gauss-Newton curvature works on Flax models out of the box."""
  import influence_jax as ij
  from influence_jax import curvature

  train, _ = data
  *_, linen, _ = twins
  assert np.isclose(linen.loss_fn(linen.params, train),
                    np.mean(linen.per_example_loss_fn(linen.params, train)) + L2 * flax_adapters.l2_penalty(linen.params))
  op = curvature.curvature_operator(linen.loss_fn, linen.params, [train], curvature="gauss_newton")
  exact = np.sort(np.linalg.eigvalsh(np.asarray(toy_problems.dense_matrix(op))))[::-1]
  assert exact.min() > 0  # Gauss-Newton + L2 is positive definite.
  es = ij.fit_eigenspace(linen.loss_fn, linen.params, [train], n_iters=60, top_k=5, curvature="gauss_newton")
  np.testing.assert_allclose(es.eigenvalues, exact[:5], rtol=1e-6)
