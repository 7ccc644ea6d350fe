"""influence_jax: influence functions for JAX/Flax models that scale to big models and data.

Sign convention everywhere (docs/design.md, "What a score means"): score(z, x) = ∇ℓ(x)ᵀ H⁻¹ ∇ℓ(z).
Positive: training example z is a proponent of test example x.

`import influence_jax` loads the core only (curvature, Arnoldi, eigenspace,
projections, scoring, checkpoints, Flax adapters). The papers' methods in
`influence_jax.methods` are exported here too, but loaded on first use, so
that the core never imports optax, NNX or the jobs' dependencies.
"""

import importlib

from influence_jax.checkpoint import load_eigenspace, save_eigenspace
from influence_jax.curvature import LinearOperator, SplitLoss, curvature_operator, gnvp, hvp
from influence_jax.diagnostics import FitDiagnostics, diagnose
from influence_jax.eigenspace import (Eigenspace, EigenspaceInfo, default_tail_constant,
                                     fit_eigenspace, project)
from influence_jax.flax_adapters import ModelFns, linen_loss_fns, nnx_loss_fns, nnx_update
from influence_jax.ranking import Extremes, extremes, merge_rows, stream_extremes
from influence_jax.scoring import (
    influence,
    influence_scores,
    influence_scores_with_tail,
    query_side,
    row_side,
    self_influence,
)
from influence_jax.residual_basis import fit_residual_basis
from influence_jax.sharding import make_mesh
from influence_jax.sketch import KroneckerSketch, make_sketch, project_and_sketch
from influence_jax.solvers import CGResult, conjugate_gradient, dense_hessian, exact_influence
from influence_jax.store import ProjectionStore, StoreError, open_store

# Methods of the papers, loaded on first attribute access: name -> module under influence_jax.methods.
_LAZY = {
    **dict.fromkeys(
        ("classification_test_loss", "exact_classification_influence", "last_layer_classification_influence",
         "last_layer_margin_gradients", "margin", "margin_logit_gradients", "per_example_margin_fn",
         "per_example_margin_gradients"), "classification"),
    **dict.fromkeys(
        ("LastLayerCurvature", "fit_last_layer", "last_layer_gradients", "last_layer_hessian",
         "last_layer_influence", "last_layer_inverse_hvp", "last_layer_self_influence"), "last_layer"),
    **dict.fromkeys(
        ("GENERALIZES", "MEMORIZED", "NEITHER", "Memorization", "eigenspace_memorization",
         "last_layer_memorization", "linen_memorization", "memorization_labels", "split_linen_last_layer"),
        "memorization"),
    **dict.fromkeys(("relative_floor", "relative_influence"), "relative"),
    **dict.fromkeys(
        ("InfluenceUpdate", "apply_update", "fif_update", "gif_update", "if_update", "label_change_gradient",
         "pif_update", "removal_gradient"), "gif_updates"),
    **dict.fromkeys(("TargetSet", "select_parameters"), "gif_selection"),
    **dict.fromkeys(("neumann_solve",), "gif_neumann"),
}


def __getattr__(name):
  if name in _LAZY:
    value = getattr(importlib.import_module(f"influence_jax.methods.{_LAZY[name]}"), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'influence_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_LAZY))


__version__ = "0.1.0"
