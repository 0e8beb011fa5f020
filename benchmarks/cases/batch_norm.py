"""BatchNorm: memory-bound, judged against the copy bandwidth; ResNet-18/50 layer shapes.

Bytes moved by a perfect kernel, N the input's elements (per-channel tensors are negligible):
evaluation forward reads x and writes y (2 N); training forward does the same when the
statistics pass and the normalisation share one read of x (2 N); the backward reads x and dy
and writes dx (3 N): training forward+backward 5 N.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import dlext.functional as DF
from benchmarks.case import Case, element_size, grads_of

CPU_SHAPES = [(8, 64, 56, 56), (8, 256, 56, 56), (8, 512, 28, 28), (32, 2048, 7, 7)]
CUDA_SHAPES = [(32, 64, 112, 112), (32, 256, 56, 56), (32, 512, 28, 28), (128, 2048, 7, 7)]
FORMATS = {"": torch.contiguous_format, " channels_last": torch.channels_last}


def _train(fn):
    return lambda x, w, b, rm, rv: fn(x, rm, rv, w, b, training=True)


def _eval(fn):
    return lambda x, w, b, rm, rv: fn(x, rm, rv, w, b, training=False)


def cases(device: torch.device, quick: bool) -> list[Case]:
    shapes = CPU_SHAPES if device.type == "cpu" else CUDA_SHAPES
    if quick:
        shapes = shapes[:2]
    dtype = torch.float32
    out = []
    for shape in shapes:
        for suffix, fmt in FORMATS.items():
            n = torch.Size(shape).numel()
            es = element_size(dtype)
            label = f"{tuple(shape)}{suffix} {str(dtype).replace('torch.', '')}"
            c = shape[1]

            def make(shape=shape, fmt=fmt, c=c, grad=False):
                x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
                w = torch.rand(c, device=device, dtype=dtype) + 0.5
                b = torch.randn(c, device=device, dtype=dtype)
                rm = torch.randn(c, device=device, dtype=dtype) * 0.1
                rv = torch.rand(c, device=device, dtype=dtype) + 0.5
                if not grad:
                    return x, w, b, rm, rv
                dy = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
                return (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), rm, rv, dy)

            out.append(Case("batch_norm", label + " train", "fwd+bwd",
                            lambda make=make: make(grad=True),
                            grads_of(_train(DF.batch_norm), 3), grads_of(_train(F.batch_norm), 3),
                            # grad_weight/bias sum N / C products: float32 sums of ~1e5
                            # terms agree to ~1e-6 of their scale (sqrt(N / C)), not of their
                            # value, which can cancel to near 0.
                            bytes_moved=5 * n * es, rtol=1e-4, atol=2e-3,
                            target=1.0 if device.type == "cpu" else None))
            out.append(Case("batch_norm", label + " eval", "fwd", make, _eval(DF.batch_norm),
                            _eval(F.batch_norm), bytes_moved=2 * n * es, rtol=1e-5, atol=1e-5))
    return out
