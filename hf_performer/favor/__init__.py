"""The FAVOR+ math: random features and linear attention, torch only (no transformers import)."""

from hf_performer.favor.attention import (
    FavorState,
    bidirectional_favor,
    causal_favor,
    favor_attention,
    fold_keys,
    recurrent_favor_step,
)
from hf_performer.favor.features import (
    FEATURE_MAPS,
    KERNELS,
    LEARNED_FEATURE_MAPS,
    key_features,
    key_log_features,
    learned_projection,
    log_normaliser,
    orthogonal_random_matrix,
    query_features,
    register_kernel,
)
from hf_performer.favor.hybrid import HybridState, hybrid_favor_attention, recurrent_hybrid_favor

__all__ = [
    "FEATURE_MAPS",
    "FavorState",
    "HybridState",
    "KERNELS",
    "LEARNED_FEATURE_MAPS",
    "bidirectional_favor",
    "causal_favor",
    "favor_attention",
    "fold_keys",
    "hybrid_favor_attention",
    "key_features",
    "key_log_features",
    "learned_projection",
    "log_normaliser",
    "orthogonal_random_matrix",
    "query_features",
    "recurrent_favor_step",
    "recurrent_hybrid_favor",
    "register_kernel",
]
