"""dlext.nn: drop-in subclasses of the torch.nn layers, computing with dlext kernels.

Same constructor arguments, defaults, repr, parameters, buffers and state_dict keys as the torch.nn
twin; only forward differs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dlext import functional as DF

__all__ = ["ReLU", "Conv2d"]


class ReLU(torch.nn.ReLU):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return DF.relu(input, inplace=self.inplace)


class Conv2d(torch.nn.Conv2d):
    """torch.nn.Conv2d on dlext's conv2d. Only the convolution is replaced: padding_mode
    'reflect' / 'replicate' / 'circular' pads with torch.nn.functional.pad first, as the twin
    does."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            padded = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return DF.conv2d(padded, weight, bias, self.stride, 0, self.dilation, self.groups)
        return DF.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
