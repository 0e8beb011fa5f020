"""`python -m dlext gradcheck`: a report that every dlext op agrees with native torch.

For each op and device: the forward and the gradients against torch.nn.functional on random
inputs of odd sizes, then torch.autograd.gradcheck and gradgradcheck in float64. The tests in
tests/ go much further; this is the quick, human-readable proof on the user's own machine.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import dlext
import dlext.functional as DF


@dataclass
class Check:
    op: str
    make: Callable[[torch.device], tuple]   # float64 inputs; the ones to differentiate require grad
    ours: Callable[..., torch.Tensor]
    native: Callable[..., torch.Tensor]


def _relu_inputs(device):
    x = torch.randn(3, 5, 7, 9, dtype=torch.float64, device=device)
    return ((x + 0.1 * x.sign()).requires_grad_(),)  # away from the kink at 0


def _pool_inputs(device):
    n = 2 * 3 * 9 * 11  # distinct values: the argmax is stable under gradcheck's perturbations
    return ((torch.randperm(n, device=device).double() / n).view(2, 3, 9, 11).requires_grad_(),)

_CE_TARGET = [1, 4, -100, 0, 6, 2, 5]  # class indices of a (7, 7, 3) input, one ignored


def _cross_entropy_inputs(device):
    x = torch.randn(7, 7, 3, dtype=torch.float64, device=device).requires_grad_()
    target = torch.tensor(_CE_TARGET, device=device).view(7, 1).expand(7, 3).contiguous()
    weight = torch.rand(7, dtype=torch.float64, device=device) + 0.5
    return x, target, weight


def _cross_entropy_prob_inputs(device):
    x = torch.randn(5, 9, dtype=torch.float64, device=device).requires_grad_()
    y = torch.randn(5, 9, dtype=torch.float64, device=device).softmax(1).requires_grad_()
    return x, y


CHECKS = [
    Check("relu", _relu_inputs, DF.relu, F.relu),
    Check("relu (inplace)", _relu_inputs, lambda x: DF.relu(x.clone(), inplace=True), F.relu),
    Check("max_pool2d", _pool_inputs, lambda x: DF.max_pool2d(x, 3, 2, 1, ceil_mode=True),
          lambda x: F.max_pool2d(x, 3, 2, 1, ceil_mode=True)),
]


def _batch_norm_inputs(device):
    x = torch.randn(4, 3, 5, 7, dtype=torch.float64, device=device) * 2 + 1
    w = torch.rand(3, dtype=torch.float64, device=device) + 0.5
    b = torch.randn(3, dtype=torch.float64, device=device)
    return x.requires_grad_(), w.requires_grad_(), b.requires_grad_()


def _running_stats(x):
    """Fixed running statistics for evaluation mode (fresh tensors: training would update them)."""
    c = x.shape[1]
    return (torch.linspace(-0.5, 0.5, c, dtype=x.dtype, device=x.device),
            torch.linspace(0.5, 1.5, c, dtype=x.dtype, device=x.device))


CHECKS += [
    Check("batch_norm (train)", _batch_norm_inputs,
          lambda x, w, b: DF.batch_norm(x, *_running_stats(x), w, b, training=True),
          lambda x, w, b: F.batch_norm(x, *_running_stats(x), w, b, training=True)),
    Check("batch_norm (eval)", _batch_norm_inputs,
          lambda x, w, b: DF.batch_norm(x, *_running_stats(x), w, b),
          lambda x, w, b: F.batch_norm(x, *_running_stats(x), w, b)),
]


def _conv2d_inputs(x_shape, w_shape):
    def make(device):
        return tuple(torch.randn(shape, dtype=torch.float64, device=device).requires_grad_()
                     for shape in (x_shape, w_shape, w_shape[:1]))
    return make


_CONV2D_GROUPED = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
_CONV2D_DEPTHWISE = dict(stride=2, padding=1, groups=4)

CHECKS += [
    Check("conv2d", _conv2d_inputs((2, 3, 9, 7), (5, 3, 3, 3)),
          lambda *t: DF.conv2d(*t, padding=1), lambda *t: F.conv2d(*t, padding=1)),
    Check("conv2d (grouped)", _conv2d_inputs((2, 4, 7, 9), (6, 2, 3, 2)),
          lambda *t: DF.conv2d(*t, **_CONV2D_GROUPED), lambda *t: F.conv2d(*t, **_CONV2D_GROUPED)),
    Check("conv2d (same)", _conv2d_inputs((1, 3, 7, 6), (4, 3, 4, 3)),
          lambda *t: DF.conv2d(*t, padding="same"), lambda *t: F.conv2d(*t, padding="same")),
    Check("conv2d (depthwise)", _conv2d_inputs((2, 4, 7, 7), (8, 1, 3, 3)),
          lambda *t: DF.conv2d(*t, **_CONV2D_DEPTHWISE),
          lambda *t: F.conv2d(*t, **_CONV2D_DEPTHWISE)),
    Check("cross_entropy", _cross_entropy_inputs,
          lambda x, t, w: DF.cross_entropy(x, t, weight=w, label_smoothing=0.1),
          lambda x, t, w: F.cross_entropy(x, t, weight=w, label_smoothing=0.1)),
    Check("cross_entropy (probs)", _cross_entropy_prob_inputs,
          lambda x, y: DF.cross_entropy(x, y, reduction="none", label_smoothing=0.1),
          lambda x, y: F.cross_entropy(x, y, reduction="none", label_smoothing=0.1)),
]


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


def run_check(check: Check, device: torch.device) -> dict:
    torch.manual_seed(0)
    inputs = check.make(device)
    diff_inputs = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    t0 = time.perf_counter()
    ours, ref = check.ours(*inputs), check.native(*inputs)
    grad_out = torch.randn_like(ref)
    g_ours = torch.autograd.grad(ours, diff_inputs, grad_out)
    g_ref = torch.autograd.grad(ref, diff_inputs, grad_out)
    fwd = _max_diff(ours, ref)
    bwd = max((_max_diff(a, b) for a, b in zip(g_ours, g_ref)), default=0.0)
    gc = torch.autograd.gradcheck(check.ours, inputs, raise_exception=False)
    ggc = torch.autograd.gradgradcheck(check.ours, inputs, raise_exception=False)
    ok = fwd <= 1e-10 and bwd <= 1e-10 and gc and ggc
    return {"op": check.op, "device": device.type, "fwd": fwd, "bwd": bwd, "gradcheck": gc,
            "gradgradcheck": ggc, "ok": ok, "seconds": time.perf_counter() - t0}


def run(device: str = "auto") -> int:
    cuda_ok = torch.cuda.is_available() and dlext.build_info()["with_cuda"]
    devices = (["cpu"] + (["cuda"] if cuda_ok else [])) if device == "auto" else [device]
    if "cuda" in devices and not cuda_ok:
        print("gradcheck --device cuda: " + ("no CUDA device is available" if
              not torch.cuda.is_available() else "dlext was built without its CUDA kernels"),
              file=sys.stderr)
        return 2
    print(f"dlext {dlext.__version__} vs torch {torch.__version__}: float64, random inputs")
    print(f"{'op':<22}{'device':<8}{'max|fwd diff|':>15}{'max|grad diff|':>16}"
          f"{'gradcheck':>11}{'gradgradcheck':>15}")
    failures = 0
    for dev in devices:
        for check in CHECKS:
            r = run_check(check, torch.device(dev))
            failures += not r["ok"]
            print(f"{r['op']:<22}{r['device']:<8}{r['fwd']:>15.2e}{r['bwd']:>16.2e}"
                  f"{'pass' if r['gradcheck'] else 'FAIL':>11}"
                  f"{'pass' if r['gradgradcheck'] else 'FAIL':>15}")
    print("all checks passed" if failures == 0 else f"{failures} check(s) FAILED")
    return 0 if failures == 0 else 1


def _one_process_group(device: torch.device):
    """A torch.distributed group of this process alone (nothing initialised globally)."""
    store = torch.distributed.HashStore()
    if device.type == "cuda":
        return torch.distributed.ProcessGroupNCCL(store, 0, 1)
    return torch.distributed.ProcessGroupGloo(store, 0, 1)


_GROUPS: dict = {}


def _sync_batch_norm(x, w, b):
    """dlext.nn.SyncBatchNorm's synchronised path (dlext.sync_batchnorm), in one process."""
    from dlext.sync_batchnorm import sync_batch_norm

    if x.device not in _GROUPS:
        _GROUPS[x.device] = _one_process_group(x.device)
    return sync_batch_norm(x, w, b, *_running_stats(x), 0.1, 1e-5, _GROUPS[x.device])


if torch.distributed.is_available() and torch.distributed.is_gloo_available():
    CHECKS += [
        Check("sync_batch_norm", _batch_norm_inputs, _sync_batch_norm,
              lambda x, w, b: F.batch_norm(x, *_running_stats(x), w, b, training=True)),
    ]
