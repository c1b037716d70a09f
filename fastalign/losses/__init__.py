"""Fused preference losses, one module per family, sharing one log-prob path (_common)."""

from ._common import PreferenceOutput
from .cpo import cpo_loss_fused
from .dpo import dpo_loss_fused
from .ipo import ipo_loss_fused
from .kto import KTOOutput, kto_class_weights, kto_loss_fused, mismatched_pairs
from .orpo import orpo_loss_fused
from .reference_free import ReferenceFreeOutput
from .simpo import simpo_loss_fused
from .typo import TYPOOutput, typo_loss_fused

__all__ = [
    "KTOOutput",
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
    "simpo_loss_fused",
    "typo_loss_fused",
]
