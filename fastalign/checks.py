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
    """An integer tensor of any of ``INT_DTYPES`` (int64, int32, int16, uint8, int8)."""
    check_tensor(value, name)
    if value.dtype not in INT_DTYPES:
        raise TypeError(
            f"{name} must be an integer tensor (int64, int32, int16, uint8 or int8), "
            f"got {value.dtype}"
        )


def check_same_device(value: torch.Tensor, name: str, device: torch.device) -> None:
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but hidden is on {device}")


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_number(
    value,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    nonzero: bool = False,
    integer: bool = False,
    allow_none: bool = False,
):
    """A Python number (never a bool), finite, inside the given bounds; returned unchanged.

    ``low``/``high`` are inclusive unless ``low_open``/``high_open``; ``nonzero`` rejects 0;
    ``integer`` asks for an ``int``. Errors name the argument and the range expected.

    Example:
        >>> check_number(0.1, "beta", low=0, low_open=True)
        0.1
    """
    if value is None and allow_none:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an int" if integer else "a number"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    inside = math.isfinite(value) and not (nonzero and value == 0)
    if low is not None:
        inside = inside and (value > low if low_open else value >= low)
    if high is not None:
        inside = inside and (value < high if high_open else value <= high)
    if not inside:
        expected = _describe(low, high, low_open, high_open, nonzero, integer)
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def _describe(low, high, low_open, high_open, nonzero, integer) -> str:
    kind = "an int" if integer else "a finite number"
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {high}"
    return f"{kind}{' other than 0' if nonzero else ''}"


def check_choice(value, name: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
