"""Exact influence restricted to the last Dense layer under softmax cross-entropy.

The toolkit's own closed form (docs/design.md, "The papers' methods": exact last-layer influence). The body of the
network is frozen: it maps an example to features h ∈ ℝᵈ, and only the last
Dense layer (kernel (d, C), bias (C,)) counts as parameters. With r = softmax −
onehot(y) and p = softmax(logits):

    ∇ℓ(z) = a ⊗ r,                      a = [1, h] ∈ ℝᵈ⁺¹
    H     = (1/N) Σ (a aᵀ) ⊗ (diag p − p pᵀ) + (l2 + damping)·I,

both of size P = (d+1)·C, small enough to form and factor exactly.

Flat order. Vectors are in the order of `ravel_pytree({"bias": b, "kernel": W})`
for a Flax Dense param dict: dict keys sort, so the C bias entries come first,
then the kernel row-major (entry (i, c) at C + i·C + c). Equivalently the flat
vector is the row-major ravel of W̃ = [bias; kernel] of shape (d+1, C), which is
why the augmented feature puts the 1 *first*: a = [1, h], logits = a W̃.

The softmax null space. Adding the same vector to every column of W̃ (adding
aᵀv to every logit) leaves softmax unchanged: the cross-entropy Hessian is zero
on the d+1 directions v ⊗ 1_C. Every cross-entropy gradient and every margin
gradient is orthogonal to them (their class parts sum to zero). The loss part
of H is positive semi-definite. `fit_last_layer` factors it one of two ways:
- l2 + damping > 0 (the usual case; this is what handles the null space):
  H + (l2 + damping)·I is positive definite and, by default, factored by
  Cholesky (exact and cheaper than `eigh`; scripts/bench_last_layer.py times both).
  With factorization="eigh" its eigenvalues μ are clamped at 0 (rounding can
  make null ones slightly negative) and every direction gets 1/(μ + l2 + damping).
  Keep l2 + damping well above the rounding level of the curvature (machine
  epsilon · max μ; about 1e-7·max μ in float32).
- l2 = damping = 0: `eigh` and the pseudo-inverse, directions with μ ≤ rcond·max μ
  get 0. The null directions are dropped, which for gradients orthogonal to
  them is the l2 → 0 limit of the regularised influence.
Size: P up to a few thousand (both factorizations are O(P³)). Memory: O(chunk·P)
per chunk of examples plus the P² factor; the
score functions take gradient matrices, so score the training set in batches
of rows when N·P is too large (columns are independent).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np

from influence_jax import validation


FACTORIZATIONS = ("auto", "cholesky", "eigh")


class LastLayerCurvature(NamedTuple):
  """The factored last-layer Hessian H = (loss part) + (l2 + damping)·I, P = (d+1)·C.

  Exactly one of two factorizations is held (the other fields are None):
  cholesky: (P, P) lower-triangular L with H = L Lᵀ (l2 + damping > 0).
  eigh: H = V diag(μ) Vᵀ + (l2 + damping)·I,
    eigenvectors: (P, P) V, columns orthonormal, in the flat order of the
      module docstring (bias first, then kernel row-major);
    loss_eigenvalues: (P,) μ, eigenvalues of the cross-entropy part (≥ 0 up to rounding);
    inverse_eigenvalues: (P,) what H⁻¹ applies along each eigenvector:
      1/(max(μ, 0) + l2 + damping); when l2 + damping = 0, 0 where μ ≤ rcond·max μ
      (pseudo-inverse).
  regularization: scalar l2 + damping.
  """

  eigenvectors: Optional[jax.Array]
  loss_eigenvalues: Optional[jax.Array]
  inverse_eigenvalues: Optional[jax.Array]
  regularization: jax.Array
  cholesky: Optional[jax.Array] = None

  @property
  def dim(self) -> int:
    """P, the number of last-layer parameters."""
    return (self.cholesky if self.cholesky is not None else self.eigenvectors).shape[0]


# ---------------------------------------------------------------------------
# Input checks (shapes always; values only when the inputs are concrete).


def _concrete(*xs) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


def check_last_layer_inputs(features, labels, kernel, bias) -> None:
  """Raises ValueError/TypeError naming the first bad input of a last-layer call."""
  fs, ks, bs = np.shape(features), np.shape(kernel), np.shape(bias)
  if len(ks) != 2:
    raise ValueError(f"kernel must have shape (d, C); got shape {ks}.")
  d, c = ks
  if c < 2:
    raise ValueError(f"kernel has {c} output column(s); softmax cross-entropy needs C ≥ 2 classes.")
  if bs != (c,):
    raise ValueError(f"bias must have shape (C,) = ({c},) to match kernel {ks}; got {bs}.")
  if len(fs) != 2 or fs[1] != d:
    raise ValueError(f"features must have shape (B, d) = (B, {d}) to match kernel {ks}; got {fs}.")
  if labels is not None:
    ls = np.shape(labels)
    if ls != (fs[0],):
      raise ValueError(f"labels must have shape (B,) = ({fs[0]},) to match features {fs}; got {ls}.")
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
      raise TypeError(f"labels must be integer class indices; got dtype {jnp.result_type(labels)}.")
  if _concrete(features, kernel, bias):
    validation.check_finite(features, "features")
    validation.check_finite({"bias": bias, "kernel": kernel}, "last-layer params")
  if labels is not None and _concrete(labels) and fs[0] > 0:
    lab = np.asarray(labels)
    if lab.min() < 0 or lab.max() >= c:
      raise ValueError(f"labels must lie in [0, {c}); got values in [{lab.min()}, {lab.max()}].")


def _check_gradient_matrix(g, name: str, dim: Optional[int] = None) -> None:
  s = np.shape(g)
  if len(s) != 2:
    raise ValueError(f"{name} must be a (rows, P) matrix of flat gradients; got shape {s}.")
  if dim is not None and s[1] != dim:
    raise ValueError(f"{name} has {s[1]} columns, but the curvature has P = {dim} parameters.")
  if _concrete(g):
    validation.check_finite(g, name)


# ---------------------------------------------------------------------------
# Pieces of the closed form.


def augment(features: jax.Array) -> jax.Array:
  """Returns a = [1, h]: (B, d) -> (B, d+1), the 1 first (the bias row of W̃ = [bias; kernel])."""
  ones = jnp.ones(features.shape[:-1] + (1,), features.dtype)
  return jnp.concatenate([ones, features], axis=-1)


def kron_rows(a: jax.Array, r: jax.Array) -> jax.Array:
  """Row-wise a ⊗ r: (B, d+1), (B, C) -> (B, (d+1)·C), entry (i, c) at i·C + c."""
  return (a[:, :, None] * r[:, None, :]).reshape(a.shape[0], -1)


def _dtype(features, kernel, bias):
  return jnp.result_type(features, kernel, bias, jnp.float32)


@jax.jit
def _gradients(features, labels, kernel, bias):
  dt = _dtype(features, kernel, bias)
  features, kernel, bias = (x.astype(dt) for x in (features, kernel, bias))
  p = jax.nn.softmax(features @ kernel + bias, axis=-1)
  r = p - jax.nn.one_hot(labels, kernel.shape[1], dtype=dt)
  return kron_rows(augment(features), r)


def last_layer_gradients(features, labels, kernel, bias) -> jax.Array:
  """Returns (B, (d+1)·C) per-example gradients of softmax cross-entropy w.r.t. (bias, kernel).

  Row b is ∇ℓ(z_b) = [1, h_b] ⊗ (softmax(h_b W + b) − onehot(y_b)), flat in the
  order of `ravel_pytree({"bias": bias, "kernel": kernel})` (bias first). The
  L2 term is not included (it belongs to the training objective, not to ℓ).
  """
  check_last_layer_inputs(features, labels, kernel, bias)
  return _gradients(features, labels, kernel, bias)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _loss_hessian(features, labels, kernel, bias, *, chunk_size):
  del labels  # The softmax cross-entropy Hessian does not depend on the labels.
  dt = _dtype(features, kernel, bias)
  features, kernel, bias = (x.astype(dt) for x in (features, kernel, bias))
  n, d = features.shape
  c = kernel.shape[1]
  p_dim = (d + 1) * c
  chunk = max(1, min(chunk_size, n))
  num = -(-n // chunk)
  pad = num * chunk - n
  feats = jnp.concatenate([features, jnp.zeros((pad, d), dt)]).reshape(num, chunk, d)
  weights = jnp.concatenate([jnp.full((n,), 1.0 / n, dt), jnp.zeros((pad,), dt)]).reshape(num, chunk)

  def body(acc, xs):
    h, w = xs
    a = augment(h)
    p = jax.nn.softmax(h @ kernel + bias, axis=-1)
    u = kron_rows(a, p)  # rows a ⊗ p, (chunk, P)
    uw = u * w[:, None]
    # (a aᵀ) ⊗ diag p has only c = c' blocks: D[(i, c), j] = Σ_b w a_i p_c a_j, one matmul.
    diag_part = (uw.T @ a).reshape(d + 1, c, d + 1)
    diag_part = diag_part[:, :, :, None] * jnp.eye(c, dtype=dt)[None, :, None, :]
    # (a aᵀ) ⊗ p pᵀ = (a ⊗ p)(a ⊗ p)ᵀ.
    return acc + diag_part.reshape(p_dim, p_dim) - uw.T @ u, None

  hess, _ = jax.lax.scan(body, jnp.zeros((p_dim, p_dim), dt), (feats, weights))
  return 0.5 * (hess + hess.T)


def last_layer_hessian(features, labels, kernel, bias, *, l2: float = 0.0, chunk_size: int = 1024) -> jax.Array:
  """Returns the dense (P, P) Hessian (1/N) Σ (a aᵀ) ⊗ (diag p − p pᵀ) + l2·I of the mean loss.

  P = (d+1)·C in the flat order of `last_layer_gradients`. Memory per chunk of
  `chunk_size` examples is O(chunk·P) on top of the P² result.
  """
  check_last_layer_inputs(features, labels, kernel, bias)
  if np.shape(features)[0] == 0:
    raise ValueError("features holds no examples; the Hessian is a mean over at least one.")
  hess = _loss_hessian(features, labels, kernel, bias, chunk_size=int(chunk_size))
  return hess + l2 * jnp.eye(hess.shape[0], dtype=hess.dtype)


@functools.partial(jax.jit, static_argnames=("rcond",))
def _factor(hess, reg, *, rcond):
  mu, vecs = jnp.linalg.eigh(hess)
  total = jnp.maximum(mu, 0.0) + reg
  cutoff = jnp.where(reg > 0, 0.0, rcond * jnp.max(jnp.abs(mu)))
  keep = total > cutoff
  inv = jnp.where(keep, 1.0 / jnp.where(keep, total, 1.0), 0.0)
  return LastLayerCurvature(vecs, mu, inv, reg)


@jax.jit
def _cholesky(hess, reg):
  lower = jnp.linalg.cholesky(hess + reg * jnp.eye(hess.shape[0], dtype=hess.dtype))
  return LastLayerCurvature(None, None, None, reg, lower)


def fit_last_layer(
    features,
    labels,
    kernel,
    bias,
    *,
    l2: float,
    damping: float = 0.0,
    rcond: Optional[float] = None,
    chunk_size: int = 1024,
    factorization: str = "auto",
) -> LastLayerCurvature:
  """Returns the factored Hessian of the mean softmax cross-entropy of the last Dense layer.

  H = (1/N) Σ (a aᵀ) ⊗ (diag p − p pᵀ) + (l2 + damping)·I over the N rows of
  `features` (the frozen body's outputs on the training set), for the objective
  (1/N) Σ ℓ + (l2/2)‖(kernel, bias)‖² of docs/design.md, "What a score means" (l2 on the bias too).
  `damping` is extra, for influence only. With l2 + damping = 0 the inverse is
  the pseudo-inverse: eigenvalues at or below rcond·max μ (default rcond:
  10·P·machine epsilon) are dropped (see the module docstring). `labels` are
  checked but H does not depend on them. `factorization`: "cholesky" (needs
  l2 + damping > 0), "eigh", or "auto" (the default: Cholesky when
  l2 + damping > 0 is known, else eigh). Every last_layer_* score function
  takes either.
  """
  check_last_layer_inputs(features, labels, kernel, bias)
  if factorization not in FACTORIZATIONS:
    raise ValueError(f"factorization must be one of {FACTORIZATIONS}; got {factorization!r}.")
  if _concrete(l2, damping):
    validation.check_finite_scalar(l2, "l2")
    validation.check_finite_scalar(damping, "damping")
    if l2 < 0 or damping < 0:
      raise ValueError(f"l2 and damping must be ≥ 0; got l2={l2}, damping={damping}.")
  if np.shape(features)[0] == 0:
    raise ValueError("features holds no examples; the Hessian is a mean over at least one.")
  positive = _concrete(l2, damping) and l2 + damping > 0
  if factorization == "cholesky" and not positive:
    raise ValueError(f"the Cholesky factorization needs l2 + damping > 0 (known, not traced); "
                     f"got l2={l2}, damping={damping}. Use factorization='eigh'.")
  hess = _loss_hessian(features, labels, kernel, bias, chunk_size=int(chunk_size))
  reg = jnp.asarray(l2 + damping, hess.dtype)
  if factorization == "cholesky" or (factorization == "auto" and positive):
    return _cholesky(hess, reg)
  if rcond is None:
    rcond = 10.0 * hess.shape[0] * float(jnp.finfo(hess.dtype).eps)
  return _factor(hess, reg, rcond=float(rcond))


# ---------------------------------------------------------------------------
# Scores.


def _whiten(curv: LastLayerCurvature, grads: jax.Array) -> jax.Array:
  """Returns rows W g with gᵀH⁻¹g' = (W g)·(W g'): L⁻¹g (Cholesky) or √inverse_eigenvalues ⊙ Vᵀg (eigh)."""
  if curv.cholesky is not None:
    lower = curv.cholesky.astype(grads.dtype)
    return jax.scipy.linalg.solve_triangular(lower, grads.T, lower=True).T
  coords = grads @ curv.eigenvectors.astype(grads.dtype)
  return coords * jnp.sqrt(curv.inverse_eigenvalues.astype(grads.dtype))


@jax.jit
def _inverse_hvp(curv, v):
  if curv.cholesky is not None:
    return jax.scipy.linalg.cho_solve((curv.cholesky, True), v.T).T
  coords = v @ curv.eigenvectors
  return (coords * curv.inverse_eigenvalues) @ curv.eigenvectors.T


def last_layer_inverse_hvp(curv: LastLayerCurvature, vectors) -> jax.Array:
  """Returns (rows, P) H⁻¹ v for each row v of `vectors` (pseudo-inverse where eigenvalues were dropped)."""
  _check_gradient_matrix(vectors, "vectors", curv.dim)
  return _inverse_hvp(curv, jnp.asarray(vectors))


def _dtype_of(curv, *grads):
  return jnp.result_type(*grads, curv.regularization)


@jax.jit
def _influence(curv, test_grads, train_grads):
  dt = _dtype_of(curv, test_grads, train_grads)
  return _whiten(curv, test_grads.astype(dt)) @ _whiten(curv, train_grads.astype(dt)).T


def last_layer_influence(curv: LastLayerCurvature, test_grads, train_grads) -> jax.Array:
  """Returns the (T, N) matrix score(z, x) = ∇ℓ(x)ᵀ H⁻¹ ∇ℓ(z).

  Rows are test examples x (rows of `test_grads`), columns training examples z
  (rows of `train_grads`), both from `last_layer_gradients`. Positive: z is a
  proponent of x (docs/design.md, "What a score means"); removing z raises the loss on x by about score/N.
  """
  p_dim = curv.dim
  _check_gradient_matrix(test_grads, "test_grads", p_dim)
  _check_gradient_matrix(train_grads, "train_grads", p_dim)
  return _influence(curv, jnp.asarray(test_grads), jnp.asarray(train_grads))


@jax.jit
def _self_influence(curv, grads):
  white = _whiten(curv, grads.astype(_dtype_of(curv, grads)))
  return jnp.sum(white * white, axis=-1)


def last_layer_self_influence(curv: LastLayerCurvature, grads) -> jax.Array:
  """Returns (N,) self-influence score(z, z) = ∇ℓ(z)ᵀ H⁻¹ ∇ℓ(z) ≥ 0 (H positive semi-definite here)."""
  _check_gradient_matrix(grads, "grads", curv.dim)
  return _self_influence(curv, jnp.asarray(grads))
