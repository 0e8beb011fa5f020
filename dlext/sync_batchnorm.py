"""Synchronised BatchNorm: the statistics of a batch split over the processes of a group.

dlext.nn.SyncBatchNorm's synchronised path (torch.nn.modules._functions.SyncBatchNorm's
algorithm), on dlext's BatchNorm primitives and torch.distributed collectives only, so the same
code runs on CPU tensors (gloo) and CUDA tensors (nccl):

  forward   each process computes its batch's per-channel mean and biased variance
            (dlext::batch_norm_stats); one all_gather shares (mean, var, count) in float64; every
            process merges them in rank order with the parallel-variance formula of Chan et al.,
            so all hold the same global mean and invstd, whatever their batch sizes (0 included);
            the running statistics move with them (unbiased variance for the global count); then
            dlext::batch_norm_elemt normalises the local batch.
  backward  dlext::batch_norm_backward_reduce gives the local sum(dy) and sum(dy * (x - mean));
            one all_reduce adds them over the group; dlext::batch_norm_backward_elemt gives the
            input gradient for the global count. As in torch, grad_weight and grad_bias are the
            process's own sums: DistributedDataParallel averages parameter gradients itself.
            (A process with an empty batch takes part in every collective and gets zero
            gradients, where torch's gives None.)

Every process of the group must make the same calls (each one a collective). The backward is
differentiable (double backward), by recomputing it in elementary ops around differentiable
collectives.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from dlext.autograd import (_bn_acc_dtype, _bn_backward_elemt_formula,
                            _bn_backward_reduce_formula, _double_backward_by_recompute, _run,
                            _save_inputs, _saved_inputs)

ops = torch.ops.dlext


# --------------------------------------------------------------------------------- collectives

def _all_gather_rows(row: torch.Tensor, group) -> torch.Tensor:
    """(group size, K): every process's `row`, in rank order."""
    rows = [torch.empty_like(row) for _ in range(group.size())]
    dist.all_gather(rows, row, group=group)
    return torch.stack(rows)


def _all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    out = t.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, dist.ReduceOp.SUM, group=group)
    return out


class _AllGatherRows(torch.autograd.Function):
    """_all_gather_rows, differentiable: every process's rows feed every process's loss, so a
    row's gradient is the sum over the group of the gradients for it."""

    @staticmethod
    def forward(ctx, row, group):
        ctx.group = group
        return _all_gather_rows(row, group)

    @staticmethod
    def backward(ctx, grad_rows):
        return _AllReduceSum.apply(grad_rows, ctx.group)[ctx.group.rank()], None


class _AllReduceSum(torch.autograd.Function):
    """_all_reduce_sum, differentiable: its gradient is the all-reduced sum of the gradients."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return _all_reduce_sum(t, group)

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad, ctx.group), None


# ---------------------------------------------------------------------------------- statistics

def _local_row(input: torch.Tensor, differentiable: bool) -> torch.Tensor:
    """This process's (mean, biased var, count) per channel as one float64 row of 2 C + 1."""
    if differentiable:
        mean, var = ops.batch_norm_stats.default(input)
    else:
        mean, var = _run(ops.batch_norm_stats.default, input)
    count = torch.full((1,), input.numel() // input.shape[1], dtype=torch.float64,
                       device=input.device)
    return torch.cat([mean.to(torch.float64), var.to(torch.float64), count])


def _merge_rows(rows: torch.Tensor, eps: float, dtype: torch.dtype):
    """(mean, invstd, m2, count) of the whole batch from the processes' rows (group size, 2C+1).

    Chan et al.'s parallel formula: the global mean, then each process's sum of squared
    deviations moved to it; in float64, in rank order, so every process gets the same bits. A
    process with no values has count 0 (and mean = var = 0), so it adds nothing. mean and invstd
    come in `dtype` (the accumulation dtype); m2 (the per-channel sum of squared deviations,
    float64) and count (an int) serve the running variance and the backward. An empty batch
    gives mean 0 and invstd 1 / sqrt(eps), as dlext::batch_norm.
    """
    C = (rows.shape[1] - 1) // 2
    means, variances, counts = rows[:, :C], rows[:, C:2 * C], rows[:, 2 * C:]
    total = counts.sum()
    mean = (counts * means).sum(0) / total.clamp_min(1)
    m2 = (counts * (variances + (means - mean) ** 2)).sum(0)
    count = int(total.item())
    invstd = (m2 / max(count, 1) + eps).sqrt().reciprocal()
    return mean.to(dtype), invstd.to(dtype), m2, count


def _global_stats(input: torch.Tensor, eps: float, group, differentiable: bool):
    """_merge_rows of every process's _local_row: the statistics of the group's whole batch."""
    row = _local_row(input, differentiable)
    rows = _AllGatherRows.apply(row, group) if differentiable else _all_gather_rows(row, group)
    return _merge_rows(rows, eps, _bn_acc_dtype(input.dtype))


def _update_running(running_mean, running_var, mean, m2, count, momentum) -> None:
    """running = momentum * batch + (1 - momentum) * running, in double, with the unbiased
    variance of the global batch (NaN for a single value), as dlext::batch_norm; unchanged for
    an empty batch."""
    if count == 0:
        return
    for running, batch in ((running_mean, mean.to(torch.float64)), (running_var, m2 / (count - 1))):
        if running is not None:
            running.copy_(momentum * batch + (1 - momentum) * running.to(torch.float64))


# ------------------------------------------------------------------------------------ backward

def _sync_backward(grad_output, input, weight, mean, invstd, count, eps, group, output_mask):
    """(grad_input, grad_weight, grad_bias) on the kernels: local sums, all-reduced for dx."""
    sum_dy, sum_dy_xmu, grad_weight, grad_bias = _run(
        ops.batch_norm_backward_reduce.default, grad_output, input, mean, invstd, weight,
        list(output_mask))
    grad_input = None
    if output_mask[0]:
        sum_dy, sum_dy_xmu = _all_reduce_sum(torch.cat([sum_dy, sum_dy_xmu]), group).chunk(2)
        grad_input = _run(ops.batch_norm_backward_elemt.default, grad_output, input, mean, invstd,
                          weight, sum_dy, sum_dy_xmu, count)
    return grad_input, grad_weight, grad_bias


def _sync_backward_formula(grad_output, input, weight, mean, invstd, count, eps, group,
                           output_mask):
    """_sync_backward in elementary differentiable ops. mean and invstd are recomputed from the
    input across the group rather than taken as given: they depend on it."""
    mean, invstd, _, _ = _global_stats(input, eps, group, differentiable=True)
    sum_dy, sum_dy_xmu, grad_weight, grad_bias = _bn_backward_reduce_formula(
        grad_output, input, mean, invstd, weight, list(output_mask))
    grad_input = None
    if output_mask[0]:
        sum_dy, sum_dy_xmu = _AllReduceSum.apply(torch.cat([sum_dy, sum_dy_xmu]), group).chunk(2)
        grad_input = _bn_backward_elemt_formula(grad_output, input, mean, invstd, weight, sum_dy,
                                                sum_dy_xmu, count)
    return grad_input, grad_weight, grad_bias


# -------------------------------------------------------------------------------- the Functions

class SyncBatchNormFunction(torch.autograd.Function):
    """out = BatchNorm of `input` with the statistics of the group's whole batch; updates the
    running statistics in place (they may be None)."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps, group):
        mean, invstd, m2, count = _global_stats(input, eps, group, differentiable=False)
        out = _run(ops.batch_norm_elemt.default, input, weight, bias, mean, invstd)
        _update_running(running_mean, running_var, mean, m2, count, momentum)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.count, ctx.eps, ctx.group = count, eps, group
        return out

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, mean, invstd = ctx.saved_tensors
        args = (grad_output, input, weight, mean, invstd, ctx.count, ctx.eps, ctx.group,
                tuple(ctx.needs_input_grad[:3]))
        if torch.is_grad_enabled():
            grads = SyncBatchNormBackwardFunction.apply(*args)
        else:
            grads = _sync_backward(*args)
        return (*grads, None, None, None, None, None)


class SyncBatchNormBackwardFunction(torch.autograd.Function):
    """(grad_input, grad_weight, grad_bias) of SyncBatchNormFunction; differentiable by
    recomputing it in elementary ops (_double_backward_by_recompute)."""

    @staticmethod
    def forward(ctx, grad_output, input, weight, mean, invstd, count, eps, group, output_mask):
        inputs = (grad_output, input, weight, mean, invstd, count, eps, group, output_mask)
        _save_inputs(ctx, inputs)
        return _sync_backward(*inputs)

    @staticmethod
    def backward(ctx, *grad_grads):
        return _double_backward_by_recompute(_sync_backward_formula, _saved_inputs(ctx),
                                             ctx.needs_input_grad, grad_grads)


def _check_running_stats(input, weight, running_mean, running_var) -> None:
    """The checks dlext::batch_norm makes of the running statistics, which are updated here."""
    if input.dim() < 2:
        return  # dlext::batch_norm_stats says what is wrong with the input
    C = input.shape[1]
    low = input.dtype in (torch.float16, torch.bfloat16)
    dtype = weight.dtype if weight is not None else None
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is None:
            continue
        if t.dim() != 1 or t.numel() != C:
            raise RuntimeError(f"sync_batch_norm: expected '{name}' to be 1-D with {C} elements "
                               f"(one per channel, dim 1 of 'input'), but got shape "
                               f"{tuple(t.shape)}")
        if t.dtype not in (input.dtype, torch.float32 if low else input.dtype):
            raise RuntimeError(f"sync_batch_norm: expected '{name}' to have dtype {input.dtype}"
                               f"{' or torch.float32' if low else ''} like 'input', but got "
                               f"{t.dtype}")
        if dtype is not None and t.dtype != dtype:
            raise RuntimeError(f"sync_batch_norm: expected '{name}' to have the dtype of the other "
                               f"per-channel parameters ({dtype}), but got {t.dtype}")
        dtype = t.dtype
        if t.device != input.device:
            raise RuntimeError(f"sync_batch_norm: expected all tensors to be on the same device, "
                               f"but got '{name}' on {t.device} and 'input' on {input.device}")


def sync_batch_norm(input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                    momentum: float, eps: float, process_group) -> torch.Tensor:
    """Training-mode BatchNorm over the batch that `process_group` holds between its processes.

    Every process calls it with its part of the batch (any size, 0 included; the same shape
    otherwise) and gets its part of the output; the running statistics, when given, are updated
    in place on each process, identically. `process_group` is a torch.distributed ProcessGroup;
    None means the default group (group.WORLD), as elsewhere in torch.distributed.
    """
    if process_group is None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError("sync_batch_norm: process_group is None and no default process "
                               "group is initialised (torch.distributed.init_process_group)")
        process_group = torch.distributed.group.WORLD
    _check_running_stats(input, weight, running_mean, running_var)
    return SyncBatchNormFunction.apply(input, weight, bias, running_mean, running_var,
                                       float(momentum), float(eps), process_group)
