"""Kernel tests run compiled on a GPU when there is one, else under Triton's interpreter on CPU.

TRITON_INTERPRET is set per test (monkeypatch restores it), so it never leaks into other tests;
the kernels are jitted at call time in the mode the variable asks for.
"""

import pytest
import torch

pytest.importorskip("triton", reason="triton is in the dev extra: pip install -e '.[dev]'")


@pytest.fixture
def kernel_device(monkeypatch):
    if torch.cuda.is_available():
        return torch.device("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return torch.device("cpu")
