"""Every projection method equals the plain per-example gradient projection (vmap of grad, then a matmul).

float64, on every layer type of the example models (Dense, Conv, Embed,
DenseGeneral attention projections, LayerNorm, BatchNorm) and on layers the
layer-wise projector must leave to vmap(grad) (a tied embedding's `attend`); and, by the layers
found from the jaxpr (`traced`), on models of every family: plain functions (an MLP with a weight
used twice, a CNN with strides and padding, tied embeddings, a scanned layer, an RNN cell),
equinox-style pytree modules, NNX, and the Linen models' losses (a Transformer among them).
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from influence_jax import flax_adapters, jaxpr_contractions, layer_gradients, layerwise, projection, sketch, traced
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


def _full_gradients(fns, batch):
  """Returns the (N, p) per-example gradients by vmap of grad, jitted (as every projection is: a model
  with float32 steps inside, e.g. NNX attention, rounds differently outside jit)."""
  flat, unravel = ravel_pytree(fns.params)
  one = lambda ex: jax.grad(lambda f: fns.per_example_loss_fn(unravel(f), jax.tree.map(lambda a: a[None], ex))[0])
  return jax.jit(jax.vmap(lambda ex: one(ex)(flat)))(batch)


def _exact(fns, batch, directions):
  """Returns ((N, k) projections, (N,) squared norms) from full per-example gradients."""
  grads = _full_gradients(fns, batch)
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
  grads = _full_gradients(fns, batch)
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
  # NNX and plain functions: layer-wise too, their layers found from the jaxpr (`traced`).
  model = models.NNXMLP(64, (4,), rngs=nnx.Rngs(0))
  nnx_fns = flax_adapters.nnx_loss_fns(model, models.softmax_cross_entropy)
  one = projection.shape_of_one({"x": jnp.zeros((2, 64)), "y": jnp.zeros((2,), jnp.int32)})
  assert sketch.store_method(nnx_fns.per_example_loss_fn, None, True, nnx_fns.params, one) == "layerwise"
  assert projection.resolve_method(nnx_fns.per_example_loss_fn, None) == "layerwise"
  plain = lambda params, batch: jnp.sum(batch["x"] * params, axis=1)  # No contraction: nothing factored.
  assert sketch.store_method(plain, None, True, jnp.zeros(64), one) == "vjp"
  assert isinstance(projection.as_layerwise(plain), traced.TracedLayerwiseLoss)
  assert projection.as_layerwise(plain) is projection.as_layerwise(plain)  # One per function: compiled once.
  assert projection.as_layerwise(fns.per_example_loss_fn) is fns.per_example_loss_fn  # Linen: interception.
  with pytest.raises(ValueError, match="Unknown projection method"):
    projection.resolve_method(fns.per_example_loss_fn, "exact")


@pytest.mark.parametrize("batch,most,want", [(1024, 300, 256), (1021, 300, 256), (1024, 1024, 1024),
                                              (7, 3, 3), (10, 3, 3), (5, 0, 1), (5, 9, 5)])
def test_balanced_microbatch(batch, most, want):
  micro = projection.balanced_microbatch(batch, most)
  assert micro == want
  steps = -(-batch // micro)
  assert micro <= max(1, most) and steps * micro - batch < steps


# ----------------------------------------------------------------------------- layers found from the jaxpr


class _Fns(NamedTuple):
  params: object
  per_example_loss_fn: object


def _plain_mlp(params, batch):
  """A plain JAX MLP over a dict of arrays, its hidden weight `cell` applied twice (x @ W)."""
  h = jnp.tanh(batch["x"] @ params["w0"] + params["b0"])
  h = jnp.tanh(h @ params["cell"] + params["bc"])
  h = jnp.tanh(h @ params["cell"] + params["bc"])
  return models.softmax_cross_entropy(h @ params["out"]["w"] + params["out"]["b"], batch["y"])


def _plain_cnn(params, batch):
  """lax convolutions with strides and padding (left to the exact per-leaf gradients), then a Dense."""
  x = batch["x"].reshape(-1, 1, 8, 8)
  x = jax.lax.conv_general_dilated(x, params["c0"], (1, 1), ((1, 1), (1, 1)))
  x = jax.lax.conv_general_dilated(jnp.tanh(x), params["c1"], (2, 2), ((0, 1), (1, 0)))
  return models.softmax_cross_entropy(jnp.tanh(x).reshape(x.shape[0], -1) @ params["w"], batch["y"])


def _plain_tied(params, batch):
  """Tied embeddings: the table gathered and contracted with (its leaf left to the exact gradient)."""
  h = params["table"][batch["x"]].mean(axis=1)  # (B, d)
  h = jnp.tanh(h @ params["w"])
  return models.softmax_cross_entropy(h @ params["table"].T, batch["y"])


def _plain_scan(params, batch):
  """A scanned layer: stacked weights (L, d, d), one slice an iteration of lax.scan."""
  def cell(h, w):
    return jnp.tanh(h @ w), None

  h, _ = jax.lax.scan(cell, jnp.tanh(batch["x"] @ params["w_in"]), params["stack"])
  return models.softmax_cross_entropy(h @ params["w_out"], batch["y"])


def _plain_rnn(params, batch):
  """One weight read by every iteration of a scan over the sequence (an RNN cell), from the scan's constants."""
  seq = jnp.moveaxis(batch["x"].reshape(-1, 4, 16), 1, 0)  # (T, B, 16)

  def cell(h, x_t):
    return jnp.tanh(h @ params["w_h"] + x_t @ params["w_x"]), None

  h, _ = jax.lax.scan(cell, jnp.zeros((seq.shape[1], 5), seq.dtype), seq)
  return models.softmax_cross_entropy(h @ params["w_out"], batch["y"])


@jax.tree_util.register_pytree_node_class
class EqxLinear:
  """An equinox-style layer: a pytree of its arrays, called on one example (W @ x); vmapped over a batch."""

  def __init__(self, weight, bias):
    self.weight, self.bias = weight, bias

  def __call__(self, x):
    return self.weight @ x + self.bias

  def tree_flatten(self):
    return (self.weight, self.bias), None

  @classmethod
  def tree_unflatten(cls, _, children):
    return cls(*children)


def _eqx_mlp(params, batch):
  first, second = params
  logits = jax.vmap(lambda x: second(jnp.tanh(first(x))))(batch["x"])
  return models.softmax_cross_entropy(logits, batch["y"])


class NNXBlock(nnx.Module):
  """An NNX Transformer block: embeddings, self-attention, LayerNorm, a position-wise Linear, a head."""

  def __init__(self, rngs):
    f = jnp.float64
    self.embed = nnx.Embed(7, 8, rngs=rngs, param_dtype=f)
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=rngs,
                                       param_dtype=f)
    self.ln = nnx.LayerNorm(8, rngs=rngs, param_dtype=f)
    self.ff = nnx.Linear(8, 16, rngs=rngs, param_dtype=f)
    self.head = nnx.Linear(16 * 5, 10, rngs=rngs, param_dtype=f)

  def __call__(self, tokens):
    h = self.embed(tokens)
    h = h + self.attn(self.ln(h))
    h = jax.nn.gelu(self.ff(h))
    return self.head(h.reshape(h.shape[0], -1))


def _traced_problem(name):
  """Returns (params and per-example loss, batch of 11 examples) for one float64 model of any family."""
  key = jax.random.PRNGKey(7)
  ks = jax.random.split(key, 12)
  normal = lambda i, shape, s=0.5: s * jax.random.normal(ks[i], shape, jnp.float64)
  n = 11
  batch = {"x": jax.random.normal(ks[10], (n, 64), jnp.float64), "y": jax.random.randint(ks[11], (n,), 0, 10)}
  if name == "plain_mlp":
    params = {"w0": normal(0, (64, 6)), "b0": normal(1, (6,)), "cell": normal(2, (6, 6)), "bc": normal(3, (6,)),
              "out": {"w": normal(4, (6, 10)), "b": normal(5, (10,))}}
    return _Fns(params, _plain_mlp), batch
  if name == "plain_cnn":
    return _Fns({"c0": normal(0, (3, 1, 3, 3)), "c1": normal(1, (4, 3, 2, 3)), "w": normal(2, (64, 10))},
                _plain_cnn), batch
  if name == "plain_tied":
    tokens = jax.random.randint(ks[9], (n, 5), 0, 10)
    return _Fns({"table": normal(0, (10, 4)), "w": normal(1, (4, 4))}, _plain_tied), {"x": tokens, "y": batch["y"]}
  if name == "plain_scan":
    return _Fns({"w_in": normal(0, (64, 5)), "stack": normal(1, (3, 5, 5)), "w_out": normal(2, (5, 10))},
                _plain_scan), batch
  if name == "plain_rnn":
    return _Fns({"w_h": normal(0, (5, 5)), "w_x": normal(1, (16, 5)), "w_out": normal(2, (5, 10))}, _plain_rnn), batch
  if name == "eqx_mlp":
    params = (EqxLinear(normal(0, (6, 64)), normal(1, (6,))), EqxLinear(normal(2, (10, 6)), normal(3, (10,))))
    return _Fns(params, _eqx_mlp), batch
  if name == "nnx_block":
    fns = flax_adapters.nnx_loss_fns(NNXBlock(nnx.Rngs(0)), models.softmax_cross_entropy)
    tokens = jax.random.randint(ks[9], (n, 5), 0, 7)
    return _Fns(fns.params, fns.per_example_loss_fn), {"x": tokens, "y": batch["y"]}
  if name == "nnx_mlp":
    model = models.NNXMLP(64, (6, 5), activation="tanh", rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    fns = flax_adapters.nnx_loss_fns(model, models.softmax_cross_entropy)
    return _Fns(fns.params, fns.per_example_loss_fn), batch
  # The Linen models of `_problem`, their plain loss (module interception off) through the traced path.
  fns, batch = _problem(name.removeprefix("linen_"))
  return _Fns(fns.params, fns.per_example_loss_fn.fn), batch


TRACED = ["plain_mlp", "plain_cnn", "plain_tied", "plain_scan", "plain_rnn", "eqx_mlp", "nnx_mlp", "nnx_block",
          "linen_mlp", "linen_cnn_bn", "linen_convs", "linen_transformer", "linen_tied"]


@pytest.mark.parametrize("name", TRACED)
@pytest.mark.parametrize("norms", [False, True])
def test_traced_projections_equal_per_example_gradients(name, norms):
  """Any per-example loss, whatever built it, takes the layer-wise path by default (`projection.as_layerwise`)."""
  fns, batch = _traced_problem(name)
  p = ravel_pytree(fns.params)[0].size
  directions = jax.random.normal(jax.random.PRNGKey(1), (K, p), jnp.float64)
  want, want_sq = _exact(fns, batch, directions)
  assert projection.resolve_method(fns.per_example_loss_fn, None) == "layerwise"
  got = projection.project_on(directions, fns.per_example_loss_fn, fns.params, _split(batch, (7, 4)),
                              microbatch_size=3, with_sq_norms=norms)
  np.testing.assert_allclose(got.values, want, rtol=TOL, atol=TOL)
  if norms:
    np.testing.assert_allclose(got.sq_norms, want_sq, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("name", TRACED)
@pytest.mark.parametrize("with_sketch", [False, True])
def test_traced_store_rows_equal_per_example_gradients(name, with_sketch):
  fns, batch = _traced_problem(name)
  flat = ravel_pytree(fns.params)[0]
  p = flat.size
  u, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(3), (p, K), jnp.float64))
  directions = jnp.pad(u.T, ((0, 0), (0, 5)))
  sk = sketch.make_sketch(p, 24, seed=4, dtype=jnp.float64) if with_sketch else None
  got = sketch.project_and_sketch(directions, sk, fns.per_example_loss_fn, fns.params, batch, method="layerwise",
                                  microbatch_size=1 if with_sketch else 0)
  grads = _full_gradients(fns, batch)
  np.testing.assert_allclose(got.projections, grads @ u, rtol=TOL, atol=TOL)
  np.testing.assert_allclose(got.sq_norms, jnp.sum(grads * grads, axis=1), rtol=TOL, atol=TOL)
  np.testing.assert_allclose(got.losses, fns.per_example_loss_fn(fns.params, batch), rtol=TOL, atol=TOL)
  if with_sketch:
    np.testing.assert_allclose(got.sketch, sketch.apply_sketch(sk, grads - (grads @ u) @ u.T), rtol=TOL, atol=TOL)


def _factored_paths(fns, batch, with_norms):
  found = jaxpr_contractions.discover(fns.per_example_loss_fn, fns.params, jax.tree.map(lambda a: a[:1], batch))
  paths = layerwise.leaf_paths(fns.params)
  return {paths[i] for i in jaxpr_contractions.factored_leaves(found, with_norms)}


def test_traced_finds_the_contractions_of_parameter_leaves():
  """Which leaves take the factored products (the rest: exact per-leaf per-example gradients)."""
  fns, batch = _traced_problem("plain_mlp")
  assert _factored_paths(fns, batch, False) == {("w0",), ("cell",), ("out", "w")}
  assert _factored_paths(fns, batch, True) == {("w0",), ("out", "w")}  # `cell`, used twice: its own gradient.
  fns, batch = _traced_problem("eqx_mlp")
  assert _factored_paths(fns, batch, True) == {("0", "0"), ("1", "0")}  # W @ x under vmap: the weights.
  fns, batch = _traced_problem("nnx_mlp")
  assert _factored_paths(fns, batch, True) == {(n, "kernel", "value") for n in ("hidden_0", "hidden_1", "output")}
  assert isinstance(fns.per_example_loss_fn, traced.TracedLayerwiseLoss)
  # Scans: stacked weights sliced per iteration are factored (norms too); a weight every iteration reads
  # sums its products, or takes its own gradient with norms.
  fns, batch = _traced_problem("plain_scan")
  assert _factored_paths(fns, batch, True) == {("w_in",), ("stack",), ("w_out",)}
  fns, batch = _traced_problem("plain_rnn")
  assert _factored_paths(fns, batch, False) == {("w_h",), ("w_x",), ("w_out",)}
  assert _factored_paths(fns, batch, True) == {("w_out",)}
  # Convolution kernels, a table both gathered and contracted: fall back.
  for name, want in (("plain_cnn", {("w",)}), ("plain_tied", {("w",)}),
                     ("linen_tied", {("mix", "kernel"), ("back", "kernel")}),
                     ("linen_cnn_bn", {("output", "kernel")}),
                     ("nnx_block", {("head", "kernel", "value")}),
                     ("linen_transformer", set())):  # Position-wise Dense layers: their own gradients.
    fns, batch = _traced_problem(name)
    assert _factored_paths(fns, batch, False) == want, name
