"""Target-parameter selection: per-layer counts, ranking by the stated scores, whole units, norm layers excluded."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from influence_jax.methods import gif_selection


class _ConvNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (2, 2), param_dtype=jnp.float64)(x)
    x = nn.BatchNorm(use_running_average=True, param_dtype=jnp.float64)(x)
    x = nn.relu(x).reshape((x.shape[0], -1))
    x = nn.Dense(6, param_dtype=jnp.float64)(x)
    x = nn.LayerNorm(param_dtype=jnp.float64)(x)
    return nn.Dense(3, param_dtype=jnp.float64)(jnp.tanh(x))


@pytest.fixture(scope="module")
def net():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(12, 4, 4, 2))
  y = rng.integers(0, 3, size=12).astype(np.int32)
  model = _ConvNet()
  variables = model.init(jax.random.PRNGKey(0), x[:1])
  # Non-trivial norm parameters, so that a wrongly selected norm leaf would show.
  stats = jax.tree.map(lambda a: a + 0.3, variables["batch_stats"])
  params = jax.tree.map(lambda a: a + 0.1 * jnp.asarray(rng.normal(size=a.shape)), variables["params"])

  def logits(p, b):
    return model.apply({"params": p, "batch_stats": stats}, b["x"])

  def loss_fn(p, b):
    out = logits(p, b)
    return jnp.mean(jax.nn.logsumexp(out, -1) - jnp.take_along_axis(out, b["y"][:, None], 1)[:, 0])

  return dict(model=model, params=params, stats=stats, batch={"x": x, "y": y}, loss_fn=loss_fn)


SIZES = {"Conv_0": (4, 9), "Dense_0": (6, 65), "Dense_1": (3, 7)}  # (units, parameters per unit)


def test_layer_budget_is_int_of_ratio_times_size():
  assert gif_selection.layer_budget(0.5, 36) == 18
  assert gif_selection.layer_budget(0.3, 36) == 10  # int(10.8)
  assert gif_selection.layer_budget(0.29, 100) == 29  # float round-off absorbed
  assert gif_selection.layer_budget(1.0, 390) == 390
  assert gif_selection.layer_budget(0.0, 390) == 0


def test_unit_layers_finds_dense_and_conv_but_not_norm_layers(net):
  layers = gif_selection.unit_layers(net["params"])
  assert [(l.key, l.units, l.unit_size) for l in layers] == [
      (("Conv_0",), 4, 9), (("Dense_0",), 6, 65), (("Dense_1",), 3, 7)]
  # A full variables dict ({"params": ...}) works and keeps the module paths.
  wrapped = gif_selection.unit_layers({"params": net["params"]})
  assert [l.module_path for l in wrapped] == [l.key for l in layers]
  assert wrapped[0].key == ("params", "Conv_0")
  # DenseGeneral-shaped kernels (several output axes) and embeddings are not unit layers.
  other = {"attn": {"kernel": np.zeros((3, 2, 4)), "bias": np.zeros((2, 4))}, "Embed_0": {"embedding": np.zeros((5, 3))},
           "Dense_0": net["params"]["Dense_0"]}
  assert [l.key for l in gif_selection.unit_layers(other)] == [("Dense_0",)]
  sel = gif_selection.select_parameters(other, ratio=1.0, method="random")
  assert not np.any(sel.mask["attn"]["kernel"]) and not np.any(sel.mask["Embed_0"]["embedding"])
  assert np.all(sel.mask["Dense_0"]["kernel"])


def _check_mask(sel, params, ratio, expected_units):
  for name, (units, unit_size) in SIZES.items():
    budget = int(ratio * units * unit_size + 1e-6)  # int(r · size), 0.3 · 390 = 117
    whole, partial = divmod(budget, unit_size)
    km = np.asarray(sel.mask[name]["kernel"])
    bm = np.asarray(sel.mask[name]["bias"])
    per_unit = km.reshape(-1, units).sum(0) + bm
    # Exactly int(r · size) parameters: `whole` complete units, one unit with `partial` kernel entries.
    assert km.sum() + bm.sum() == budget
    assert sorted(per_unit, reverse=True) == [unit_size] * whole + ([partial] if partial else []) + [0] * (
        units - whole - (1 if partial else 0))
    full = np.flatnonzero(per_unit == unit_size)
    np.testing.assert_array_equal(np.flatnonzero(bm), full)  # a partial unit never gets its bias
    if partial:
      part = int(np.flatnonzero((per_unit > 0) & (per_unit < unit_size))[0])
      np.testing.assert_array_equal(np.flatnonzero(km.reshape(-1, units)[:, part]), np.arange(partial))
    if expected_units is not None:
      assert set(full) == set(expected_units[name][:whole]), name
      if partial:
        assert part == expected_units[name][whole], name
    row = [l for l in sel.layers if l.path == (name,)][0]
    assert (row.units_selected, row.units_total, row.partial_params, row.params_selected, row.params_total) == (
        whole, units, partial, budget, units * unit_size)
  for norm in ("BatchNorm_0", "LayerNorm_0"):
    assert not any(np.any(m) for m in jax.tree.leaves(sel.mask[norm]))
  assert jax.tree.structure(sel.mask) == jax.tree.structure(params)


def _ranking(score):
  return list(np.argsort(-np.asarray(score), kind="stable"))


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.3, 0.5, 0.8])
def test_output_based_selection_takes_units_with_largest_mean_preactivation(net, ratio):
  # Reference pre-activations through a different Flax mechanism: capture_intermediates.
  _, state = net["model"].apply({"params": net["params"], "batch_stats": net["stats"]}, net["batch"]["x"],
                                capture_intermediates=True, mutable=["intermediates"])
  inter = state["intermediates"]
  expected = {}
  for name, (units, _) in SIZES.items():
    out = np.asarray(inter[name]["__call__"][0]).reshape(-1, units)
    expected[name] = _ranking(np.abs(out.mean(0)))
  sel = gif_selection.select_parameters(net["params"], ratio=ratio, method="output", loss_fn=net["loss_fn"],
                              target_batch=net["batch"])
  _check_mask(sel, net["params"], ratio, expected)


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.3, 0.5, 0.8])
def test_gradient_based_selection_takes_units_with_largest_mean_output_gradient(net, ratio):
  # Σ over examples and positions of ∂L/∂(pre-activation) of unit j is ∂L/∂bias_j.
  grads = jax.grad(net["loss_fn"])(net["params"], net["batch"])
  expected = {name: _ranking(np.abs(grads[name]["bias"])) for name in SIZES}
  sel = gif_selection.select_parameters(net["params"], ratio=ratio, method="gradient", loss_fn=net["loss_fn"],
                              target_batch=net["batch"])
  _check_mask(sel, net["params"], ratio, expected)
  # The scores themselves, not only the ranking: |mean over examples and positions|.
  scores = gif_selection.unit_scores(net["loss_fn"], net["params"], net["batch"], "gradient")
  np.testing.assert_allclose(scores[("Conv_0",)], np.abs(grads["Conv_0"]["bias"]) / (12 * 4 * 4), rtol=1e-10)  # 'SAME': 4×4 positions
  np.testing.assert_allclose(scores[("Dense_1",)], np.abs(grads["Dense_1"]["bias"]) / 12, rtol=1e-10)


def test_random_selection_is_seeded(net):
  a = gif_selection.select_parameters(net["params"], ratio=0.5, method="random", seed=3)
  b = gif_selection.select_parameters(net["params"], ratio=0.5, method="random", seed=3)
  _check_mask(a, net["params"], 0.5, None)
  for x, y in zip(jax.tree.leaves(a.mask), jax.tree.leaves(b.mask)):
    np.testing.assert_array_equal(x, y)
  draws = {tuple(np.flatnonzero(gif_selection.select_parameters(net["params"], ratio=0.5, method="random", seed=s)
                                .mask["Dense_0"]["bias"])) for s in range(8)}
  assert len(draws) > 1


def test_summary_lists_every_layer(net):
  sel = gif_selection.select_parameters(net["params"], ratio=0.5, method="random")
  text = sel.summary()
  for name in SIZES:
    assert name in text
  assert "selected 223 of" in text  # int(0.5 · 36) + int(0.5 · 390) + int(0.5 · 21) = 18 + 195 + 10
  total_selected = sum(l.params_selected for l in sel.layers)
  assert f"selected {total_selected} of" in text


def test_selection_rejects_bad_input(net):
  p = net["params"]
  with pytest.raises(ValueError, match="method"):
    gif_selection.select_parameters(p, ratio=0.5, method="magnitude")
  with pytest.raises(ValueError, match="ratio"):
    gif_selection.select_parameters(p, ratio=1.5, method="random")
  with pytest.raises(ValueError, match="loss_fn and target_batch"):
    gif_selection.select_parameters(p, ratio=0.5, method="output")
  jitted = jax.jit(net["loss_fn"])
  jitted(p, net["batch"])  # traced once: later calls do not run the modules
  with pytest.raises(ValueError, match="never called"):
    gif_selection.select_parameters(p, ratio=0.5, method="output", loss_fn=jitted, target_batch=net["batch"])
  with pytest.raises(ValueError, match="no Dense/Conv"):
    gif_selection.select_parameters({"LayerNorm_0": p["LayerNorm_0"]}, ratio=0.5, method="random")


def test_random_fill_is_seeded_and_spends_the_exact_budget(net):
  ratio = 0.3  # Dense_0: int(0.3 · 390) = 117 = 1 whole unit of 65 + 52 kernel entries of the next one.
  masks = {s: gif_selection.select_parameters(net["params"], ratio=ratio, method="output", loss_fn=net["loss_fn"],
                                              target_batch=net["batch"], seed=s, fill="random") for s in (0, 0, 1)}
  first = gif_selection.select_parameters(net["params"], ratio=ratio, method="output", loss_fn=net["loss_fn"],
                                          target_batch=net["batch"], fill="first")
  a = gif_selection.select_parameters(net["params"], ratio=ratio, method="output", loss_fn=net["loss_fn"],
                                      target_batch=net["batch"], seed=0, fill="random")
  b, c = masks[0], masks[1]
  jax.tree.map(np.testing.assert_array_equal, a.mask, b.mask)  # Same seed, same mask.
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a.mask), jax.tree.leaves(c.mask)))
  for t in (a, c):
    for layer in t.layers:
      units, unit_size = SIZES[layer.path[-1]]
      node = t.mask
      for k in layer.path:
        node = node[k]
      kernel = np.asarray(node["kernel"]).reshape(-1, units)
      bias = np.asarray(node["bias"])
      assert kernel.sum() + bias.sum() == gif_selection.layer_budget(ratio, units * unit_size)  # The exact budget.
      whole, partial = divmod(layer.params_selected, unit_size)
      assert bias.sum() == whole and layer.partial_params == partial
      # The whole units are the same as with the first-entries fill; the partial unit is the next-ranked one,
      # the same unit for both seeds, `partial` of its kernel entries and not its bias.
      ref = first.mask
      for k in layer.path:
        ref = ref[k]
      ref_kernel = np.asarray(ref["kernel"]).reshape(-1, units)
      np.testing.assert_array_equal(bias, np.asarray(ref["bias"]))
      assert kernel[:, bias].all()
      part = kernel[:, ~bias].sum(0)
      assert part.sum() == partial and (partial == 0 or np.count_nonzero(part) == 1)
      np.testing.assert_array_equal(kernel.sum(0) > 0, ref_kernel.sum(0) > 0)
  dense0 = lambda t: np.asarray(t.mask["Dense_0"]["kernel"])
  assert not np.array_equal(dense0(a), dense0(first))  # Random entries, not the first 52 in memory order.
  with pytest.raises(ValueError, match="fill"):
    gif_selection.select_parameters(net["params"], ratio=0.3, method="random", fill="last")


def test_partial_rows_draw_distinct_rows():
  rows = gif_selection.partial_rows(65, 52, "random", np.random.default_rng(3))
  assert rows.size == 52 and np.unique(rows).size == 52 and rows.min() >= 0 and rows.max() < 65
  np.testing.assert_array_equal(gif_selection.partial_rows(65, 3, "first"), [0, 1, 2])
  with pytest.raises(ValueError, match="count"):
    gif_selection.partial_rows(4, 5, "first")


def test_tinynet_has_over_100k_parameters_and_5_percent_is_thousands():
  from influence_jax.examples import models
  module = models.TinyNet()
  params = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
  assert models.num_params(params) == 102_282
  assert module.apply({"params": params}, jnp.zeros((3, 64))).shape == (3, 10)
  t = gif_selection.select_parameters(params, ratio=0.05, method="random", seed=0, fill="random")
  assert sum(l.params_selected for l in t.layers) >= 5000
  assert [l.path for l in t.layers] == [(f"conv_{i}",) for i in range(4)] + [("output",)]
