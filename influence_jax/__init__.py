"""influence_jax: influence functions for JAX/Flax models that scale to big models and data.

Sign convention everywhere (DESIGN §1): score(z, x) = ∇ℓ(x)ᵀ H⁻¹ ∇ℓ(z).
Positive: training example z is a proponent of test example x.
"""
