"""Curvature of old-task losses for quadratic continual-learning penalties (methods.md#penalties).

- :mod:`~cft_jax.curvature.fisher`: diagonal Fisher (EWC; empirical, Monte-Carlo, exact), MAS
  importance, the diagonal penalty ``1/2 sum F (theta - theta*)^2``, and the logit-space
  cotangents that define which Fisher is meant (:func:`output_cotangents`).
- :mod:`~cft_jax.curvature.kfac`: K-FAC / TK-FAC factors of Flax models (dense + KFC convs), the
  Kronecker penalty ``1/2 s tr(V^T G V A)``, per-task factor averaging and the class-IL head
  extension (DLCFT eq. 13).

Everything is pure JAX; factors and importances are pytrees (checkpoint them like params).
"""

from cft_jax.curvature.fisher import (FISHER_TYPES, LOSSES, diagonal_fisher, ewc_penalty,
                                      iterate_batches, mas_importance, output_cotangents)
from cft_jax.curvature.kfac import (LayerFactors, average_factors, default_layer_filter,
                                    extend_head_anchor, extend_head_factors, kfac_factors,
                                    kfac_factors_linearized, kfac_factors_linearized_features,
                                    kfac_penalty,
                                    kronecker_matrix, layer_matrix, layer_penalty,
                                    tkfac_penalty, tkfac_scale)

__all__ = [
    "FISHER_TYPES", "LOSSES", "diagonal_fisher", "ewc_penalty", "iterate_batches",
    "mas_importance", "output_cotangents", "LayerFactors", "average_factors",
    "default_layer_filter", "extend_head_anchor", "extend_head_factors", "kfac_factors",
    "kfac_factors_linearized", "kfac_factors_linearized_features", "kfac_penalty",
    "kronecker_matrix", "layer_matrix",
    "layer_penalty", "tkfac_penalty", "tkfac_scale",
]
