"""Relative influence: scores divided by the square root of the training example's self-influence.

The toolkit's own definition (docs/design.md, "The papers' methods"):

    rel(z, x) = score(z, x) / √max(score(z, z), floor).

Unchanged when z's gradient is scaled by a constant; |rel(z, x)| ≤ √score(x, x)
when H is positive definite (Cauchy–Schwarz in the H⁻¹ metric; the floor only
makes the denominator larger, so the bound survives it). Training examples
whose gradients are merely large no longer dominate the ranking.

The floor. Self-influence near 0 (a point the model fits with certainty, or a
rounding-level negative value under an indefinite H) would blow the ratio up.
The denominator uses max(score(z, z), floor) with, by default,
floor = floor_fraction · median_z max(score(z, z), 0) (floor_fraction = 0.01:
no training example is amplified more than 10× beyond a median one), or an
absolute `floor` when given; never below the dtype's smallest normal number,
so all-zero inputs give zeros, not NaN. Works the same for classification
scores (`cls`), whose self-term is still the loss self-influence score(z, z).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from influence_jax import validation


def relative_floor(self_influence: jax.Array, floor_fraction: float = 0.01) -> jax.Array:
  """Returns the default floor: floor_fraction · median of max(self_influence, 0) (a scalar)."""
  s = jnp.asarray(self_influence)
  return floor_fraction * jnp.median(jnp.maximum(s, 0))


def relative_influence(
    scores: jax.Array,
    self_influence: jax.Array,
    *,
    floor: Optional[float] = None,
    floor_fraction: float = 0.01,
) -> jax.Array:
  """Returns the (T, N) matrix scores / √max(self_influence, floor), same sign as `scores`.

  `scores` is (T, N) (test rows, training columns), `self_influence` is (N,)
  score(z, z) of the same training examples under the same H. `floor`
  overrides the default floor_fraction · median(self_influence).
  """
  ss, ns = np.shape(scores), np.shape(self_influence)
  if len(ss) != 2:
    raise ValueError(f"scores must be a (T, N) matrix; got shape {ss}.")
  if ns != (ss[1],):
    raise ValueError(f"self_influence must have shape (N,) = ({ss[1]},) to match scores {ss}; got {ns}.")
  if ss[1] == 0:
    raise ValueError("scores has no training columns.")
  if not isinstance(scores, jax.core.Tracer) and not isinstance(self_influence, jax.core.Tracer):
    validation.check_finite(scores, "scores")
    validation.check_finite(self_influence, "self_influence")
  if floor is not None and not isinstance(floor, jax.core.Tracer) and not float(floor) >= 0:
    raise ValueError(f"floor must be ≥ 0; got {floor}.")
  if not floor_fraction >= 0:
    raise ValueError(f"floor_fraction must be ≥ 0; got {floor_fraction}.")
  dt = jnp.result_type(scores, self_influence, jnp.float32)
  s = jnp.asarray(self_influence, dt)
  f = relative_floor(s, floor_fraction) if floor is None else jnp.asarray(floor, dt)
  f = jnp.maximum(f, jnp.finfo(dt).tiny)
  return jnp.asarray(scores, dt) / jnp.sqrt(jnp.maximum(s, f))[None, :]
