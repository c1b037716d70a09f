"""Per-GPU memory model of one preference-training step: eager full-logits loss vs fastalign.

``estimate(...)`` counts parameters from a model config and turns them, with the batch shape,
into a byte breakdown (weights, gradients, optimizer, activations, loss-side buffers, the
reference forward) and a peak over the phases of a step; ``fastalign memory`` prints it.
Rooms: ``shapes``/``presets`` (model numbers), ``step`` (checked setup), ``params``,
``body`` and ``loss`` (the terms), ``estimator`` (their sum), ``result``, ``command`` (the CLI).
"""

from __future__ import annotations

from .command import add_arguments, cli, run
from .estimator import estimate
from .presets import PRESETS
from .result import PATHS, MemoryEstimate, PathBreakdown
from .shapes import ModelShape, count_parameters, model_shape
from .step import GRAD_MODES, LOSSES, SHARDINGS
from .units import GIB, dtype_bytes, parse_bytes

__all__ = [
    "GIB",
    "GRAD_MODES",
    "LOSSES",
    "PATHS",
    "PRESETS",
    "SHARDINGS",
    "MemoryEstimate",
    "ModelShape",
    "PathBreakdown",
    "add_arguments",
    "cli",
    "count_parameters",
    "dtype_bytes",
    "estimate",
    "model_shape",
    "parse_bytes",
    "run",
]
