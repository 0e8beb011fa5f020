"""Rooflines measured in the same run: device copy bandwidth and matrix-multiply rate."""
from __future__ import annotations

import torch

from benchmarks.timing import compare


def copy_bandwidth(device: torch.device, quick: bool = False) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    nbytes = (64 << 20) if quick else (256 << 20) if device.type == "cpu" else (1 << 30)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = compare({"copy": lambda: dst.copy_(src)}, device, budget_s=0.5 if quick else 1.5)["copy"]
    return 2 * nbytes / t


def matmul_rate(device: torch.device, dtype: torch.dtype, quick: bool = False) -> float:
    """FLOP/s of a large square matrix product in dtype (TF32 off for float32 on CUDA)."""
    n = 1024 if quick else (2048 if device.type == "cpu" else 8192)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = compare({"mm": lambda: a @ b}, device, budget_s=0.5 if quick else 1.5)["mm"]
    return 2 * n**3 / t
