r"""GIF editing demo on scikit-learn digits: class removal and label change on a 2,410-parameter Linen MLP.

Trains a 64-32-10 tanh MLP (float64, Adam, L2 inside each example's loss),
then edits it with IF / GIF / FIF / PIF (target units chosen by output,
gradient or random selection) and compares test accuracies with a model
retrained from the same initialisation on the edited data. The step size is
chosen by the line search on the edited *training* loss (no test labels); the
oracle scale (best agreement with the retrained model's test accuracies) is
printed separately.

  PYTHONPATH=. python scripts/gif_digits_demo.py --ratio=0.1 --removed_class=8
"""

import time

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn import datasets, model_selection

from influence_jax import gif, gif_tasks

_RATIO = flags.DEFINE_float("ratio", 0.1, "Fraction of each Dense layer's parameters in the target set.")
_REMOVED = flags.DEFINE_integer("removed_class", 8, "Class to forget.")
_STEPS = flags.DEFINE_integer("steps", 3000, "Full-batch Adam steps for training and for each retraining.")
_L2 = flags.DEFINE_float("l2", 1e-3, "L2 coefficient (inside every example's loss).")
_DAMPING = flags.DEFINE_float("damping", 1e-3, "Damping added to the Hessian.")
_MAX_ITERS = flags.DEFINE_integer("max_iters", 500, "CG iterations per solve.")
_FLIP = flags.DEFINE_float("flip", 0.3, "Label change task: fraction of training 1s labelled 7.")


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    hidden = jnp.tanh(nn.Dense(32, param_dtype=jnp.float64, name="hidden")(x))
    return nn.Dense(10, param_dtype=jnp.float64, name="out")(hidden)


MODEL = MLP()


def logits_fn(params, x):
  return MODEL.apply({"params": params}, x)


def per_example_loss(params, batch):
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, batch["x"]), batch["y"])
  return ce + 0.5 * _L2.value * sum(jnp.sum(p ** 2) for p in jax.tree.leaves(params))


def mean_loss(params, batch):
  return jnp.mean(per_example_loss(params, batch))


def train(batch, seed=0):
  params = MODEL.init(jax.random.PRNGKey(seed), batch["x"][:1])["params"]
  opt = optax.adam(1e-2)

  @jax.jit
  def run(params):
    def step(carry, _):
      p, s = carry
      g = jax.grad(mean_loss)(p, batch)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(step, (params, opt.init(params)), None, length=_STEPS.value)[0][0]

  return run(params)


def oracle(metrics_fn, target, params, delta):
  """Scale whose test metrics are closest (L1) to the retrained model's: the oracle line search."""
  def gap(p):
    m = metrics_fn(p)
    return sum(abs(m[k] - target[k]) for k in target)
  return gif_tasks.line_search(gap, params, delta)[0]


def report(name, metrics, extra=""):
  print(f"  {name:<22} " + "  ".join(f"{k}={v:.3f}" for k, v in metrics.items()) + extra)


def run_task(title, edit_fn, metrics_fn, params, retrained, selection_loss, selection_batch):
  print(f"\n== {title}")
  report("original", metrics_fn(params))
  target = metrics_fn(retrained)
  report("retrained", target)
  jobs = [("IF (all)", "if", None)]
  for sel in ("output", "gradient", "random"):
    s = gif.select_parameters(params, ratio=_RATIO.value, method=sel, loss_fn=selection_loss,
                              target_batch=selection_batch, seed=0)
    for method in ("gif", "fif", "pif"):
      jobs.append((f"{method.upper()} ({sel})", method, s.mask))
  print(s.summary())
  for name, method, mask in jobs:
    t = time.perf_counter()
    res = edit_fn(method, mask)
    took = time.perf_counter() - t
    m = metrics_fn(res.params)
    best = oracle(metrics_fn, target, params, res.update.delta)
    report(name, m, f"  scale={res.scale:g}  rel.resid={float(res.update.relative_residual):.3f} "
           f"iters={int(res.update.num_iters)} {took:.1f}s")
    report(f"  oracle scale={best:g}", metrics_fn(gif.apply_update(params, res.update, best)))


def main(_):
  jax.config.update("jax_enable_x64", True)
  d = datasets.load_digits()
  x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
      d.data / 16.0, d.target.astype(np.int32), test_size=0.3, random_state=0)
  train_batch, test_batch = {"x": x_tr, "y": y_tr}, {"x": x_te, "y": y_te}
  solver = dict(damping=_DAMPING.value, max_iters=_MAX_ITERS.value, tol=1e-6)

  # Class removal.
  params = train(train_batch)
  keep = y_tr != _REMOVED.value
  retrained = train(gif_tasks.select_examples(train_batch, keep))
  removed_batch = gif_tasks.select_examples(train_batch, ~keep)
  run_task(f"class removal: forget class {_REMOVED.value} ({(~keep).sum()} of {keep.size} training examples)",
           lambda method, mask: gif_tasks.class_removal_edit(per_example_loss, params, train_batch, _REMOVED.value,
                                                             method=method, mask=mask, **solver),
           lambda p: gif_tasks.class_removal_metrics(logits_fn, p, test_batch, _REMOVED.value),
           params, retrained, mean_loss, removed_batch)

  # Label change: a fraction of the training 1s labelled 7, then corrected.
  rng = np.random.default_rng(0)
  ones = np.flatnonzero(y_tr == 1)
  changed = np.zeros(y_tr.size, bool)
  changed[rng.choice(ones, int(_FLIP.value * ones.size), replace=False)] = True
  wrong_y = y_tr.copy()
  wrong_y[changed] = 7
  wrong_batch = {"x": x_tr, "y": wrong_y}
  params = train(wrong_batch)
  retrained = train(train_batch)
  changed_batch = gif_tasks.select_examples(train_batch, changed)
  run_task(f"label change: {changed.sum()} training 1s labelled 7, corrected",
           lambda method, mask: gif_tasks.label_change_edit(per_example_loss, params, wrong_batch, changed,
                                                            y_tr[changed], method=method, mask=mask, **solver),
           lambda p: gif_tasks.label_change_metrics(logits_fn, p, test_batch, changed_batch, wrong_y[changed]),
           params, retrained, mean_loss, gif_tasks.select_examples(wrong_batch, changed))


if __name__ == "__main__":
  app.run(main)
