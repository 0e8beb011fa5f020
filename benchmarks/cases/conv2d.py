"""conv2d: compute-bound, judged against the matrix-multiply rate and native (oneDNN on the CPU,
cuDNN on CUDA).

Useful FLOPs: 2 * N * Cout * Ho * Wo * (Cin / groups) * kh * kw for the forward; the backward
computes the input and the weight gradients, each as many again, so forward+backward is 3x.
Shapes: LeNet-5's two convolutions (batch 256) and ResNet-18 / ResNet-50 layers at a small batch
on the CPU (each case well under a second), NCHW and channels_last; on CUDA, the shapes and
targets of issue 5 (CUDA_LAYERS).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import dlext.functional as DF
from benchmarks.case import Case, grads_of

# name, input (N, C, H, W), weight (Cout, Cin, kh, kw), stride, padding
CPU_LAYERS = [
    ("lenet.conv1", (256, 1, 32, 32), (6, 1, 5, 5), 1, 0),
    ("lenet.conv2", (256, 6, 14, 14), (16, 6, 5, 5), 1, 0),
    ("resnet.stem", (8, 3, 224, 224), (64, 3, 7, 7), 2, 3),
    ("resnet18.layer1", (8, 64, 56, 56), (64, 64, 3, 3), 1, 1),
    ("resnet18.layer2.down", (8, 64, 56, 56), (128, 64, 3, 3), 2, 1),
    ("resnet18.layer2", (8, 128, 28, 28), (128, 128, 3, 3), 1, 1),
    ("resnet18.layer4", (8, 512, 7, 7), (512, 512, 3, 3), 1, 1),
    ("resnet50.1x1.reduce", (8, 256, 56, 56), (64, 256, 1, 1), 1, 0),
    ("resnet50.1x1.expand", (8, 64, 56, 56), (256, 64, 1, 1), 1, 0),
    ("resnet50.1x1.down", (8, 512, 28, 28), (1024, 512, 1, 1), 2, 0),
]
# On a GPU (issue 5): LeNet-5 at batch 256 in float32 NCHW (launch overhead dominates: target
# 1.0x cuDNN), ResNet-50's 3x3 and 1x1 layers at batch 64 in channels_last, bfloat16 (target 0.7x,
# roofline: the bfloat16 matmul rate) and float32 with TF32 (torch's default for convolutions;
# target 0.5x; the float32 roofline is measured with TF32 off, so it can read above 100%).
CUDA_LAYERS = [
    ("lenet.conv1", (256, 1, 32, 32), (6, 1, 5, 5), 1, 0),
    ("lenet.conv2", (256, 6, 14, 14), (16, 6, 5, 5), 1, 0),
    ("resnet50.stem", (64, 3, 224, 224), (64, 3, 7, 7), 2, 3),
    ("resnet50.layer1.3x3", (64, 64, 56, 56), (64, 64, 3, 3), 1, 1),
    ("resnet50.layer2.3x3", (64, 128, 28, 28), (128, 128, 3, 3), 1, 1),
    ("resnet50.layer3.3x3", (64, 256, 14, 14), (256, 256, 3, 3), 1, 1),
    ("resnet50.layer4.3x3", (64, 512, 7, 7), (512, 512, 3, 3), 1, 1),
    ("resnet50.layer1.1x1.reduce", (64, 256, 56, 56), (64, 256, 1, 1), 1, 0),
    ("resnet50.layer1.1x1.expand", (64, 64, 56, 56), (256, 64, 1, 1), 1, 0),
    ("resnet50.layer3.1x1.reduce", (64, 1024, 14, 14), (256, 1024, 1, 1), 1, 0),
    ("resnet50.layer2.1x1.down", (64, 512, 28, 28), (1024, 512, 1, 1), 2, 0),
]
QUICK = {"lenet.conv2", "resnet18.layer1", "resnet50.1x1.reduce", "resnet50.layer1.3x3",
         "resnet50.layer1.1x1.reduce"}
CUDA_TARGETS = {torch.bfloat16: 0.7, torch.float32: 0.5}


def _flops(x, w, stride, padding):
    n, _, h, wd = x
    cout, cin_g, kh, kw = w
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (wd + 2 * padding - kw) // stride + 1
    return 2 * n * cout * ho * wo * cin_g * kh * kw


def _variants(device: torch.device, name: str):
    """(memory format, dtype, target) for each run of a layer."""
    if device.type == "cpu":
        formats = [torch.contiguous_format] if name.startswith("lenet") else \
            [torch.contiguous_format, torch.channels_last]
        return [(fmt, torch.float32, 0.7) for fmt in formats]
    if name.startswith("lenet"):
        return [(torch.contiguous_format, torch.float32, 1.0)]
    # The targets cover the 3x3 and 1x1 layers; the 7x7 stem (Cin = 3) is measured only.
    return [(torch.channels_last, dt, None if "stem" in name else t)
            for dt, t in CUDA_TARGETS.items()]


def cases(device: torch.device, quick: bool) -> list[Case]:
    layers = CPU_LAYERS if device.type == "cpu" else CUDA_LAYERS
    if quick:
        layers = [layer for layer in layers if layer[0] in QUICK]
    out = []
    for name, xs, ws, stride, padding in layers:
        for fmt, dtype, target in _variants(device, name):
            cl = fmt == torch.channels_last
            label = f"{name} {xs[1]}->{ws[0]} {ws[2]}x{ws[3]} s{stride} {xs[2]}x{xs[3]}" + \
                (" NHWC" if cl else "") + ("" if dtype == torch.float32 else " bf16")
            flops = _flops(xs, ws, stride, padding)
            # Rounding grows with the length of the sums: the forward's (Cin/g * kh * kw), and
            # for the weight gradient that times the batch's pixels. On CUDA float32 runs as TF32
            # (10-bit operands) and bfloat16 rounds its results to 8 bits.
            unit = 1e-5 if device.type == "cpu" else 3e-3 if dtype == torch.float32 else 3e-2
            atol = unit * (ws[1] * ws[2] * ws[3]) ** 0.5
            atol_bwd = atol * (xs[0] * xs[2] * xs[3]) ** 0.5
            rtol = 1e-4 if device.type == "cpu" else 10 * unit

            def make(xs=xs, ws=ws, fmt=fmt, dtype=dtype, stride=stride, padding=padding,
                     grad=False):
                x = torch.randn(xs, device=device, dtype=dtype).contiguous(memory_format=fmt)
                w = torch.randn(ws, device=device, dtype=dtype)
                b = torch.randn(ws[0], device=device, dtype=dtype)
                if not grad:
                    return x, w, b
                y = F.conv2d(x, w, b, stride, padding)
                return (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(),
                        torch.randn_like(y))

            def ours(x, w, b, stride=stride, padding=padding):
                return DF.conv2d(x, w, b, stride, padding)

            def native(x, w, b, stride=stride, padding=padding):
                return F.conv2d(x, w, b, stride, padding)

            roofline = "bfloat16" if dtype == torch.bfloat16 else "float32"
            out.append(Case("conv2d", label, "fwd", make, ours, native, flops=flops,
                            roofline=roofline, rtol=rtol, atol=atol,
                            target=None if device.type == "cpu" else target))
            out.append(Case("conv2d", label, "fwd+bwd", lambda make=make: make(grad=True),
                            grads_of(ours, 3), grads_of(native, 3), flops=3 * flops,
                            roofline=roofline, rtol=rtol, atol=atol_bwd, target=target))
    return out
