"""conv2d: compute-bound, judged against the matrix-multiply rate and native (oneDNN on the CPU).

Useful FLOPs: 2 * N * Cout * Ho * Wo * (Cin / groups) * kh * kw for the forward; the backward
computes the input and the weight gradients, each as many again, so forward+backward is 3x.
Shapes: LeNet-5's two convolutions (batch 256) and ResNet-18 / ResNet-50 layers at a small batch
on the CPU (each case well under a second), NCHW and channels_last.
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
# On a GPU the ResNet layers run at batch 64.
CUDA_LAYERS = [(name, x if name.startswith("lenet") else (64, *x[1:]), w, s, p)
               for name, x, w, s, p in CPU_LAYERS]
QUICK = {"lenet.conv2", "resnet18.layer1", "resnet50.1x1.reduce"}


def _flops(x, w, stride, padding):
    n, _, h, wd = x
    cout, cin_g, kh, kw = w
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (wd + 2 * padding - kw) // stride + 1
    return 2 * n * cout * ho * wo * cin_g * kh * kw


def cases(device: torch.device, quick: bool) -> list[Case]:
    layers = CPU_LAYERS if device.type == "cpu" else CUDA_LAYERS
    if quick:
        layers = [layer for layer in layers if layer[0] in QUICK]
    out = []
    for name, xs, ws, stride, padding in layers:
        formats = [torch.contiguous_format] if name.startswith("lenet") else \
            [torch.contiguous_format, torch.channels_last]
        for fmt in formats:
            cl = fmt == torch.channels_last
            label = f"{name} {xs[1]}->{ws[0]} {ws[2]}x{ws[3]} s{stride} {xs[2]}x{xs[3]}" + \
                (" NHWC" if cl else "")
            flops = _flops(xs, ws, stride, padding)
            # Rounding grows with the length of the sums: the forward's (Cin/g * kh * kw), and
            # for the weight gradient that times the batch's pixels.
            atol = 1e-5 * (ws[1] * ws[2] * ws[3]) ** 0.5
            atol_bwd = atol * (xs[0] * xs[2] * xs[3]) ** 0.5

            def make(xs=xs, ws=ws, fmt=fmt, stride=stride, padding=padding, grad=False):
                x = torch.randn(xs, device=device).contiguous(memory_format=fmt)
                w = torch.randn(ws, device=device)
                b = torch.randn(ws[0], device=device)
                if not grad:
                    return x, w, b
                y = F.conv2d(x, w, b, stride, padding)
                return (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(),
                        torch.randn_like(y))

            def ours(x, w, b, stride=stride, padding=padding):
                return DF.conv2d(x, w, b, stride, padding)

            def native(x, w, b, stride=stride, padding=padding):
                return F.conv2d(x, w, b, stride, padding)

            out.append(Case("conv2d", label, "fwd", make, ours, native, flops=flops,
                            roofline="float32", rtol=1e-4, atol=atol))
            out.append(Case("conv2d", label, "fwd+bwd", lambda make=make: make(grad=True),
                            grads_of(ours, 3), grads_of(native, 3), flops=3 * flops,
                            roofline="float32", rtol=1e-4, atol=atol_bwd,
                            target=0.7 if device.type == "cpu" else None))
    return out
