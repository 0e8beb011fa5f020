"""SyncBatchNorm's synchronised path, in a group of one process, against native single-process
training-mode BatchNorm on the same batch: what synchronisation costs a process, collectives on
one process included (no network), ResNet layer shapes.

Bytes moved by a perfect kernel, N the input's elements: the statistics must be complete (over
every process) before anything is normalised, so the forward reads x twice and writes y (3 N);
likewise the backward reads x and dy for the sums, then again for dx, and writes dx (5 N): 8 N
for forward+backward, where a fused single-process BatchNorm needs 5 N. So the best ratio to
native on memory-bound shapes is about 5/8.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.case import Case, element_size, grads_of
from dlext.sync_batchnorm import sync_batch_norm

CPU_SHAPES = [(8, 64, 56, 56), (8, 256, 56, 56), (32, 2048, 7, 7)]
CUDA_SHAPES = [(32, 64, 112, 112), (32, 256, 56, 56), (128, 2048, 7, 7)]


def _one_process_group(device: torch.device):
    store = torch.distributed.HashStore()
    if device.type == "cuda":
        return torch.distributed.ProcessGroupNCCL(store, 0, 1)
    return torch.distributed.ProcessGroupGloo(store, 0, 1)


def cases(device: torch.device, quick: bool) -> list[Case]:
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        return []
    group = _one_process_group(device)
    shapes = CPU_SHAPES if device.type == "cpu" else CUDA_SHAPES
    if quick:
        shapes = shapes[:2]
    dtype = torch.float32
    out = []
    for shape in shapes:
        n, c = torch.Size(shape).numel(), shape[1]
        label = f"{tuple(shape)} {str(dtype).replace('torch.', '')} train, 1 process"

        def make(shape=shape, c=c):
            x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
            w = (torch.rand(c, device=device, dtype=dtype) + 0.5).requires_grad_()
            b = torch.randn(c, device=device, dtype=dtype, requires_grad=True)
            rm = torch.randn(c, device=device, dtype=dtype) * 0.1
            rv = torch.rand(c, device=device, dtype=dtype) + 0.5
            return x, w, b, rm, rv, torch.randn(shape, device=device, dtype=dtype)

        def ours(x, w, b, rm, rv):
            return sync_batch_norm(x, w, b, rm, rv, 0.1, 1e-5, group)

        def native(x, w, b, rm, rv):
            return F.batch_norm(x, rm, rv, w, b, training=True)

        # grad_weight/bias: float32 sums of N / C products (see cases/batch_norm.py).
        out.append(Case("sync_batch_norm", label, "fwd+bwd", make, grads_of(ours, 3),
                        grads_of(native, 3), bytes_moved=8 * n * element_size(dtype),
                        rtol=1e-4, atol=2e-3))
    return out
