"""fastalign: fused preference-alignment losses that never materialise full logits."""

from ._types import LogitTransform, LogpOutput
from .ops import policy_ref_logps, sequence_logps

__version__ = "0.1.0"

__all__ = [
    "LogitTransform",
    "LogpOutput",
    "policy_ref_logps",
    "sequence_logps",
]
