"""fastalign: fused preference-alignment losses that never materialise full logits."""

from ._types import LogitTransform, LogpOutput
from .losses import (
    KTOOutput,
    PreferenceOutput,
    ReferenceFreeOutput,
    TYPOOutput,
    cpo_loss_fused,
    dpo_loss_fused,
    ipo_loss_fused,
    kto_class_weights,
    kto_loss_fused,
    mismatched_pairs,
    orpo_loss_fused,
    simpo_loss_fused,
    typo_loss_fused,
)
from .ops import policy_ref_logps, sequence_logps
from .token_ops import TOKEN_OUTPUTS, TokenLogpsOutput, token_logps

__version__ = "0.1.0"

__all__ = [
    "TOKEN_OUTPUTS",
    "TokenLogpsOutput",
    "token_logps",
    "KTOOutput",
    "LogitTransform",
    "LogpOutput",
    "PreferenceOutput",
    "ReferenceFreeOutput",
    "TYPOOutput",
    "cpo_loss_fused",
    "dpo_loss_fused",
    "ipo_loss_fused",
    "kto_class_weights",
    "kto_loss_fused",
    "mismatched_pairs",
    "orpo_loss_fused",
    "policy_ref_logps",
    "sequence_logps",
    "simpo_loss_fused",
    "typo_loss_fused",
]
