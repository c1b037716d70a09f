"""Test setup: run Triton kernels through the interpreter on CPU.

TRITON_INTERPRET must be set before anything imports triton, hence at the very top here.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
