"""Test setup: run Triton kernels through the interpreter on CPU.

TRITON_INTERPRET must be set before anything imports triton, hence at the very top here.
On a GPU machine, run with ``TRITON_INTERPRET=0`` to test the compiled kernels on CUDA.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device() -> str:
    """Where Triton-backend tests put their tensors: CUDA when compiled kernels can run."""
    if os.environ["TRITON_INTERPRET"] != "1" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


@pytest.fixture
def nan_empty(monkeypatch):
    """Every floating ``torch.empty`` comes NaN-filled, so an element a kernel leaves unwritten
    surfaces as NaN in its output."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", poisoned)
