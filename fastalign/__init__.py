"""fastalign: fused preference-alignment losses that never materialise full logits."""

from ._types import LogitTransform, LogpOutput
from .losses import (
    KTOOutput,
    PreferenceOutput,
    TYPOOutput,
    dpo_loss_fused,
    ipo_loss_fused,
    kto_class_weights,
    kto_loss_fused,
    mismatched_pairs,
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
    "TYPOOutput",
    "dpo_loss_fused",
    "ipo_loss_fused",
    "kto_class_weights",
    "kto_loss_fused",
    "mismatched_pairs",
    "policy_ref_logps",
    "sequence_logps",
    "typo_loss_fused",
]
