"""dlext.nn: drop-in subclasses of the torch.nn layers, computing with dlext kernels.

Same constructor arguments, defaults, repr, parameters, buffers and state_dict keys as the torch.nn
twin; only forward differs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dlext import functional as DF
from dlext.sync_batchnorm import sync_batch_norm

__all__ = ["ReLU", "MaxPool2d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "Conv2d",
           "CrossEntropyLoss", "SyncBatchNorm"]


class ReLU(torch.nn.ReLU):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return DF.relu(input, inplace=self.inplace)


class MaxPool2d(torch.nn.MaxPool2d):
    def forward(self, input: torch.Tensor):
        return DF.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                             ceil_mode=self.ceil_mode, return_indices=self.return_indices)


def _fx_tracing() -> bool:
    """Whether torch.fx.symbolic_trace is running (inputs are proxies)."""
    trace = torch.fx._symbolic_trace
    fn = getattr(trace, "is_fx_symbolic_tracing", None) or getattr(trace, "is_fx_tracing", None)
    return fn is not None and fn()


def _batch_norm_step(self):
    """The bookkeeping of torch's _BatchNorm.forward, shared by the BatchNorm layers and
    SyncBatchNorm: counts the batch in num_batches_tracked (training with running statistics)
    and returns (momentum, batch statistics?, running_mean, running_var to pass).

    momentum=None is the cumulative average 1 / num_batches_tracked. torch.fx runs a buffer's
    add_ once at trace time instead of recording it, so a traced graph would keep one n forever:
    refused rather than wrong.
    """
    factor = 0.0 if self.momentum is None else self.momentum
    if self.training and self.track_running_stats and self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            if _fx_tracing():
                raise RuntimeError("torch.fx cannot trace a dlext BatchNorm layer with "
                                   "momentum=None in training (its num_batches_tracked update is "
                                   "not traceable); use a float momentum, or torch.compile / "
                                   "torch.export")
            factor = 1.0 / float(self.num_batches_tracked)
    # Batch statistics in training, and in evaluation when there are no running statistics.
    batch_stats = self.training or (self.running_mean is None and self.running_var is None)
    # The running statistics are passed only where they are used or updated.
    track = not self.training or self.track_running_stats
    return (factor, batch_stats, self.running_mean if track else None,
            self.running_var if track else None)


def _batch_norm_forward(self, input: torch.Tensor) -> torch.Tensor:
    """torch.nn.modules.batchnorm._BatchNorm.forward, on dlext.functional.batch_norm."""
    # torch.fx traces into dlext's modules (torch.nn's are leaves): no branch on a proxy's dim.
    if not _fx_tracing():
        self._check_input_dim(input)
    momentum, batch_stats, running_mean, running_var = _batch_norm_step(self)
    return DF.batch_norm(input, running_mean, running_var, self.weight, self.bias, batch_stats,
                         momentum, self.eps)


class BatchNorm1d(torch.nn.BatchNorm1d):
    forward = _batch_norm_forward


class BatchNorm2d(torch.nn.BatchNorm2d):
    forward = _batch_norm_forward


class BatchNorm3d(torch.nn.BatchNorm3d):
    forward = _batch_norm_forward


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


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return DF.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                                reduction=self.reduction, label_smoothing=self.label_smoothing)


class SyncBatchNorm(torch.nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm on dlext kernels, for CPU (gloo) and CUDA (nccl) tensors alike.

    Follows torch.nn.SyncBatchNorm.forward: in training, with torch.distributed initialised and
    more than one process in the group, the statistics are those of the whole batch over the
    group (dlext.sync_batchnorm); otherwise it is plain BatchNorm on the local batch.

    torch's DistributedDataParallel refuses any SyncBatchNorm in a CPU module when it is built
    (torch's own has no CPU kernels); on the CPU, wrap first, then convert the wrapped module:
    ``SyncBatchNorm.convert_sync_batchnorm(ddp.module)``.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not _fx_tracing():  # as in _batch_norm_forward
            self._check_input_dim(input)
            self._check_non_zero_input_channels(input)
        exponential_average_factor, bn_training, running_mean, running_var = \
            _batch_norm_step(self)
        # Synchronise in training only, and only over a group of more than one process.
        process_group = None
        if (bn_training and self.training and torch.distributed.is_available()
                and torch.distributed.is_initialized()):
            process_group = self.process_group or torch.distributed.group.WORLD
            if torch.distributed.get_world_size(process_group) <= 1:
                process_group = None
        if process_group is None:
            return DF.batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                 bn_training, exponential_average_factor, self.eps)
        return sync_batch_norm(input, self.weight, self.bias, running_mean, running_var,
                               exponential_average_factor, self.eps, process_group)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """torch.nn.SyncBatchNorm.convert_sync_batchnorm, making dlext SyncBatchNorm layers.

        Every BatchNorm*D layer (torch.nn's, dlext's, and SyncBatchNorm itself) in `module` is
        replaced by a SyncBatchNorm that shares its parameters and buffers; a BatchNorm `module`
        itself is returned converted.
        """
        module_output = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module_output = cls(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats, process_group,
                                bias=module.bias is not None)
            if module.affine:
                with torch.no_grad():
                    module_output.weight = module.weight
                    module_output.bias = module.bias
            module_output.running_mean = module.running_mean
            module_output.running_var = module.running_var
            module_output.num_batches_tracked = module.num_batches_tracked
            module_output.training = module.training
            if hasattr(module, "qconfig"):
                module_output.qconfig = module.qconfig
        for name, child in module.named_children():
            module_output.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return module_output
