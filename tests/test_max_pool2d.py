"""max_pool2d: dlext.functional / dlext.nn.MaxPool2d / torch.ops.dlext.max_pool2d* against torch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dlext
import dlext.functional as DF
import dlext.nn as DN
from conftest import DEVICES
from helpers import aten_ops_called, assert_no_native, assert_raises_like_torch, make_layout

# (input shape, kernel_size, stride, padding, dilation, ceil_mode)
CONFIGS = [
    ((2, 3, 9, 11), 3, 2, 1, 1, False),
    ((2, 3, 9, 11), 3, 2, 1, 1, True),
    ((1, 4, 13, 13), 2, None, 0, 1, False),
    ((3, 2, 16, 15), (3, 2), (2, 1), (1, 0), (1, 2), True),
    ((2, 5, 17, 7), (5, 3), 1, (2, 1), 2, False),
    ((1, 1, 10, 10), 1, 1, 0, 1, False),
    ((2, 3, 8, 8), 4, 3, 2, 1, True),
    ((4, 7, 12, 14), (2, 3), (2, 3), 0, 1, True),
    ((3, 9, 11), 3, 2, 1, 1, False),          # unbatched
    ((0, 3, 9, 9), 3, 2, 1, 1, False),        # empty batch
    ((2, 16, 28, 28), 2, 2, 0, 1, False),     # LeNet-like
    ((1, 64, 112, 112), 3, 2, 1, 1, False),   # ResNet stem
]
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INT_DTYPES = [torch.uint8, torch.int8, torch.int32, torch.int64]
LAYOUTS = ["contiguous", "channels_last", "strided", "transposed"]


def random_input(shape, dtype, device):
    if dtype.is_floating_point:
        return torch.randn(shape, device=device).to(dtype)
    lo = 0 if dtype == torch.uint8 else -50
    return torch.randint(lo, 50, shape, device=device, dtype=dtype)  # ties are common


def layout_ok(shape, layout):
    return layout != "channels_last" or len(shape) == 4


def call(fn, x, cfg, **kw):
    _, k, s, p, d, c = cfg
    return fn(x, k, s, p, d, ceil_mode=c, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + INT_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_forward_matches_native(device, dtype, layout, cfg):
    if not layout_ok(cfg[0], layout):
        pytest.skip("channels_last is 4-D only")
    x = make_layout(random_input(cfg[0], dtype, device), layout)
    out, idx = call(DF.max_pool2d, x, cfg, return_indices=True)
    # torch's channels_last kernel cannot index with 8-bit integer types (it raises); the values
    # and indices do not depend on the layout, so the contiguous input is the reference there.
    ref_x = x.contiguous() if layout == "channels_last" and dtype in INT_DTYPES else x
    ref, ref_idx = call(F.max_pool2d, ref_x, cfg, return_indices=True)
    assert out.dtype == ref.dtype and idx.dtype == torch.int64
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(idx, ref_idx, rtol=0, atol=0)
    if layout == "channels_last" and x.numel():
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_backward_matches_native(device, dtype, layout, cfg):
    if not layout_ok(cfg[0], layout):
        pytest.skip("channels_last is 4-D only")
    x = make_layout(random_input(cfg[0], dtype, device), layout)
    xa, xb = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    out = call(DF.max_pool2d, xa, cfg)
    grad = torch.randn(out.shape, device=device).to(dtype)
    out.backward(grad)
    call(F.max_pool2d, xb, cfg).backward(grad)
    # Overlapping windows sum several gradients into one element; 16-bit results may round apart.
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 0)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_propagates_last_nan_index_and_ties_take_the_first(device):
    x = torch.tensor([[[[1.0, float("nan"), 3.0, float("nan"), 2.0, 2.0, 1.0, 2.0]]]],
                     device=device)
    for layout in ("contiguous", "channels_last"):
        xx = make_layout(x, layout)
        out, idx = DF.max_pool2d(xx, (1, 4), return_indices=True)
        ref, ref_idx = F.max_pool2d(xx, (1, 4), return_indices=True)
        torch.testing.assert_close(out, ref, equal_nan=True)
        assert idx.tolist() == ref_idx.tolist() == [[[[3, 4]]]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [6, 19, 43, 72])
def test_channels_last_nan_and_ties_in_every_channel_block(device, dtype, channels):
    """Channels_last scans channels in blocks of 4, 2 and 1 vectors plus a partial tail; NaNs and
    ties in every block must follow torch (last NaN's index, first maximum's index)."""
    torch.manual_seed(channels)
    x = torch.randint(-3, 4, (3, channels, 7, 9), device=device).to(dtype)  # many ties
    x[torch.rand(x.shape, device=device) < 0.05] = float("nan")
    x = x.contiguous(memory_format=torch.channels_last)
    x[-1, :, -1, -1] = float("nan")  # the last pixel: its tail is read without over-reading
    for args in [(3, 2, 1), (2, 2, 0), ((1, 4), (1, 3), 0)]:
        out, idx = DF.max_pool2d(x, *args, return_indices=True)
        ref, ref_idx = F.max_pool2d(x, *args, return_indices=True)
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(idx, ref_idx)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels", [2, 8, 70])
def test_all_minus_infinity_window(device, layout, dtype, channels):
    """An all -inf window takes its first tap's index, as torch's, and passes the gradient there."""
    x = torch.full((1, channels, 4, 4), float("-inf"), device=device, dtype=dtype)
    x[:, :, 2:, 2:] = torch.randn(1, channels, 2, 2, device=device, dtype=dtype)
    x = make_layout(x, layout).requires_grad_()
    out, idx = DF.max_pool2d(x, 2, return_indices=True)
    ref, ref_idx = F.max_pool2d(x, 2, return_indices=True)
    assert torch.equal(out, ref) and torch.equal(idx, ref_idx)
    grad, ref_grad = (torch.autograd.grad(o.sum(), x)[0] for o in (out, ref))
    assert torch.equal(grad, ref_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_window_without_input_elements(device, layout):
    """kernel 2, padding 1, dilation 5 on 4x4: the only window's taps (-1, 4) miss the input.

    torch returns -inf with index 20 (outside the 16-element plane, which its backward would
    write through); dlext returns -inf with index -1 and a zero gradient.
    """
    x = make_layout(torch.randn(1, 2, 4, 4, device=device), layout).requires_grad_()
    out, idx = DF.max_pool2d(x, 2, 1, 1, 5, return_indices=True)
    assert out.shape == (1, 2, 1, 1) and torch.isneginf(out).all()
    assert (idx == -1).all()
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("cfg", [c for c in CONFIGS if 0 < torch.Size(c[0]).numel() < 3000],
                         ids=lambda c: "-".join(map(str, c)))
def test_gradcheck_and_gradgradcheck(device, seed, cfg):
    torch.manual_seed(seed)
    # Distinct values (a permutation) so the argmax is stable under gradcheck's perturbations.
    n = torch.Size(cfg[0]).numel()
    x = (torch.randperm(n, device=device).double() / n).view(cfg[0]).requires_grad_()
    f = lambda t: call(DF.max_pool2d, t, cfg)  # noqa: E731
    # Past a few hundred elements the full Jacobians cost minutes; torch's fast mode checks
    # random projections of them instead (the same failures, with high probability).
    fast = n > 200
    assert torch.autograd.gradcheck(f, (x,), fast_mode=fast)
    assert torch.autograd.gradgradcheck(f, (x,), fast_mode=fast)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic_across_runs_and_thread_counts(device):
    x = torch.randn(4, 8, 33, 33, device=device, requires_grad=True)
    out = DF.max_pool2d(x, 3, 1, 1)            # heavily overlapping windows
    grad = torch.randn_like(out)
    results = []
    threads = torch.get_num_threads()
    try:
        for t in (1, threads, 1):
            torch.set_num_threads(t)
            (g,) = torch.autograd.grad(out, x, grad, retain_graph=True)
            results.append(g)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("device", DEVICES)
def test_errors_match_torch(device):
    x = torch.randn(1, 2, 5, 5, device=device)
    bad = [
        dict(kernel_size=(2, 2, 2)),
        dict(kernel_size=2, stride=(1, 1, 1)),
        dict(kernel_size=2, padding=(1, 1, 1)),
        dict(kernel_size=2, dilation=(1, 1, 1)),
        dict(kernel_size=0),
        dict(kernel_size=0, stride=1),
        dict(kernel_size=2, stride=0),
        dict(kernel_size=2, dilation=0),
        dict(kernel_size=2, padding=-1),
        dict(kernel_size=3, padding=2),
        dict(kernel_size=6),
        dict(kernel_size=5, padding=3, dilation=1),
    ]
    for kw in bad:
        assert_raises_like_torch(lambda: DF.max_pool2d(x, **kw), lambda: F.max_pool2d(x, **kw))
    for shape in [(5, 5), (1, 1, 2, 5, 5), (1, 0, 5, 5), (0, 5, 5)]:
        t = torch.randn(shape, device=device)
        assert_raises_like_torch(lambda: DF.max_pool2d(t, 2), lambda: F.max_pool2d(t, 2))
    b = torch.ones(1, 2, 4, 4, dtype=torch.bool, device=device)
    assert_raises_like_torch(lambda: DF.max_pool2d(b, 2), lambda: F.max_pool2d(b, 2))
    with pytest.raises(TypeError, match="must be Tensor"):
        DF.max_pool2d([1.0], 2)


@pytest.mark.parametrize("return_indices", [False, True])
def test_argument_types_and_ranges_match_torch(return_indices):
    """Arguments torch refuses are refused with its TypeError, not rounded or parsed (2.5 as 2,
    '3' as 3, True as 1); values past int32 raise torch's overflow error instead of wrapping."""
    x = torch.randn(1, 1, 8, 8)
    bad_types = [
        dict(kernel_size=2.5), dict(kernel_size="3"), dict(kernel_size=True),
        dict(kernel_size=None), dict(kernel_size=2, padding=1.0),
        dict(kernel_size=2, stride=[True, 1]),
        dict(kernel_size=2, ceil_mode=1), dict(kernel_size=2, ceil_mode=None),
    ]
    for kw in bad_types:
        assert_raises_like_torch(lambda: DF.max_pool2d(x, **kw, return_indices=return_indices),
                                 lambda: F.max_pool2d(x, **kw, return_indices=return_indices))
    with pytest.raises(TypeError, match="found element of type float at pos 1"):
        DF.max_pool2d(x, (2, 2.0), return_indices=return_indices)  # torch words this one oddly
    for kw in [dict(kernel_size=5, dilation=2**62), dict(kernel_size=(1, 5), dilation=(1, 2**62)),
               dict(kernel_size=2**31), dict(kernel_size=2, stride=2**40)]:
        assert_raises_like_torch(lambda: DF.max_pool2d(x, **kw), lambda: F.max_pool2d(x, **kw),
                                 contains="cannot be converted to type int without overflow")
    for k in (torch.tensor(3), torch.tensor([3]), (3, torch.tensor(3))):  # ints torch accepts
        torch.testing.assert_close(DF.max_pool2d(x, k), F.max_pool2d(x, k), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_op_checks_its_arguments(device):
    go = torch.randn(1, 2, 2, 2, device=device)
    idx = torch.zeros(1, 2, 2, 2, dtype=torch.long, device=device)
    geometry = ([2], [2], [0], [1], False)

    def bwd(g, i, size, geo=geometry):
        return torch.ops.dlext.max_pool2d_backward(g, i, size, *geo)

    with pytest.raises(RuntimeError, match="'indices' to be int64"):
        bwd(go, idx.int(), [1, 2, 4, 4])
    with pytest.raises(RuntimeError, match="'grad_output' to have the shape of 'indices'"):
        bwd(go[:, :1], idx, [1, 2, 4, 4])
    with pytest.raises(RuntimeError, match="'input_size'"):
        bwd(go, idx, [1, 3, 4, 4])
    with pytest.raises(RuntimeError, match="do not match the pooling"):
        bwd(go, idx, [1, 2, 4, 4], ([2], [1], [0], [1], False))
    if device == "cpu":  # the CUDA gather never reads at an index, it only compares with it
        with pytest.raises(RuntimeError, match="outside the input plane"):
            bwd(go, idx + 16, [1, 2, 4, 4])
        with pytest.raises(RuntimeError, match="outside the input plane"):
            bwd(go, idx - 2, [1, 2, 4, 4])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_backward_scatters_indices_outside_their_window(layout, dtype):
    """The CPU backward adds each gradient at its index anywhere in the plane, as torch's does:
    channels_last zeroes input rows lazily, so an index below (or above) its window still lands
    on a zeroed row. 70 channels: two channel blocks per image."""
    torch.manual_seed(0)
    size, geometry = [2, 70, 11, 9], ([3], [2], [1], [1], False)
    out_shape = (2, 70, 6, 5)
    idx = make_layout(torch.randint(0, 11 * 9, out_shape), layout)
    idx[:, :, :2] = 11 * 9 - 1 - idx[:, :, :2] % 5  # the first output rows reach the last row
    go = make_layout(torch.randn(out_shape, dtype=dtype), layout)
    ours = torch.ops.dlext.max_pool2d_backward(go, idx, size, *geometry)
    x = make_layout(torch.empty(size, dtype=dtype), layout)
    ref = torch.ops.aten.max_pool2d_with_indices_backward(go, x, [3], [2], [1], [1], False, idx)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)


def test_module_is_a_drop_in():
    for kw in [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=(2, 3), ceil_mode=True,
                                                                return_indices=True)]:
        ours, theirs = DN.MaxPool2d(**kw), torch.nn.MaxPool2d(**kw)
        assert isinstance(ours, torch.nn.MaxPool2d)
        assert repr(ours) == repr(theirs)
        x = torch.randn(2, 3, 11, 13)
        a, b = ours(x), theirs(x)
        if kw.get("return_indices"):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(2, 3, 9, 10, device=device)
    for args in [(x, [3], [2], [1], [1], False), (x.requires_grad_(), [2, 3], [], [1, 1], [1, 2], True),
                 (x.detach().contiguous(memory_format=torch.channels_last), [3], [2], [1], [1], True),
                 (torch.randn(3, 7, 7, device=device), [2], [2], [0], [1], False)]:
        torch.library.opcheck(torch.ops.dlext.max_pool2d.default, args)
    _, idx = F.max_pool2d(x.detach(), 3, 2, 1, return_indices=True)
    torch.library.opcheck(torch.ops.dlext.max_pool2d_backward.default,
                          (torch.randn(idx.shape, device=device), idx, list(x.shape), [3], [2],
                           [1], [1], False))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    def f(t):
        out, idx = DF.max_pool2d(t * 2, 3, 2, 1, return_indices=True)
        return out.sum() + DF.max_pool2d(t, (2, 3), ceil_mode=True).mean()

    x = torch.randn(2, 3, 11, 12, device=device, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_c = torch.compile(f, fullgraph=True, backend="aot_eager")(xa)
    out_e = f(xb)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(xa.grad, xb.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_dlext_kernels_only(device):
    forbidden = {"aten::max_pool2d", "aten::max_pool2d_with_indices",
                 "aten::max_pool2d_with_indices_backward", "aten::max_pool2d_backward",
                 "aten::mkldnn_max_pool2d", "aten::quantized_max_pool2d",
                 "aten::adaptive_max_pool2d", "aten::max_pool3d_with_indices", "aten::unfold",
                 "aten::max", "aten::amax", "aten::im2col"}
    x = torch.randn(2, 3, 9, 9, device=device, requires_grad=True)
    for layout in ("contiguous", "channels_last"):
        xx = make_layout(x, layout)

        def fwd_bwd():
            y = DF.max_pool2d(xx, 3, 2, 1)
            y.backward(torch.ones_like(y))

        _, names = aten_ops_called(fwd_bwd)
        assert {"dlext::max_pool2d", "dlext::max_pool2d_backward"} <= names
        assert_no_native(names, forbidden, "dlext max_pool2d")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 2), c=st.integers(1, 4), h=st.integers(1, 12), w=st.integers(1, 12),
       kh=st.integers(1, 4), kw=st.integers(1, 4), sh=st.integers(1, 3), sw=st.integers(1, 3),
       ph=st.integers(0, 2), pw=st.integers(0, 2), dh=st.integers(1, 3), dw=st.integers(1, 3),
       ceil=st.booleans(), channels_last=st.booleans())
def test_property_matches_native(n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ceil, channels_last):
    """Any parameters: dlext raises exactly when torch raises, else agrees on values and indices
    (up to the documented index of windows without input elements) and on the gradient."""
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = ((kh, kw), (sh, sw), (ph, pw), (dh, dw), ceil)
    try:
        ref, ref_idx = F.max_pool2d(x, *args, return_indices=True)
    except RuntimeError as e:
        with pytest.raises(RuntimeError) as got:
            DF.max_pool2d(x, *args)
        assert str(e).splitlines()[0] in str(got.value)
        return
    xa = x.clone().requires_grad_()
    out, idx = DF.max_pool2d(xa, *args, return_indices=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    has_input = ~torch.isneginf(ref)
    assert torch.equal(idx[has_input], ref_idx[has_input])
    if out.numel():
        grad = torch.randn_like(out)
        out.backward(grad)
        xb = x.clone().requires_grad_()
        F.max_pool2d(xb, *args).backward(grad.masked_fill(~has_input, 0))
        torch.testing.assert_close(xa.grad, xb.grad)


@pytest.mark.bigmem
@pytest.mark.slow
def test_plane_past_2_pow_31_elements():
    """Flat indices inside one plane exceed 2^31: 64-bit index arithmetic throughout."""
    h, w = 2**16, 2**15 + 64                       # 2^31 + 2^22 int8 elements
    try:
        x = torch.zeros((1, 1, h, w), dtype=torch.int8)
    except RuntimeError:
        pytest.skip("not enough memory")
    x[0, 0, h - 1, w - 1] = 7
    dlext._C.set_poison_outputs(False)
    out, idx = DF.max_pool2d(x, 64, return_indices=True)
    assert out[0, 0, -1, -1].item() == 7
    assert idx[0, 0, -1, -1].item() == (h - 1) * w + (w - 1) > 2**31
    assert idx[0, 0, 0, 0].item() == 0
