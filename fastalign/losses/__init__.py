"""Fused preference losses, one module per family, sharing one log-prob path (_common)."""

from ._common import PreferenceOutput
from .dpo import dpo_loss_fused
from .ipo import ipo_loss_fused
from .kto import KTOOutput, kto_class_weights, kto_loss_fused, mismatched_pairs
from .typo import TYPOOutput, typo_loss_fused

__all__ = [
    "KTOOutput",
    "PreferenceOutput",
    "TYPOOutput",
    "dpo_loss_fused",
    "ipo_loss_fused",
    "kto_class_weights",
    "kto_loss_fused",
    "mismatched_pairs",
    "typo_loss_fused",
]
