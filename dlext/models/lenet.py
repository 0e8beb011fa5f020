"""LeNet-5 for 1x32x32 input: conv 6@5x5, pool, conv 16@5x5, pool, 120, 84, classes.

The classic layout with ReLU and max-pooling. Convolutions, activations and pooling are dlext
layers (or torch.nn's with native=True, for comparisons); the fully connected layers stay torch's.
"""
from __future__ import annotations

import torch
from torch import nn


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10, native: bool = False):
        super().__init__()
        L = nn if native else _dlext_nn()
        self.features = nn.Sequential(
            L.Conv2d(1, 6, kernel_size=5),     # 32 -> 28
            L.ReLU(inplace=True),
            L.MaxPool2d(2),                     # 28 -> 14
            L.Conv2d(6, 16, kernel_size=5),    # 14 -> 10
            L.ReLU(inplace=True),
            L.MaxPool2d(2),                     # 10 -> 5
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            L.ReLU(inplace=True),
            nn.Linear(120, 84),
            L.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def lenet5(num_classes: int = 10, native: bool = False) -> LeNet5:
    """LeNet-5 built from dlext layers (torch.nn layers with native=True)."""
    return LeNet5(num_classes=num_classes, native=native)


def _dlext_nn():
    import dlext.nn
    return dlext.nn
