"""A benchmark case: one op at one shape, dlext and native side by side."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Case:
    op: str                                   # "relu", "conv2d", ...
    label: str                                # shape and dtype, for the table
    mode: str                                 # "fwd" or "fwd+bwd"
    make_inputs: Callable[[], tuple]          # a fresh set of inputs on the case's device
    dlext: Callable[..., object]              # dlext(*inputs) -> tensor or tuple of tensors
    native: Callable[..., object]             # native(*inputs) -> the same
    bytes_moved: int = 0                      # memory-bound: bytes a perfect kernel moves
    flops: int = 0                            # compute-bound: useful floating-point operations
    roofline: str = "copy"                    # "copy" (bandwidth) or a matmul dtype name
    target: float | None = None               # speedup over native an issue asks for
    rtol: float = 1e-5
    atol: float = 1e-6
    extra: dict = field(default_factory=dict)


def grads_of(fn: Callable[..., torch.Tensor], n_diff: int) -> Callable[..., tuple]:
    """fwd+bwd of fn: output then gradients of its first n_diff inputs for a given grad_output.

    Uses torch.autograd.grad, so nothing accumulates into .grad between repetitions. The last
    input is the grad_output.
    """
    def run(*inputs):
        *args, grad_out = inputs
        out = fn(*args)
        grads = torch.autograd.grad(out, args[:n_diff], grad_out)
        return (out, *grads)
    return run


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
