"""dlext.functional: the torch.nn.functional signatures and semantics, on dlext kernels.

Each function normalises its arguments the way torch.nn.functional does, then applies the
autograd Function of dlext.autograd.
"""
from __future__ import annotations

import operator

import torch
from torch.nn import _reduction as _Reduction

from dlext.autograd import ReLUFunction, ReLUInplaceFunction, cross_entropy_loss

__all__ = ["relu", "cross_entropy"]


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """relu(input, inplace=False) -> Tensor, as torch.nn.functional.relu."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"relu(): argument 'input' must be Tensor, not {type(input).__name__}")
    if inplace:
        return ReLUInplaceFunction.apply(input)
    return ReLUFunction.apply(input)


_DTYPE_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
                torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int",
                torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool"}


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _check_class_index_target(input: torch.Tensor, target: torch.Tensor) -> None:
    """The shape and dtype checks of torch's nll_loss_nd for class-index targets."""
    if input.dim() < 1:
        raise ValueError(f"Expected 1 or more dimensions (got {input.dim()})")
    if input.dim() != 1 and (target.dim() == 0 or input.shape[0] != target.shape[0]):
        raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target "
                         f"batch_size ({target.shape[0] if target.dim() else 0}).")
    if input.dim() <= 2 and target.dim() > 1:
        raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got "
                           f"{_dtype_name(target.dtype)}")
    if input.dim() == 1 and target.dim() == 1 and target.numel() != 1:
        raise ValueError(f"For 1D input, 1D target must have size 1, but got target size: "
                         f"{target.numel()}")
    if input.dim() == 4 and target.dim() != 3:
        raise RuntimeError(f"only batches of spatial targets supported (3D tensors) but got "
                           f"targets of dimension: {target.dim()}")
    if input.dim() >= 3 and target.shape[1:] != input.shape[2:]:
        expected = [input.shape[0], *input.shape[2:]]
        raise RuntimeError(f"Expected target size {expected}, got {list(target.shape)}")
    if input.dim() >= 3 and target.dtype == torch.uint8:
        raise RuntimeError("expected scalar type Long but found Byte")


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  size_average=None, ignore_index: int = -100, reduce=None,
                  reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    """cross_entropy(input, target, ...) -> Tensor, as torch.nn.functional.cross_entropy.

    input (C,), (N, C) or (N, C, d1, ..., dK); target class indices (int64 or uint8, the input's
    shape without C) or class probabilities (the input's shape). One fused kernel computes the
    stable log-sum-exp and the loss per row; log_softmax is never materialised.
    """
    for name, value, position in (("input", input, 1), ("target", target, 2)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"cross_entropy(): argument '{name}' (position {position}) must be "
                            f"Tensor, not {type(value).__name__}")
    if weight is not None and not isinstance(weight, torch.Tensor):
        raise TypeError(f"cross_entropy(): argument 'weight' (position 3) must be Tensor, not "
                        f"{type(weight).__name__}")
    try:
        ignore_index = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"cross_entropy(): argument 'ignore_index' must be int, not "
                        f"{type(ignore_index).__name__}") from None
    try:
        label_smoothing = float(label_smoothing)
    except (TypeError, ValueError):
        raise TypeError(f"cross_entropy(): argument 'label_smoothing' must be float, not "
                        f"{type(label_smoothing).__name__}") from None
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    reduction_enum = _Reduction.get_enum(reduction)

    if input.shape == target.shape:  # class probabilities, as torch decides
        if not target.is_floating_point():
            raise RuntimeError(f"Expected floating point type for target with class "
                               f"probabilities, got {_dtype_name(target.dtype)}")
        if ignore_index >= 0:
            raise RuntimeError("ignore_index is not supported for floating point target")
        if input.dim() == 0:
            raise IndexError("cross_entropy(): expected 'input' with a class dimension, but got "
                             "a 0-dimensional tensor")
        if input.is_floating_point():  # torch computes in the promoted dtype
            dtype = torch.promote_types(input.dtype, target.dtype)
            if weight is not None:
                dtype = torch.promote_types(dtype, weight.dtype)
            input, target = input.to(dtype), target.to(dtype)
            weight = weight.to(dtype) if weight is not None else None
    else:
        if label_smoothing > 1.0:
            raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: "
                               f"{label_smoothing}")
        _check_class_index_target(input, target)
        if weight is not None and weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("cross_entropy(): the loss is not differentiable with respect to "
                               "argument 'weight' for class-index targets (as torch's "
                               "nll_loss_forward). This input cannot have requires_grad True.")

    return cross_entropy_loss(input, target, weight, reduction_enum, ignore_index,
                              label_smoothing)
