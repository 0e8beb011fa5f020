"""max_pool2d: memory-bound, judged against the copy bandwidth.

Bytes a perfect kernel moves: forward reads the input and writes values and int64 indices;
backward reads grad_output and indices and writes grad_input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import dlext.functional as DF
from benchmarks.case import Case, element_size, grads_of

# (shape, kernel, stride, padding, where it comes from)
CPU_CASES = [((256, 6, 28, 28), 2, 2, 0, "LeNet pool1"), ((256, 16, 10, 10), 2, 2, 0, "LeNet pool2"),
             ((8, 64, 112, 112), 3, 2, 1, "ResNet stem")]
CUDA_CASES = [((256, 6, 28, 28), 2, 2, 0, "LeNet pool1"), ((64, 64, 112, 112), 3, 2, 1, "ResNet stem")]


def _out(n, k, s, p):
    return (n + 2 * p - k) // s + 1


def cases(device: torch.device, quick: bool) -> list[Case]:
    table = CPU_CASES if device.type == "cpu" else CUDA_CASES
    dtypes = [torch.float32] if device.type == "cpu" else [torch.float32, torch.bfloat16]
    layouts = [torch.contiguous_format, torch.channels_last]
    if quick:
        table, layouts = table[:1], layouts[:1]
    out = []
    for shape, k, s, p, origin in table:
        for dtype in dtypes:
            for fmt in layouts:
                n, c, h, w = shape
                n_in = n * c * h * w
                n_out = n * c * _out(h, k, s, p) * _out(w, k, s, p)
                es = element_size(dtype)
                tag = "NHWC" if fmt == torch.channels_last else "NCHW"
                label = f"{origin} {shape} k{k}s{s}p{p} {tag} {str(dtype)[6:]}"

                def make(shape=shape, dtype=dtype, fmt=fmt):
                    return (torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt),)

                def make_bwd(shape=shape, dtype=dtype, fmt=fmt, k=k, s=s, p=p):
                    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
                    o = F.max_pool2d(x, k, s, p)
                    return x.requires_grad_(), torch.randn_like(o)

                def ours(x, k=k, s=s, p=p):
                    return DF.max_pool2d(x, k, s, p, return_indices=True)

                def native(x, k=k, s=s, p=p):
                    return F.max_pool2d(x, k, s, p, return_indices=True)

                target_fb = 1.0 if device.type == "cpu" else (1.3 if origin == "ResNet stem" else None)
                out.append(Case("max_pool2d", label, "fwd", make, ours, native, rtol=0, atol=0,
                                bytes_moved=n_in * es + n_out * (es + 8)))
                out.append(Case("max_pool2d", label, "fwd+bwd", make_bwd,
                                grads_of(lambda x, k=k, s=s, p=p: DF.max_pool2d(x, k, s, p), 1),
                                grads_of(lambda x, k=k, s=s, p=p: F.max_pool2d(x, k, s, p), 1),
                                bytes_moved=n_in * es + n_out * (es + 8) + n_out * (es + 8) + n_in * es,
                                target=target_fb))
    return out
