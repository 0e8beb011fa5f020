"""Fused softmax + cross-entropy: dlext.functional.cross_entropy / dlext.nn.CrossEntropyLoss /
torch.ops.dlext.cross_entropy* against torch.nn.functional.cross_entropy."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dlext
import dlext.functional as DF
import dlext.nn as DN
from conftest import DEVICES
from helpers import aten_ops_called, assert_no_native, make_layout

ops = torch.ops.dlext
REDUCTIONS = ["none", "mean", "sum"]
# (C,), (N, C) with C above and below the small-row threshold, and spatial shapes whose positions
# fill part of a vector (7), several (20, 45) or sit behind a permuted layout (channels_last).
SHAPES = [(7,), (13, 97), (33, 10), (5, 13, 7), (3, 7, 5, 4), (2, 40, 3, 3), (2, 5, 3, 1, 3)]
LAYOUTS = ["contiguous", "transposed", "strided", "channels_last"]
CASES = [(s, lay) for s in SHAPES for lay in LAYOUTS if lay != "channels_last" or len(s) == 4]
# Tolerances: float64 agrees with torch to rounding; float32 carries the 20-ulp exp of the
# kernels (a relative 2.4e-6 per term), inside assert_close's float32 defaults.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1.3e-6, atol=1e-5)}


def classes_of(shape):
    return shape[0] if len(shape) == 1 else shape[1]


def index_target(shape, device, ignore_index=-100, ignored=0.2):
    """Class indices for an input of `shape`, a fraction of them ignore_index."""
    t_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
    t = torch.randint(classes_of(shape), t_shape, device=device)
    mask = torch.rand(t_shape, device=device) < ignored
    return torch.where(mask, torch.full_like(t, ignore_index), t)


def prob_target(shape, dtype, device):
    dim = 0 if len(shape) == 1 else 1
    return torch.randn(shape, dtype=torch.float64, device=device).mul(2).softmax(dim).to(dtype)


def logits(shape, dtype, device, scale=3.0):
    return (torch.randn(shape, dtype=torch.float64, device=device) * scale).to(dtype)


def run(fn, x, target, grad=None, **kwargs):
    """Loss and d loss / d input (and target, when it requires grad) of fn."""
    x = x.detach().requires_grad_()
    loss = fn(x, target, **kwargs)
    wrt = [x] + ([target] if target.requires_grad else [])
    if grad is None:
        grad = torch.randn_like(loss) if loss.dim() else torch.ones_like(loss)
    grads = torch.autograd.grad(loss, wrt, grad)
    return loss, grads, grad


def assert_matches(x, target, tol, **kwargs):
    loss, grads, grad = run(DF.cross_entropy, x, target, **kwargs)
    ref, ref_grads, _ = run(F.cross_entropy, x, target, grad=grad, **kwargs)
    assert loss.dtype == ref.dtype and loss.shape == ref.shape
    torch.testing.assert_close(loss, ref, equal_nan=True, **tol)
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape and g.dtype == r.dtype
        torch.testing.assert_close(g, r, equal_nan=True, **tol)


# ----------------------------------------------------------------------------- against native

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,layout", CASES)
def test_class_indices_match_native(device, dtype, shape, layout):
    x = make_layout(logits(shape, dtype, device), layout)
    weight = torch.rand(classes_of(shape), dtype=dtype, device=device) + 0.1
    for ignore_index in (-100, 2):
        target = index_target(shape, device, ignore_index)
        for w in (None, weight):
            for label_smoothing in (0.0, 0.15, 1.0):
                for reduction in REDUCTIONS:
                    assert_matches(x, target, TOL[dtype], weight=w, ignore_index=ignore_index,
                                   reduction=reduction, label_smoothing=label_smoothing)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,layout", CASES)
def test_class_probabilities_match_native(device, dtype, shape, layout):
    x = make_layout(logits(shape, dtype, device), layout)
    weight = torch.rand(classes_of(shape), dtype=dtype, device=device) + 0.1
    target = make_layout(prob_target(shape, dtype, device), layout).requires_grad_()
    for w in (None, weight):
        for label_smoothing in (0.0, 0.3):
            for reduction in REDUCTIONS:
                assert_matches(x, target, TOL[dtype], weight=w, reduction=reduction,
                               label_smoothing=label_smoothing)


@pytest.mark.parametrize("device", DEVICES)
def test_probability_target_and_weight_gradients(device):
    """With class probabilities torch differentiates target and weight too; so does dlext."""
    x = logits((6, 9, 5), torch.float64, device)
    for reduction in REDUCTIONS:
        for label_smoothing in (0.0, 0.2):
            leaves = [x, prob_target(x.shape, torch.float64, device),
                      torch.rand(9, dtype=torch.float64, device=device)]
            ours = [t.clone().requires_grad_() for t in leaves]
            theirs = [t.clone().requires_grad_() for t in leaves]
            kw = dict(reduction=reduction, label_smoothing=label_smoothing)
            a = DF.cross_entropy(ours[0], ours[1], weight=ours[2], **kw)
            b = F.cross_entropy(theirs[0], theirs[1], weight=theirs[2], **kw)
            grad = torch.randn_like(b)
            for g, r in zip(torch.autograd.grad(a, ours, grad), torch.autograd.grad(b, theirs, grad)):
                torch.testing.assert_close(g, r, **TOL[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(13, 97), (33, 10), (3, 7, 5, 4), (2, 40, 3, 3)])
def test_low_precision_computes_in_float32(device, dtype, shape):
    """16-bit inputs give torch's output dtype, within one 16-bit rounding of the float32 result."""
    x = logits(shape, dtype, device)
    for target in (index_target(shape, device), prob_target(shape, dtype, device)):
        weight = torch.rand(classes_of(shape), device=device).to(dtype) + 0.5
        for reduction in REDUCTIONS:
            kw = dict(weight=weight, reduction=reduction, label_smoothing=0.1)
            loss, (grad,), g_out = run(DF.cross_entropy, x, target, **kw)
            native = F.cross_entropy(x, target, **kw)
            assert loss.dtype == native.dtype == dtype and loss.shape == native.shape
            ref, (ref_grad,), _ = run(F.cross_entropy, x.float(), target.float()
                                      if target.is_floating_point() else target,
                                      grad=g_out.float(), weight=weight.float(),
                                      reduction=reduction, label_smoothing=0.1)
            assert grad.dtype == dtype
            torch.testing.assert_close(loss, ref.to(dtype))
            torch.testing.assert_close(grad, ref_grad.to(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_promote_like_torch(device):
    """Probability targets: torch computes in the promoted dtype of input, target and weight."""
    x = logits((5, 7), torch.float32, device)
    cases = [(x, prob_target(x.shape, torch.float64, device), None),
             (x.half(), prob_target(x.shape, torch.bfloat16, device), None),
             (x.half(), prob_target(x.shape, torch.float16, device), torch.ones(7, device=device)),
             (x, prob_target(x.shape, torch.float32, device), torch.ones(7, dtype=torch.float64,
                                                                           device=device))]
    for inp, target, weight in cases:
        loss, (grad,), g_out = run(DF.cross_entropy, inp, target, weight=weight)
        ref, (ref_grad,), _ = run(F.cross_entropy, inp, target, grad=g_out, weight=weight)
        assert loss.dtype == ref.dtype and grad.dtype == ref_grad.dtype == inp.dtype
        torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(4, 11), (6, 40), (3, 5, 9), (2, 4, 3, 3)])
def test_huge_logits_stay_finite_and_exact(device, dtype, shape):
    """Logits of +-1e4: loss and gradient finite and as exact as float64's, smoothing included."""
    x = torch.randn(shape, dtype=torch.float64, device=device).sign() * 1e4
    x = x + torch.randn(shape, dtype=torch.float64, device=device)  # +-1e4, distinct
    x_low = x.to(dtype)
    target = index_target(shape, device)
    for kw in (dict(), dict(label_smoothing=0.2), dict(reduction="sum", label_smoothing=0.2),
               dict(weight=torch.rand(shape[1], device=device, dtype=dtype) + 0.5,
                    reduction="none", label_smoothing=0.1)):
        loss, (grad,), g_out = run(DF.cross_entropy, x_low, target, **kw)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        ref_kw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        ref, (ref_grad,), _ = run(F.cross_entropy, x_low.double(), target, grad=g_out.double(),
                                  **ref_kw)
        # Exact up to the dtype's rounding of values of size 1e4 (the smoothing term sums them).
        tol = dict(rtol=1e-12, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-6, atol=2e-3)
        torch.testing.assert_close(loss.double(), ref, **tol)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(6, 5), (6, 40), (3, 5, 9)])
def test_nonfinite_logits_give_torch_nans(device, shape):
    """NaN, +inf and all -inf rows: NaN where torch has NaN, in loss and gradient; -inf logits of
    other classes are fine; ignored rows give loss 0 whatever they hold."""
    x = logits(shape, torch.float32, device)
    target = torch.randint(shape[1], (shape[0], *shape[2:]), device=device)
    flat = x.movedim(1, -1).reshape(-1, shape[1])  # a view: one row per target
    tflat = target.reshape(-1)
    flat[0, 1] = float("nan")
    flat[1, 2] = float("inf")
    flat[2] = float("-inf")
    flat[3, (tflat[3] + 1) % shape[1]] = float("-inf")
    flat[4, 0] = float("nan")
    tflat[4] = -100
    for kw in (dict(reduction="none"), dict(reduction="none", label_smoothing=0.1),
               dict(reduction="sum")):
        assert_matches(x, target, TOL[torch.float32], **kw)


# ----------------------------------------------------------------------------- semantics

@pytest.mark.parametrize("device", DEVICES)
def test_ignore_index(device):
    x = logits((6, 5), torch.float64, device)
    target = torch.tensor([0, 3, 3, 1, 4, 3], device=device)
    weight = torch.rand(5, dtype=torch.float64, device=device)
    for w in (None, weight):
        for ls in (0.0, 0.3):
            for reduction in REDUCTIONS:
                kw = dict(weight=w, label_smoothing=ls, reduction=reduction)
                assert_matches(x, target, TOL[torch.float64], ignore_index=3, **kw)
                all_ignored = torch.full_like(target, 3)
                loss = DF.cross_entropy(x, all_ignored, ignore_index=3, **kw)
                ref = F.cross_entropy(x, all_ignored, ignore_index=3, **kw)
                torch.testing.assert_close(loss, ref, equal_nan=True, rtol=0, atol=0)
                if reduction == "mean":
                    assert loss.isnan()                # mean over nothing, as torch
                else:
                    assert (loss == 0).all()
    # A target equal to ignore_index is never range-checked, even outside [0, C).
    assert_matches(x, torch.tensor([7, 7, 0, 1, 2, 7], device=device), TOL[torch.float64],
                   ignore_index=7, reduction="none")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(4, 5), (3, 5, 7), (40, 5)])
def test_zero_total_weight_mean_is_nan(device, shape):
    """Counted targets whose class weights are all 0: torch's mean divides the nll part (0 / 0)
    and the smoothing part separately, so the loss is NaN even with label smoothing (one sum
    divided by 0 would give inf); the gradients are torch's too."""
    x = logits(shape, torch.float64, device)
    target = torch.randint(2, (shape[0], *shape[2:]), device=device)
    target.view(-1)[0] = 2  # ignored
    weight = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64, device=device)
    for ls in (0.0, 0.1):
        kw = dict(weight=weight, ignore_index=2, label_smoothing=ls)
        ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        loss, ref_loss = DF.cross_entropy(ours, target, **kw), F.cross_entropy(ref, target, **kw)
        assert loss.isnan() and ref_loss.isnan()
        loss.backward()
        ref_loss.backward()
        torch.testing.assert_close(ours.grad, ref.grad, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_unbatched_input(device):
    x = logits((11,), torch.float64, device)
    for target in (torch.tensor(4, device=device), torch.tensor(-100, device=device),
                   prob_target((11,), torch.float64, device)):
        for reduction in REDUCTIONS:
            assert_matches(x, target, TOL[torch.float64], reduction=reduction)
    # A (1,) target: torch computes the loss (but fails in its backward); dlext does both, the
    # gradient that of the 0-D target.
    for reduction in REDUCTIONS:
        one = torch.tensor([4], device=device)
        torch.testing.assert_close(DF.cross_entropy(x, one, reduction=reduction),
                                   F.cross_entropy(x, one, reduction=reduction))
        _, (grad,), _ = run(DF.cross_entropy, x, one, reduction=reduction)
        _, (ref,), _ = run(F.cross_entropy, x, one[0], reduction=reduction)
        torch.testing.assert_close(grad, ref, **TOL[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
def test_uint8_targets(device):
    x = logits((9, 6), torch.float64, device)
    target = torch.tensor([0, 5, 255, 2, 255, 1, 3, 4, 0], dtype=torch.uint8, device=device)
    for ls in (0.0, 0.2):
        assert_matches(x, target, TOL[torch.float64], ignore_index=255, label_smoothing=ls)
    with pytest.raises(IndexError, match="Target 255 is out of bounds"):
        DF.cross_entropy(x, target)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_inputs(device, reduction):
    """No rows or no classes: torch's values, to the sign of zero."""
    cases = [((0, 5), index_target((0, 5), device)), ((2, 5, 0, 3), index_target((2, 5, 0, 3), device)),
             ((3, 0), torch.full((3,), -100, device=device)),
             ((0, 5), torch.zeros(0, 5, device=device)), ((3, 0), torch.zeros(3, 0, device=device))]
    for shape, target in cases:
        x = torch.randn(shape, device=device)
        for ls in (0.0, 0.5):
            kw = dict(reduction=reduction, label_smoothing=ls)
            loss, (grad,), _ = run(DF.cross_entropy, x, target, **kw)
            ref, (ref_grad,), _ = run(F.cross_entropy, x, target, **kw)
            assert loss.shape == ref.shape and grad.shape == x.shape
            torch.testing.assert_close(loss, ref, equal_nan=True, rtol=0, atol=0)
            numbers = ~ref.isnan()  # the sign of a NaN means nothing
            assert torch.equal(loss.signbit()[numbers], ref.signbit()[numbers])
        # The operator's by-products: lse (2, N, D) and the mean's denominator (N * D rows for
        # probabilities, the counted ones for indices: none here).
        _, lse, tw = ops.cross_entropy(x, target, None, 1, -100, 0.0)
        n, d = shape[0], math.prod(shape[2:])
        assert lse.shape == (2, n, d)
        assert tw.item() == (n * d if target.is_floating_point() else 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_backward_with_stride_zero_grad(device, reduce):
    """.sum()/.mean() of a 'none' loss hand backward an expanded grad_output (stride 0)."""
    for shape in [(9, 13), (9, 40), (4, 6, 5, 3)]:
        x = logits(shape, torch.float64, device)
        target = index_target(shape, device)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        getattr(DF.cross_entropy(xa, target, reduction="none", label_smoothing=0.1), reduce)().backward()
        getattr(F.cross_entropy(xb, target, reduction="none", label_smoothing=0.1), reduce)().backward()
        torch.testing.assert_close(xa.grad, xb.grad, **TOL[torch.float64])
        # And straight into the operator.
        x3 = x.reshape(shape[0], shape[1], -1)
        t2 = target.reshape(shape[0], -1)
        _, lse, tw = ops.cross_entropy(x3, t2, None, 0, -100, 0.0)
        expanded = torch.ones((), dtype=x.dtype, device=device).expand(t2.shape)
        g, _, _ = ops.cross_entropy_backward(expanded, x3, t2, None, lse, tw, 0, -100, 0.0,
                                             [True, False, False])
        g_ref, _, _ = ops.cross_entropy_backward(expanded.contiguous(), x3, t2, None, lse, tw, 0,
                                                 -100, 0.0, [True, False, False])
        assert torch.equal(g, g_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_keeps_the_input_layout(device):
    """Dense inputs get gradients in their own layout (channels_last stays channels_last); the
    kernel's own result, before autograd's accumulation lays .grad out like the input anyway."""
    x = logits((2, 7, 5, 3), torch.float32, device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    (grad,) = torch.autograd.grad(DF.cross_entropy(x, index_target(x.shape, device)), x)
    assert grad.is_contiguous(memory_format=torch.channels_last)
    y = logits((5, 8), torch.float32, device).t().requires_grad_()  # (8, 5), classes strided
    (grad,) = torch.autograd.grad(DF.cross_entropy(y, index_target(y.shape, device)), y)
    assert grad.is_contiguous()  # copied to class-contiguous rows first


@pytest.mark.parametrize("device", DEVICES)
def test_reduced_loss_does_not_depend_on_thread_count(device):
    x = logits((4099, 13), torch.float32, device)
    y = logits((5, 9, 70, 33), torch.float32, device)
    tx, ty = index_target(x.shape, device), index_target(y.shape, device)
    w = torch.rand(9, device=device)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append([DF.cross_entropy(x, tx, label_smoothing=0.1),
                            DF.cross_entropy(y, ty, weight=w, reduction="sum")])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_label_smoothing_outside_the_open_range(device):
    """torch ignores label_smoothing <= 0 (and NaN) and raises above 1."""
    x = logits((5, 6), torch.float64, device)
    for target in (index_target(x.shape, device), prob_target(x.shape, torch.float64, device)):
        for ls in (-0.5, float("nan"), 1.0):
            assert_matches(x, target, TOL[torch.float64], label_smoothing=ls)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("device", DEVICES)
def test_errors(device):
    x = torch.randn(3, 5, device=device)
    t = torch.tensor([0, 1, 4], device=device)
    # Out-of-range targets: raised before any read at that index, on every path.
    for shape in [(3, 5), (3, 40), (3, 5, 4), (2, 5, 3, 3)]:
        xs = torch.randn(shape, device=device)
        for bad in (5 if shape[1] == 5 else 40, -1):
            target = index_target(shape, device, ignored=0)
            target.view(-1)[-1] = bad
            for kw in (dict(), dict(reduction="none"), dict(label_smoothing=0.1)):
                with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
                    DF.cross_entropy(xs, target, **kw)
    with pytest.raises(IndexError, match="Target 0 is out of bounds"):
        DF.cross_entropy(torch.randn(3, 0, device=device), torch.zeros(3, dtype=torch.long,
                                                                        device=device))
    # Shapes and dtypes, in torch's words.
    with pytest.raises(ValueError, match=r"Expected input batch_size \(3\) to match target "
                                         r"batch_size \(2\)"):
        DF.cross_entropy(x, t[:2])
    with pytest.raises(RuntimeError, match="expected target dtype to be Long or Byte, but got Float"):
        DF.cross_entropy(x, t.float())
    with pytest.raises(RuntimeError, match="expected target dtype to be Long or Byte, but got Int"):
        DF.cross_entropy(x, t.int())
    with pytest.raises(RuntimeError, match="multi-target not supported"):
        DF.cross_entropy(x, t.view(3, 1))
    with pytest.raises(ValueError, match="For 1D input, 1D target must have size 1"):
        DF.cross_entropy(x[0], t[:2])
    with pytest.raises(RuntimeError, match=r"Expected target size \[2, 3\], got \[2\]"):
        DF.cross_entropy(torch.randn(2, 5, 3, device=device), t[:2])
    with pytest.raises(RuntimeError, match="only batches of spatial targets supported"):
        DF.cross_entropy(torch.randn(2, 5, 3, 4, device=device), t[:2])
    with pytest.raises(RuntimeError, match="Expected target size"):
        DF.cross_entropy(torch.randn(2, 5, 3, 4, device=device),
                         torch.zeros(2, 3, 5, dtype=torch.long, device=device))
    with pytest.raises(RuntimeError, match="expected scalar type Long but found Byte"):
        DF.cross_entropy(torch.randn(2, 5, 3, device=device),
                         torch.zeros(2, 3, dtype=torch.uint8, device=device))
    with pytest.raises(ValueError, match=r"Expected 1 or more dimensions \(got 0\)"):
        DF.cross_entropy(torch.tensor(1.0, device=device), t[:1])
    with pytest.raises(RuntimeError, match="weight tensor should be defined either for all 5 "
                                           "classes or no classes"):
        DF.cross_entropy(x, t, weight=torch.ones(4, device=device))
    with pytest.raises(RuntimeError, match="weight tensor should be defined either for all 5"):
        DF.cross_entropy(x, x.softmax(1), weight=torch.ones(1, 5, device=device))
    with pytest.raises(RuntimeError, match="expected 'weight' to have the same dtype as 'input'"):
        DF.cross_entropy(x, t, weight=torch.ones(5, dtype=torch.float64, device=device))
    with pytest.raises(RuntimeError, match="label_smoothing must be between 0.0 and 1.0. Got: 1.5"):
        DF.cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(RuntimeError, match="label_smoothing must be between 0.0 and 1.0"):
        DF.cross_entropy(x, x.softmax(1), label_smoothing=float("inf"))
    with pytest.raises(ValueError, match="avg is not a valid value for reduction"):
        DF.cross_entropy(x, t, reduction="avg")
    with pytest.raises(RuntimeError, match="Expected floating point type for target with class "
                                           "probabilities, got Long"):
        DF.cross_entropy(x, t.expand(5, 3).t().contiguous())
    with pytest.raises(RuntimeError, match="ignore_index is not supported for floating point"):
        DF.cross_entropy(x, x.softmax(1), ignore_index=0)
    with pytest.raises(NotImplementedError, match="not implemented for 'Long'"):
        DF.cross_entropy(x.long(), t)
    with pytest.raises(NotImplementedError, match="not implemented for 'ComplexFloat'"):
        DF.cross_entropy(x.to(torch.complex64), t)
    with pytest.raises(TypeError, match="argument 'input' .* must be Tensor, not list"):
        DF.cross_entropy([1.0, 2.0], t)
    with pytest.raises(TypeError, match="argument 'target' .* must be Tensor, not list"):
        DF.cross_entropy(x, [0, 1, 4])
    with pytest.raises(TypeError, match="argument 'weight' .* must be Tensor, not list"):
        DF.cross_entropy(x, t, weight=[1.0] * 5)
    with pytest.raises(TypeError, match="argument 'ignore_index' must be int, not float"):
        DF.cross_entropy(x, t, ignore_index=1.0)
    with pytest.raises(TypeError, match="argument 'ignore_index' must be int, not bool"):
        DF.cross_entropy(x, t, ignore_index=True)
    with pytest.raises(TypeError, match="argument 'label_smoothing' must be float, not str"):
        DF.cross_entropy(x, t, label_smoothing="0.1")
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        DF.cross_entropy(x, t, weight=torch.ones(5, device=device, requires_grad=True))
    with pytest.raises(RuntimeError, match="'weight' is on meta"):
        DF.cross_entropy(x, t, weight=torch.ones(5, device="meta"))
    with pytest.raises(RuntimeError, match="'target' is on meta"):
        DF.cross_entropy(x, t.to("meta"))


@pytest.mark.parametrize("device", DEVICES)
def test_operator_errors(device):
    """The raw operators check what the functional form leaves to them, as torch does, and their
    own contract (C++ users call them directly)."""
    x = torch.randn(3, 5, 2, device=device)
    t = torch.zeros(3, 2, dtype=torch.long, device=device)
    loss, lse, tw = ops.cross_entropy(x, t, None, 1, -100, 0.0)
    with pytest.raises(ValueError, match=r"Expected 1 or more dimensions \(got 0\)"):
        ops.cross_entropy(x[0, 0, 0], t[0], None, 1, -100, 0.0)
    with pytest.raises(RuntimeError, match="expected 'reduction' to be 0 .none., 1 .mean. or 2"):
        ops.cross_entropy(x, t, None, 3, -100, 0.0)
    with pytest.raises(RuntimeError, match=r"Expected target size \[3, 2\], got \[3, 1\]"):
        ops.cross_entropy(x, t[:, :1], None, 1, -100, 0.0)
    with pytest.raises(RuntimeError, match="expected target dtype to be Long or Byte, but got Float"):
        ops.cross_entropy(x, x[:, :4], None, 1, -100, 0.0)
    with pytest.raises(RuntimeError, match="expected 'target' to have the same dtype as 'input'"):
        ops.cross_entropy(x, x.double(), None, 1, -100, 0.0)
    with pytest.raises(RuntimeError, match="expected target dtype to be Long or Byte, but got Int"):
        ops.cross_entropy(x, t.int(), None, 1, -100, 0.0)
    back = lambda *args: ops.cross_entropy_backward(*args)  # noqa: E731
    with pytest.raises(RuntimeError, match="expected a single element 'grad_output'"):
        back(torch.ones(3, 2, device=device), x, t, None, lse, tw, 1, -100, 0.0, [True, False, False])
    with pytest.raises(RuntimeError, match=r"expected 'grad_output' of the loss's shape \[3, 2\]"):
        back(torch.ones(3, device=device), x, t, None, lse, tw, 0, -100, 0.0, [True, False, False])
    with pytest.raises(RuntimeError, match="expected 'lse' to be the"):
        back(torch.ones((), device=device), x, t, None, lse.double(), tw, 1, -100, 0.0,
             [True, False, False])
    with pytest.raises(RuntimeError, match="expected 'lse' to be the"):
        back(torch.ones((), device=device), x, t, None, lse[0], tw, 1, -100, 0.0,
             [True, False, False])
    with pytest.raises(RuntimeError, match="expected 'total_weight' to be the single-element"):
        back(torch.ones((), device=device), x, t, None, lse, lse, 1, -100, 0.0, [True, False, False])
    with pytest.raises(RuntimeError, match="class-index targets have no gradient"):
        back(torch.ones((), device=device), x, t, None, lse, tw, 1, -100, 0.0, [True, True, False])


# ----------------------------------------------------------------------------- autograd

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(5,), (4, 7), (3, 6, 5), (2, 5, 3, 2), (2, 34)])
def test_gradcheck_and_gradgradcheck(device, seed, shape):
    torch.manual_seed(seed)
    # Rows of more than 32 classes take other kernels; checked by random projections (fast mode)
    # there, since the full Jacobians of gradgradcheck grow with the square of the size.
    fast = dict(fast_mode=shape[-1] > 32)
    x = logits(shape, torch.float64, device).requires_grad_()
    c = classes_of(shape)
    weight = torch.rand(c, dtype=torch.float64, device=device) + 0.1
    target = index_target(shape, device, ignored=0.3 if len(shape) > 1 else 0)
    target.view(-1)[0] = 1  # not all ignored: a mean over nothing is NaN, not differentiable
    for reduction in REDUCTIONS:
        for w, ls in ((None, 0.0), (weight, 0.2)):
            fn = lambda x: DF.cross_entropy(x, target, weight=w, reduction=reduction,  # noqa: E731
                                            label_smoothing=ls)
            assert torch.autograd.gradcheck(fn, (x,), **fast)
            assert torch.autograd.gradgradcheck(fn, (x,), **fast)
    y = prob_target(shape, torch.float64, device).requires_grad_()
    wg = weight.clone().requires_grad_()
    for reduction in REDUCTIONS:
        fn = lambda x, y, w: DF.cross_entropy(x, y, weight=w, reduction=reduction,  # noqa: E731
                                              label_smoothing=0.2)
        assert torch.autograd.gradcheck(fn, (x, y, wg), **fast)
        assert torch.autograd.gradgradcheck(fn, (x, y, wg), **fast)


@pytest.mark.parametrize("device", DEVICES)
def test_raw_operators_are_differentiable(device):
    x = logits((4, 6, 3), torch.float64, device).requires_grad_()
    t = index_target(x.shape, device).reshape(4, 3)
    y = prob_target(x.shape, torch.float64, device).requires_grad_()
    w = torch.rand(6, dtype=torch.float64, device=device).requires_grad_()
    fn = lambda x: ops.cross_entropy(x, t, w.detach(), 0, -100, 0.1)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))
    fn = lambda x, y, w: ops.cross_entropy(x, y, w, 1, -100, 0.1)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, y, w))
    assert torch.autograd.gradgradcheck(fn, (x, y, w))
    loss, lse, tw = ops.cross_entropy(x, t, None, 2, -100, 0.0)
    assert not lse.requires_grad and not tw.requires_grad
    # lse and total_weight are the forward's by-products of the input: the backward operator is
    # differentiated as a function of (grad_output, input, ...) with them following the input.
    go = torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True)

    def back(go, x):
        _, lse, tw = ops.cross_entropy(x, t, None, 0, -100, 0.1)
        return ops.cross_entropy_backward(go, x, t, None, lse, tw, 0, -100, 0.1,
                                          [True, False, False])[0]

    assert torch.autograd.gradcheck(back, (go, x))
    assert torch.autograd.gradgradcheck(back, (go, x))


@pytest.mark.parametrize("device", DEVICES)
def test_nothing_n_by_c_is_saved(device):
    """Between forward and backward only the input itself has N x C elements."""
    for shape in [(64, 50), (8, 9, 11, 7)]:
        x = logits(shape, torch.float32, device).requires_grad_()
        target = index_target(shape, device)
        saved = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = DF.cross_entropy(x, target, label_smoothing=0.1)
        big = [t for t in saved if t.numel() >= x.numel()]
        assert big and all(t.data_ptr() == x.data_ptr() and t.shape == x.shape for t in big)
            # The target, lse (two values per row) and total_weight.
        assert sum(t.numel() for t in saved if t.data_ptr() != x.data_ptr()) <= 3 * target.numel() + 1
        loss.backward()


# ----------------------------------------------------------------------------- torch integration

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(5, 7, 3, device=device)
    t = torch.randint(7, (5, 3), device=device)
    t[0, 0] = -100
    w = torch.rand(7, device=device)
    y = torch.randn(5, 7, 3, device=device).softmax(1)
    cl = torch.randn(2, 7, 3, 4, device=device).contiguous(memory_format=torch.channels_last)
    cases = [(x, t, None, 1, -100, 0.0), (x.clone().requires_grad_(), t, w, 0, -100, 0.1),
             (x.transpose(0, 2).contiguous().transpose(0, 2), t.clamp(min=0), w, 2, 3, 0.0),
             (x.clone().requires_grad_(), y.clone().requires_grad_(), w, 1, -100, 0.2),
             (cl, torch.randint(7, (2, 3, 4), device=device), None, 0, -100, 0.3),
             (cl[..., ::2], torch.randint(7, (2, 3, 2), device=device), None, 0, -100, 0.0),
             (torch.randn(9, 12, device=device).t(), torch.randint(9, (12,), device=device),
              None, 0, -100, 0.0),
             (torch.randn(9, 40, device=device), torch.randint(40, (9,), device=device), w[:1].expand(40),
              1, -100, 0.0),
             (torch.randn(11, device=device), torch.tensor(3, device=device), None, 0, -100, 0.1),
             (torch.randn(11, device=device), torch.randn(11, device=device).softmax(0), None, 0,
              -100, 0.0)]
    for args in cases:
        torch.library.opcheck(ops.cross_entropy.default, args)
        plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        loss, lse, tw = ops.cross_entropy(*plain)
        prob = plain[1].is_floating_point()
        mask = [True, prob, prob and plain[2] is not None]
        torch.library.opcheck(ops.cross_entropy_backward.default,
                              (torch.randn_like(loss), plain[0], plain[1], plain[2], lse, tw,
                               *plain[3:], mask))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    def f(x, t, y):
        return (DF.cross_entropy(x * 1.5, t, label_smoothing=0.1)
                + DF.cross_entropy(x, t, reduction="none").sum()
                + DF.cross_entropy(x, y, reduction="sum"))

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = logits((6, 9, 4), torch.float64, device)
    t = index_target(x.shape, device)
    y = prob_target(x.shape, torch.float64, device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_c, out_e = compiled(xa, t, y), f(xb, t, y)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(xa.grad, xb.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_dlext_kernels_only(device):
    forbidden = {"aten::cross_entropy_loss", "aten::log_softmax", "aten::_log_softmax",
                 "aten::softmax", "aten::_softmax", "aten::nll_loss", "aten::nll_loss_nd",
                 "aten::nll_loss_forward", "aten::nll_loss2d", "aten::nll_loss2d_forward",
                 "aten::nll_loss_backward", "aten::nll_loss2d_backward",
                 "aten::_log_softmax_backward_data", "aten::_softmax_backward_data",
                 "aten::logsumexp"}
    x = torch.randn(8, 9, 3, device=device, dtype=torch.float64, requires_grad=True)
    t = index_target(x.shape, device)
    y = prob_target(x.shape, torch.float64, device).requires_grad_()

    def fwd_bwd():
        loss = DF.cross_entropy(x, t, label_smoothing=0.1) + DF.cross_entropy(x, y)
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        g.sum().backward()  # double backward too

    _, names = aten_ops_called(fwd_bwd)
    assert {"dlext::cross_entropy", "dlext::cross_entropy_backward"} <= names
    assert_no_native(names, forbidden, "dlext cross_entropy")


# ----------------------------------------------------------------------------- module

def test_module_is_a_drop_in():
    weight = torch.rand(6) + 0.5
    configs = [dict(), dict(weight=weight, ignore_index=2, reduction="sum", label_smoothing=0.1),
               dict(reduction="none"), dict(size_average=False), dict(reduce=False)]
    x = torch.randn(7, 6)
    t = torch.randint(6, (7,))
    for kw in configs:
        with warnings.catch_warnings(record=True) as ours_w:
            warnings.simplefilter("always")
            ours = DN.CrossEntropyLoss(**kw)
        with warnings.catch_warnings(record=True) as theirs_w:
            warnings.simplefilter("always")
            theirs = torch.nn.CrossEntropyLoss(**kw)
        assert len(ours_w) == len(theirs_w)
        assert isinstance(ours, torch.nn.CrossEntropyLoss)
        assert repr(ours) == repr(theirs)
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        ours.load_state_dict(theirs.state_dict())
        torch.testing.assert_close(ours(x, t), theirs(x, t))
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        loss = DF.cross_entropy(x, t, size_average=False)
    torch.testing.assert_close(loss, F.cross_entropy(x, t, reduction="sum"))


def test_swap_in_a_training_step():
    """A model trained with dlext's loss follows native's step for step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
    twin = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
    twin.load_state_dict(model.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, twin)]
    x, t = torch.randn(64, 12), torch.randint(5, (64,))
    for _ in range(5):
        for m, opt, loss_fn in ((model, opts[0], DN.CrossEntropyLoss(label_smoothing=0.05)),
                                (twin, opts[1], torch.nn.CrossEntropyLoss(label_smoothing=0.05))):
            opt.zero_grad()
            loss_fn(m(x), t).backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- properties

@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(0, 9), c=st.integers(1, 70), spatial=st.lists(st.integers(1, 6), max_size=2),
    layout=st.sampled_from(["contiguous", "transposed", "strided"]),
    probs=st.booleans(), weighted=st.booleans(), ignore_valid=st.booleans(),
    reduction=st.sampled_from(REDUCTIONS),
    label_smoothing=st.sampled_from([0.0, 0.05, 0.5, 1.0]), seed=st.integers(0, 2**16),
)
def test_matches_native_on_random_configurations(device, n, c, spatial, layout, probs, weighted,
                                                 ignore_valid, reduction, label_smoothing, seed):
    torch.manual_seed(seed)
    shape = (n, c, *spatial)
    x = make_layout(logits(shape, torch.float64, device), layout)
    ignore_index = c // 2 if ignore_valid else -100
    if probs:
        target = prob_target(shape, torch.float64, device).requires_grad_()
        ignore_index = -100
    else:
        target = index_target(shape, device, ignore_index, ignored=0.3)
    weight = torch.rand(c, dtype=torch.float64, device=device) + 0.1 if weighted else None
    assert_matches(x, target, TOL[torch.float64], weight=weight, ignore_index=ignore_index,
                   reduction=reduction, label_smoothing=label_smoothing)


def test_selfcheck_lists_cross_entropy():
    from dlext.selfcheck import CHECKS, run_check
    checks = [c for c in CHECKS if c.op.startswith("cross_entropy")]
    assert checks
    for check in checks:
        assert run_check(check, torch.device("cpu"))["ok"]


def test_check_targets_option_toggles():
    """dlext.cross_entropy_check_targets sets the CUDA operators' host check and returns the
    previous setting; the CPU operators check whatever it says (their check costs nothing)."""
    previous = dlext.cross_entropy_check_targets(False)
    try:
        assert dlext.cross_entropy_check_targets(False) is False
        with pytest.raises(IndexError, match="Target 7 is out of bounds"):
            DF.cross_entropy(torch.randn(2, 5), torch.tensor([1, 7]))
    finally:
        assert dlext.cross_entropy_check_targets(previous) is False


# ----------------------------------------------------------------------------- CUDA kernels
# The device-parametrised tests above run the CUDA kernels too; these aim at what only the CUDA
# kernels have (cross_entropy_cuda_kernels.cuh): each row walk (8 or 32 lanes per row, a block
# per row, a long row split over blocks and merged, one thread per row), 16-byte packs with a
# head for misaligned rows and their element-wise fallback, the host check of the targets.

CUDA_ONLY = [pytest.param("cuda", marks=DEVICES[1].marks)]
LOW_TOL = {torch.bfloat16: dict(rtol=2e-2, atol=2e-3), torch.float16: dict(rtol=2e-3, atol=2e-4)}


def _misaligned(shape, dtype, device):
    """Random logits in a view whose storage starts one element past a 16-byte boundary."""
    buf = logits((math.prod(shape) + 1,), dtype, device)
    return buf[1:].view(shape)


def _assert_matches_float64(x, target, dtype, **kw):
    """dlext in `dtype` against native in float64 on the same values, rounded to `dtype`."""
    tol = TOL.get(dtype) or LOW_TOL[dtype]
    loss, grads, grad = run(DF.cross_entropy, x, target, **kw)
    t64 = target.detach().double().requires_grad_(target.requires_grad) \
        if target.is_floating_point() else target
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref, ref_grads, _ = run(F.cross_entropy, x.double(), t64, grad=grad.double(), **kw64)
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.double(), ref, equal_nan=True, **tol)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), r, equal_nan=True, **tol)


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(600, 32768), (3, 32768), (2, 262144), (700, 2500)])
def test_cuda_long_rows(device, dtype, shape):
    """A block per row (600 x 32768, 700 x 2500 in float32), long rows of a small batch split over
    several blocks and merged (3 x 32768, 2 x 262144): class indices with smoothing and weights,
    and probabilities."""
    x = logits(shape, dtype, device)
    w = torch.rand(shape[1], device=device, dtype=dtype) + 0.5
    target = index_target(shape, device)
    for kw in (dict(), dict(weight=w, label_smoothing=0.1, reduction="sum"),
               dict(reduction="none", label_smoothing=0.2)):
        _assert_matches_float64(x, target, dtype, **kw)
    y = prob_target(shape, dtype, device).requires_grad_()
    _assert_matches_float64(x, y, dtype, weight=w, label_smoothing=0.1)


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(13, 1001), (5, 4099), (3, 13, 7), (97, 7)])
def test_cuda_misaligned_storage(device, dtype, shape):
    """Views starting one element past a 16-byte boundary with odd C: every row takes its own head
    before the packs (the forward reads x alone; the backward's gradient is aligned, so it walks
    element by element)."""
    x = _misaligned(shape, dtype, device)
    target = index_target(shape, device)
    w = torch.rand(shape[1], device=device, dtype=dtype) + 0.5
    for kw in (dict(), dict(weight=w, label_smoothing=0.1), dict(reduction="none")):
        _assert_matches_float64(x, target, dtype, **kw)
    y = _misaligned(shape, dtype, device).softmax(1).requires_grad_()
    _assert_matches_float64(x, y, dtype, label_smoothing=0.3, reduction="sum")


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,layout", [((4, 37, 33, 31), "contiguous"),
                                          ((4, 37, 33, 31), "channels_last"),
                                          ((2, 21, 5, 7), "contiguous"),
                                          ((1500, 50), "transposed"),
                                          ((8, 19, 300), "strided")])
def test_cuda_spatial_and_strided_inputs(device, dtype, shape, layout):
    """One thread per row where the rows, not the classes, are adjacent (NCHW maps, transposed
    logits); class-contiguous rows (channels_last); teams over strided classes (few rows, or
    gaps)."""
    x = make_layout(logits(shape, dtype, device), layout)
    target = index_target(shape, device)
    for kw in (dict(label_smoothing=0.1), dict(reduction="none",
                                               weight=torch.rand(shape[1], device=device,
                                                                 dtype=dtype) + 0.5)):
        _assert_matches_float64(x, target, dtype, **kw)
    y = make_layout(prob_target(shape, dtype, device), layout).requires_grad_()
    _assert_matches_float64(x, y, dtype)


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("shape", [(4099, 13), (3, 262144), (64, 5000), (4, 37, 33, 31)])
def test_cuda_bitwise_reproducible(device, shape):
    """Fixed-order reductions, no floating-point atomics: two runs agree bit for bit."""
    x = logits(shape, torch.float32, device)
    target = index_target(shape, device)
    y = prob_target(shape, torch.float32, device)
    w = torch.rand(shape[1], device=device) + 0.5

    def once():
        xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
        ws = w.clone().requires_grad_()
        a = DF.cross_entropy(xs, target, weight=w, label_smoothing=0.1)
        b = DF.cross_entropy(xs, ys, weight=ws, reduction="sum")
        _, lse, tw = ops.cross_entropy(x, target, w, 1, -100, 0.1)
        return [a, b, lse, tw, *torch.autograd.grad(a + b, [xs, ys, ws])]

    for u, v in zip(once(), once()):
        assert torch.equal(u, v)


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_cuda_out_of_range_target_raises_and_context_survives(device):
    for shape in [(5, 7), (5, 3000), (2, 70000), (2, 7, 40, 40)]:
        x = logits(shape, torch.float32, device).requires_grad_()
        for bad in (shape[1], -1):
            target = index_target(shape, device, ignored=0)
            target.view(-1)[-2] = bad
            for kw in (dict(), dict(reduction="none", label_smoothing=0.1)):
                with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
                    DF.cross_entropy(x, target, **kw)
    # The raw backward checks its own targets.
    x = logits((6, 9), torch.float32, device)
    t = index_target(x.shape, device)
    _, lse, tw = ops.cross_entropy(x, t, None, 1, -100, 0.0)
    t[3] = 9
    with pytest.raises(IndexError, match="Target 9 is out of bounds"):
        ops.cross_entropy_backward(torch.ones((), device=device), x, t, None, lse, tw, 1, -100,
                                   0.0, [True, False, False])
    # The context is still usable.
    torch.cuda.synchronize()
    t[3] = 2
    assert torch.isfinite(DF.cross_entropy(x, t)).item()
    # Unchecked: no error, nothing read out of bounds, NaN for the bad row.
    previous = dlext.cross_entropy_check_targets(False)
    try:
        t[3] = 1000
        loss = DF.cross_entropy(x, t, reduction="none")
        assert loss[3].isnan() and torch.isfinite(loss[torch.arange(6, device=device) != 3]).all()
        xr = x.clone().requires_grad_()
        DF.cross_entropy(xr, t).backward()
        assert xr.grad[3].isnan().all() and torch.isfinite(xr.grad[:3]).all()
    finally:
        dlext.cross_entropy_check_targets(previous)
    torch.cuda.synchronize()


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_cuda_device_mismatch_errors(device):
    x = torch.randn(4, 5, device=device)
    t = torch.randint(5, (4,), device=device)
    w = torch.rand(5, device=device)
    _, lse, tw = ops.cross_entropy(x, t, w, 1, -100, 0.0)
    mask = [True, False, False]
    cases = {
        "'target' is on cpu": lambda: ops.cross_entropy(x, t.cpu(), w, 1, -100, 0.0),
        "'weight' is on cpu": lambda: ops.cross_entropy(x, t, w.cpu(), 1, -100, 0.0),
        "'input' is on cpu and 'target' is on cuda": lambda: ops.cross_entropy(x.cpu(), t, None,
                                                                              1, -100, 0.0),
        "'grad_output' is on cpu": lambda: ops.cross_entropy_backward(
            torch.ones(()), x, t, w, lse, tw, 1, -100, 0.0, mask),
        "'lse' is on cpu": lambda: ops.cross_entropy_backward(
            torch.ones((), device=device), x, t, w, lse.cpu(), tw, 1, -100, 0.0, mask),
        "'total_weight' is on cpu": lambda: ops.cross_entropy_backward(
            torch.ones((), device=device), x, t, w, lse, tw.cpu(), 1, -100, 0.0, mask),
    }
    for message, call in cases.items():
        with pytest.raises(RuntimeError, match=message):
            call()
    with pytest.raises(RuntimeError, match="'target' is on cpu"):
        DF.cross_entropy(x, t.cpu())


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_cuda_side_stream_and_graph_capture(device):
    """Kernels run on the current stream: on a side stream, and captured into a CUDA graph (the
    target check, a host synchronisation, is skipped while capturing) whose replay recomputes."""
    x = logits((64, 1000), torch.float32, device).requires_grad_()
    t = index_target(x.shape, device)
    ref_loss = F.cross_entropy(x, t, label_smoothing=0.1)
    (ref_grad,) = torch.autograd.grad(ref_loss, x)

    def step():
        loss = DF.cross_entropy(x, t, label_smoothing=0.1)
        return loss, torch.autograd.grad(loss, x)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        loss, grad = step()  # warm-up before capture, as torch.cuda.graph asks
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_loss, g_grad = step()
    with torch.no_grad():
        x.mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    ref_loss = F.cross_entropy(x, t, label_smoothing=0.1)
    (ref_grad,) = torch.autograd.grad(ref_loss, x)
    torch.testing.assert_close(g_loss, ref_loss)
    torch.testing.assert_close(g_grad, ref_grad)


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_cuda_peak_memory_below_native(device):
    """Forward + backward keeps nothing N x C but the gradient: native keeps log_softmax too."""
    x = logits((2048, 32768), torch.float32, device).requires_grad_()  # 256 MiB
    t = index_target(x.shape, device)

    def extra_peak(fn):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        (grad,) = torch.autograd.grad(fn(x, t), x)
        del grad
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    ours, native = extra_peak(DF.cross_entropy), extra_peak(F.cross_entropy)
    n_c = x.numel() * x.element_size()
    assert ours <= 1.1 * n_c < native
