"""conv2d: dlext.functional.conv2d / dlext.nn.Conv2d / torch.ops.dlext.conv2d* against torch.

Values are compared with native torch computed in float64 from the same inputs, within a bound
derived from the rounding of each dtype: |ours - exact| <= eps_out * |exact| (the final rounding)
+ 8 * eps_acc * sum(|terms|) (the accumulation, eps of float for half/bfloat16), where sum(|terms|)
is the same convolution of absolute values. A wrong index or a missed term changes a result by
about one term, far beyond that bound at these sizes. On CUDA, float32 runs with TF32 off (exact
FMA kernels) unless a test turns it on, and the tensor-core sums of half/bfloat16 get a coarser
accumulation epsilon (see eps_acc_of).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import dlext
import dlext.functional as DF
import dlext.nn as DN
from conftest import CUDA_SKIP, DEVICES
from helpers import aten_ops_called, assert_no_native, make_layout

ops = torch.ops.dlext
# torch's own 'same' with an even kernel warns that it copies the input (dlext does not).
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

# Each case: input shape, weight shape and F.conv2d's keyword arguments. Sizes are odd and small;
# some are picked to drive particular code paths (named in the comments). NCHW problems whose
# output rows are shorter than 16 are computed in NHWC, so several cases are wide enough (>= 16
# output columns) to keep the NCHW patch code covered too.
CASES = {
    "3x3-pad1": dict(x=(2, 3, 13, 11), w=(5, 3, 3, 3), padding=1),
    "3x3-pad1-wide": dict(x=(2, 3, 7, 29), w=(5, 3, 3, 3), padding=1),
    "1x1": dict(x=(3, 8, 7, 9), w=(6, 8, 1, 1)),  # the input is its own patch matrix
    "1x1-stride2-nobias": dict(x=(2, 8, 7, 9), w=(6, 8, 1, 1), stride=2, bias=False),
    "5x5-valid-cin1": dict(x=(3, 1, 16, 15), w=(6, 1, 5, 5), padding="valid"),
    "7x7-s2-p3": dict(x=(2, 3, 23, 41), w=(8, 3, 7, 7), stride=2, padding=3),
    "3x5-s21-p02-d12": dict(x=(2, 4, 13, 37), w=(6, 4, 3, 5), stride=(2, 1), padding=(0, 2),
                            dilation=(1, 2)),
    "3x5-s13-p21-d21": dict(x=(2, 4, 11, 61), w=(6, 4, 3, 5), stride=(1, 3), padding=(2, 1),
                            dilation=(2, 1)),
    "same-even-4x2-d13": dict(x=(2, 4, 9, 23), w=(5, 4, 4, 2), padding="same", dilation=(1, 3)),
    "same-even-2x4": dict(x=(2, 3, 7, 9), w=(4, 3, 2, 4), padding="same"),
    "same-5x5-d2-nobias": dict(x=(1, 3, 13, 12), w=(4, 3, 5, 5), padding="same", dilation=2,
                               bias=False),
    "groups2": dict(x=(2, 6, 9, 11), w=(4, 3, 3, 3), padding=1, groups=2),
    "groups3-s2": dict(x=(3, 9, 11, 40), w=(6, 3, 3, 3), stride=2, groups=3),
    "groups3-short-rows": dict(x=(3, 9, 11, 10), w=(6, 3, 3, 3), stride=2, groups=3),
    "depthwise": dict(x=(2, 7, 11, 13), w=(7, 1, 3, 3), padding=1, groups=7),  # direct loops
    "depthwise-x2-s2-d2": dict(x=(2, 5, 13, 12), w=(10, 1, 3, 3), stride=2, padding=2,
                               dilation=2, groups=5),
    "cin1-3x2-s3": dict(x=(2, 1, 19, 53), w=(4, 1, 3, 2), stride=3, padding=(2, 1)),
    "cin1-cout2-d2": dict(x=(3, 1, 11, 9), w=(2, 1, 3, 3), stride=(1, 2), padding=(1, 0),
                          dilation=(2, 1)),  # direct loops
    "kernel-fills-input": dict(x=(3, 4, 5, 6), w=(7, 4, 5, 6)),
    "padding-beyond-kernel": dict(x=(2, 3, 5, 4), w=(4, 3, 2, 3), padding=(4, 3)),
    "many-small-images": dict(x=(13, 4, 5, 5), w=(6, 4, 3, 3), padding=1),  # images share a tile
    "many-small-1x1": dict(x=(11, 6, 3, 4), w=(5, 6, 1, 1)),
    "one-large-image": dict(x=(1, 16, 37, 41), w=(8, 16, 3, 3), padding=1),  # tiles split images
    "three-large-images": dict(x=(3, 16, 37, 41), w=(8, 16, 3, 3), stride=(1, 2), padding=1),
    "batch0": dict(x=(0, 4, 9, 9), w=(6, 4, 3, 3)),
    "unbatched": dict(x=(3, 10, 9), w=(4, 3, 3, 3), padding=1),
}
CONV_KEYS = ("stride", "padding", "dilation", "groups")
LAYOUTS = [("contiguous", "contiguous"), ("channels_last", "contiguous"),
           ("strided", "contiguous"), ("contiguous", "channels_last")]
LOW_PRECISION_CASES = ["3x3-pad1", "3x3-pad1-wide", "1x1", "5x5-valid-cin1", "groups2",
                       "depthwise", "same-even-4x2-d13", "many-small-images"]


def conv_kwargs(case):
    return {k: v for k, v in case.items() if k in CONV_KEYS}


def make_inputs(case, dtype, device, x_layout="contiguous", w_layout="contiguous"):
    x = torch.randn(case["x"], device=device).to(dtype)
    w = torch.randn(case["w"], device=device).to(dtype)
    if x.dim() == 4 or x_layout != "channels_last":
        x = make_layout(x, x_layout)
    w = make_layout(w, w_layout)
    b = torch.randn(case["w"][0], device=device).to(dtype) if case.get("bias", True) else None
    return x, w, b


def eps_of(dtype):
    return torch.finfo(dtype).eps


def eps_acc_of(dtype, device="cpu"):
    """Unit of the accumulation. CUDA tensor cores (float16/bfloat16) add exact products into
    float32 with truncation rather than rounding, once per 16-deep step, so their error grows
    with the number of steps; 2^-16 covers sums of thousands of terms while a wrong or missing
    term (about bound / terms) still exceeds 8 * 2^-16 * bound."""
    if torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return 2.0**-16
    return eps_of(torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.fixture(autouse=True)
def _exact_float32():
    """float32 on CUDA computes exactly (FMA), as with cuDNN, unless a test allows TF32 (the CPU
    kernels ignore the switch)."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = previous


def reference(x, w, b, grad_out, **kw):
    """Native float64 output and gradients, and the same with absolute values (error bounds)."""
    def run(fx, fw, fb, fg):
        leaves = [t.detach().double().requires_grad_() for t in (fx, fw)]
        bias = None if fb is None else fb.detach().double().requires_grad_()
        y = F.conv2d(leaves[0], leaves[1], bias, **kw)
        wrt = leaves + ([bias] if bias is not None else [])
        grads = torch.autograd.grad(y, wrt, fg.double(), allow_unused=True) if y.numel() else \
            [torch.zeros_like(t) for t in wrt]
        return [y.detach(), *grads]
    exact = run(x, w, b, grad_out)
    bound = run(x.abs(), w.abs(), None if b is None else b.abs(), grad_out.abs())
    return exact, bound


def assert_within_rounding(ours, exact, bound, dtype, what, eps_acc=None):
    assert ours.dtype == dtype, what
    assert ours.shape == exact.shape, what
    if ours.numel() == 0:
        return
    if eps_acc is None:
        eps_acc = eps_acc_of(dtype, ours.device)
    err = (ours.double() - exact).abs()
    tol = eps_of(dtype) * exact.abs() + 8 * eps_acc * bound + 1e-300
    worst = (err / tol).max().item()
    assert worst <= 1, f"{what}: error {err.max().item():.3e} is {worst:.1f}x the rounding bound"


def check_against_native(x, w, b, kw, dtype, eps_acc=None):
    """Forward and all gradients of DF.conv2d against native, plus output strides."""
    xa = x.detach().requires_grad_()
    wa = w.detach().requires_grad_()
    ba = None if b is None else b.detach().requires_grad_()
    out = DF.conv2d(xa, wa, ba, **kw)
    native = F.conv2d(x, w, b, **kw)
    assert out.shape == native.shape and out.dtype == native.dtype
    if out.numel() and out.dim() == 4:
        assert out.stride() == native.stride(), "output layout differs from torch's"
    grad_out = torch.randn(out.shape, device=x.device).to(dtype)
    (y_ex, *g_ex), (y_bd, *g_bd) = reference(x, w, b, grad_out, **kw)
    assert_within_rounding(out.detach(), y_ex, y_bd, dtype, "output", eps_acc)
    out.backward(grad_out)
    names = ["grad_input", "grad_weight", "grad_bias"]
    for name, ours, ex, bd in zip(names, [xa.grad, wa.grad, None if ba is None else ba.grad],
                                  g_ex, g_bd):
        assert ours is not None, name
        assert_within_rounding(ours, ex, bd, dtype, name, eps_acc)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("x_layout,w_layout", LAYOUTS, ids=["-".join(lay) for lay in LAYOUTS])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_native(device, dtype, x_layout, w_layout, name):
    case = CASES[name]
    if len(case["x"]) == 3 and x_layout == "channels_last":
        pytest.skip("channels_last needs a 4-D input")
    x, w, b = make_inputs(case, dtype, device, x_layout, w_layout)
    check_against_native(x, w, b, conv_kwargs(case), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", LOW_PRECISION_CASES)
def test_low_precision_matches_native(device, dtype, x_layout, name):
    """half and bfloat16 accumulate in float and round once, so they meet the bound exactly."""
    case = CASES[name]
    x, w, b = make_inputs(case, dtype, device, x_layout)
    check_against_native(x, w, b, conv_kwargs(case), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs_match_native(device):
    """Empty batch: empty output, zero weight and bias gradients. No input channels: torch
    returns no output channels (its 'empty' backend), and so does dlext."""
    for xs, ws in [((0, 4, 9, 9), (6, 4, 3, 3)), ((2, 0, 9, 9), (6, 0, 3, 3)),
                   ((0, 4, 9, 9), (6, 2, 3, 3))]:
        groups = xs[1] // ws[1] if ws[1] else 1
        x = torch.randn(xs, device=device, requires_grad=True)
        w = torch.randn(ws, device=device, requires_grad=True)
        b = torch.randn(ws[0], device=device, requires_grad=True)
        out = DF.conv2d(x, w, b, padding=1, groups=groups)
        ref = F.conv2d(x, w, b, padding=1, groups=groups)
        assert out.shape == ref.shape and out.stride() == ref.stride()
        out.sum().backward()
        assert x.grad.shape == x.shape
        assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["3x3-pad1", "1x1", "depthwise", "many-small-images"])
def test_grad_output_with_stride_zero(device, name):
    """.sum() hands backward an expanded grad_output whose strides are all 0."""
    case = CASES[name]
    x, w, b = make_inputs(case, torch.float64, device)
    ours = [t.clone().requires_grad_() for t in (x, w, b)]
    theirs = [t.clone().requires_grad_() for t in (x, w, b)]
    DF.conv2d(*ours, **conv_kwargs(case)).sum().backward()
    F.conv2d(*theirs, **conv_kwargs(case)).sum().backward()
    for a, r in zip(ours, theirs):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_weight_and_bias(device):
    x = torch.randn(2, 10, 11, 9, device=device, dtype=torch.float64)
    w = torch.randn(3, 7, 5, 6, device=device, dtype=torch.float64).permute(3, 2, 1, 0)[:, :, :3]
    b = torch.randn(12, device=device, dtype=torch.float64)[::2]
    assert not w.is_contiguous() and not b.is_contiguous()
    check_against_native(x, w, b, dict(padding=(1, 2), groups=2), torch.float64)


# Small enough for full (not fast-mode) gradcheck and gradgradcheck; every code path once.
GRADCHECK_CASES = {
    "3x2-s21-p(1,0,2,1)-d12-g2": dict(x=(2, 4, 5, 4), w=(4, 2, 3, 2), stride=(2, 1),
                                      padding=(1, 2), dilation=(1, 2), groups=2),
    "same-even-2x3": dict(x=(1, 3, 5, 4), w=(2, 3, 2, 3), padding="same", dilation=(2, 1)),
    "wide-rows-d12": dict(x=(1, 2, 3, 18), w=(2, 2, 2, 3), padding=1, dilation=(1, 2)),
    "1x1": dict(x=(2, 3, 3, 4), w=(2, 3, 1, 1)),
    "depthwise-x2-s2": dict(x=(2, 2, 5, 5), w=(4, 1, 3, 3), stride=2, padding=1, groups=2),
    "unbatched-nobias": dict(x=(2, 5, 4), w=(3, 2, 2, 2), padding=1, bias=False),
}


GRADCHECK_RUNS = ([(name, "contiguous") for name in GRADCHECK_CASES]
                  + [("3x2-s21-p(1,0,2,1)-d12-g2", "channels_last"), ("1x1", "channels_last")])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name,layout", GRADCHECK_RUNS,
                         ids=[f"{n}-{lay}" for n, lay in GRADCHECK_RUNS])
def test_gradcheck_and_gradgradcheck(device, seed, name, layout):
    torch.manual_seed(seed)
    case = GRADCHECK_CASES[name]
    x, w, b = make_inputs(case, torch.float64, device, layout)
    inputs = tuple(t.requires_grad_() for t in (x, w, b) if t is not None)
    kw = conv_kwargs(case)

    def fn(*args):
        return DF.conv2d(*args, **kw)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_raw_ops_are_differentiable(device):
    x = torch.randn(2, 4, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(4, 2, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    args = ([2, 1], [1, 0, 2, 1], [1, 2], 2)
    assert torch.autograd.gradgradcheck(lambda *t: ops.conv2d(*t, *args), (x, w, b))
    g = torch.randn_like(ops.conv2d(x, w, b, *args)).requires_grad_()

    def backward_op(g, x, w):
        return ops.conv2d_backward(g, x, w, *args, [True, True, True])
    assert torch.autograd.gradcheck(backward_op, (g, x, w))
    assert torch.autograd.gradgradcheck(backward_op, (g, x, w))


class RecordBackwardMasks(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is ops.conv2d_backward.default:
            self.masks.append(list(args[7]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_computes_only_what_is_needed(device):
    x0 = torch.randn(2, 4, 7, 7, device=device)
    w0 = torch.randn(5, 4, 3, 3, device=device)
    b0 = torch.randn(5, device=device)
    for needs in [(True, False, False), (False, True, False), (False, False, True),
                  (True, True, False), (False, True, True), (True, True, True)]:
        x, w, b = (t.clone().requires_grad_(n) for t, n in zip((x0, w0, b0), needs))
        with RecordBackwardMasks() as rec:
            DF.conv2d(x, w, b, padding=1).sum().backward()
        assert rec.masks == [list(needs)]
        assert [t.grad is not None for t in (x, w, b)] == list(needs)
    # Without a bias nothing asks for its gradient.
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    with RecordBackwardMasks() as rec:
        DF.conv2d(x, w).sum().backward()
    assert rec.masks == [[True, True, False]]
    # The raw op returns None for what the mask leaves out, and the rest unchanged.
    g = torch.randn(2, 5, 7, 7, device=device)
    full = ops.conv2d_backward(g, x0, w0, [1, 1], [1, 1, 1, 1], [1, 1], 1, [True, True, True])
    for mask in [[True, False, False], [False, True, False], [False, False, True],
                 [False, False, False]]:
        part = ops.conv2d_backward(g, x0, w0, [1, 1], [1, 1, 1, 1], [1, 1], 1, mask)
        for asked, p, f in zip(mask, part, full):
            assert (p is not None) == asked
            if asked:
                assert torch.equal(p, f)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["one-large-image", "three-large-images", "many-small-images",
                                  "depthwise"])
def test_deterministic(device, name):
    """Same inputs, same thread count: bit-identical results (no atomics, fixed-order sums)."""
    case = CASES[name]
    x, w, b = make_inputs(case, torch.float32, device)
    g = torch.randn_like(F.conv2d(x, w, b, **conv_kwargs(case)))
    first = [ops.conv2d(x, w, b, *raw_args(case, w)),
             *ops.conv2d_backward(g, x, w, *raw_args(case, w)[:4], [True, True, True])]
    again = [ops.conv2d(x, w, b, *raw_args(case, w)),
             *ops.conv2d_backward(g, x, w, *raw_args(case, w)[:4], [True, True, True])]
    assert all(torch.equal(a, c) for a, c in zip(first, again))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups,k_out", [(3, 3), (3, 6), (3, 12), (1, 4)],
                         ids=["depthwise", "multiplier-2", "multiplier-4", "dense"])
@pytest.mark.parametrize("padding,stride,dilation", [(1, 1, 1), ((2, 0), 1, 1), ("same", 1, 1),
                                                     (1, 2, 1), (2, 1, 2)])
def test_nonfinite_factors_on_padded_taps_give_nan(dtype, groups, k_out, padding, stride,
                                                   dilation):
    """Zero padding times an inf or NaN weight (forward) or output gradient (weight gradient) is
    NaN, as IEEE and torch's reference CPU convolution (slow_conv2d: float64, bfloat16) have it.
    dlext's direct path (depthwise, small multipliers) skips padded taps and marks those results
    NaN itself; its GEMM path multiplies the zeros. (torch's float32 CPU path is oneDNN, whose
    depthwise and dense kernels skip padding and give no NaN there; on CUDA torch's depthwise
    kernel skips it too: the reference here is float64 torch.)"""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    w = torch.randn(k_out, 3 // groups, 3, 4, dtype=torch.float64)
    w[0, 0, 0, 0] = float("inf")
    w[-1, 0, 2, 3] = float("nan")
    kw = dict(padding=padding, stride=stride, dilation=dilation, groups=groups)
    ref = F.conv2d(x, w, **kw)
    ours = DF.conv2d(x.to(dtype), w.to(dtype), **kw)
    assert ref.isnan().any()  # the case reaches padded taps
    assert torch.equal(ours.isnan(), ref.isnan())
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=3e-2, atol=0.3)
    torch.testing.assert_close(ours.double(), ref, equal_nan=True, **tol)
    g = torch.randn_like(ref)
    g[0, 0, 0, 1] = float("inf")
    g[1, -1, -1, -1] = float("-inf")
    g[1, 1 % k_out, ref.shape[2] // 2, 0] = float("nan")
    finite_w = w.nan_to_num(posinf=1.0)
    ref_dw = torch.autograd.grad(F.conv2d(x, finite_w.requires_grad_(), **kw), finite_w, g)[0]
    ours_dw = ops.conv2d_backward(g.to(dtype), x.to(dtype), finite_w.detach().to(dtype),
                                  *raw_args(kw, finite_w)[:4], [False, True, False])[1]
    assert torch.equal(ours_dw.isnan(), ref_dw.isnan())
    torch.testing.assert_close(ours_dw.double(), ref_dw, equal_nan=True, **tol)


def raw_args(case, w):
    """The raw op's (stride, padding [t, b, l, r], dilation, groups) for a case."""
    def pair(v):
        return list(v) if isinstance(v, tuple) else [v, v]
    stride, dilation = pair(case.get("stride", 1)), pair(case.get("dilation", 1))
    padding = case.get("padding", 0)
    if padding == "same":
        pads = []
        for k, d in zip(w.shape[2:], dilation):
            pads += [d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2]
    elif padding == "valid":
        pads = [0, 0, 0, 0]
    else:
        ph, pw = pair(padding)
        pads = [ph, ph, pw, pw]
    return stride, pads, dilation, case.get("groups", 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("threads", [1, 3])
def test_thread_count_does_not_change_results(device, threads):
    case = CASES["three-large-images"]
    x, w, b = make_inputs(case, torch.float64, device)
    kw = conv_kwargs(case)
    g = torch.randn_like(F.conv2d(x, w, b, **kw))
    args = raw_args(case, w)
    results = []
    previous = torch.get_num_threads()
    try:
        for n in (previous, threads):
            torch.set_num_threads(n)
            results.append([ops.conv2d(x, w, b, *args),
                            *ops.conv2d_backward(g, x, w, *args, [True, True, True])])
    finally:
        torch.set_num_threads(previous)
    for a, c in zip(*results):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


# Each code path once, and every layout combination on one of them.
OPCHECK_RUNS = ([(name, ("contiguous", "contiguous")) for name in
                 ["3x5-s21-p02-d12", "same-even-4x2-d13", "depthwise", "1x1", "batch0",
                  "many-small-images"]]
                + [("groups2", lay) for lay in LAYOUTS])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,layouts", OPCHECK_RUNS,
                         ids=[f"{n}-{'-'.join(lay)}" for n, lay in OPCHECK_RUNS])
def test_opcheck(device, name, layouts):
    case = CASES[name]
    x, w, b = make_inputs(case, torch.float32, device, *layouts)
    args = raw_args(case, w)
    torch.library.opcheck(ops.conv2d.default, (x, w, b, *args))
    torch.library.opcheck(ops.conv2d.default, (x.requires_grad_(), w.requires_grad_(), None, *args))
    x, w = x.detach(), w.detach()
    g = torch.randn_like(ops.conv2d(x, w, b, *args))
    for mask in ([True, True, True], [True, False, True], [False, True, False]):
        torch.library.opcheck(ops.conv2d_backward.default, (g, x, w, *args, mask))
    torch.library.opcheck(ops.conv2d_backward.default,
                          (g.requires_grad_(), x.requires_grad_(), w.requires_grad_(), *args,
                           [True, True, True]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding", [1, "same", "valid"])
def test_compile_fullgraph(device, padding):
    def f(x, w, b, x3):
        y = DF.conv2d(x * 1.5, w, b, padding=padding, groups=2)
        z = DF.conv2d(x3, w, None, padding=padding, groups=2)  # unbatched
        return y.square().sum() + z.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    tensors = [torch.randn(2, 4, 9, 8, device=device, dtype=torch.float64),
               torch.randn(6, 2, 3, 2, device=device, dtype=torch.float64),
               torch.randn(6, device=device, dtype=torch.float64),
               torch.randn(4, 7, 7, device=device, dtype=torch.float64)]
    a = [t.clone().requires_grad_() for t in tensors]
    e = [t.clone().requires_grad_() for t in tensors]
    out_c, out_e = compiled(*a), f(*e)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    for ta, te in zip(a, e):
        torch.testing.assert_close(ta.grad, te.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_module(device):
    model = torch.nn.Sequential(DN.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"),
                                torch.nn.ReLU(), DN.Conv2d(8, 4, 1, stride=2)).to(device)
    x = torch.randn(2, 3, 11, 10, device=device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# (call, expected error, message, does torch raise as well?)
def _x(*shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype)


X, W = _x(2, 4, 9, 9), _x(6, 4, 3, 3)
ERROR_CASES = [
    (lambda f: f(_x(1, 2, 4, 9, 9), W), RuntimeError,
     r"Expected 3D \(unbatched\) or 4D \(batched\) input to conv2d, but got input of size: "
     r"\[1, 2, 4, 9, 9\]", True),
    (lambda f: f(_x(4, 9), W), RuntimeError, r"Expected 3D \(unbatched\) or 4D \(batched\)", True),
    (lambda f: f(X, _x(6, 4, 3)), RuntimeError, r"expected 'weight' to be 4-D", True),
    (lambda f: f(X, _x(6, 4, 3, 3, 1)), RuntimeError, r"expected 'weight' to be 4-D", True),
    (lambda f: f(X, _x(6, 3, 3, 3)), RuntimeError,
     r"Given groups=1, weight of size \[6, 3, 3, 3\], expected input\[2, 4, 9, 9\] to have 3 "
     r"channels, but got 4 channels instead", True),
    (lambda f: f(_x(3, 9, 9), W), RuntimeError,
     r"expected input\[1, 3, 9, 9\] to have 4 channels, but got 3", True),
    (lambda f: f(_x(2, 5, 9, 9), _x(4, 2, 3, 3), groups=2), RuntimeError,
     r"expected input\[2, 5, 9, 9\] to have 4 channels", True),
    (lambda f: f(X, W, groups=0), RuntimeError, r"non-positive groups is not supported", True),
    (lambda f: f(X, W, groups=-1), RuntimeError, r"non-positive groups is not supported", True),
    (lambda f: f(_x(2, 6, 9, 9), _x(4, 2, 3, 3), groups=3), RuntimeError,
     r"Given groups=3, expected weight to be divisible by 3 at dimension 0", True),
    (lambda f: f(_x(2, 8, 9, 9), _x(2, 1, 3, 3), groups=8), RuntimeError,
     r"Given groups=8, expected weight to be at least 8 at dimension 0", True),
    (lambda f: f(X, _x(0, 4, 3, 3)), RuntimeError, r"expected weight to be at least 1", True),
    (lambda f: f(X, W, stride=0), RuntimeError, r"non-positive stride is not supported", True),
    (lambda f: f(X, W, stride=(1, -1)), RuntimeError, r"non-positive stride is not supported",
     True),
    (lambda f: f(X, W, padding=-1), RuntimeError, r"negative padding is not supported", True),
    (lambda f: f(X, W, padding=2**62), RuntimeError, r"padding=.* is too large", True),
    (lambda f: f(X, W, dilation=0), RuntimeError, r"non-positive dilation is not supported", True),
    (lambda f: f(X, W, dilation=(1, -1)), RuntimeError, r"non-positive dilation", True),
    (lambda f: f(X, _x(6, 4, 11, 3)), RuntimeError,
     r"Calculated padded input size per channel: \(9 x 9\)\. Kernel size: \(11 x 3\)\. Kernel "
     r"size can't be greater than actual input size", True),
    (lambda f: f(X, W, dilation=5), RuntimeError, r"Kernel size: \(11 x 11\)", True),
    (lambda f: f(X, _x(6, 4, 10, 3), padding="valid"), RuntimeError,
     r"Kernel size can't be greater", True),
    (lambda f: f(X, _x(6, 4, 0, 3)), RuntimeError, r"expected 'weight' to have a positive kernel",
     True),
    (lambda f: f(_x(2, 4, 0, 9), W, padding=2), RuntimeError,
     r"Only zero batch or zero channel inputs are supported, but got input shape: \[2, 4, 0, 9\]",
     True),
    (lambda f: f(X, W, _x(6, 1)), RuntimeError,
     r"Given weight of size \[6, 4, 3, 3\], expected bias to be 1-dimensional with 6 elements, "
     r"but got bias of size \[6, 1\] instead", True),
    (lambda f: f(X, W, _x(5)), RuntimeError, r"but got bias of size \[5\]", True),
    (lambda f: f(X, W.double()), RuntimeError,
     r"expected 'weight' to have the same dtype as 'input' \(Float\), but got Double", True),
    (lambda f: f(X.double(), W), RuntimeError, r"expected 'weight' to have the same dtype", True),
    (lambda f: f(X, W, _x(6, dtype=torch.float64)), RuntimeError,
     r"expected 'bias' to have the same dtype as 'input'", True),
    (lambda f: f(X, W, padding="same", stride=2), RuntimeError,
     r"padding='same' is not supported for strided convolutions", True),
    (lambda f: f(X, W, padding="same", stride=(1, 2)), RuntimeError,
     r"padding='same' is not supported for strided convolutions", True),
    (lambda f: f(X, W, padding="foo"), RuntimeError, r"Invalid padding string: 'foo'", True),
    (lambda f: f(X, W, stride=(1, 1, 1)), RuntimeError,
     r"expected stride to be a single integer value or a list of 2 values to match the "
     r"convolution dimensions, but got stride=\[1, 1, 1\]", True),
    (lambda f: f(X, W, stride=()), RuntimeError, r"but got stride=\[\]", True),
    (lambda f: f(X, W, padding=(1, 1, 1, 1)), RuntimeError,
     r"expected padding to be a single integer value or a list of 2 values", True),
    (lambda f: f(X, W, dilation=[1, 1, 1]), RuntimeError,
     r"expected dilation to be a single integer value or a list of 2 values", True),
    (lambda f: f(X, W, stride=1.5), TypeError, r"argument 'stride' must be an int or a tuple",
     True),
    (lambda f: f(X, W, padding=(1.0, 1)), TypeError, r"argument 'padding' must be an int", True),
    (lambda f: f(X, W, stride=True), TypeError, r"argument 'stride' must be an int", True),
    (lambda f: f(X, W, groups=1.0), TypeError, r"argument 'groups' must be int", True),
    (lambda f: f([1.0], W), TypeError, r"argument 'input' must be Tensor, not list", True),
    (lambda f: f(X, None), TypeError, r"argument 'weight' must be Tensor, not NoneType", True),
    (lambda f: f(X, W, 1.0), TypeError, r"argument 'bias' must be Tensor or None, not float", True),
    # torch computes integer and complex convolutions on the CPU; dlext refuses them clearly.
    (lambda f: f(X.long(), W.long()), RuntimeError,
     r"expected 'input' to be a floating-point tensor \(float32, float64, float16 or bfloat16\), "
     r"but got Long", False),
    (lambda f: f(X.cfloat(), W.cfloat()), RuntimeError, r"floating-point tensor .* ComplexFloat",
     False),
    (lambda f: f(X.bool(), W.bool()), RuntimeError, r"floating-point tensor .* Bool", True),
]


@pytest.mark.parametrize("call,error,match,torch_raises", ERROR_CASES,
                         ids=[f"case{i}" for i in range(len(ERROR_CASES))])
def test_errors(call, error, match, torch_raises):
    with pytest.raises(error, match=match):
        call(DF.conv2d)
    if torch_raises:  # torch rejects the same call (in its own words)
        with pytest.raises((RuntimeError, TypeError, NotImplementedError)):
            call(F.conv2d)


@pytest.mark.parametrize("device", DEVICES)
def test_raw_op_errors(device):
    x, w = torch.randn(2, 4, 9, 9, device=device), torch.randn(6, 4, 3, 3, device=device)
    with pytest.raises(RuntimeError, match=r"dlext::conv2d: expected 'input' to be 4-D"):
        ops.conv2d(x[0], w, None, [1, 1], [0, 0, 0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match=r"expected 'padding' to have 4 values"):
        ops.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match=r"expected 'stride' to have 2 values"):
        ops.conv2d(x, w, None, [1, 1, 1], [0, 0, 0, 0], [1, 1], 1)
    g = torch.randn(2, 6, 7, 7, device=device)
    with pytest.raises(RuntimeError, match=r"dlext::conv2d_backward: expected 'grad_output' to "
                                           r"have the shape of the convolution's output "
                                           r"\[2, 6, 7, 7\], but got \[2, 6, 7, 6\]"):
        ops.conv2d_backward(g[..., :6], x, w, [1, 1], [0, 0, 0, 0], [1, 1], 1, [True] * 3)
    with pytest.raises(RuntimeError, match=r"expected 'grad_output' to have the same dtype"):
        ops.conv2d_backward(g.double(), x, w, [1, 1], [0, 0, 0, 0], [1, 1], 1, [True] * 3)
    with pytest.raises(RuntimeError, match=r"dlext::conv2d_backward: non-positive stride"):
        ops.conv2d_backward(g, x, w, [0, 1], [0, 0, 0, 0], [1, 1], 1, [True] * 3)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [2, (1, 3), "same", "valid"])
def test_module_is_a_drop_in(padding_mode, padding):
    kwargs = dict(kernel_size=(3, 4), padding=padding, dilation=(2, 1), groups=2,
                  padding_mode=padding_mode, dtype=torch.float64)
    theirs = torch.nn.Conv2d(4, 6, **kwargs)
    ours = DN.Conv2d(4, 6, **kwargs)
    assert isinstance(ours, torch.nn.Conv2d)
    assert repr(ours) == repr(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 4, 11, 10, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)
    for pa, pb in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-12, atol=1e-12)


def test_module_without_bias_and_unbatched():
    ours, theirs = DN.Conv2d(3, 5, 3, stride=2, bias=False), torch.nn.Conv2d(3, 5, 3, stride=2,
                                                                            bias=False)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 12, 9)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_dlext_kernels_only(device):
    forbidden = {"aten::conv2d", "aten::convolution", "aten::_convolution",
                 "aten::convolution_backward", "aten::convolution_overrideable",
                 "aten::_convolution_double_backward", "aten::mkldnn_convolution",
                 "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward", "aten::thnn_conv2d",
                 "aten::slow_conv_dilated2d", "aten::_conv_depthwise2d", "aten::im2col",
                 "aten::col2im", "aten::unfold", "aten::_nnpack_spatial_convolution",
                 "aten::conv_depthwise3d", "aten::cudnn_convolution"}
    if device == "cuda":  # no cuDNN / MIOpen, and no cuBLAS either
        forbidden |= {"aten::cudnn_convolution_transpose", "aten::cudnn_convolution_relu",
                      "aten::cudnn_convolution_add_relu", "aten::miopen_convolution",
                      "aten::miopen_depthwise_convolution", "aten::mm", "aten::addmm",
                      "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::_convolution_mode"}
    runs = [((2, 8, 9, 9), (6, 8, 3, 3), {}, torch.float32, "contiguous"),
            ((2, 8, 9, 9), (6, 8, 3, 3), dict(padding="same"), torch.float32, "channels_last"),
            ((3, 8, 5, 5), (6, 8, 1, 1), {}, torch.float32, "channels_last"),
            ((3, 8, 5, 5), (6, 8, 1, 1), {}, torch.float64, "contiguous"),
            ((2, 6, 9, 9), (6, 1, 3, 3), dict(groups=6, stride=2), torch.float32, "contiguous"),
            ((2, 4, 9, 9), (6, 2, 3, 3), dict(groups=2), torch.bfloat16, "channels_last"),
            ((2, 16, 9, 9), (16, 16, 3, 3), dict(padding=1), torch.bfloat16, "channels_last"),
            ((2, 3, 9, 9), (8, 3, 3, 3), dict(stride=2), torch.float16, "contiguous")]
    for xs, ws, kw, dtype, layout in runs:
        x = make_layout(torch.randn(xs, device=device).to(dtype), layout).requires_grad_()
        w = torch.randn(ws, device=device).to(dtype).requires_grad_()
        b = torch.randn(ws[0], device=device).to(dtype).requires_grad_()

        def fwd_bwd_double():
            y = DF.conv2d(x, w, b, **kw)
            grads = torch.autograd.grad(y.square().sum(), (x, w, b), create_graph=True)
            sum(g.sum() for g in grads).backward()

        _, names = aten_ops_called(fwd_bwd_double)
        assert {"dlext::conv2d", "dlext::conv2d_backward"} <= names
        assert_no_native(names, forbidden, "dlext conv2d")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 3), groups=st.integers(1, 3), cg=st.integers(1, 3), kg=st.integers(1, 3),
       h=st.integers(1, 12), w=st.integers(1, 40), r=st.integers(1, 5), s=st.integers(1, 5),
       stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       dilation=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       padding=st.one_of(st.tuples(st.integers(0, 3), st.integers(0, 3)),
                         st.sampled_from(["same", "valid"])),
       bias=st.booleans(), layout=st.sampled_from(["contiguous", "channels_last", "strided"]),
       seed=st.integers(0, 2**16))
def test_hypothesis_matches_native(n, groups, cg, kg, h, w, r, s, stride, dilation, padding, bias,
                                   layout, seed):
    """Random parameter combinations: dlext raises exactly where torch does, else agrees."""
    torch.manual_seed(seed)
    if padding == "same":
        stride = (1, 1)
    x = make_layout(torch.randn(n, groups * cg, h, w, dtype=torch.float64), layout)
    wt = torch.randn(groups * kg, cg, r, s, dtype=torch.float64)
    b = torch.randn(groups * kg, dtype=torch.float64) if bias else None
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    try:
        F.conv2d(x, wt, b, **kw)
    except RuntimeError:
        with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
            DF.conv2d(x, wt, b, **kw)
        return
    check_against_native(x, wt, b, kw, torch.float64)


@pytest.mark.bigmem
def test_input_offsets_past_2_pow_31():
    """64-bit indexing: reads past element 2^31 of the input. Only the sampled pixels of the huge
    input are ever written or read, so its pages stay mostly untouched (little real memory)."""
    stride = 1024
    for channels, groups in [(1, 1), (2, 1)]:  # direct loops; GEMM with im2col
        try:
            x = torch.empty(1, channels, 2**16 + 3, 2**15 + 5)
        except RuntimeError:
            pytest.skip("cannot reserve a 2^31-element tensor")
        assert x[0, 0].numel() > 2**31
        sampled = x[:, :, ::stride, ::stride]
        sampled.copy_(torch.randn(sampled.shape))
        w = torch.randn(3, channels // groups, 1, 1)
        out = DF.conv2d(x, w, stride=stride, groups=groups)
        torch.testing.assert_close(out, F.conv2d(sampled, w), rtol=1e-5, atol=1e-5)
        dw = ops.conv2d_backward(torch.ones_like(out), x, w, [stride] * 2, [0] * 4, [1, 1], groups,
                                 [False, True, False])[1]
        torch.testing.assert_close(dw, sampled.sum((0, 2, 3)).view(1, -1, 1, 1).expand_as(w),
                                   rtol=1e-4, atol=1e-4)
        del x, sampled


# ---------------------------------------------------------------------------------- CUDA kernels
#
# Shapes that drive the edges of the CUDA kernels (csrc/conv2d/conv2d_cuda.cu): output channels
# around the 64 / 128 tiles, 1 or 3 input channels (element-wise gathers), pixel counts that are
# not a multiple of a tile, 1x1 and 7x7 s2, dilation, stride with backward-data's divisibility
# rule, groups, depthwise and Cin = 1 (direct kernels), and a backward-weight long enough to be
# split (split-K). Each in float32 (exact), float64, bfloat16 and float16, NCHW and channels_last.
CUDA_CASES = {
    "cout1": dict(x=(2, 16, 9, 11), w=(1, 16, 3, 3), padding=1),
    "cin3-cout3": dict(x=(3, 3, 17, 19), w=(3, 3, 3, 3), padding=1),
    "cout65": dict(x=(2, 16, 13, 15), w=(65, 16, 3, 3), padding=1),
    "cout129-1x1": dict(x=(2, 32, 15, 17), w=(129, 32, 1, 1)),
    "cin1-cout16-5x5": dict(x=(4, 1, 28, 28), w=(16, 1, 5, 5)),
    "lenet-conv1-direct": dict(x=(8, 1, 32, 32), w=(6, 1, 5, 5)),
    "7x7-s2-cin3": dict(x=(2, 3, 45, 47), w=(64, 3, 7, 7), stride=2, padding=3),
    "3x3-64ch-odd-pixels": dict(x=(3, 64, 29, 31), w=(64, 64, 3, 3), padding=1),
    "3x3-s2-d2": dict(x=(2, 32, 21, 23), w=(48, 32, 3, 3), stride=2, padding=2, dilation=2),
    "3x2-s32-d23": dict(x=(2, 16, 25, 26), w=(24, 16, 3, 2), stride=(3, 2), padding=(2, 1),
                        dilation=(2, 3)),
    "groups4-16ch": dict(x=(2, 64, 13, 13), w=(64, 16, 3, 3), padding=1, groups=4),
    "groups3-4ch": dict(x=(2, 12, 11, 9), w=(18, 4, 3, 3), groups=3),
    "depthwise-x2-s2": dict(x=(2, 32, 14, 14), w=(64, 1, 3, 3), stride=2, padding=1, groups=32),
    "same-even-4x4": dict(x=(2, 16, 12, 13), w=(16, 16, 4, 4), padding="same"),
    "splitk-wgrad": dict(x=(8, 16, 32, 32), w=(32, 16, 3, 3), padding=1, bias=False),
}
CUDA_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.cuda
@CUDA_SKIP
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", list(CUDA_CASES))
def test_cuda_tile_edges_match_native(dtype, layout, name):
    case = CUDA_CASES[name]
    x, w, b = make_inputs(case, dtype, "cuda", layout)
    check_against_native(x, w, b, conv_kwargs(case), dtype)


@pytest.mark.cuda
@CUDA_SKIP
@pytest.mark.parametrize("name", ["3x3-64ch-odd-pixels", "cout129-1x1", "splitk-wgrad",
                                  "7x7-s2-cin3"])
def test_cuda_tf32_follows_torch_switch(name):
    """torch.backends.cudnn.allow_tf32 (torch's default True for convolutions) selects TF32
    tensor cores for float32: operands rounded to 10 mantissa bits (eps 2^-10), accumulated in
    float32. With it False the result is float32-exact; with it True visibly coarser."""
    case = CUDA_CASES[name]
    x, w, b = make_inputs(case, torch.float32, "cuda", "channels_last")
    kw = conv_kwargs(case)
    torch.backends.cudnn.allow_tf32 = True
    check_against_native(x, w, b, kw, torch.float32, eps_acc=2.0**-10)
    tf32 = DF.conv2d(x, w, b, **kw)
    torch.backends.cudnn.allow_tf32 = False
    exact = DF.conv2d(x, w, b, **kw)
    reference = F.conv2d(x.double(), w.double(), None if b is None else b.double(), **kw)
    tf32_err = (tf32.double() - reference).abs().max().item()
    exact_err = (exact.double() - reference).abs().max().item()
    assert tf32_err > 4 * exact_err, (tf32_err, exact_err)


@pytest.mark.cuda
@CUDA_SKIP
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_cuda_gradients_are_deterministic(dtype):
    """Split-K weight gradients, bias sums and everything else: bit-identical across runs."""
    torch.backends.cudnn.allow_tf32 = True
    cl = torch.channels_last
    x = torch.randn(16, 32, 28, 28, device="cuda", dtype=dtype).contiguous(memory_format=cl)
    w = torch.randn(48, 32, 3, 3, device="cuda", dtype=dtype)
    g = torch.randn(16, 48, 28, 28, device="cuda", dtype=dtype).contiguous(memory_format=cl)
    args = ([1, 1], [1, 1, 1, 1], [1, 1], 1, [True, True, True])
    first = ops.conv2d_backward(g, x, w, *args)
    for _ in range(3):
        again = ops.conv2d_backward(g, x, w, *args)
        assert all(torch.equal(a, c) for a, c in zip(first, again))


@pytest.mark.cuda
@CUDA_SKIP
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 3), groups=st.integers(1, 3), cg=st.sampled_from([1, 2, 3, 4, 8, 16]),
       kg=st.sampled_from([1, 3, 8, 9, 16, 24]), h=st.integers(1, 12), w=st.integers(1, 20),
       r=st.integers(1, 4), s=st.integers(1, 4),
       stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       dilation=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       padding=st.tuples(st.integers(0, 3), st.integers(0, 3)), bias=st.booleans(),
       layout=st.sampled_from(["contiguous", "channels_last", "strided"]),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_cuda_hypothesis_matches_native(n, groups, cg, kg, h, w, r, s, stride, dilation, padding,
                                        bias, layout, dtype, seed):
    """Random parameters over the CUDA paths: vector and element-wise gathers, every tile."""
    torch.manual_seed(seed)
    x = make_layout(torch.randn(n, groups * cg, h, w, device="cuda").to(dtype), layout)
    wt = torch.randn(groups * kg, cg, r, s, device="cuda").to(dtype)
    b = torch.randn(groups * kg, device="cuda").to(dtype) if bias else None
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if any((size + 2 * p - d * (k - 1) - 1) < 0
           for size, p, d, k in zip((h, w), padding, dilation, (r, s))):
        with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
            DF.conv2d(x, wt, b, **kw)
        return
    check_against_native(x, wt, b, kw, dtype)


@pytest.mark.cuda
@pytest.mark.bigmem
@CUDA_SKIP
def test_cuda_input_offsets_past_2_pow_31():
    """64-bit offsets in the CUDA gathers: a channels_last input of more than 2^31 elements of
    which only sampled pixels are ever read (1x1 kernel, stride 1024)."""
    stride = 1024
    try:
        x = torch.empty(1, 8, 2**14 + 3, 2**14 + 5, device="cuda",
                        memory_format=torch.channels_last)
    except RuntimeError:
        pytest.skip("cannot allocate a 2^31-element tensor")
    assert x.numel() > 2**31
    sampled = x[:, :, ::stride, ::stride]
    sampled.copy_(torch.randn(sampled.shape, device="cuda"))
    w = torch.randn(3, 8, 1, 1, device="cuda")
    out = DF.conv2d(x, w, stride=stride)
    torch.testing.assert_close(out, F.conv2d(sampled.contiguous(), w), rtol=1e-5, atol=1e-5)
    dw = ops.conv2d_backward(torch.ones_like(out), x, w, [stride] * 2, [0] * 4, [1, 1], 1,
                             [False, True, False])[1]
    torch.testing.assert_close(dw, sampled.sum((0, 2, 3)).view(1, -1, 1, 1).expand_as(w),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.bigmem
@CUDA_SKIP
def test_cuda_bias_gradient_past_65535_chunks():
    """The bias gradient's first pass over a channels_last dy has one grid row per chunk of
    pixels; with more than 65535 * 512 output pixels the chunks grow instead of the call being
    refused. (The NCHW pass chunks images: its limit needs planes of 16385+ pixels in a batch of
    65536+, past any memory here.)"""
    layout = "channels_last"
    n, k, h, w = 70000, 2, 1, 512  # 35.8M pixels of 2 channels: 287 MB of float32
    dy = make_layout(torch.randn(n, k, h, w, device="cuda"), layout)
    x = make_layout(torch.empty(n, 1, h, w, device="cuda"), layout)
    weight = torch.randn(k, 1, 1, 1, device="cuda")
    db = ops.conv2d_backward(dy, x, weight, [1, 1], [0] * 4, [1, 1], 1, [False, False, True])[2]
    torch.testing.assert_close(db, dy.double().sum((0, 2, 3)).float(), rtol=1e-4, atol=1e-2)
