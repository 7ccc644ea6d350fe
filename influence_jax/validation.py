"""Input checks that fail early with errors naming the offending pytree leaf."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from influence_jax import sharding


def nonfinite_leaves(tree: Any) -> list[str]:
  """Returns the key paths (as strings) of leaves holding NaN or ±inf."""
  found = [(path, leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
           if jnp.issubdtype(_dtype(leaf), jnp.inexact)]
  if not found:
    return []
  finite = jax.device_get(_all_finite([leaf for _, leaf in found]))
  return [jax.tree_util.keystr(path) or "<root>" for (path, _), ok in zip(found, finite) if not ok]


def _dtype(leaf: Any):
  return leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
  """Returns (len(leaves),) bool: whether each leaf is finite. One program for the whole tree, not one a leaf
  shape (a model's tree has dozens of shapes)."""
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def check_finite(tree: Any, name: str) -> None:
  """Raises ValueError naming each leaf of `tree` that holds NaN or ±inf."""
  bad = nonfinite_leaves(tree)
  if bad:
    raise ValueError(f"{name} has non-finite values (NaN or inf) in leaf/leaves: {', '.join(bad)}.")


def nonfinite_rows(x: Any) -> np.ndarray:
  """Returns the indices of the rows of host array `x` (N, ...) holding NaN or ±inf."""
  x = np.asarray(x)
  return np.flatnonzero(~np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1))


def check_finite_rows(x: jax.Array, what: str, *, row_ids: Any = None) -> None:
  """Raises ValueError naming the rows of (N, ...) `x` that hold NaN or ±inf (by `row_ids` when given).

  One device reduction when all are finite; `x` is fetched to the host only to name the rows.
  """
  if isinstance(x, jax.Array):
    if bool(jnp.all(jnp.isfinite(x))):
      return
    x = sharding.to_host(x)
  bad = nonfinite_rows(x)
  if not bad.size:
    return
  ids = bad if row_ids is None else np.asarray(row_ids)[bad]
  raise ValueError(f"{what}: {bad.size} example(s) give NaN or inf (rows {ids[:10].tolist()}"
                   f"{' ...' if bad.size > 10 else ''}): check their data and the loss on them.")


def check_finite_scalar(value: Any, name: str) -> None:
  """Raises ValueError if the scalar `value` is NaN or ±inf."""
  v = np.asarray(value)
  if not np.all(np.isfinite(v)):
    raise ValueError(f"{name} is not finite: {v}.")


def check_damping(damping: Any, name: str = "damping δ") -> float:
  """Returns `damping` as a float; raises ValueError naming it unless it is finite and ≥ 0 (a negative δ
  turns every direction with λ < |δ| into a negative one: scores of the wrong sign)."""
  delta = float(damping)
  if not (np.isfinite(delta) and delta >= 0):
    raise ValueError(f"The {name} must be finite and ≥ 0, got {delta}.")
  return delta


def param_signature(params: Any) -> tuple[tuple[str, tuple[int, ...], str], ...]:
  """Returns ((path, shape, dtype), ...) for every leaf of `params`, in flattening order."""
  return tuple(
      (jax.tree_util.keystr(path), tuple(np.shape(leaf)), str(jnp.result_type(leaf)))
      for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0])


def check_same_signature(expected: tuple, params: Any, what: str) -> None:
  """Raises ValueError describing the first difference between `expected` and params' signature."""
  got = param_signature(params)
  if got == expected:
    return
  exp_paths = [p for p, _, _ in expected]
  got_paths = [p for p, _, _ in got]
  if exp_paths != got_paths:
    missing = sorted(set(exp_paths) - set(got_paths))
    extra = sorted(set(got_paths) - set(exp_paths))
    raise ValueError(
        f"params do not match the pytree structure {what} was made for: "
        f"missing leaves {missing}, unexpected leaves {extra}.")
  for (p, s1, d1), (_, s2, d2) in zip(expected, got):
    if s1 != s2:
      raise ValueError(f"params leaf {p} has shape {s2}, but {what} was made for shape {s1}.")
  # Dtype differences only (e.g. float32 vs float64) are allowed.
