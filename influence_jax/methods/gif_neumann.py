"""The GIF authors' solver: a Neumann (Richardson) iteration with a growing normaliser, early-stopped.

To solve A x = b for a positive semi-definite A (for GIF: A = P H H P,
b = P H g), it divides A and b by n² and iterates

  x₀ = b / n²,   x_{k+1} = b / n² + x_k − A x_k / n²,

which converges to A⁻¹b (on the range of A) when n² > λ_max(A) / 2. Every
second iteration the step ‖x_{k+1} − x_k‖ is compared with the previous one;
if it grew, the iteration is declared divergent and restarted with a larger
normaliser: rule "multiply" (n ← growth · n) or rule "add" (n ← n + growth;
the authors' rule, growth 5 from n = 1 in their label-change notebook, 0.5 in
their library's default). Stopping after a few iterations (the authors use 30
to 1,000) makes it a heavily regularised solve: the components of small
eigenvalues of A are barely reached.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

NORMALISER_RULES = ("multiply", "add")

import jax
import jax.numpy as jnp


class NeumannResult(NamedTuple):
  """x ≈ A⁻¹b; num_iters run with the final normaliser; normaliser n (A was divided by n²);
  restarts: divergent runs before it; converged: ‖x_{k+1} − x_k‖ ≤ tol · ‖x_{k+1}‖ was reached;
  normalisers: every normaliser tried, in order (the last is `normaliser`)."""

  x: jax.Array
  num_iters: jax.Array
  normaliser: float
  restarts: int
  converged: jax.Array
  normalisers: tuple = ()


def next_normaliser(n: float, growth: float, rule: str = "multiply") -> float:
  """Returns the normaliser after a divergent run: growth · n ("multiply") or n + growth ("add")."""
  if rule == "multiply":
    return n * growth
  if rule == "add":
    return n + growth
  raise ValueError(f"Unknown normaliser rule {rule!r}; expected one of {NORMALISER_RULES}.")


def operator_parts(op):
  """Returns (pure matvec(operands, v), operands) of a `curvature.LinearOperator`, or (callable, None)."""
  if hasattr(op, "matvec") and hasattr(op, "operands"):
    return op.matvec, op.operands
  if not callable(op):
    raise TypeError(f"op must be a curvature.LinearOperator or a callable; got {type(op).__name__}.")
  return _Plain(op), None


@dataclasses.dataclass(frozen=True)
class _Plain:
  fn: object

  def __call__(self, operands, v):
    del operands
    return self.fn(v)


def neumann_solve(op, b: jax.Array, *, max_iters: int = 30, normaliser: float = 1.0, growth: float = 2.0,
                  rule: str = "multiply", max_restarts: int = 40, tol: float = 1e-9) -> NeumannResult:
  """Returns the early-stopped Neumann solution of A x = b (A = `op`, positive semi-definite).

  Runs at most `max_iters` iterations per normaliser; on divergence the
  normaliser grows (`next_normaliser`: × growth for rule "multiply", + growth
  for the authors' rule "add") and the iteration restarts from x₀, at most
  `max_restarts` times (then raises: A is not positive semi-definite or far
  larger than the last normaliser tried).
  """
  b = jnp.asarray(b)
  if b.ndim != 1 or not jnp.issubdtype(b.dtype, jnp.floating):
    raise ValueError(f"b must be a flat floating-point vector; got shape {b.shape}, dtype {b.dtype}.")
  if not bool(jnp.all(jnp.isfinite(b))):
    raise ValueError("b has non-finite values (NaN or inf).")
  if rule not in NORMALISER_RULES:
    raise ValueError(f"Unknown normaliser rule {rule!r}; expected one of {NORMALISER_RULES}.")
  least = 1.0 if rule == "multiply" else 0.0
  if max_iters < 1 or not normaliser > 0 or not growth > least or not tol > 0:
    raise ValueError(f"Need max_iters ≥ 1, normaliser > 0, growth > {least:g} (rule {rule!r}) and tol > 0; got "
                     f"{max_iters}, {normaliser}, {growth}, {tol}.")
  fn, operands = operator_parts(op)
  tried = []
  n = float(normaliser)
  for restart in range(max_restarts + 1):
    tried.append(n)
    x, k, diverged, converged = _richardson(fn, operands, b, jnp.asarray(1.0 / n ** 2, b.dtype), tol, int(max_iters))
    if not bool(diverged) and bool(jnp.all(jnp.isfinite(x))):
      return NeumannResult(x, k, n, restart, converged, tuple(tried))
    n = next_normaliser(n, growth, rule)
  raise ValueError(f"The Neumann iteration diverged up to normaliser {tried[-1]:.3g}; is the operator "
                   "positive semi-definite?")


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _richardson(fn, operands, b, omega, tol, max_iters):
  v = omega * b

  def cond(state):
    _, _, k, diverged, done = state
    return (k < max_iters) & ~diverged & ~done

  def body(state):
    x, diff_old, k, _, _ = state
    x_new = v + x - omega * fn(operands, x)
    diff = jnp.linalg.norm(x_new - x)
    check = k % 2 == 0
    diverged = check & (diff > diff_old) | ~jnp.isfinite(diff)
    diff_old = jnp.where(check, diff, diff_old)
    done = diff <= tol * jnp.linalg.norm(x_new)
    return x_new, diff_old, k + 1, diverged, done

  init = (v, jnp.asarray(jnp.inf, b.dtype), jnp.asarray(0), jnp.asarray(False), jnp.asarray(False))
  x, _, k, diverged, done = jax.lax.while_loop(cond, body, init)
  return x, k, diverged, done
