"""Shared test fixtures: devices, poisoned outputs, deterministic seeds."""
from __future__ import annotations

import pytest
import torch

import dlext


def cuda_ready() -> bool:
    return torch.cuda.is_available() and dlext.build_info()["with_cuda"]


CUDA_SKIP = pytest.mark.skipif(not cuda_ready(),
                               reason="needs a CUDA device and dlext built with CUDA kernels")

# Every device-parametrised test runs on the CPU and, where possible, on CUDA (skipped, and listed
# as skipped, elsewhere).
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA_SKIP])]


@pytest.fixture(autouse=True)
def _poison_and_seed():
    """Poison every kernel output before it is written, and seed the generators per test."""
    previous = dlext._C.set_poison_outputs(True)
    torch.manual_seed(0)
    yield
    dlext._C.set_poison_outputs(previous)
