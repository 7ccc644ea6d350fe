"""Tests for influence_jax.models (architectures, losses) and influence_jax.training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from influence_jax import flax_adapters
from influence_jax.examples import datasets
from influence_jax.examples import models
from influence_jax.methods import training


@pytest.fixture(scope="module")
def digits():
  return datasets.load_digits(seed=0)


def _mlp_fns(x, features=(16,), l2=0.0, dtype=jnp.float32, seed=0):
  model = models.MLP(features=features)
  variables = model.init(jax.random.key(seed), jnp.asarray(x[:1], dtype))
  variables = jax.tree.map(lambda v: v.astype(dtype), variables)
  return flax_adapters.linen_loss_fns(model, variables, models.softmax_cross_entropy, l2=l2)


# ----------------------------------------------------------------------------- losses


def test_softmax_cross_entropy_matches_log_softmax():
  logits = jax.random.normal(jax.random.key(0), (5, 4), jnp.float64)
  labels = jnp.array([0, 3, 1, 2, 3])
  expected = -jax.nn.log_softmax(logits)[jnp.arange(5), labels]
  np.testing.assert_allclose(models.softmax_cross_entropy(logits, labels), expected, rtol=1e-12)
  with pytest.raises(ValueError, match="one more axis"):
    models.softmax_cross_entropy(logits, labels[:, None])


def test_sequence_cross_entropy_mean_and_mask():
  logits = jax.random.normal(jax.random.key(1), (3, 4, 6), jnp.float64)
  labels = jax.random.randint(jax.random.key(2), (3, 4), 0, 6)
  tok = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1)[..., 0]
  np.testing.assert_allclose(models.sequence_cross_entropy(logits, labels), tok.mean(1), rtol=1e-12)
  mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
  expected = [tok[0, :2].mean(), tok[1].mean(), tok[2, 0]]
  np.testing.assert_allclose(models.sequence_cross_entropy(logits, labels, mask), expected, rtol=1e-12)


# ----------------------------------------------------------------------------- models


def test_mlp_default_size_and_forward(digits):
  model = models.MLP()
  params = model.init(jax.random.key(0), digits["train"]["x"][:1])["params"]
  assert models.num_params(params) == 64 * 32 + 32 + 32 * 10 + 10 == 2410
  x = digits["train"]["x"][:4]
  expected = jax.nn.relu(x @ params["hidden_0"]["kernel"] + params["hidden_0"]["bias"])
  expected = expected @ params["output"]["kernel"] + params["output"]["bias"]
  np.testing.assert_allclose(model.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-6)
  big = jax.eval_shape(models.MLP(features=(256, 256)).init, jax.random.key(0), x[:1])["params"]
  assert 8e4 < models.num_params(big) < 1e5


def test_nnx_mlp_round_trip_and_errors(digits):
  model = models.MLP(features=(5, 4), activation="tanh")
  params = model.init(jax.random.key(0), digits["train"]["x"][:1])["params"]
  nnx_model = models.nnx_mlp_from_linen(model, params)
  x = digits["train"]["x"][:7]
  np.testing.assert_allclose(nnx_model(x), model.apply({"params": params}, x), rtol=1e-6, atol=1e-6)
  back = models.nnx_mlp_to_linen_params(nnx_model)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  with pytest.raises(ValueError, match="not the whole variables"):
    models.nnx_mlp_from_linen(model, {"params": params})
  with pytest.raises(ValueError, match="expects"):
    models.nnx_mlp_from_linen(models.MLP(features=(5,)), params)
  with pytest.raises(ValueError, match="unknown activation"):
    models.MLP(activation="nope").init(jax.random.key(0), x[:1])


def test_cnn_batch_norm_train_and_eval_modes(digits):
  x = digits["train"]["x"][:16]
  model = models.CNN(use_batch_norm=True)
  variables = model.init(jax.random.key(0), x)
  assert set(variables) == {"params", "batch_stats"}
  out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert out.shape == (16, 10)
  variables = {"params": variables["params"], **updates}
  # Eval mode: each example's output is independent of the rest of the batch.
  full = model.apply(variables, x)
  np.testing.assert_allclose(model.apply(variables, x[:3]), full[:3], rtol=1e-5, atol=1e-6)
  # Train mode uses batch statistics, so the same subset differs.
  part = model.apply(variables, x[:3], train=True, mutable=["batch_stats"])[0]
  assert np.abs(part - full[:3]).max() > 1e-3
  img = model.apply(variables, x.reshape(-1, 8, 8, 1))
  np.testing.assert_allclose(img, full, rtol=1e-6)


def test_transformer_shapes_and_causality():
  d = datasets.synthetic_seq2seq(4, 5, 7, seed=0)
  model = models.Transformer(vocab_size=7, max_len=8)
  params = model.init(jax.random.key(0), d["src"], d["tgt"])["params"]
  logits = model.apply({"params": params}, d["src"], d["tgt"])
  assert logits.shape == (4, 5, 7)
  # Changing target token j only changes predictions at positions > j (teacher forcing is causal).
  tgt2 = d["tgt"].copy()
  tgt2[:, 2] = (tgt2[:, 2] % 6) + 1
  logits2 = model.apply({"params": params}, d["src"], tgt2)
  np.testing.assert_allclose(logits2[:, :3], logits[:, :3], rtol=1e-5, atol=1e-6)
  assert np.abs(logits2[:, 3:] - logits[:, 3:]).max() > 1e-4
  # Greedy decoding equals argmax of teacher-forced logits fed its own outputs.
  out = models.greedy_decode(model, params, d["src"])
  np.testing.assert_array_equal(out, jnp.argmax(model.apply({"params": params}, d["src"], out), -1))
  with pytest.raises(ValueError, match="max_len"):
    model.apply({"params": params}, np.ones((1, 9), np.int32), np.ones((1, 9), np.int32))


# ----------------------------------------------------------------------------- training


def test_full_batch_sgd_equals_gradient_descent(digits):
  batch = jax.tree.map(lambda a: a[:50], digits["train"])
  fns = _mlp_fns(batch["x"], features=(4,), l2=1e-2, dtype=jnp.float64)
  params, hist = training.train(fns.loss_fn, fns.params, batch, optimizer=optax.sgd(0.5), num_steps=5)
  expected, losses = fns.params, []
  for _ in range(5):
    loss, g = jax.value_and_grad(fns.loss_fn)(expected, batch)
    losses.append(loss)
    expected = jax.tree.map(lambda p, gi: p - 0.5 * gi, expected, g)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), params, expected)
  np.testing.assert_allclose(hist["loss"], losses, rtol=1e-10)
  np.testing.assert_allclose(hist["final_loss"], fns.loss_fn(expected, batch), rtol=1e-10)


def test_minibatch_indices_are_epoch_permutations():
  idx = np.asarray(training.epoch_indices(jax.random.key(0), 10, 3, 7))
  assert idx.shape == (7, 3)
  for epoch in (idx[0:3], idx[3:6]):
    assert len(set(epoch.ravel())) == 9  # 3 batches of 3, one example dropped, none repeated.
  assert not np.array_equal(idx[0:3], idx[3:6])


def test_train_segment_vmaps_over_weights_and_keys_and_resumes(digits):
  batch = jax.tree.map(lambda a: jnp.asarray(a[:40]), {"x": digits["train"]["x"], "y": digits["train"]["y"]})
  fns = _mlp_fns(batch["x"], features=(4,), dtype=jnp.float64)
  opt = optax.adam(0.05)

  def weighted_loss(params, b):  # The weights ride in the batch, so vmap can map over them.
    return jnp.mean(b["weight"] * fns.per_example_loss_fn(params, b))

  def run(weights, key, batch_size=8, num_steps=6, params=fns.params, opt_state=None):
    opt_state = opt.init(params) if opt_state is None else opt_state
    return training.train_segment(weighted_loss, opt, params, opt_state, dict(batch, weight=weights), key,
                                  batch_size=batch_size, num_steps=num_steps)

  weights = jnp.asarray(np.random.default_rng(0).random((3, 40)))
  keys = jax.random.split(jax.random.key(1), 3)
  mapped = jax.vmap(run)(weights, keys)
  for m in range(3):
    looped = run(weights[m], keys[m])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[m], b, rtol=1e-10, atol=1e-12), mapped, looped)
  assert not np.allclose(mapped[2][0], mapped[2][1])  # Other weights and keys, other losses.
  # Resumable: two full-batch segments of 3 steps are one of 6.
  whole = run(weights[0], keys[0], batch_size=40, num_steps=6)
  half = run(weights[0], keys[0], batch_size=40, num_steps=3)
  rest = run(weights[0], keys[0], batch_size=40, num_steps=3, params=half[0], opt_state=half[1])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), whole[0], rest[0])
  np.testing.assert_allclose(whole[2], np.concatenate([half[2], rest[2]]), rtol=1e-10)


def test_train_reduces_loss_is_deterministic_and_accurate(digits):
  fns = _mlp_fns(digits["train"]["x"], features=(16,), l2=1e-4)
  kw = dict(optimizer=optax.adam(1e-2), num_epochs=15, batch_size=64)
  p1, h1 = training.train(fns.loss_fn, fns.params, digits["train"], seed=0, **kw)
  p2, h2 = training.train(fns.loss_fn, fns.params, digits["train"], seed=0, **kw)
  p3, _ = training.train(fns.loss_fn, fns.params, digits["train"], seed=1, **kw)
  assert h1["loss"].shape == (15 * (digits["train"]["y"].size // 64),)
  assert h1["final_loss"] < 0.2 * float(fns.loss_fn(fns.params, digits["train"]))
  jax.tree.map(np.testing.assert_array_equal, p1, p2)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p3)))
  acc = training.accuracy(fns.outputs_fn, p1, digits["test"])
  assert acc > 0.92
  logits = fns.outputs_fn(p1, digits["test"])
  assert acc == pytest.approx(float(np.mean(np.argmax(logits, -1) == digits["test"]["y"])))


def test_train_bad_arguments(digits):
  fns = _mlp_fns(digits["train"]["x"])
  with pytest.raises(ValueError, match="exactly one"):
    training.train(fns.loss_fn, fns.params, digits["train"], optimizer=optax.sgd(0.1), num_steps=1, num_epochs=1)
  bad = jax.tree.map(lambda p: p.at[0].set(jnp.nan), fns.params)
  with pytest.raises(ValueError, match="non-finite"):
    training.train(fns.loss_fn, bad, digits["train"], optimizer=optax.sgd(0.1), num_steps=1)
  with pytest.raises(KeyError, match="label key"):
    training.accuracy(fns.outputs_fn, fns.params, {"x": digits["test"]["x"]})


def test_train_to_convergence_reaches_stationary_point(digits):
  # Multinomial logistic regression with L2: strictly convex, so L-BFGS reaches ‖∇L‖ < tol.
  batch = jax.tree.map(lambda a: a[:300], digits["train"])
  fns = _mlp_fns(batch["x"], features=(), l2=1e-2, dtype=jnp.float64)
  params, info = training.train_to_convergence(fns.loss_fn, fns.params, batch, tol=1e-8, max_steps=500)
  assert info["converged"] and info["steps"] < 500
  grad = jax.grad(fns.loss_fn)(params, batch)
  assert float(optax.tree_utils.tree_norm(grad)) < 1e-8
  assert info["loss"] == pytest.approx(float(fns.loss_fn(params, batch)), rel=1e-12)
  # A few Adam steps from there cannot go lower (it is the minimum).
  more, hist = training.train(fns.loss_fn, params, batch, optimizer=optax.adam(1e-3), num_steps=20)
  assert hist["final_loss"] >= info["loss"] - 1e-12


def test_transformer_learns_reversal_a_little():
  d = datasets.synthetic_seq2seq(128, 4, 6, seed=0)
  model = models.Transformer(vocab_size=6, max_len=4, d_model=16, d_ff=32)
  fns = flax_adapters.linen_loss_fns(
      model, model.init(jax.random.key(0), d["src"][:1], d["tgt"][:1]), models.sequence_cross_entropy,
      input_key=("src", "tgt"), label_key="tgt")
  params, hist = training.train(fns.loss_fn, fns.params, d, optimizer=optax.adam(1e-2), num_epochs=25, batch_size=32)
  assert hist["final_loss"] < 0.7 * float(fns.loss_fn(fns.params, d))
  assert training.accuracy(fns.outputs_fn, params, d, label_key="tgt") > 0.4
