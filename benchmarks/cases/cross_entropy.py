"""Fused softmax + cross-entropy: memory-bound, judged against the copy bandwidth.

Class-index targets, reduction 'mean'. Bytes moved by a perfect kernel: the forward reads the
N x C logits once; the backward reads them again and writes the gradient; forward+backward
3 N*C elements (the targets and per-row values are negligible next to them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import dlext.functional as DF
from benchmarks.case import Case, element_size, grads_of

# (N, C) logits, then an (N, C, H, W) segmentation-style map.
SHAPES = [(4096, 10), (1024, 1000), (512, 32000), (8, 21, 128, 128)]


def cases(device: torch.device, quick: bool) -> list[Case]:
    dtypes = [torch.float32] if device.type == "cpu" else [torch.float32, torch.bfloat16]
    out = []
    for shape in SHAPES:
        for dtype in dtypes:
            n_c = torch.Size(shape).numel()
            es = element_size(dtype)
            label = f"{tuple(shape)} {str(dtype).replace('torch.', '')}"
            target_shape = (shape[0], *shape[2:])
            tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)

            def make(shape=shape, dtype=dtype, target_shape=target_shape):
                x = torch.randn(shape, device=device, dtype=dtype)
                return x, torch.randint(shape[1], target_shape, device=device)

            def make_bwd(shape=shape, dtype=dtype, target_shape=target_shape):
                x, t = make(shape, dtype, target_shape)
                return x.requires_grad_(), t, torch.ones((), device=device, dtype=dtype)

            out.append(Case("cross_entropy", label, "fwd", make, DF.cross_entropy,
                            F.cross_entropy, bytes_moved=n_c * es, **tol))
            out.append(Case("cross_entropy", label, "fwd+bwd", make_bwd,
                            grads_of(DF.cross_entropy, 1), grads_of(F.cross_entropy, 1),
                            bytes_moved=3 * n_c * es,
                            target=1.5 if device.type == "cpu" else None, **tol))
    return out
