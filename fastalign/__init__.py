"""fastalign: fused preference-alignment losses that never materialise full logits."""

from . import losses
from ._types import LogitTransform, LogpOutput
from .losses import *  # noqa: F403  (the fused losses and their outputs: losses.__all__)
from .ops import policy_ref_logps, sequence_logps
from .options import LogpOptions
from .token_ops import TOKEN_OUTPUTS, TokenLogpsOutput, token_logps

__version__ = "0.2.1"

__all__ = [
    "LogitTransform",
    "LogpOptions",
    "LogpOutput",
    "TOKEN_OUTPUTS",
    "TokenLogpsOutput",
    "policy_ref_logps",
    "sequence_logps",
    "token_logps",
    *losses.__all__,
]
