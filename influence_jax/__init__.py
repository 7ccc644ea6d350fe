"""influence_jax: influence functions for JAX/Flax models that scale to big models and data.

Sign convention everywhere (DESIGN §1): score(z, x) = ∇ℓ(x)ᵀ H⁻¹ ∇ℓ(z).
Positive: training example z is a proponent of test example x.
"""

from influence_jax.classification import (
    classification_test_loss,
    exact_classification_influence,
    last_layer_classification_influence,
    last_layer_margin_gradients,
    margin,
    margin_logit_gradients,
    per_example_margin_fn,
    per_example_margin_gradients,
)
from influence_jax.curvature import LinearOperator, SplitLoss, curvature_operator, gnvp, hvp
from influence_jax.eigenspace import Eigenspace, EigenspaceInfo, fit_eigenspace, project
from influence_jax.flax_adapters import ModelFns, linen_loss_fns, nnx_loss_fns, nnx_update
from influence_jax.last_layer import (
    LastLayerCurvature,
    fit_last_layer,
    last_layer_gradients,
    last_layer_hessian,
    last_layer_influence,
    last_layer_inverse_hvp,
    last_layer_self_influence,
)
from influence_jax.memorization import (
    GENERALIZES,
    MEMORIZED,
    NEITHER,
    Memorization,
    eigenspace_memorization,
    last_layer_memorization,
    linen_memorization,
    memorization_labels,
    split_linen_last_layer,
)
from influence_jax.relative import relative_floor, relative_influence
from influence_jax.scoring import (
    TopK,
    default_tail_constant,
    influence,
    influence_scores,
    influence_scores_with_tail,
    self_influence,
    top_k,
)
from influence_jax.gif import (
    InfluenceUpdate,
    Selection,
    apply_update,
    fif_update,
    gif_update,
    if_update,
    label_change_gradient,
    pif_update,
    removal_gradient,
    select_parameters,
)
from influence_jax.solvers import CGResult, conjugate_gradient, dense_hessian, exact_influence

__version__ = "0.1.0"
