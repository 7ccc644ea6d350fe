r"""Times closed-form last-layer influence on digits against one full-batch training step.

Trains examples.models.MLP (64 → hidden → 10, ReLU) with methods.training.train
on the 1,438 digits training points (examples.datasets.load_digits, 359 held
out), then times one "influence pass" as it would run every epoch: body
features, the factored last-layer Hessian, the per-example loss and margin
gradients, the (359, 1438) loss-influence and classification-influence
matrices, self-influence and relative influence. Also times fit_last_layer with
each factorization (Cholesky, the default when l2 + damping > 0, and eigh).

  PYTHONPATH=. python scripts/bench_last_layer.py                  # hidden=32
  PYTHONPATH=. python scripts/bench_last_layer.py --hidden=0       # softmax regression on pixels
  PYTHONPATH=. python scripts/bench_last_layer.py --hidden=128 --float64
"""

from __future__ import annotations

import time

from absl import app
from absl import flags

_HIDDEN = flags.DEFINE_integer("hidden", 32, "Hidden width of the MLP body; 0: no body (features = pixels).")
_STEPS = flags.DEFINE_integer("train_steps", 300, "Full-batch Adam steps before timing.")
_L2 = flags.DEFINE_float("l2", 1e-3, "L2 coefficient of the training objective (also the Hessian's).")
_REPEATS = flags.DEFINE_integer("repeats", 9, "Timed repetitions (min and median are reported).")
_FLOAT64 = flags.DEFINE_bool("float64", False, "Run everything in float64.")


def _times(fn, repeats):
  """Returns (min, median) wall seconds of fn() over `repeats` runs after one warm-up run."""
  import jax
  jax.block_until_ready(fn())  # compile / warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  times.sort()
  return times[0], times[len(times) // 2]


def main(argv):
  del argv
  import jax
  if _FLOAT64.value:
    jax.config.update("jax_enable_x64", True)
  import jax.numpy as jnp
  import numpy as np
  import optax

  from influence_jax import flax_adapters
  from influence_jax.examples import datasets, models
  from influence_jax.methods import training
  from influence_jax.methods import classification as cl
  from influence_jax.methods import last_layer as ll
  from influence_jax.methods import relative

  dtype = np.float64 if _FLOAT64.value else np.float32
  digits = datasets.load_digits(test_fraction=0.2, seed=0)
  x_tr, y_tr = jnp.asarray(digits["train"]["x"], dtype), jnp.asarray(digits["train"]["y"])
  x_te, y_te = jnp.asarray(digits["test"]["x"], dtype), jnp.asarray(digits["test"]["y"])
  train, test = {"x": x_tr, "y": y_tr}, {"x": x_te, "y": y_te}
  hidden, l2 = _HIDDEN.value, _L2.value
  model = models.MLP(features=(hidden,) if hidden else (), num_classes=datasets.DIGITS_NUM_CLASSES)
  variables = jax.tree.map(lambda a: a.astype(dtype), model.init(jax.random.key(0), x_tr[:1]))
  fns = flax_adapters.linen_loss_fns(model, variables, models.softmax_cross_entropy, l2=l2)
  opt = optax.adam(1e-2)
  params, hist = training.train(fns.loss_fn, fns.params, train, optimizer=opt, num_steps=_STEPS.value)
  test_acc = training.accuracy(fns.outputs_fn, params, test)

  def features(params, inp):
    if not hidden:
      return inp
    b = params["hidden_0"]
    return jax.nn.relu(inp @ b["kernel"] + b["bias"])

  def influence_pass(params):
    k, b = params["output"]["kernel"], params["output"]["bias"]
    f_tr, f_te = features(params, x_tr), features(params, x_te)
    curv = ll.fit_last_layer(f_tr, y_tr, k, b, l2=l2)
    g_tr = ll.last_layer_gradients(f_tr, y_tr, k, b)
    scores = ll.last_layer_influence(curv, ll.last_layer_gradients(f_te, y_te, k, b), g_tr)
    cls = cl.last_layer_classification_influence(curv, cl.last_layer_margin_gradients(f_te, y_te, k, b), g_tr)
    self_inf = ll.last_layer_self_influence(curv, g_tr)
    return scores, cls, relative.relative_influence(cls, self_inf), self_inf

  opt_state = opt.init(params)
  step = jax.jit(lambda p, s: training.train_segment(fns.loss_fn, opt, p, s, train, jax.random.key(0),
                                                    batch_size=x_tr.shape[0], num_steps=1))
  step_s = _times(lambda: step(params, opt_state), _REPEATS.value)
  pass_s = _times(lambda: influence_pass(params), _REPEATS.value)
  jitted = jax.jit(influence_pass)
  jit_s = _times(lambda: jitted(params), _REPEATS.value)
  k, b = params["output"]["kernel"], params["output"]["bias"]
  f_tr = features(params, x_tr)
  fit_s = {name: _times(lambda name=name: ll.fit_last_layer(f_tr, y_tr, k, b, l2=l2, factorization=name),
                        _REPEATS.value) for name in ("cholesky", "eigh")}

  scores, cls, rel, self_inf = jitted(params)
  p_dim = (k.shape[0] + 1) * k.shape[1]
  print(f"devices: {jax.devices()}  dtype: {np.dtype(dtype).name}")
  print(f"digits: {len(x_tr)} train × {len(x_te)} test; head params P = (d+1)·C = {p_dim}; "
        f"final train objective {hist['final_loss']:.4f}, test accuracy {test_acc:.3f}")
  fmt = lambda t: f"{t[0] * 1e3:.1f} ms (median {t[1] * 1e3:.1f})"
  ratio = lambda t: f"{t[0] / step_s[0]:.0f}× a train step (medians: {t[1] / step_s[1]:.0f}×)"
  print(f"one full-batch train step (grad + Adam, jitted): {step_s[0] * 1e3:.2f} ms (median {step_s[1] * 1e3:.2f})")
  for name, t in fit_s.items():
    print(f"  fit_last_layer alone, factorization={name} (Hessian + factor): {fmt(t)}")
  print(f"  eigh ÷ Cholesky: {fit_s['eigh'][0] / fit_s['cholesky'][0]:.1f}× "
        f"(medians: {fit_s['eigh'][1] / fit_s['cholesky'][1]:.1f}×)")
  print(f"influence pass, public API (eager + input checks): {fmt(pass_s)} = {ratio(pass_s)}")
  print(f"influence pass, one jax.jit: {fmt(jit_s)} = {ratio(jit_s)}")
  print(f"outputs: scores {scores.shape}, cls {cls.shape}, relative {rel.shape}, "
        f"all finite: {bool(jnp.all(jnp.isfinite(scores)) & jnp.all(jnp.isfinite(rel)))}, "
        f"min self-influence {float(self_inf.min()):.3g}")


if __name__ == "__main__":
  app.run(main)
