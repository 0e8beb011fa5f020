"""Fused softmax + cross-entropy: memory-bound, judged against the copy bandwidth.

Class-index targets, reduction 'mean'. Bytes moved by a perfect kernel: the forward reads the
N x C logits once; the backward reads them again and writes the gradient; forward+backward
3 N*C elements (the targets and per-row values are negligible next to them).

On CUDA: LLM-vocabulary logits (16384 x 32768) in float32 and bfloat16, where the issue asks for
2.5x native on forward+backward (and a peak memory of at most a third of native's, which the
harness does not measure: tests/test_cross_entropy.py::test_cuda_peak_memory_below_native checks
that dlext keeps nothing N x C but the gradient); ImageNet-sized (4096 x 1000); rows of few
classes, few (256 x 10) and many (65536 x 10); a small batch of very long rows (64 x 262144,
split over several blocks per row); and a segmentation map (NCHW, one thread per position).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import dlext.functional as DF
from benchmarks.case import Case, element_size, grads_of

# (N, C) logits, then an (N, C, H, W) segmentation-style map.
CPU_SHAPES = [(4096, 10), (1024, 1000), (512, 32000), (8, 21, 128, 128)]
CUDA_SHAPES = [(16384, 32768), (4096, 1000), (256, 10), (65536, 10), (64, 262144),
               (8, 21, 512, 512)]
CUDA_TARGETS = {(16384, 32768): 2.5}


def cases(device: torch.device, quick: bool) -> list[Case]:
    cuda = device.type != "cpu"
    shapes = CUDA_SHAPES if cuda else CPU_SHAPES
    dtypes = [torch.float32, torch.bfloat16] if cuda else [torch.float32]
    if quick and cuda:
        shapes = shapes[:3]
    out = []
    for shape in shapes:
        for dtype in dtypes:
            n_c = torch.Size(shape).numel()
            es = element_size(dtype)
            label = f"{tuple(shape)} {str(dtype).replace('torch.', '')}"
            target_shape = (shape[0], *shape[2:])
            tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
            target = CUDA_TARGETS.get(tuple(shape)) if cuda else 1.5

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
                            bytes_moved=3 * n_c * es, target=target, **tol))
    return out
