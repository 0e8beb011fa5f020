"""ReLU: memory-bound, judged against the copy bandwidth.

Bytes moved by a perfect kernel: forward reads x and writes y (2 N); backward reads dy and y and
writes dx (3 N); forward+backward 5 N elements.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import dlext.functional as DF
from benchmarks.case import Case, element_size, grads_of

CPU_SHAPES = [(256, 6, 28, 28), (32, 64, 56, 56), (64, 256, 56, 56)]
CUDA_SHAPES = [(256, 6, 28, 28), (64, 64, 112, 112), (64, 256, 56, 56), (128, 256, 112, 112)]


def cases(device: torch.device, quick: bool) -> list[Case]:
    shapes = CPU_SHAPES if device.type == "cpu" else CUDA_SHAPES
    dtypes = [torch.float32] if device.type == "cpu" else [torch.float32, torch.bfloat16]
    if quick:
        shapes = shapes[:2]
    out = []
    for shape in shapes:
        for dtype in dtypes:
            n = torch.Size(shape).numel()
            es = element_size(dtype)
            label = f"{tuple(shape)} {str(dtype).replace('torch.', '')}"

            def make(shape=shape, dtype=dtype):
                return (torch.randn(shape, device=device, dtype=dtype),)

            def make_bwd(shape=shape, dtype=dtype):
                x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
                return x, torch.randn(shape, device=device, dtype=dtype)

            out.append(Case("relu", label, "fwd", make, DF.relu, F.relu, bytes_moved=2 * n * es,
                            rtol=0, atol=0))
            out.append(Case("relu", label, "fwd+bwd", make_bwd, grads_of(DF.relu, 1),
                            grads_of(F.relu, 1), bytes_moved=5 * n * es, rtol=0, atol=0,
                            target=1.0 if device.type == "cpu" else None))
    return out
