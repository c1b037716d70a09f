"""Byte sizes and argument checks of the memory model: ``"80GB"`` strings, dtype widths."""

from __future__ import annotations

import re
from typing import Any

GIB = 1 << 30
_DTYPE_BYTES = {
    "bfloat16": 2,
    "bf16": 2,
    "float16": 2,
    "fp16": 2,
    "half": 2,
    "float32": 4,
    "fp32": 4,
    "float": 4,
}


def parse_bytes(value: int | float | str, name: str = "gpu_memory") -> int:
    """``80GB``/``80GiB``/``80G`` → 80·2³⁰ (GPU "GB" are GiB), ``512MB`` → 512·2²⁰, ints as is.
    A string needs its unit (``"80"`` is refused: 80 bytes is never what is meant)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a byte count or a size string, got bool")
    if isinstance(value, (int, float)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")
        return int(value)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a byte count or a size string, got {type(value).__name__}")
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", value, re.IGNORECASE)
    if not match or float(match.group(1)) <= 0 or not (match.group(2) or match.group(3)):
        raise ValueError(f"{name} must look like '80GB' or '81920MiB', got {value!r}")
    scale = 1 << (10 * " KMGT".index(match.group(2).upper() or " "))
    return int(float(match.group(1)) * scale)


def dtype_bytes(dtype: Any, name: str = "dtype") -> int:
    """Bytes per element of ``"bfloat16"``/``"bf16"``/``"float32"``/... or a ``torch.dtype``."""
    key = str(dtype).removeprefix("torch.").lower() if not isinstance(dtype, str) else dtype.lower()
    if not isinstance(dtype, str) and not hasattr(dtype, "is_floating_point"):
        raise TypeError(f"{name} must be a dtype name or torch.dtype, got {type(dtype).__name__}")
    if key not in _DTYPE_BYTES:
        raise ValueError(f"{name} must be one of bfloat16, float16, float32, got {dtype!r}")
    return _DTYPE_BYTES[key]


def positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value
