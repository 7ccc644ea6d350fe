"""What a fitted eigenspace says about itself: pairs kept and why, unconverged pairs, and whether the
curvature plus damping is positive definite on the fitted subspace (`diagnose`)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from influence_jax import sharding as sharding_lib
from influence_jax.eigenspace import Eigenspace

# A pair is unconverged when its residual ‖Cu − λu‖ exceeds this fraction of |λ|.
DEFAULT_RESIDUAL_TOL = 1e-2


@dataclasses.dataclass(frozen=True)
class FitDiagnostics:
  """What a fitted eigenspace says about itself (`diagnose`); `to_json()` for reports, `notes()` for logs.

  top_k, k: pairs asked for and kept; why_fewer: the reason when k < top_k ("" otherwise).
  unconverged: indices (0-based, descending eigenvalue order) of kept pairs whose residual ‖Cu − λu‖
    exceeds residual_tol · |λ|: measured (residuals_measured), or else Arnoldi's own Ritz estimate of it.
  min_ritz_value, num_negative_ritz: the smallest of all Ritz values of the Arnoldi run and how many
    are negative (None / 0 when unknown). A Ritz value λ is uᵀCu for a unit u of the Krylov space, so
    λ + δ ≤ 0 proves C + δI is not positive definite there (positive_definite False); the true most
    negative eigenvalue of C can only be lower.
  """

  curvature: str
  damping: float
  top_k: int
  k: int
  why_fewer: str
  residual_tol: float
  residuals_measured: bool
  unconverged: tuple
  max_relative_residual: Optional[float]
  num_ritz: int
  num_negative_ritz: int
  min_ritz_value: Optional[float]
  positive_definite: Optional[bool]

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["unconverged"] = list(self.unconverged)
    return d

  def indefinite_warning(self) -> str:
    """Returns the warning (with its remedy) when C + δI is not positive definite on the fitted subspace, else ""."""
    if self.positive_definite is not False:
      return ""
    lam = self.min_ritz_value
    remedy = ("arnoldi.curvature='gauss_newton' (positive semi-definite for a convex output loss such as "
              "cross-entropy; needs the loss as a SplitLoss, which ij.linen_loss_fns / ij.nnx_loss_fns return)"
              if self.curvature == "hessian" else "a larger damping")
    return (f"The {self.curvature} curvature is indefinite on the fitted subspace: its most negative Ritz value "
            f"is {lam:.3g} ≤ −δ = {-self.damping:.3g} ({self.num_negative_ritz} of {self.num_ritz} Ritz values "
            "are negative), so C + δI is not positive definite and preconditioned CG solves can stop at once on "
            f"non-positive curvature, returning the plain tail. Remedy: {remedy}, or a damping above "
            f"{-lam:.2g} (e.g. {_round_up(-2 * lam):g}; the damping is a scoring setting: no refit).")

  def notes(self) -> list:
    """Returns [(level, message)] for a log: 'info' for the kept pairs and the definiteness, 'warning'
    for fewer pairs than asked, unconverged pairs and an indefinite C + δI."""
    out = [("info" if not self.why_fewer else "warning",
            f"Kept {self.k} of the {self.top_k} eigenpairs asked for" + (f": {self.why_fewer}." if self.why_fewer else "."))]
    if self.unconverged:
      shown = ", ".join(str(j) for j in self.unconverged[:20]) + (", ..." if len(self.unconverged) > 20 else "")
      how = "" if self.residuals_measured else " by Arnoldi's estimate"
      out.append(("warning", f"{len(self.unconverged)} of the {self.k} kept pairs are unconverged (residual "
                             f"‖Cu − λu‖{how} > {self.residual_tol:g}·|λ|): pairs {shown} (0-based, largest eigenvalue "
                             "first). More arnoldi.n_iters converges more of them."))
    warning = self.indefinite_warning()
    if warning:
      out.append(("warning", warning))
    elif self.min_ritz_value is not None:
      sign = "indefinite" if self.min_ritz_value < 0 else "positive semi-definite"
      out.append(("info", f"The {self.curvature} curvature looks {sign} on the fitted subspace (most negative Ritz "
                          f"value {self.min_ritz_value:.3g}); C + δI is positive definite there at δ = {self.damping:g}."))
    return out


def _round_up(x: float) -> float:
  """Returns x rounded up to one significant digit (0.108 -> 0.2)."""
  if not x > 0:
    return 0.0
  scale = 10.0 ** np.floor(np.log10(x))
  return float(np.ceil(x / scale) * scale)


def diagnose(eigenspace: Eigenspace, *, damping: Optional[float] = None,
             residual_tol: float = DEFAULT_RESIDUAL_TOL) -> FitDiagnostics:
  """Returns the FitDiagnostics of a fitted eigenspace at damping δ (default: its own): why fewer
  pairs than asked, which pairs are unconverged, whether C + δI is positive definite on the subspace."""
  info = eigenspace.info
  delta = eigenspace.damping if damping is None else float(damping)
  values = np.asarray(sharding_lib.to_host(eigenspace.eigenvalues), np.float64)
  residuals = np.asarray(sharding_lib.to_host(eigenspace.residuals), np.float64)
  measured = bool(np.all(np.isfinite(residuals))) and residuals.size > 0
  if not measured:  # arnoldi.residuals off: Arnoldi's own estimates |β_m y_mj| (= ‖Cu − λu‖ in exact arithmetic).
    residuals = np.asarray(sharding_lib.to_host(eigenspace.ritz_estimates), np.float64)
  judged = bool(np.all(np.isfinite(residuals))) and residuals.size > 0
  relative = residuals / np.maximum(np.abs(values), np.finfo(np.float64).tiny)
  unconverged = tuple(int(j) for j in np.flatnonzero(relative > residual_tol)) if judged else ()
  top_k = info.top_k if info is not None else eigenspace.k
  k = eigenspace.k
  why = ""
  min_ritz = None if info is None else info.min_ritz_value
  if info is not None and k < top_k:
    if info.num_ritz and info.num_ritz < top_k:
      why = (f"the Krylov space closed after {info.num_steps} steps (the curvature has rank about {info.num_ritz} "
             "on this sample)" if info.breakdown else f"Arnoldi ran only {info.num_ritz} steps")
    elif info.num_ritz:
      negligible = info.num_ritz - info.num_selectable - (info.num_negative_ritz if info.selection == "largest" else 0)
      kind = "positive beyond" if info.selection == "largest" else "larger in magnitude than"
      why = (f"only {info.num_selectable} of the {info.num_ritz} Ritz values are {kind} "
             f"{info.selection_threshold:.2g}")
      if info.selection == "largest" and info.num_negative_ritz:
        why += f"; {info.num_negative_ritz} are negative (the most negative {min_ritz:.3g})"
      if negligible > 0:
        why += f"; {negligible} are negligible"
  return FitDiagnostics(
      curvature=info.curvature if info is not None else "hessian", damping=delta, top_k=int(top_k), k=k,
      why_fewer=why, residual_tol=float(residual_tol), residuals_measured=measured, unconverged=unconverged,
      max_relative_residual=float(np.max(relative)) if judged else None,
      num_ritz=0 if info is None else info.num_ritz, num_negative_ritz=0 if info is None else info.num_negative_ritz,
      min_ritz_value=min_ritz, positive_definite=None if min_ritz is None else bool(min_ritz + delta > 0))
