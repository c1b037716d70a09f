"""Argument checks for the public entry points: named errors before any kernel runs."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
BACKENDS = ("auto", "triton", "torch")


def check_tensor(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float(value: torch.Tensor, name: str) -> None:
    check_tensor(value, name)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be bfloat16, float16, float32 or float64, got {value.dtype}")


def check_int(value: torch.Tensor, name: str) -> None:
    check_tensor(value, name)
    if value.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (int64 or int32), got {value.dtype}")


def check_same_device(value: torch.Tensor, name: str, device: torch.device) -> None:
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but hidden is on {device}")


def check_positive(value, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def check_finite(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value == 0:
        raise ValueError(f"{name} must be a finite non-zero number, got {value}")


def check_choice(value, name: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
