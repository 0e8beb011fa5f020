"""dlext.nn: drop-in subclasses of the torch.nn layers, computing with dlext kernels.

Same constructor arguments, defaults, repr, parameters, buffers and state_dict keys as the torch.nn
twin; only forward differs.
"""
from __future__ import annotations

import torch

from dlext import functional as DF

__all__ = ["ReLU", "CrossEntropyLoss"]


class ReLU(torch.nn.ReLU):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return DF.relu(input, inplace=self.inplace)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return DF.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                                reduction=self.reduction, label_smoothing=self.label_smoothing)
