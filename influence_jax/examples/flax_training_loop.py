"""Influence inside a Flax training loop, for a Linen and an NNX model.

Run:  python -m influence_jax.examples.flax_training_loop [--epochs 10]

Both loops train the same tiny digits MLP (the NNX model is a copy of the Linen
one's initial weights) with full-batch SGD and, after each epoch, measure

- the mean per-example gradient norm ‖∇ℓ(z_i)‖ over the training set, and
- the self-influence score(z, z) = ∇ℓ(z)ᵀ (H + δI)⁻¹ ∇ℓ(z) of a few
  training examples, twice: exact (dense H, the Hessian of the training
  objective) and with the library's Arnoldi eigenspace (fit_eigenspace on
  the same H, eigenpairs kept by magnitude, plus the spectral tail). It is
  ≥ 0 once H + δI is positive definite; early in training, far from a
  minimum, H can be indefinite and a score can come out negative.

The influence computations see only `loss_fn(params, batch)` and
`per_example_loss_fn(params, batch)`, made by flax_adapters. Because both
models hold the same weights and take the same steps, the two tables agree.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from influence_jax import eigenspace, flax_adapters, projection, scoring, solvers
from influence_jax.examples import datasets
from influence_jax.examples import models


def _measure(fns: flax_adapters.ModelFns, params: Any, train: dict, probe: dict, damping: float,
             arnoldi_iters: int) -> dict:
  """Returns {"loss", "grad_norm" (mean over train), "self_influence" and "arnoldi_self_influence"
  (one per probe example)}."""
  grads = projection.per_example_gradients(fns.per_example_loss_fn, params, train)
  scores = solvers.exact_influence(fns.loss_fn, fns.per_example_loss_fn, params, [probe], [probe],
                                   damping=damping, hessian_batches=[train])
  # The scalable path: eigenspace of H once per epoch, then each example's gradient projected on it.
  space = eigenspace.fit_eigenspace(fns.loss_fn, params, [train], n_iters=arnoldi_iters, top_k=arnoldi_iters,
                                    damping=damping, selection="magnitude")
  proj = eigenspace.project(space, fns.per_example_loss_fn, params, [probe])
  sq_norms = jnp.sum(grads[: proj.shape[0]] ** 2, axis=1)  # probe = the first training examples.
  # Early in training H is indefinite and λ_k + δ (the default tail constant) can be ≤ 0; the remainder's
  # eigenvalues are smaller in magnitude than every kept one, so |λ|_min + δ bounds them.
  tail = float(jnp.min(jnp.abs(space.eigenvalues))) + damping
  return {"loss": float(fns.loss_fn(params, train)),
          "grad_norm": float(jnp.mean(jnp.linalg.norm(grads, axis=1))),
          "self_influence": np.asarray(jnp.diag(scores)),
          "arnoldi_self_influence": np.asarray(scoring.self_influence(space, proj, sq_norms=sq_norms,
                                                                               tail_constant=tail))}


def _setup(num_train: int, num_probe: int, hidden: int, seed: int, dtype):
  data = datasets.load_digits(seed=seed)["train"]
  train = {"x": jnp.asarray(data["x"][:num_train], dtype), "y": jnp.asarray(data["y"][:num_train])}
  probe = {"x": train["x"][:num_probe], "y": train["y"][:num_probe]}
  model = models.MLP(features=(hidden,), activation="tanh")
  variables = jax.tree.map(lambda v: v.astype(dtype), model.init(jax.random.key(seed), train["x"][:1]))
  return model, variables, train, probe


def linen_run(*, epochs=5, num_train=64, num_probe=4, hidden=8, l2=1e-3, lr=0.5, damping=0.1,
               steps_per_epoch=10, arnoldi_iters=40, seed=0, dtype=jnp.float32):
  """Trains the Linen MLP; returns one _measure dict per epoch (after its steps)."""
  model, variables, train, probe = _setup(num_train, num_probe, hidden, seed, dtype)
  fns = flax_adapters.linen_loss_fns(model, variables, models.softmax_cross_entropy, l2=l2)
  tx = optax.sgd(lr, momentum=0.9)
  params, opt_state = fns.params, tx.init(fns.params)

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(fns.loss_fn)(params, train)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  history = []
  for _ in range(epochs):
    for _ in range(steps_per_epoch):  # Full-batch steps: the training set is tiny.
      params, opt_state = step(params, opt_state)
    history.append(_measure(fns, params, train, probe, damping, arnoldi_iters))
  return history


def nnx_run(*, epochs=5, num_train=64, num_probe=4, hidden=8, l2=1e-3, lr=0.5, damping=0.1,
             steps_per_epoch=10, arnoldi_iters=40, seed=0, dtype=jnp.float32):
  """Trains the NNX twin with nnx.Optimizer; returns one _measure dict per epoch."""
  linen_model, variables, train, probe = _setup(num_train, num_probe, hidden, seed, dtype)
  model = models.nnx_mlp_from_linen(linen_model, variables["params"])
  optimizer = nnx.Optimizer(model, optax.sgd(lr, momentum=0.9), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    def loss(model):
      per_example = models.softmax_cross_entropy(model(train["x"]), train["y"])
      return jnp.mean(per_example) + l2 * flax_adapters.l2_penalty(nnx.state(model, nnx.Param))
    grads = nnx.grad(loss)(model)
    optimizer.update(model, grads)

  history = []
  for _ in range(epochs):
    for _ in range(steps_per_epoch):
      step(model, optimizer)
    # A fresh adapter each epoch: params = the model's current nnx.Param state.
    fns = flax_adapters.nnx_loss_fns(model, models.softmax_cross_entropy, l2=l2)
    history.append(_measure(fns, fns.params, train, probe, damping, arnoldi_iters))
  return history


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=10)
  parser.add_argument("--num_train", type=int, default=64)
  parser.add_argument("--hidden", type=int, default=8)
  parser.add_argument("--arnoldi_iters", type=int, default=40)
  args = parser.parse_args(argv)
  kw = dict(epochs=args.epochs, num_train=args.num_train, hidden=args.hidden, arnoldi_iters=args.arnoldi_iters)
  for name, run in (("linen", linen_run), ("nnx", nnx_run)):
    print(f"{name}: epoch  loss    mean‖∇ℓ‖  self-influence of 4 training examples: exact | Arnoldi")
    for epoch, h in enumerate(run(**kw)):
      exact = " ".join(f"{s:8.3f}" for s in h["self_influence"])
      approx = " ".join(f"{s:8.3f}" for s in h["arnoldi_self_influence"])
      print(f"{name}: {epoch:5d}  {h['loss']:.4f}  {h['grad_norm']:.4f}    {exact} | {approx}")


if __name__ == "__main__":
  main()
