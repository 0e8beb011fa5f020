"""End-to-end training step, dlext model vs its torch.nn twin: images per second.

One step = zero_grad, forward, cross-entropy, backward, SGD with momentum, on a fixed batch.
Both models start from the same weights (the twin loads dlext's state_dict), so the first step's
losses must agree (the harness validates them before timing). Shapes from the issue: LeNet-5 at
batch 256 (1x32x32); ResNet-18 at batch 32, 64x64 on the CPU and 224x224 on CUDA.
"""
from __future__ import annotations

import torch

import dlext.nn as DN
from benchmarks.case import Case
from dlext.models import lenet5, resnet18

CONFIGS = {  # name: (factory, batch, channels, CPU side, CUDA side, classes)
    "lenet5": (lenet5, 256, 1, 32, 32, 10),
    "resnet18": (resnet18, 32, 3, 64, 224, 1000),
}


def _stepper(model: torch.nn.Module, loss_fn: torch.nn.Module):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def cases(device: torch.device, quick: bool) -> list[Case]:
    out = []
    dtypes = [torch.float32] if device.type == "cpu" else [torch.float32, torch.bfloat16]
    for name, (factory, batch, chans, cpu_side, cuda_side, classes) in CONFIGS.items():
        if quick and name != "lenet5":
            continue
        side = cpu_side if device.type == "cpu" else cuda_side
        for dtype in dtypes:
            torch.manual_seed(0)
            ours = factory(num_classes=classes).to(device=device, dtype=dtype)
            twin = factory(num_classes=classes, native=True).to(device=device, dtype=dtype)
            twin.load_state_dict(ours.state_dict())
            shape = (batch, chans, side, side)

            def make(shape=shape, dtype=dtype, classes=classes):
                return (torch.randn(shape, device=device, dtype=dtype),
                        torch.randint(0, classes, shape[:1], device=device))

            label = f"{name} batch {batch} {chans}x{side}x{side} {str(dtype).replace('torch.', '')}"
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            out.append(Case("train_step", label, "step", make,
                            _stepper(ours, DN.CrossEntropyLoss()),
                            _stepper(twin, torch.nn.CrossEntropyLoss()),
                            rtol=tol, atol=tol, target=1.0 if dtype == torch.float32 else None,
                            extra={"images": batch}))
    return out
