"""Every projection method equals the plain per-example gradient projection (vmap of grad, then a matmul).

float64, on every layer type of the example models (Dense, Conv, Embed,
DenseGeneral attention projections, LayerNorm, BatchNorm) and on layers the
layer-wise projector must leave to vmap(grad) (a tied embedding's `attend`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from influence_jax import flax_adapters, layer_gradients, layerwise, projection, sketch
from influence_jax.examples import models

TOL = 1e-10
K = 3


class TiedLM(nn.Module):
  """Embedding, a DenseGeneral over two axes applied once, and logits through the tied `embed.attend`."""

  vocab: int = 7

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(self.vocab, 4, name="embed")
    h = embed(tokens)  # (B, L, 4)
    h = nn.DenseGeneral((2, 3), axis=(-2, -1), name="mix")(h)  # Applied once per example: (B, 2, 3).
    h = nn.Dense(4, name="back")(h.reshape(h.shape[0], -1))
    return embed.attend(h)  # (B, vocab)


class ConvVariants(nn.Module):
  """Convolutions of every kind the layer-wise projector takes offset by offset, and two it leaves to vmap."""

  @nn.compact
  def __call__(self, x):
    halves = nn.Conv(2, (3, 3), name="folded")(x.reshape(-1, 4, 8, 1))  # Two images an example.
    halves = halves.reshape(x.shape[0], -1)
    x = x.reshape(x.shape[0], 8, 8, 1)
    x = nn.Conv(3, (3, 2), strides=(2, 1), padding="VALID", name="valid")(x)  # (B, 3, 7, 3)
    x = nn.Conv(4, (2, 2), padding=((1, 0), (2, 1)), kernel_dilation=(1, 2), use_bias=False, name="pairs")(x)
    x = nn.Conv(4, (3, 3), input_dilation=2, padding=1, name="dilated")(jnp.tanh(x))
    x = nn.Conv(4, (3, 3), padding="CIRCULAR", name="circular")(x)  # Left to vmap: padded by hand.
    x = nn.Conv(4, (1, 1), feature_group_count=2, name="grouped")(x)  # Left to vmap: two groups.
    s = x.reshape(x.shape[0], -1, 4)  # A 1-D convolution over the positions.
    s = nn.Conv(2, (3,), strides=2, padding="SAME", name="one_d")(s)
    return nn.Dense(10, name="output")(jnp.concatenate([s.reshape(s.shape[0], -1), halves], axis=1))


def _float64(variables):
  return jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, variables)


def _problem(name):
  """Returns (ModelFns, batch of 11 examples) for one float64 model."""
  key, kx, ky = jax.random.split(jax.random.PRNGKey(0), 3)
  n = 11
  if name in ("transformer", "tied"):
    src = jax.random.randint(kx, (n, 6), 1, 7)
    tgt = jax.random.randint(ky, (n, 5), 1, 7)
    if name == "tied":
      module, keys, batch, loss = TiedLM(), "x", {"x": src, "y": tgt[:, 0]}, models.softmax_cross_entropy
    else:
      module = models.Transformer(vocab_size=7, max_len=8, d_model=8, num_heads=2, d_ff=16)
      keys, batch, loss = ("src", "tgt"), {"src": src, "tgt": tgt, "y": tgt}, models.sequence_cross_entropy
  else:
    module = {"mlp": models.MLP(features=(6, 5), activation="tanh"),
              "cnn_bn": models.CNN(features=(3, 4), use_batch_norm=True), "convs": ConvVariants()}[name]
    keys = "x"
    batch = {"x": jax.random.normal(kx, (n, 64), jnp.float64), "y": jax.random.randint(ky, (n,), 0, 10)}
    loss = models.softmax_cross_entropy
  inputs = [batch[k][:1] for k in ((keys,) if isinstance(keys, str) else keys)]
  variables = _float64(module.init(key, *inputs))
  if "batch_stats" in variables:  # Running statistics away from (0, 1), so that BatchNorm matters.
    variables["batch_stats"] = jax.tree.map(lambda a: a + jax.random.uniform(key, a.shape, a.dtype),
                                            variables["batch_stats"])
  return flax_adapters.linen_loss_fns(module, variables, loss, input_key=keys), batch


def _exact(fns, batch, directions):
  """Returns ((N, k) projections, (N,) squared norms) from full per-example gradients."""
  flat, unravel = ravel_pytree(fns.params)
  one = lambda ex: jax.grad(lambda f: fns.per_example_loss_fn(unravel(f), jax.tree.map(lambda a: a[None], ex))[0])
  grads = jax.vmap(lambda ex: one(ex)(flat))(batch)
  return grads @ directions.T, jnp.sum(grads * grads, axis=1)


def _split(batch, sizes):
  """Returns the batch cut into consecutive batches of the given sizes."""
  out, start = [], 0
  for s in sizes:
    out.append(jax.tree.map(lambda a: a[start:start + s], batch))
    start += s
  return out


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "convs", "transformer", "tied"])
@pytest.mark.parametrize("method", [None, "layerwise", "vjp", "jvp"])
def test_every_method_equals_per_example_gradients(name, method):
  fns, batch = _problem(name)
  p = ravel_pytree(fns.params)[0].size
  directions = jax.random.normal(jax.random.PRNGKey(1), (K, p), jnp.float64)
  want, want_sq = _exact(fns, batch, directions)
  norms = method != "jvp"
  # 11 examples as batches of 7 and 4 with micro-batches of 3: padding in both batches.
  got = projection.project_on(directions, fns.per_example_loss_fn, fns.params, _split(batch, (7, 4)),
                              method=method, microbatch_size=3, with_sq_norms=norms)
  np.testing.assert_allclose(got.values, want, rtol=TOL, atol=TOL)
  if norms:
    np.testing.assert_allclose(got.sq_norms, want_sq, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "convs", "transformer", "tied"])
@pytest.mark.parametrize("method", [None, "vjp"])
@pytest.mark.parametrize("with_sketch", [False, True])
def test_project_and_sketch_equals_per_example_gradients(name, method, with_sketch):
  """The stores' rows (U g, ‖g‖², R(I − UᵀU)g, ℓ) by either path, against full per-example gradients."""
  fns, batch = _problem(name)
  flat, unravel = ravel_pytree(fns.params)
  p = flat.size
  u, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(3), (p, K), jnp.float64))
  directions = jnp.pad(u.T, ((0, 0), (0, 5)))  # A mesh's flat layout: zero columns beyond p.
  sk = sketch.make_sketch(p, 24, seed=4, dtype=jnp.float64) if with_sketch else None
  got = sketch.project_and_sketch(directions, sk, fns.per_example_loss_fn, fns.params, batch, method=method,
                                  microbatch_size=1 if with_sketch else 0)
  one = lambda ex: jax.grad(lambda f: fns.per_example_loss_fn(unravel(f), jax.tree.map(lambda a: a[None], ex))[0])
  grads = jax.vmap(lambda ex: one(ex)(flat))(batch)
  np.testing.assert_allclose(got.projections, grads @ u, rtol=TOL, atol=TOL)
  np.testing.assert_allclose(got.sq_norms, jnp.sum(grads * grads, axis=1), rtol=TOL, atol=TOL)
  np.testing.assert_allclose(got.losses, fns.per_example_loss_fn(fns.params, batch), rtol=TOL, atol=TOL)
  if with_sketch:
    want = sketch.apply_sketch(sk, grads - (grads @ u) @ u.T)
    assert want.shape == (11, sk.dim) and float(jnp.abs(want).max()) > 1e-3
    np.testing.assert_allclose(got.sketch, want, rtol=TOL, atol=TOL)
  else:
    assert got.sketch.shape == (11, 0)


@pytest.mark.parametrize("k, columns, chunks", [(6, 12, [3, 3, 6]), (5, 12, [5, 5, 5]), (5, 18, [2, 2, 5])])
def test_factored_dense_in_chunks_of_directions(k, columns, chunks, monkeypatch):
  """Dense directions taken a few at a time (k = 6: chunks of 2 and of 1; k = 5, prime: of 1, or of
  3 with a zero direction padding the last), by project_on (layouts prepared once per call) and by
  the store's rows (laid out in the program)."""
  monkeypatch.setattr(layer_gradients, "FACTORED_COLUMNS", columns)  # The MLP's layers have 6, 5 and 10 outputs.
  fns, batch = _problem("mlp")
  flat, unravel = ravel_pytree(fns.params)
  directions = jax.random.normal(jax.random.PRNGKey(k), (k, flat.size), jnp.float64)
  layouts = fns.per_example_loss_fn.prepare_directions(fns.params, directions, True,
                                                       jax.tree.map(lambda a: a[:1], batch))
  assert sorted(u.shape[0] for u in layouts.values()) == chunks
  want, want_sq = _exact(fns, batch, directions)
  got = projection.project_on(directions, fns.per_example_loss_fn, fns.params, _split(batch, (7, 4)),
                              microbatch_size=3, with_sq_norms=True)
  np.testing.assert_allclose(got.values, want, rtol=TOL, atol=TOL)
  np.testing.assert_allclose(got.sq_norms, want_sq, rtol=TOL, atol=TOL)
  rows = sketch.project_and_sketch(directions, None, fns.per_example_loss_fn, fns.params, batch, microbatch_size=0)
  np.testing.assert_allclose(rows.projections, want, rtol=TOL, atol=TOL)


class SharedDense(nn.Module):
  """One Dense applied twice in a row (an unrolled cell), then a head."""

  @nn.compact
  def __call__(self, x):
    cell = nn.Dense(x.shape[-1], name="cell")
    return nn.Dense(10, name="head")(jnp.tanh(cell(jnp.tanh(cell(x)))))


def test_a_dense_called_twice_has_one_layout_and_exact_projections():
  key, kx, ky = jax.random.split(jax.random.PRNGKey(5), 3)
  batch = {"x": jax.random.normal(kx, (9, 6), jnp.float64), "y": jax.random.randint(ky, (9,), 0, 10)}
  module = SharedDense()
  fns = flax_adapters.linen_loss_fns(module, _float64(module.init(key, batch["x"][:1])), models.softmax_cross_entropy)
  p = ravel_pytree(fns.params)[0].size
  directions = jax.random.normal(jax.random.PRNGKey(6), (K, p), jnp.float64)
  layouts = fns.per_example_loss_fn.prepare_directions(fns.params, directions, False,
                                                       jax.tree.map(lambda a: a[:1], batch))
  assert sorted(layouts) == ["cell", "head"]
  got = projection.project_on(directions, fns.per_example_loss_fn, fns.params, [batch], microbatch_size=4)
  np.testing.assert_allclose(got.values, _exact(fns, batch, directions)[0], rtol=TOL, atol=TOL)


def test_convolutions_by_kernel_offsets_where_they_can():
  fns, batch = _problem("convs")
  calls = layerwise.discover_calls(fns.per_example_loss_fn.fn, fns.params, jax.tree.map(lambda a: a[:1], batch))
  by_offsets = {c.path[0] for c in calls if layer_gradients.conv_geometry(c) is not None}
  assert by_offsets == {"folded", "valid", "pairs", "dilated", "one_d"}


def test_project_and_sketch_refuses_jvp():
  fns, batch = _problem("mlp")
  p = ravel_pytree(fns.params)[0].size
  with pytest.raises(ValueError, match="jvp never forms the gradient"):
    sketch.project_and_sketch(jnp.zeros((K, p)), None, fns.per_example_loss_fn, fns.params, batch, method="jvp")


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_default_micro_batch_and_norms(name):
  fns, batch = _problem(name)
  p = ravel_pytree(fns.params)[0].size
  directions = jax.random.normal(jax.random.PRNGKey(2), (K, p), jnp.float64)
  want, want_sq = _exact(fns, batch, directions)
  got = projection.project_on(directions, fns.per_example_loss_fn, fns.params, [batch], with_sq_norms=True)
  np.testing.assert_allclose(got.values, want, rtol=TOL, atol=TOL)
  np.testing.assert_allclose(got.sq_norms, want_sq, rtol=TOL, atol=TOL)


def test_layers_covered():
  """The layer-wise path really runs on each layer type (not everything left to vmap(grad))."""
  expect = {
      "mlp": {("hidden_0",), ("hidden_1",), ("output",)},
      "cnn_bn": {("conv_0",), ("conv_1",), ("output",)},
      # attend() reads the embedding outside __call__: the table is left to vmap(grad).
      "tied": {("mix",), ("back",)},
  }
  for name, paths in expect.items():
    fns, batch = _problem(name)
    calls = layerwise.discover_calls(fns.per_example_loss_fn, fns.params, jax.tree.map(lambda a: a[:1], batch))
    assert {c.path for c in calls} == paths, name
  fns, batch = _problem("transformer")
  calls = layerwise.discover_calls(fns.per_example_loss_fn, fns.params, jax.tree.map(lambda a: a[:1], batch))
  paths = [c.path for c in calls]
  assert paths.count(("embed",)) == 2  # Shared by the encoder and the decoder.
  assert ("decoder_0", "cross_attn", "query") in paths and ("head",) in paths
  assert {type(c.layer) for c in calls} == {nn.Embed, nn.Dense, nn.DenseGeneral}


def test_default_method():
  fns, _ = _problem("mlp")
  assert projection.resolve_method(fns.per_example_loss_fn, None) == "layerwise"
  # A sketched store's rows, from the model's layers: most parameters in layers applied once (MLP, the
  # CNN's output layer, the tied model's DenseGenerals) → layer-wise; in Dense layers applied at every
  # position (Transformer) → vjp. Without a sketch, or when asked, as resolve_method says.
  for name, want in (("mlp", "layerwise"), ("cnn_bn", "layerwise"), ("tied", "layerwise"), ("transformer", "vjp")):
    fns_n, batch = _problem(name)
    one = projection.shape_of_one(batch)
    assert sketch.store_method(fns_n.per_example_loss_fn, None, True, fns_n.params, one) == want, name
    assert sketch.store_method(fns_n.per_example_loss_fn, None, False, fns_n.params, one) == "layerwise"
    assert sketch.store_method(fns_n.per_example_loss_fn, "layerwise", True, fns_n.params, one) == "layerwise"
  model = models.NNXMLP(64, (4,), rngs=nnx.Rngs(0))
  nnx_fns = flax_adapters.nnx_loss_fns(model, models.softmax_cross_entropy)
  assert sketch.store_method(nnx_fns.per_example_loss_fn, None, True, None, None) == "vjp"
  assert projection.resolve_method(nnx_fns.per_example_loss_fn, None) == "vjp"
  with pytest.raises(ValueError, match="layerwise"):
    projection.resolve_method(nnx_fns.per_example_loss_fn, "layerwise")
  with pytest.raises(ValueError, match="Unknown projection method"):
    projection.resolve_method(fns.per_example_loss_fn, "exact")


@pytest.mark.parametrize("batch,most,want", [(1024, 300, 256), (1021, 300, 256), (1024, 1024, 1024),
                                              (7, 3, 3), (10, 3, 3), (5, 0, 1), (5, 9, 5)])
def test_balanced_microbatch(batch, most, want):
  micro = projection.balanced_microbatch(batch, most)
  assert micro == want
  steps = -(-batch // micro)
  assert micro <= max(1, most) and steps * micro - batch < steps
