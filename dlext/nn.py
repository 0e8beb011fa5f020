"""dlext.nn: drop-in subclasses of the torch.nn layers, computing with dlext kernels.

Same constructor arguments, defaults, repr, parameters, buffers and state_dict keys as the torch.nn
twin; only forward differs.
"""
from __future__ import annotations

import torch

from dlext import functional as DF

__all__ = ["ReLU", "MaxPool2d"]


class ReLU(torch.nn.ReLU):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return DF.relu(input, inplace=self.inplace)


class MaxPool2d(torch.nn.MaxPool2d):
    def forward(self, input: torch.Tensor):
        return DF.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                             ceil_mode=self.ceil_mode, return_indices=self.return_indices)
