r"""Times closed-form last-layer influence on digits against one full-batch training step.

Trains a small MLP (64 → hidden → 10, ReLU) on the 1,437 digits training points
(scikit-learn's load_digits, 360 held out), then times one "influence pass" as
it would run every epoch: body features, the factored last-layer Hessian, the
per-example loss and margin gradients, the (360, 1437) loss-influence and
classification-influence matrices, self-influence and relative influence.

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
  import flax.linen as nn
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.flatten_util import ravel_pytree
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  from influence_jax.methods import classification as cl
  from influence_jax.methods import last_layer as ll
  from influence_jax.methods import relative

  dtype = np.float64 if _FLOAT64.value else np.float32
  x, y = load_digits(return_X_y=True)
  x_tr, x_te, y_tr, y_te = train_test_split(
      (x / 16.0).astype(dtype), y.astype(np.int32), test_size=360, random_state=0, stratify=y)
  hidden, l2 = _HIDDEN.value, _L2.value

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, inp):
      h = nn.relu(nn.Dense(hidden, name="body")(inp)) if hidden else inp
      return nn.Dense(10, name="head")(h)

  model = MLP()
  params = jax.tree.map(lambda a: a.astype(dtype), model.init(jax.random.PRNGKey(0), x_tr[:1])["params"])

  def features(params, inp):
    if not hidden:
      return inp
    b = params["body"]
    return jax.nn.relu(inp @ b["kernel"] + b["bias"])

  def loss(params, inp, lab):
    logits = model.apply({"params": params}, inp)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, lab).mean()
    return ce + 0.5 * l2 * jnp.sum(ravel_pytree(params)[0] ** 2)

  opt = optax.adam(1e-2)

  @jax.jit
  def train_step(params, opt_state):
    value, grads = jax.value_and_grad(loss)(params, x_tr, y_tr)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  opt_state = opt.init(params)
  for _ in range(_STEPS.value):
    params, opt_state, value = train_step(params, opt_state)
  test_acc = float(np.mean(np.argmax(model.apply({"params": params}, x_te), -1) == y_te))

  def influence_pass(params):
    k, b = params["head"]["kernel"], params["head"]["bias"]
    f_tr, f_te = features(params, x_tr), features(params, x_te)
    curv = ll.fit_last_layer(f_tr, y_tr, k, b, l2=l2)
    g_tr = ll.last_layer_gradients(f_tr, y_tr, k, b)
    scores = ll.last_layer_influence(curv, ll.last_layer_gradients(f_te, y_te, k, b), g_tr)
    cls = cl.last_layer_classification_influence(curv, cl.last_layer_margin_gradients(f_te, y_te, k, b), g_tr)
    self_inf = ll.last_layer_self_influence(curv, g_tr)
    return scores, cls, relative.relative_influence(cls, self_inf), self_inf

  step_s = _times(lambda: train_step(params, opt_state), _REPEATS.value)
  pass_s = _times(lambda: influence_pass(params), _REPEATS.value)
  jitted = jax.jit(influence_pass)
  jit_s = _times(lambda: jitted(params), _REPEATS.value)
  k, b = params["head"]["kernel"], params["head"]["bias"]
  f_tr = features(params, x_tr)
  fit_s = _times(lambda: ll.fit_last_layer(f_tr, y_tr, k, b, l2=l2), _REPEATS.value)

  scores, cls, rel, self_inf = jitted(params)
  p_dim = (k.shape[0] + 1) * k.shape[1]
  print(f"devices: {jax.devices()}  dtype: {np.dtype(dtype).name}")
  print(f"digits: {len(x_tr)} train × {len(x_te)} test; head params P = (d+1)·C = {p_dim}; "
        f"final train objective {float(value):.4f}, test accuracy {test_acc:.3f}")
  fmt = lambda t: f"{t[0] * 1e3:.1f} ms (median {t[1] * 1e3:.1f})"
  ratio = lambda t: f"{t[0] / step_s[0]:.0f}× a train step (medians: {t[1] / step_s[1]:.0f}×)"
  print(f"one full-batch train step (grad + Adam, jitted): {step_s[0] * 1e3:.2f} ms (median {step_s[1] * 1e3:.2f})")
  print(f"  fit_last_layer alone (Hessian + eigh): {fmt(fit_s)}")
  print(f"influence pass, public API (eager + input checks): {fmt(pass_s)} = {ratio(pass_s)}")
  print(f"influence pass, one jax.jit: {fmt(jit_s)} = {ratio(jit_s)}")
  print(f"outputs: scores {scores.shape}, cls {cls.shape}, relative {rel.shape}, "
        f"all finite: {bool(jnp.all(jnp.isfinite(scores)) & jnp.all(jnp.isfinite(rel)))}, "
        f"min self-influence {float(self_inf.min()):.3g}")


if __name__ == "__main__":
  app.run(main)
