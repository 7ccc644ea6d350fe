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
_SEEDS = flags.DEFINE_integer("seeds", 3, "Initialisation seeds (and random-selection seeds) to average over.")
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


def run_task(edit_fn, metrics_fn, params, retrained, selection_loss, selection_batch, seed):
  """Returns {row name: {metric: value}} for the original, retrained and every edited model."""
  rows = {"original": metrics_fn(params), "retrained": metrics_fn(retrained)}
  jobs = [("IF (all)", "if", None)]
  for sel in ("output", "gradient", "random"):
    s = gif.select_parameters(params, ratio=_RATIO.value, method=sel, loss_fn=selection_loss,
                              target_batch=selection_batch, seed=seed)
    jobs += [(f"{m.upper()} ({sel})", m, s.mask) for m in ("gif", "fif", "pif")]
  if seed == 0:
    print(s.summary())
  for name, method, mask in jobs:
    res = edit_fn(method, mask)
    best = oracle(metrics_fn, rows["retrained"], params, res.update.delta)
    rows[name] = dict(metrics_fn(res.params), scale=res.scale, resid=float(res.update.relative_residual))
    rows[name].update({f"oracle_{k}": v for k, v in metrics_fn(gif.apply_update(params, res.update, best)).items()})
  return rows


def print_table(title, per_seed):
  print(f"\n== {title}: mean over {len(per_seed)} seeds")
  keys = list(per_seed[0]["IF (all)"])
  print(f"  {'':<16}" + "".join(f"{k:>19}" for k in keys))
  for name in per_seed[0]:
    vals = [np.mean([r[name].get(k, np.nan) for r in per_seed]) for k in keys]
    print(f"  {name:<16}" + "".join(f"{'':>19}" if np.isnan(v) else f"{v:>19.3f}" for v in vals))


def main(_):
  jax.config.update("jax_enable_x64", True)
  d = datasets.load_digits()
  x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
      d.data / 16.0, d.target.astype(np.int32), test_size=0.3, random_state=0)
  train_batch, test_batch = {"x": x_tr, "y": y_tr}, {"x": x_te, "y": y_te}
  solver = dict(damping=_DAMPING.value, max_iters=_MAX_ITERS.value, tol=1e-6)
  keep = y_tr != _REMOVED.value
  removed_batch = gif_tasks.select_examples(train_batch, ~keep)
  rng = np.random.default_rng(0)
  ones = np.flatnonzero(y_tr == 1)
  changed = np.zeros(y_tr.size, bool)
  changed[rng.choice(ones, int(_FLIP.value * ones.size), replace=False)] = True
  wrong_y = y_tr.copy()
  wrong_y[changed] = 7
  wrong_batch = {"x": x_tr, "y": wrong_y}
  changed_batch = gif_tasks.select_examples(train_batch, changed)
  removal, relabel = [], []
  t0 = time.perf_counter()
  for seed in range(_SEEDS.value):
    # Class removal: the retrained model starts from the same initialisation.
    params = train(train_batch, seed)
    retrained = train(gif_tasks.select_examples(train_batch, keep), seed)
    removal.append(run_task(
        lambda method, mask: gif_tasks.class_removal_edit(per_example_loss, params, train_batch, _REMOVED.value,
                                                          method=method, mask=mask, **solver),
        lambda p: gif_tasks.class_removal_metrics(logits_fn, p, test_batch, _REMOVED.value),
        params, retrained, mean_loss, removed_batch, seed))
    # Label change: a fraction of the training 1s labelled 7, then corrected.
    params = train(wrong_batch, seed)
    retrained = train(train_batch, seed)
    relabel.append(run_task(
        lambda method, mask: gif_tasks.label_change_edit(per_example_loss, params, wrong_batch, changed,
                                                         y_tr[changed], method=method, mask=mask, **solver),
        lambda p: gif_tasks.label_change_metrics(logits_fn, p, test_batch, changed_batch, wrong_y[changed]),
        params, retrained, mean_loss, gif_tasks.select_examples(wrong_batch, changed), seed))
    print(f"seed {seed} done, {time.perf_counter() - t0:.0f}s")
  print_table(f"class removal: forget class {_REMOVED.value} ({(~keep).sum()} of {keep.size} training examples), "
              f"ratio {_RATIO.value}", removal)
  print_table(f"label change: {changed.sum()} training 1s labelled 7, corrected; ratio {_RATIO.value}", relabel)


if __name__ == "__main__":
  app.run(main)
