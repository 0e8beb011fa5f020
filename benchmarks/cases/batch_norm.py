"""BatchNorm: memory-bound, judged against the copy bandwidth; ResNet-18/50 layer shapes.

Bytes moved by a perfect kernel, N the input's elements (per-channel tensors are negligible):
evaluation forward reads x and writes y (2 N); training forward does the same when the
statistics pass and the normalisation share one read of x (2 N); the backward reads x and dy
and writes dx (3 N): training forward+backward 5 N.

On CUDA: the ResNet-50 BatchNorm layers at batch 64, in float32 and in bfloat16 with float32
parameters and running statistics (mixed precision training), NCHW and channels_last. The issue's
target is 1.2x native for training forward+backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import dlext.functional as DF
from benchmarks.case import Case, element_size, grads_of

CPU_SHAPES = [(8, 64, 56, 56), (8, 256, 56, 56), (8, 512, 28, 28), (32, 2048, 7, 7)]
CUDA_SHAPES = [(64, 64, 112, 112), (64, 256, 56, 56), (64, 512, 28, 28), (64, 1024, 14, 14),
               (64, 2048, 7, 7)]
FORMATS = {"": torch.contiguous_format, " channels_last": torch.channels_last}


def _train(fn):
    return lambda x, w, b, rm, rv: fn(x, rm, rv, w, b, training=True)


def _eval(fn):
    return lambda x, w, b, rm, rv: fn(x, rm, rv, w, b, training=False)


def cases(device: torch.device, quick: bool) -> list[Case]:
    cuda = device.type != "cpu"
    shapes = CUDA_SHAPES if cuda else CPU_SHAPES
    dtypes = [torch.float32, torch.bfloat16] if cuda else [torch.float32]
    if quick:
        shapes = shapes[:2]
    out = []
    for shape in shapes:
        for dtype in dtypes:
            for suffix, fmt in FORMATS.items():
                out += _cases_of(device, shape, dtype, suffix, fmt)
    return out


def _cases_of(device, shape, dtype, suffix, fmt) -> list[Case]:
    n = torch.Size(shape).numel()
    es = element_size(dtype)
    c = shape[1]
    pdtype = torch.float32  # parameters and running statistics: float32 for a bfloat16 input
    label = f"{tuple(shape)}{suffix} {str(dtype).replace('torch.', '')}"
    if dtype != pdtype:
        label += " (float32 params)"

    def make(grad=False):
        x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
        w = torch.rand(c, device=device, dtype=pdtype) + 0.5
        b = torch.randn(c, device=device, dtype=pdtype)
        rm = torch.randn(c, device=device, dtype=pdtype) * 0.1
        rv = torch.rand(c, device=device, dtype=pdtype) + 0.5
        if not grad:
            return x, w, b, rm, rv
        dy = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
        return (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), rm, rv, dy)

    # float32: grad_weight/bias sum N / C products: float32 sums of ~1e5 terms agree to ~1e-6 of
    # their scale (sqrt(N / C)), not of their value, which can cancel to near 0. bfloat16: the
    # results are rounded to 8 bits, so one rounding apart is 2^-8 relative.
    train_tol, eval_tol = ((1e-4, 2e-3), (1e-5, 1e-5)) if dtype == torch.float32 else \
        ((1e-2, 1e-2), (1e-2, 1e-2))
    target = 1.0 if device.type == "cpu" else 1.2
    return [
        Case("batch_norm", label + " train", "fwd+bwd", lambda: make(grad=True),
             grads_of(_train(DF.batch_norm), 3), grads_of(_train(F.batch_norm), 3),
             bytes_moved=5 * n * es, rtol=train_tol[0], atol=train_tol[1], target=target),
        Case("batch_norm", label + " eval", "fwd", make, _eval(DF.batch_norm), _eval(F.batch_norm),
             bytes_moved=2 * n * es, rtol=eval_tol[0], atol=eval_tol[1]),
    ]
