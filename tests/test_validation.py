"""Every bad input to the core op raises a named ValueError/TypeError before any kernel runs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fastalign
from fastalign import torch_backend


@pytest.fixture(autouse=True)
def _no_kernel(monkeypatch):
    """Any validation failure must happen before a backend is reached."""
    monkeypatch.setattr(torch_backend, "forward", _fail)


def _fail(*args, **kwargs):
    raise AssertionError("backend ran before validation rejected the input")


def good():
    return dict(
        hidden=torch.randn(2, 5, 8),
        weight=torch.randn(20, 8),
        labels=torch.randint(0, 20, (2, 5)),
    )


OPTION_FIELDS = {f.name for f in dataclasses.fields(fastalign.LogpOptions)}


def call(**overrides):
    """``sequence_logps`` on good inputs with ``overrides``; option fields go to its
    ``LogpOptions`` (whose checks run first)."""
    args = good()
    args.update(overrides)
    options = {name: args.pop(name) for name in OPTION_FIELDS & set(args)}
    return fastalign.sequence_logps(
        args.pop("hidden"),
        args.pop("weight"),
        args.pop("labels"),
        options=fastalign.LogpOptions(**options),
        **args,
    )


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(hidden=[[1.0]]), TypeError, "hidden must be a torch.Tensor"),
        (dict(hidden=torch.ones(2, 5, 8, dtype=torch.int32)), TypeError, "hidden must be"),
        (dict(weight=torch.randn(20, 8).half()), TypeError, "weight dtype"),
        (dict(labels=torch.rand(2, 5)), TypeError, "labels must be an integer"),
        (dict(hidden=torch.randn(2, 5, 8, 1)), ValueError, r"hidden must be \[B, T, H\]"),
        (dict(weight=torch.randn(20, 7)), ValueError, r"weight must be \[V, H\] with H=8"),
        (dict(weight=torch.randn(20)), ValueError, r"weight must be \[V, H\]"),
        (dict(weight=torch.randn(0, 8)), ValueError, "weight has an empty vocabulary"),
        (dict(labels=torch.randint(0, 20, (2, 4))), ValueError, "labels shape"),
        (dict(labels=torch.full((2, 5), 20)), ValueError, r"labels holds 20, outside \[0, V=20\)"),
        (dict(labels=torch.full((2, 5), -5)), ValueError, "labels holds -5"),
        (dict(bias=torch.randn(19)), ValueError, r"bias must be \[V\]"),
        (dict(bias=torch.ones(20, dtype=torch.long)), TypeError, "bias must be"),
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(temperature="1"), TypeError, "temperature must be a number"),
        (dict(logit_softcap=-1.0), ValueError, "logit_softcap must be a finite number > 0"),
        (dict(logit_scale=float("inf")), ValueError, "logit_scale"),
        (dict(logit_scale=0.0), ValueError, "logit_scale"),
        (dict(shift=1), TypeError, "shift must be a bool"),
        (dict(ignore_index=-100.0), TypeError, "ignore_index must be an int"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(cu_seqlens=torch.tensor([0, 5, 10])), ValueError, "cu_seqlens is only for packed"),
    ],
)
def test_padded_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        call(**overrides)


def packed(**overrides):
    args = dict(
        hidden=torch.randn(10, 8),
        weight=torch.randn(20, 8),
        labels=torch.randint(0, 20, (10,)),
        cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32),
    )
    args.update(overrides)
    return fastalign.sequence_logps(
        args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args
    )


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(cu_seqlens=None), ValueError, r"cu_seqlens \[B\+1\] is required"),
        (dict(cu_seqlens=torch.tensor([0.0, 10.0])), TypeError, "cu_seqlens must be an integer"),
        (dict(cu_seqlens=torch.tensor([0, 4, 9])), ValueError, "end at N=10"),
        (dict(cu_seqlens=torch.tensor([1, 4, 10])), ValueError, "start at 0"),
        (dict(cu_seqlens=torch.tensor([0, 6, 4, 10])), ValueError, "non-decreasing"),
        (dict(cu_seqlens=torch.tensor([0])), ValueError, r"1-D \[B\+1\]"),
        (dict(labels=torch.randint(0, 20, (9,))), ValueError, "labels shape"),
    ],
)
def test_packed_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        packed(**overrides)


def test_device_mismatch_is_named():
    meta_weight = torch.randn(20, 8, device="meta")
    with pytest.raises(ValueError, match="weight is on meta but hidden is on cpu"):
        call(weight=meta_weight)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        call(backend="triton")


def test_triton_refuses_float64():
    args = {k: v.double() if v.is_floating_point() else v for k, v in good().items()}
    with pytest.raises(TypeError, match="not float64"):
        call(backend="triton", **args)


def test_reference_stream_errors_use_reference_names():
    args = good()
    with pytest.raises(TypeError, match="ref_hidden must be a torch.Tensor"):
        fastalign.policy_ref_logps(args["hidden"], args["weight"], args["labels"], None)
    with pytest.raises(ValueError, match=r"ref_weight must be \[V, H\]"):
        fastalign.policy_ref_logps(
            args["hidden"], args["weight"], args["labels"], args["hidden"], torch.randn(20, 3)
        )
    with pytest.raises(ValueError, match="labels shape"):
        fastalign.policy_ref_logps(
            args["hidden"], args["weight"], args["labels"], torch.randn(2, 4, 8)
        )
