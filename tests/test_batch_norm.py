"""BatchNorm: dlext.functional.batch_norm / dlext.nn.BatchNorm{1,2,3}d / torch.ops.dlext.batch_norm*
against torch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dlext
import dlext.functional as DF
import dlext.nn as DN
from conftest import DEVICES
from helpers import aten_ops_called, assert_no_native, make_layout

ops = torch.ops.dlext

# Largest error allowed, relative to the largest magnitude of the float64 reference (+1): a few
# roundings of the dtype; for bfloat16/float16 the half-ulp rounding of the result itself.
TOL = {torch.float64: 1e-12, torch.float32: 5e-6, torch.bfloat16: 5e-3, torch.float16: 6e-4}
LAYOUTS = ["contiguous", "channels_last", "strided", "transposed"]
SHAPES = [(7, 13), (5, 13, 97), (4, 13, 7, 9), (2, 3, 5, 7, 9), (1, 13, 17), (3, 97, 1, 1),
          (2, 7, 33, 35)]


def bn_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in the named layout; channels_last means channels innermost in any rank."""
    if layout == "channels_last":
        if t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        if t.dim() == 5:
            return t.contiguous(memory_format=torch.channels_last_3d)
        perm = [0] + list(range(2, t.dim())) + [1]
        inverse = [perm.index(i) for i in range(t.dim())]
        return t.permute(perm).contiguous().permute(inverse)
    return make_layout(t, layout)


def channel_params(C, dtype, device, affine=True, seed_shift=0.0):
    """Random weight, bias, running_mean, running_var (positive) for C channels."""
    if C == 0 or not affine:
        w = b = None
    else:
        w = torch.randn(C, dtype=torch.float64, device=device).to(dtype)
        b = torch.randn(C, dtype=torch.float64, device=device).to(dtype)
    rm = (torch.randn(C, dtype=torch.float64, device=device) * 0.5 + seed_shift).to(dtype)
    rv = (torch.rand(C, dtype=torch.float64, device=device) + 0.5).to(dtype)
    return w, b, rm, rv


def run(fn, x, rm, rv, w, b, training, momentum=0.1, eps=1e-5, grad=None, dtype=None):
    """fn forward (and backward for `grad`) on copies, in `dtype` when given.

    Returns (out, running_mean, running_var, grad_input, grad_weight, grad_bias) with the running
    statistics as they are after the call.
    """
    def copy(t):
        return None if t is None else t.detach().to(dtype or t.dtype).clone()

    xr = x.detach() if dtype in (None, x.dtype) else x.detach().to(dtype)
    xr.requires_grad_(grad is not None)
    wr, br, rmr, rvr = copy(w), copy(b), copy(rm), copy(rv)
    for t in (wr, br):
        if t is not None:
            t.requires_grad_(grad is not None)
    out = fn(xr, rmr, rvr, wr, br, training=training, momentum=momentum, eps=eps)
    grads = (None, None, None)
    if grad is not None:
        out.backward(grad.to(out.dtype))
        grads = (xr.grad, None if wr is None else wr.grad, None if br is None else br.grad)
    return (out, rmr, rvr) + grads


def assert_near(ours, ref, tol, what=""):
    """max |ours - ref| <= tol * (max |ref| + 1) over finite values; NaNs and infinities equal."""
    if ref is None:
        assert ours is None, what
        return
    assert ours is not None, what
    assert ours.shape == ref.shape, what
    ref = ref.detach().double()
    ours = ours.detach().double()
    assert torch.equal(ours.isnan(), ref.isnan()), f"{what}: NaNs differ"
    assert torch.equal(ours.isinf(), ref.isinf()), f"{what}: infinities differ"
    assert torch.equal(ours[ref.isinf()], ref[ref.isinf()]), f"{what}: infinities differ"
    finite = ref.isfinite()
    if not finite.any():
        return
    err = (ours[finite] - ref[finite]).abs().max().item()
    scale = ref[finite].abs().max().item() + 1
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} * {scale:.3e}"


def grad_input_condition(x, w, training, eps):
    """How much rounding in the gradient's inputs grows in grad_input: max |weight| * invstd.

    Training subtracts two means from the gradient and multiplies by invstd; when a channel's
    variance is tiny (two samples close together) invstd is large and so is every
    implementation's rounding error, native's included."""
    if not training or x.numel() == 0:
        return 1.0
    dims = [d for d in range(x.dim()) if d != 1]
    var = x.detach().double().var(dim=dims, unbiased=False)
    scale = (var + eps).rsqrt()
    if w is not None:
        scale = scale * w.detach().double().abs()
    return max(1.0, scale.max().item())


def canonical_strides(x):
    """x's values with the canonical strides of its layout.

    A channels_last tensor with size-1 dims can carry non-canonical strides there (e.g. (1, 2, 1, 2)
    with strides (1, 1, 1, 2)); torch's CPU batch_norm backward then reads grad_output in the
    wrong order (torch 2.14: its grad_input is not grad_output * invstd in evaluation). dlext
    handles such inputs; the native reference is taken on the canonical copy, which has the same
    values and the same memory format.
    """
    for fmt, dim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if x.dim() == dim and x.is_contiguous(memory_format=fmt) and not x.is_contiguous():
            return x.clone(memory_format=fmt)
    return x


def compare_with_native(x, rm, rv, w, b, training, momentum=0.1, eps=1e-5, grad=None,
                        tol=None):
    """dlext against the float64 reference (tight) and against native in the same dtypes."""
    tol = tol if tol is not None else TOL[x.dtype]
    ours = run(DF.batch_norm, x, rm, rv, w, b, training, momentum, eps, grad)
    xn = canonical_strides(x)
    ref = run(F.batch_norm, xn, rm, rv, w, b, training, momentum, eps, grad, dtype=torch.float64)
    native = run(F.batch_norm, xn, rm, rv, w, b, training, momentum, eps, grad)
    names = ["out", "running_mean", "running_var", "grad_input", "grad_weight", "grad_bias"]
    tols = [tol] * 3 + [tol * grad_input_condition(x, w, training, eps), tol, tol]
    for name, o, r, n, t in zip(names, ours, ref, native, tols):
        assert_near(o, r, t, name)
        assert_near(o, n, 2 * t, name + " vs native")
        if o is not None:
            assert o.dtype == n.dtype, name
    return ours, native


# ------------------------------------------------------------------------- against native

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_matches_native(device, dtype, layout, shape, training):
    if layout == "channels_last" and len(shape) == 2:
        pytest.skip("a 2-D input has one layout")
    x = bn_layout((torch.randn(shape, dtype=torch.float64, device=device) * 2 + 0.5).to(dtype),
                  layout)
    w, b, rm, rv = channel_params(shape[1], dtype, device)
    grad = bn_layout(torch.randn(shape, device=device, dtype=dtype), layout)
    ours, native = compare_with_native(x, rm, rv, w, b, training, grad=grad)
    assert ours[0].stride() == native[0].stride()  # torch's layout rule: suggest_memory_format


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affine", ["none", "weight", "bias", "both"])
@pytest.mark.parametrize("stats", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_optional_weight_bias_and_running_stats(device, affine, stats, training):
    if not training and not stats:
        pytest.skip("evaluation needs running statistics (tested in test_errors)")
    shape = (6, 5, 7, 3)
    x = torch.randn(shape, dtype=torch.float64, device=device)
    w, b, rm, rv = channel_params(5, torch.float64, device)
    w = w if affine in ("weight", "both") else None
    b = b if affine in ("bias", "both") else None
    rm, rv = (rm, rv) if stats else (None, None)
    compare_with_native(x, rm, rv, w, b, training, grad=torch.randn_like(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("params", ["same", "float32", "none"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("training", [True, False])
def test_low_precision_inputs(device, dtype, params, layout, training):
    """16-bit inputs, with 16-bit or float32 parameters (torch's mixed-dtype rule on the CPU)."""
    shape = (4, 13, 9, 11)
    x = bn_layout((torch.randn(shape, dtype=torch.float64, device=device) * 2 + 0.5).to(dtype),
                  layout)
    pdtype = torch.float32 if params == "float32" else dtype
    w, b, rm, rv = channel_params(13, pdtype, device)
    if params == "none":
        w = b = None
        if training:
            rm = rv = None
    grad = torch.randn(shape, device=device).to(dtype)
    ours, _ = compare_with_native(x, rm, rv, w, b, training, grad=grad)
    assert ours[0].dtype == dtype and ours[3].dtype == dtype
    if w is not None:
        assert ours[4].dtype == pdtype and ours[5].dtype == pdtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.5, 1.0])
def test_running_stats_after_several_steps(device, momentum):
    """Running statistics (unbiased variance) move exactly as torch's, step after step."""
    w, b, rm, rv = channel_params(7, torch.float32, device)
    rm_ours, rv_ours, rm_nat, rv_nat = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    for step in range(4):
        x = torch.randn(5, 7, 11, device=device) * (step + 1) + step
        DF.batch_norm(x, rm_ours, rv_ours, w, b, training=True, momentum=momentum)
        F.batch_norm(x, rm_nat, rv_nat, w, b, training=True, momentum=momentum)
        torch.testing.assert_close(rm_ours, rm_nat, rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(rv_ours, rv_nat, rtol=2e-6, atol=1e-6)
    out = DF.batch_norm(x, rm_ours, rv_ours, w, b, training=False)
    torch.testing.assert_close(out, F.batch_norm(x, rm_nat, rv_nat, w, b, training=False),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_per_channel_tensors_may_be_strided_views(device):
    """Running statistics, weight and bias may be strided views; the running statistics are
    written in place, through the view, and autograd sees the write."""
    x = torch.randn(6, 4, 9, device=device)
    store_ours, store_nat = torch.zeros(8, device=device), torch.zeros(8, device=device)
    var_ours, var_nat = torch.ones(4, device=device), torch.ones(4, device=device)
    params = torch.randn(4, 2, device=device)
    w, b = params[:, 0], params[:, 1]
    version = var_ours._version
    out = DF.batch_norm(x, store_ours[::2], var_ours, w, b, training=True, momentum=0.3)
    ref = F.batch_norm(x, store_nat[::2], var_nat, w, b, training=True, momentum=0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(store_ours, store_nat, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(var_ours, var_nat, rtol=2e-6, atol=1e-7)
    assert store_ours[1::2].eq(0).all()
    assert var_ours._version > version, "autograd must see the in-place update"
    torch.testing.assert_close(DF.batch_norm(x, store_ours[::2], var_ours, w, b),
                               F.batch_norm(x, store_nat[::2], var_nat, w, b),
                               rtol=1e-5, atol=1e-5)
    # The statistics handed to the raw ops may be views too.
    mean, var = ops.batch_norm_stats(x)
    packed = torch.stack([mean, (var + 1e-5).rsqrt()], 1)
    dy = torch.randn_like(x)
    strided = ops.batch_norm_backward(dy, x, w, packed[:, 0], packed[:, 1], True,
                                      [True, True, True])
    dense = ops.batch_norm_backward(dy, x, w, packed[:, 0].contiguous(),
                                    packed[:, 1].contiguous(), True, [True, True, True])
    for a, d in zip(strided, dense):
        assert torch.equal(a, d)


@pytest.mark.parametrize("device", DEVICES)
def test_inference_mode(device):
    module, ref = DN.BatchNorm2d(3).to(device), torch.nn.BatchNorm2d(3).to(device)
    x = torch.randn(4, 3, 5, 5, device=device)
    with torch.inference_mode():
        for mode in ("train", "eval"):
            getattr(module, mode)()
            getattr(ref, mode)()
            torch.testing.assert_close(module(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module.running_var, ref.running_var, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_running_stats_versions_move_only_when_written(device):
    """Training writes the running statistics in place (their version moves, so a graph that
    saved them notices); evaluation only reads them: no version bump, so statistics created in
    inference mode (a model loaded for serving) and statistics saved by a graph still work."""
    x = torch.randn(4, 3, 5, device=device)
    with torch.inference_mode():
        served = DN.BatchNorm1d(3).to(device).eval()
    with torch.no_grad():
        torch.testing.assert_close(served(x), torch.nn.functional.batch_norm(
            x, served.running_mean.clone(), served.running_var.clone()), rtol=1e-6, atol=1e-6)

    m = DN.BatchNorm1d(3).to(device)
    a = torch.randn(3, device=device, requires_grad=True)
    kept = (a * m.running_var).sum()  # saves running_var for backward
    v0 = m.running_var._version
    m.eval()
    m(x)
    assert m.running_var._version == v0
    torch.autograd.grad(kept, a, retain_graph=True)  # not "modified by an inplace operation"
    m.train()
    m(x)
    assert m.running_var._version > v0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(kept, a)


@pytest.mark.parametrize("device", DEVICES)
def test_argument_forms_torch_accepts(device):
    """momentum and eps may be 0-d tensors or bools (torch's float arguments); an empty input in
    evaluation needs no running statistics (torch returns it unchecked)."""
    x = torch.randn(4, 3, 5, device=device)
    for momentum in (torch.tensor(0.25), True, 0):
        ours_rm, ours_rv = torch.zeros(3, device=device), torch.ones(3, device=device)
        ref_rm, ref_rv = ours_rm.clone(), ours_rv.clone()
        torch.testing.assert_close(
            DF.batch_norm(x, ours_rm, ours_rv, training=True, momentum=momentum,
                          eps=torch.tensor(1e-3)),
            F.batch_norm(x, ref_rm, ref_rv, training=True, momentum=momentum,
                         eps=torch.tensor(1e-3)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close((ours_rm, ours_rv), (ref_rm, ref_rv), rtol=1e-6, atol=1e-6)
    empty = torch.randn(0, 3, 5, device=device)
    out = DF.batch_norm(empty, None, None, training=False)
    assert out.shape == empty.shape and out.device == empty.device
    with pytest.raises(TypeError, match="argument 'momentum' must be float, not Tensor"):
        DF.batch_norm(x, None, None, training=True, momentum=torch.tensor([0.1]))
    with pytest.raises(TypeError, match="argument 'running_mean' must be Tensor, not list"):
        DF.batch_norm(x, [0.0, 0.0, 0.0], torch.ones(3, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_offset_is_numerically_stable(device, dtype):
    """Mean far from 0 and a small spread: E[x^2] - E[x]^2 would lose every digit, and even a
    plain two-pass variance loses some (torch's own running_var is off by 4e-5 here)."""
    offset = 1e4 if dtype == torch.float32 else 1e8
    x = (offset + 1e-2 * torch.randn(8, 3, 61, 67, dtype=torch.float64, device=device)).to(dtype)
    mean_tol, var_tol = (1e-7, 1e-5) if dtype == torch.float32 else (1e-15, 1e-10)
    view = (1, -1, 1, 1)
    for t in (x, x.contiguous(memory_format=torch.channels_last), x[:, :1], x[:1, :, :, :1]):
        true_mean = t.double().mean((0, 2, 3))
        true_var = (t.double() - true_mean.view(view)).square().mean((0, 2, 3))
        mean, var = ops.batch_norm_stats(t)
        torch.testing.assert_close(mean.double(), true_mean, rtol=mean_tol, atol=0)
        torch.testing.assert_close(var.double(), true_var, rtol=var_tol, atol=0)

        C, n = t.shape[1], t[:, 0].numel()
        rm = torch.zeros(C, dtype=dtype, device=device)
        rv = torch.ones(C, dtype=dtype, device=device)
        out = DF.batch_norm(t, rm, rv, training=True, momentum=1.0)
        torch.testing.assert_close(rv.double(), true_var * n / (n - 1), rtol=var_tol, atol=0)
        # The output is only as exact as the mean rounded to the dtype (half an ulp of the
        # offset, and half another in the reference), times invstd.
        invstd = (true_var + 1e-5).rsqrt()
        ref = (t.double() - true_mean.view(view)) * invstd.view(view)
        o = torch.tensor(offset, dtype=dtype)
        ulp = (torch.nextafter(o, 2 * o) - o).double()
        assert (out.double() - ref).abs().max() <= 1.1 * ulp * invstd.max()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_inf_stay_in_their_channel(device):
    x = torch.randn(4, 3, 5, 5, device=device)
    x[1, 0, 2, 2] = float("nan")
    x[0, 2, 0, 0] = float("inf")
    for t in (x, x.contiguous(memory_format=torch.channels_last)):
        for training in (True, False):
            compare_with_native(t, torch.zeros(3, device=device), torch.ones(3, device=device),
                                None, None, training)
    out = DF.batch_norm(x, None, None, training=True)
    assert out[:, 0].isnan().all() and out[:, 2].isnan().all() and out[:, 1].isfinite().all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_backward_with_stride_zero_grad(device, reduce):
    x = torch.randn(5, 4, 6, 7, device=device, dtype=torch.float64)
    w, b, _, _ = channel_params(4, torch.float64, device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    wa, wb = w.clone().requires_grad_(), w.clone().requires_grad_()
    getattr(DF.batch_norm(xa, None, None, wa, b, training=True) * x, reduce)().backward()
    getattr(F.batch_norm(xb, None, None, wb, b, training=True) * x, reduce)().backward()
    assert_near(xa.grad, xb.grad, 1e-12)
    assert_near(wa.grad, wb.grad, 1e-12)
    xa.grad = None
    getattr(DF.batch_norm(xa, None, None, None, None, training=True), reduce)().backward()
    assert xa.grad.abs().max() < 1e-12  # the gradient of a normalised sum is 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 3, 0), (0, 3), (2, 0, 5), (0, 3, 2, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_empty_inputs(device, shape, training):
    x = torch.randn(shape, device=device, dtype=torch.float64)
    C = shape[1]
    w, b, rm, rv = channel_params(C, torch.float64, device)
    if C == 0:
        w = b = None
    ours = run(DF.batch_norm, x, rm, rv, w, b, training, grad=torch.randn_like(x))
    native = run(F.batch_norm, x, rm, rv, w, b, training, grad=torch.randn_like(x))
    for name, o, n in zip(["out", "rm", "rv", "gx", "gw", "gb"], ours, native):
        if n is None:
            assert o is None
            continue
        assert o.shape == n.shape, name
        torch.testing.assert_close(o, n, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_one_sample_with_spatial_size_is_allowed(device):
    x = torch.randn(1, 4, 3, 5, device=device, dtype=torch.float64)
    compare_with_native(x, torch.zeros(4, dtype=torch.float64, device=device),
                        torch.ones(4, dtype=torch.float64, device=device), None, None, True,
                        grad=torch.randn_like(x))


@pytest.mark.parametrize("device", DEVICES)
def test_weight_of_any_shape_with_one_value_per_channel(device):
    """torch's forward accepts a weight/bias of shape (1, C) (its backward then fails); dlext
    does both, and the gradients keep the parameters' shapes."""
    x = torch.randn(4, 3, 5, device=device, dtype=torch.float64)
    w = torch.randn(1, 3, device=device, dtype=torch.float64)
    b = torch.randn(3, 1, device=device, dtype=torch.float64)
    grad = torch.randn_like(x)
    ours = run(DF.batch_norm, x, None, None, w, b, True, grad=grad)
    flat = run(F.batch_norm, x, None, None, w.reshape(-1), b.reshape(-1), True, grad=grad)
    assert_near(ours[0], F.batch_norm(x, None, None, w, b, training=True), 1e-12)
    assert ours[4].shape == w.shape and ours[5].shape == b.shape
    for o, n in zip(ours, flat):
        if n is not None:
            assert_near(o.reshape(n.shape), n, 1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_threads_do_not_change_results(device):
    """Segments, groups and merge orders depend on the shape only: any thread count gives the
    same bits (planes with few or many channels, and rows)."""
    if device != "cpu":
        pytest.skip("CPU threads")
    previous = torch.get_num_threads()
    inputs = [torch.randn(3, 2, 150, 150), torch.randn(4, 16, 70, 70),
              torch.randn(9, 24, 40, 40).contiguous(memory_format=torch.channels_last)]
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            res = []
            for x in inputs:
                out, mean, invstd = ops.batch_norm(x, None, None, None, None, True, 0.1, 1e-5)
                grads = ops.batch_norm_backward(torch.cos(x), x, None, mean, invstd, True,
                                                [True, True, True])
                res += [out, mean, invstd, *grads]
            results.append(res)
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------ primitives

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", [(7, 13), (4, 13, 7, 9), (2, 3, 5, 7, 9), (2, 3, 17001)])
def test_primitives(device, dtype, layout, shape):
    """The four SyncBN primitives against formulas in float64, and composed into BatchNorm
    against native training forward and backward."""
    x = bn_layout((torch.randn(shape, dtype=torch.float64, device=device) + 0.3).to(dtype), layout)
    dy = bn_layout(torch.randn(shape, dtype=torch.float64, device=device).to(dtype), layout)
    C, dims, acc = shape[1], [0] + list(range(2, len(shape))), torch.float64
    pdtype = torch.float32 if dtype == torch.bfloat16 else dtype
    w, b, _, _ = channel_params(C, pdtype, device)
    view = (1, C) + (1,) * (len(shape) - 2)
    tol = TOL[dtype]

    mean, var = ops.batch_norm_stats(x)
    acc_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    assert mean.dtype == var.dtype == acc_dtype
    xd, dyd = x.to(acc), dy.to(acc)
    ref_mean = xd.mean(dims)
    ref_var = (xd - ref_mean.view(view)).square().mean(dims)
    assert_near(mean, ref_mean, TOL[acc_dtype], "mean")
    assert_near(var, ref_var, TOL[acc_dtype], "var")

    invstd = (var + 1e-5).rsqrt()
    out = ops.batch_norm_elemt(x, w, b, mean, invstd)
    scale = (invstd.to(acc) * w.to(acc)).view(view)
    ref_out = (xd - mean.to(acc).view(view)) * scale + b.to(acc).view(view)
    assert_near(out, ref_out, tol, "elemt")
    native = F.batch_norm(x, None, None, w, b, training=True)
    assert_near(out, native, 2 * tol, "elemt vs native")

    sum_dy, sum_dy_xmu, gw, gb = ops.batch_norm_backward_reduce(dy, x, mean, invstd, w,
                                                                [True, True, True])
    xmu = xd - mean.to(acc).view(view)
    assert_near(sum_dy, dyd.sum(dims), TOL[acc_dtype], "sum_dy")
    assert_near(sum_dy_xmu, (dyd * xmu).sum(dims), TOL[acc_dtype], "sum_dy_xmu")
    assert_near(gw, (dyd * xmu).sum(dims) * invstd.to(acc), TOL[pdtype], "grad_weight")
    assert_near(gb, dyd.sum(dims), TOL[pdtype], "grad_bias")
    assert gw.dtype == gb.dtype == pdtype

    n = x.numel() // C
    dx = ops.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, n)
    k = (invstd.to(acc) ** 2 * sum_dy_xmu.to(acc) / n).view(view)
    ref_dx = (dyd - (sum_dy.to(acc) / n).view(view) - xmu * k) * scale
    assert_near(dx, ref_dx, tol, "backward_elemt")
    xn = x.detach().requires_grad_()
    F.batch_norm(xn, None, None, w, b, training=True).backward(dy)
    assert_near(dx, xn.grad, 2 * tol, "backward_elemt vs native")
    assert out.stride() == native.stride()


@pytest.mark.parametrize("device", DEVICES)
def test_primitives_split_like_sync_batch_norm(device):
    """Statistics of two halves merged with Chan's formula (what SyncBN does across processes)
    and backward sums added, then elemt / backward_elemt with the global count, equal BatchNorm
    over the whole batch."""
    x = torch.randn(10, 6, 7, 5, dtype=torch.float64, device=device)
    dy = torch.randn_like(x)
    w, b, _, _ = channel_params(6, torch.float64, device)
    halves, dys = (x[:4], x[4:]), (dy[:4], dy[4:])
    counts = [h.numel() // 6 for h in halves]
    stats = [ops.batch_norm_stats(h) for h in halves]
    n = sum(counts)
    mean = sum(c * m for c, (m, _) in zip(counts, stats)) / n
    m2 = sum(c * (v + (m - mean) ** 2) for c, (m, v) in zip(counts, stats))
    invstd = (m2 / n + 1e-5).rsqrt()
    out = torch.cat([ops.batch_norm_elemt(h, w, b, mean, invstd) for h in halves])
    xn = x.clone().requires_grad_()
    native = F.batch_norm(xn, None, None, w, b, training=True)
    native.backward(dy)
    assert_near(out, native, 1e-12)
    sums = [ops.batch_norm_backward_reduce(g, h, mean, invstd, w, [True, False, False])
            for g, h in zip(dys, halves)]
    sum_dy, sum_dy_xmu = sums[0][0] + sums[1][0], sums[0][1] + sums[1][1]
    dx = torch.cat([ops.batch_norm_backward_elemt(g, h, mean, invstd, w, sum_dy, sum_dy_xmu, n)
                    for g, h in zip(dys, halves)])
    assert_near(dx, xn.grad, 1e-12)


# --------------------------------------------------------------------- gradients, higher order

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(5, 3), (3, 2, 5), (2, 3, 2, 3), (2, 2, 2, 3, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_and_gradgradcheck(device, seed, shape, training):
    torch.manual_seed(seed)
    C = shape[1]
    x = torch.randn(shape, dtype=torch.float64, device=device)
    if len(shape) == 4 and seed == 1:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w, b, rm, rv = channel_params(C, torch.float64, device)
    w.requires_grad_()
    b.requires_grad_()

    def f(x, w, b):
        return DF.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training)

    def g(x):
        return DF.batch_norm(x, None if training else rm, None if training else rv, None, None,
                             training=training)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))
    if seed == 0:
        assert torch.autograd.gradcheck(g, (x,))
        assert torch.autograd.gradgradcheck(g, (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(5, 3), (2, 2, 3, 2)])
def test_gradcheck_raw_ops(device, shape):
    """Every functional op is differentiable on its own, to second order."""
    C = shape[1]
    kw = dict(dtype=torch.float64, device=device, requires_grad=True)
    x, dy = torch.randn(shape, **kw), torch.randn(shape, **kw)
    w, mean = torch.randn(C, **kw), torch.randn(C, **kw)
    b, sum_dy, sum_dy_xmu = torch.randn(C, **kw), torch.randn(C, **kw), torch.randn(C, **kw)
    invstd = (torch.rand(C, dtype=torch.float64, device=device) + 0.5).requires_grad_()
    n = x.numel() // C
    cases = [
        (ops.batch_norm_stats, (x,)),
        (ops.batch_norm_elemt, (x, w, b, mean, invstd)),
        (lambda *a: ops.batch_norm_backward_reduce(*a, [True, True, True]),
         (dy, x, mean, invstd, w)),
        (lambda *a: ops.batch_norm_backward_elemt(*a, n),
         (dy, x, mean, invstd, w, sum_dy, sum_dy_xmu)),
        (lambda *a: ops.batch_norm_backward(*a, True, [True, True, True]),
         (dy, x, w, mean, invstd)),
        (lambda *a: ops.batch_norm_backward(*a, False, [True, True, True]),
         (dy, x, w, mean, invstd)),
    ]
    for fn, args in cases:
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("device", DEVICES)
def test_third_order(device):
    """Double backward is itself differentiable (the recompute keeps the graph)."""
    x = torch.randn(4, 3, 5, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)

    def third(fn):
        y = fn(x, None, None, w, None, training=True)
        (gx,) = torch.autograd.grad((y * torch.sin(y)).sum(), x, create_graph=True)
        (ggx,) = torch.autograd.grad((gx * gx).sum(), x, create_graph=True)
        return torch.autograd.grad((ggx * torch.cos(x)).sum(), (x, w))

    def elementary(x, running_mean, running_var, weight, bias, training):
        mean = x.mean((0, 2), keepdim=True)
        var = (x - mean).square().mean((0, 2), keepdim=True)
        return (x - mean) * (var + 1e-5).rsqrt() * weight.view(1, -1, 1)

    for a, b in zip(third(DF.batch_norm), third(elementary)):  # torch stops at second order
        assert_near(a, b, 1e-9)


# -------------------------------------------------------------------------------- modules

@pytest.mark.parametrize("cls,shape", [("BatchNorm1d", (6, 5)), ("BatchNorm1d", (6, 5, 7)),
                                       ("BatchNorm2d", (4, 5, 6, 7)),
                                       ("BatchNorm3d", (2, 5, 3, 4, 6))])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_module_is_a_drop_in(cls, shape, momentum, track, affine):
    torch.manual_seed(0)
    ours = getattr(DN, cls)(5, momentum=momentum, track_running_stats=track, affine=affine)
    theirs = getattr(torch.nn, cls)(5, momentum=momentum, track_running_stats=track,
                                    affine=affine)
    assert isinstance(ours, getattr(torch.nn, cls))
    assert repr(ours) == repr(theirs)
    if affine:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.uniform_(-1, 1)
    ours.load_state_dict(theirs.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for step in range(2):
        for mode in ("train", "eval", "train"):
            getattr(ours, mode)()
            getattr(theirs, mode)()
            x = torch.randn(shape) * (step + 1) + step
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = ours(xa), theirs(xb)
            torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
            g = torch.randn_like(ya)
            ya.backward(g)
            yb.backward(g)
            torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-4)
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    if affine:
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-4)


def test_module_input_dims_are_checked_like_torch():
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        DN.BatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"):
        DN.BatchNorm1d(3)(torch.randn(2, 3, 4, 5))


# ------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("device", DEVICES)
def test_errors(device):
    x = torch.randn(4, 3, 5, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    bn = DF.batch_norm
    with pytest.raises(NotImplementedError, match="not implemented for 'Int'"):
        bn(torch.ones(4, 3, 2, dtype=torch.int32, device=device), rm, rv)
    with pytest.raises(NotImplementedError, match="not implemented for 'ComplexFloat'"):
        bn(torch.ones(4, 3, 2, dtype=torch.complex64, device=device), None, None, training=True)
    with pytest.raises(RuntimeError, match="at least 2 dimensions"):
        bn(torch.randn(5, device=device), None, None, training=True)
    with pytest.raises(RuntimeError, match="running_mean should contain 3 elements not 4"):
        bn(x, torch.zeros(4, device=device), rv, training=True)
    with pytest.raises(RuntimeError, match="running_var should contain 3 elements not 2"):
        bn(x, rm, torch.ones(2, device=device))
    with pytest.raises(RuntimeError, match="weight should contain 3 elements not 4"):
        bn(x, rm, rv, torch.ones(4, device=device))
    with pytest.raises(RuntimeError, match="bias should contain 3 elements not 1"):
        bn(x, rm, rv, None, torch.ones(1, device=device))
    with pytest.raises(RuntimeError, match="expected 'running_mean' to be 1-D"):
        bn(x, torch.zeros(3, 1, device=device), rv, training=True)
    with pytest.raises(RuntimeError, match="expected 'weight' to have dtype Double"):
        bn(x.double(), None, None, torch.ones(3, device=device), training=True)
    with pytest.raises(RuntimeError, match=r"expected 'weight' to have the dtype of the other "
                                           r"per-channel parameters \(Double\), but got Float"):
        bn(x.double(), rm.double(), rv.double(), torch.ones(3, device=device))
    with pytest.raises(RuntimeError, match="expected 'running_mean' to have dtype Float"):
        bn(x, rm.double(), rv.double())
    with pytest.raises(RuntimeError, match=r"expected 'running_mean' to have dtype BFloat16 or "
                                           r"Float .* but got Double"):
        bn(x.bfloat16(), rm.double(), rv.double())
    with pytest.raises(RuntimeError, match=r"expected 'weight' to have the dtype of the other "
                                           r"per-channel parameters \(Float\), but got BFloat16"):
        bn(x.bfloat16(), rm, rv, torch.ones(3, device=device, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        bn(x, None, rv)
    with pytest.raises(RuntimeError, match="running_var must be defined in evaluation mode"):
        bn(x, rm, None)
    with pytest.raises(ValueError, match="must either both be None or neither be None"):
        bn(x, rm, None, training=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bn(torch.randn(1, 3, device=device), None, None, training=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bn(torch.randn(1, 3, 1, 1, device=device), None, None, training=True)
    with pytest.raises(ValueError, match="eps must be positive during training, but got 0.0"):
        bn(x, rm, rv, training=True, eps=0.0)
    with pytest.raises(ValueError, match="eps must be non-negative, but got -1.0"):
        bn(x, rm, rv, eps=-1.0)
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument "
                                           "'running_var'"):
        bn(x, rm, rv.clone().requires_grad_(), training=True)
    with pytest.raises(TypeError, match="argument 'momentum' must be float, not NoneType"):
        bn(x, rm, rv, training=True, momentum=None)
    with pytest.raises(TypeError, match="argument 'training' must be bool, not int"):
        bn(x, rm, rv, training=1)
    with pytest.raises(TypeError, match="argument 'input' must be Tensor"):
        bn([1.0, 2.0], rm, rv)
    with torch.no_grad():  # as in torch, requires_grad of running stats matters to autograd only
        bn(x, rm.clone().requires_grad_(), rv, training=False)


@pytest.mark.parametrize("device", DEVICES)
def test_op_errors(device):
    x = torch.randn(4, 3, 5, device=device)
    mean, invstd = torch.zeros(3, device=device), torch.ones(3, device=device)
    with pytest.raises(RuntimeError, match=r"'mean' to have dtype Double \(the accumulation "
                                           r"dtype of a Double input\), but got Float"):
        ops.batch_norm_elemt(x.double(), None, None, mean, invstd.double())
    with pytest.raises(RuntimeError, match=r"'invstd' to have dtype Float \(the accumulation "
                                           r"dtype of a BFloat16 input\), but got BFloat16"):
        ops.batch_norm_elemt(x.bfloat16(), None, None, mean, invstd.bfloat16())
    with pytest.raises(RuntimeError, match="mean should contain 3 elements not 2"):
        ops.batch_norm_backward_reduce(x, x, mean[:2], invstd, None, [True, True, True])
    with pytest.raises(RuntimeError, match="'grad_output' to have the shape of 'input'"):
        ops.batch_norm_backward_reduce(x[:2], x, mean, invstd, None, [True, True, True])
    with pytest.raises(RuntimeError, match="'grad_output' to have the same dtype as 'input'"):
        ops.batch_norm_backward(x.double(), x, None, mean, invstd, True, [True, True, True])
    with pytest.raises(RuntimeError, match="'save_invstd' to have dtype Float"):
        ops.batch_norm_backward(x, x, None, mean, invstd.double(), True, [True, True, True])
    with pytest.raises(RuntimeError, match="'count' .* at least the input's 20 values"):
        ops.batch_norm_backward_elemt(x, x, mean, invstd, None, mean, mean, 19)
    with pytest.raises(NotImplementedError, match="not implemented for 'Long'"):
        ops.batch_norm_stats(torch.ones(4, 3, dtype=torch.long, device=device))
    with pytest.raises(RuntimeError, match="argument 'running_mean' requires grad, but this "
                                           "in-place operator is not differentiable"):
        ops.batch_norm(x, None, None, mean.clone().requires_grad_(), invstd, True, 0.1, 1e-5)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=DEVICES[1].marks)])
def test_device_mismatch(device):
    x = torch.randn(4, 3, 5, device=device)
    with pytest.raises(RuntimeError, match="expected all tensors to be on the same device"):
        DF.batch_norm(x, torch.zeros(3), torch.ones(3, device=device))


# ---------------------------------------------------------------- opcheck, compile, profile

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    """Every op over layouts, dtypes, masks and modes. The mutable batch_norm gets inputs that do
    not require grad: called directly it refuses them (its autograd is BatchNormFunction)."""
    x = torch.randn(4, 3, 5, 6, device=device)
    cl = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(3, device=device), torch.randn(3, device=device)

    def stats():
        return torch.zeros(3, device=device), torch.ones(3, device=device)

    ambiguous = [torch.randn(4, 3, 1, 1, device=device),  # contiguous and channels_last alike
                 torch.randn(4, 1, 5, 5, device=device)[:, :, :, :3].transpose(2, 3)]
    for args in [(x, w, b, *stats(), True), (x, w, b, *stats(), False),
                 (cl, None, None, None, None, True), (x[..., ::2], w, None, *stats(), False),
                 (torch.randn(5, 3, device=device), None, b, *stats(), True),
                 (x.bfloat16(), w, b, *stats(), True),
                 (ambiguous[0], None, None, None, None, True),
                 (ambiguous[1], None, None, None, None, True)]:
        torch.library.opcheck(ops.batch_norm.default, (*args, 0.1, 1e-5))
    for t, mask, training in [(x, [True, True, True], True), (cl, [False, True, False], False),
                              (x.bfloat16(), [True, False, True], True)]:
        tg = t.clone().requires_grad_()
        torch.library.opcheck(ops.batch_norm_stats.default, (tg,))
        mean, var = ops.batch_norm_stats(t)
        invstd = (var + 1e-5).rsqrt()
        torch.library.opcheck(ops.batch_norm_elemt.default,
                              (tg, w.clone().requires_grad_(), b, mean, invstd))
        dy = torch.randn_like(t)
        torch.library.opcheck(ops.batch_norm_backward_reduce.default,
                              (dy, tg, mean, invstd, w, mask))
        torch.library.opcheck(ops.batch_norm_backward.default,
                              (dy.clone().requires_grad_(), t, w, mean, invstd, training, mask))
        sum_dy, sum_dy_xmu, _, _ = ops.batch_norm_backward_reduce(dy, t, mean, invstd, w,
                                                                  [True, False, False])
        torch.library.opcheck(ops.batch_norm_backward_elemt.default,
                              (dy, tg, mean, invstd, w, sum_dy, sum_dy_xmu, t.numel() // 3))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    def f(x, w, b, rm, rv):
        y = DF.batch_norm(x * 1.5, rm, rv, w, b, training=True, momentum=0.2)
        z = DF.batch_norm(x, rm, rv, w, b, training=False)
        return y.sum() + (z * z).mean() + DF.batch_norm(x, None, None, training=True).abs().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 5, 6, device=device, dtype=torch.float64)
    w, b, rm, rv = channel_params(3, torch.float64, device)
    args_c = [t.clone().requires_grad_(i < 3) for i, t in enumerate((x, w, b, rm, rv))]
    args_e = [t.clone().requires_grad_(i < 3) for i, t in enumerate((x, w, b, rm, rv))]
    out_c, out_e = compiled(*args_c), f(*args_e)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    for a, e in zip(args_c, args_e):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, e.grad)
        else:  # the running statistics
            torch.testing.assert_close(a, e)


def test_compile_module():
    """The module under torch.compile: buffers updated as in eager. (momentum=None does not
    compile with fullgraph, in torch either: its factor depends on num_batches_tracked.)"""
    torch.manual_seed(0)
    eager, ref = DN.BatchNorm2d(4, momentum=0.3), torch.nn.BatchNorm2d(4, momentum=0.3)
    compiled = torch.compile(DN.BatchNorm2d(4, momentum=0.3), fullgraph=True, backend="aot_eager")
    for _ in range(3):
        x = torch.randn(3, 4, 5, 5) + 2
        outs = [m(x) for m in (eager, ref, compiled)]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outs[2], outs[1], rtol=1e-5, atol=1e-5)
    for m in (eager, compiled):
        assert m.num_batches_tracked.item() == 3
        torch.testing.assert_close(m.running_var, ref.running_var, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(m.running_mean, ref.running_mean, rtol=1e-6, atol=1e-6)


FORBIDDEN = {"aten::batch_norm", "aten::native_batch_norm", "aten::_native_batch_norm_legit",
             "aten::_native_batch_norm_legit_no_training", "aten::_batch_norm_impl_index",
             "aten::native_batch_norm_backward", "aten::_batch_norm_with_update",
             "aten::_batch_norm_no_update", "aten::batch_norm_backward", "aten::batch_norm_stats",
             "aten::batch_norm_elemt", "aten::batch_norm_backward_reduce",
             "aten::batch_norm_backward_elemt", "aten::var", "aten::var_mean", "aten::std",
             "aten::instance_norm", "aten::layer_norm"}


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_dlext_kernels_only(device):
    x = torch.randn(4, 3, 5, 6, device=device, requires_grad=True)
    w = torch.randn(3, device=device, requires_grad=True)
    b = torch.randn(3, device=device, requires_grad=True)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    module = DN.BatchNorm2d(3).to(device)

    def fwd_bwd():
        for training in (True, False):
            y = DF.batch_norm(x, rm, rv, w, b, training=training)
            y.backward(torch.ones_like(y))
            module.train(training)
            module(x).sum().backward()
        mean, var = ops.batch_norm_stats(x.detach())
        invstd = (var + 1e-5).rsqrt()
        ops.batch_norm_elemt(x.detach(), w.detach(), b.detach(), mean, invstd)
        s = ops.batch_norm_backward_reduce(x.detach(), x.detach(), mean, invstd, None,
                                           [True, True, True])
        ops.batch_norm_backward_elemt(x.detach(), x.detach(), mean, invstd, None, s[0], s[1], 120)

    _, names = aten_ops_called(fwd_bwd)
    assert {"dlext::batch_norm", "dlext::batch_norm_backward", "dlext::batch_norm_stats",
            "dlext::batch_norm_elemt", "dlext::batch_norm_backward_reduce",
            "dlext::batch_norm_backward_elemt"} <= names
    assert_no_native(names, FORBIDDEN, "dlext batch_norm")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
def test_channels_last_with_non_canonical_strides(device, training):
    """(1, 2, 1, 2) with strides (1, 1, 1, 2) is channels_last-contiguous with odd strides on its
    size-1 dims. Evaluation's grad_input is grad_output * invstd exactly; both modes match native on
    the canonical copy (native's own backward gets this input wrong, see canonical_strides)."""
    x = torch.as_strided(torch.randn(4, device=device), (1, 2, 1, 2), (1, 1, 1, 2))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    w, b, rm, rv = channel_params(2, torch.float32, device)
    grad = torch.randn(1, 2, 1, 2, device=device)
    ours, _ = compare_with_native(x, rm, rv, w, b, training, grad=grad)
    if not training:
        expected = grad * (w / (rv + 1e-5).sqrt()).view(1, 2, 1, 1)
        torch.testing.assert_close(ours[3], expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------- hypothesis

@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, deadline=None)
@given(dims=st.integers(2, 5), n=st.integers(1, 5), c=st.integers(1, 9),
       spatial=st.lists(st.integers(1, 7), min_size=3, max_size=3),
       layout=st.sampled_from(["contiguous", "channels_last", "strided", "transposed"]),
       training=st.booleans(), affine=st.booleans(), stats=st.booleans(),
       momentum=st.sampled_from([0.0, 0.1, 0.9, 1.0]), eps=st.sampled_from([1e-5, 1e-3, 0.5]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_hypothesis_against_native(device, dims, n, c, spatial, layout, training, affine, stats,
                                   momentum, eps, dtype):
    shape = (n, c, *spatial[:dims - 2])
    if training and n * torch.Size(spatial[:dims - 2]).numel() == 1:
        n, shape = 2, (2, *shape[1:])
    torch.manual_seed(n * 1000 + c)
    x = bn_layout(torch.randn(shape, dtype=torch.float64, device=device).to(dtype), layout)
    w, b, rm, rv = channel_params(c, dtype, device, affine=affine)
    if training and not stats:
        rm = rv = None
    compare_with_native(x, rm, rv, w, b, training, momentum, eps,
                        grad=torch.randn(shape, dtype=dtype, device=device))


# ------------------------------------------------------------------------------- big tensors

@pytest.mark.bigmem
@pytest.mark.slow
def test_past_2_pow_31_elements():
    """64-bit indexing: a channel whose values lie beyond element 2^31 is reduced and written."""
    L = 2**30 + 5
    try:
        x = torch.zeros(1, 2, L, dtype=torch.bfloat16)
    except RuntimeError:
        pytest.skip("not enough memory for a 2^31-element tensor")
    x[0, 1, -1] = 1.0
    dlext._C.set_poison_outputs(False)  # a full poison pass would double the test's time
    try:
        out, mean, invstd = ops.batch_norm(x, None, None, None, None, True, 0.1, 0.0)
    except RuntimeError as e:
        if "alloc" not in str(e):
            raise
        pytest.skip("not enough memory for the 2^31-element output")
    assert mean[0].item() == 0 and invstd[0].item() == 0  # var == eps == 0: invstd 0, as in torch
    expected_mean = 1.0 / L
    torch.testing.assert_close(mean[1].item(), expected_mean, rtol=1e-6, atol=0)
    scale = 1.0 / (expected_mean * (1 - expected_mean)) ** 0.5
    torch.testing.assert_close(out[0, 1, -1].float().item(), (1 - expected_mean) * scale,
                               rtol=1e-2, atol=0)
    torch.testing.assert_close(out[0, 1, 0].float().item(), -expected_mean * scale, rtol=1e-2,
                               atol=0)


# ------------------------------------------------------------------------------ CUDA kernels
#
# The device-parametrised tests above run the CUDA kernels too; these aim at what only the CUDA
# kernels have: their paths (batch_norm_cuda_kernels.cuh), 16-byte packs and their fallback,
# determinism of the two-stage reductions, streams, and devices.

CUDA_ONLY = [pytest.param("cuda", marks=DEVICES[1].marks)]

# Shapes that take each CUDA path on any GPU: planes split over several blocks per channel (a
# few channels, over 4096 packs each), planes with one block per channel (the fused kernels:
# fewer than 4096 packs per channel), and rows (channels_last, 2-D inputs). Odd sizes leave
# partial batches, and planes or rows that are not a multiple of 16 bytes use one-value packs.
CUDA_PATHS = [
    ((4, 3, 301, 301), "contiguous"),    # split, odd planes: one value per pack
    ((3, 2, 64, 1000), "contiguous"),    # split, 16-byte packs
    ((2, 5, 1_000_003), "contiguous"),   # split, a long odd plane
    ((8, 2100, 7, 7), "contiguous"),     # fused, many channels
    ((5, 13, 32, 24), "contiguous"),     # fused, 16-byte packs
    ((64, 37, 17, 19), "channels_last"),  # rows, an odd number of channels
    ((16, 64, 33, 35), "channels_last"),  # rows, 16-byte packs
    ((3000, 24), "contiguous"),          # rows (2-D), 16-byte packs
    ((20011, 3), "contiguous"),          # rows (2-D), few channels
]


def _cuda_inputs(shape, layout, dtype, device):
    x = bn_layout((torch.randn(shape, dtype=torch.float64, device=device) * 2 + 0.5).to(dtype),
                  layout)
    dy = bn_layout(torch.randn(shape, dtype=torch.float64, device=device).to(dtype), layout)
    pdtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    return x, dy, channel_params(shape[1], pdtype, device)


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,layout", CUDA_PATHS)
def test_cuda_paths_against_native(device, dtype, shape, layout):
    x, dy, (w, b, rm, rv) = _cuda_inputs(shape, layout, dtype, device)
    for training in (True, False):
        ours, _ = compare_with_native(x, rm, rv, w, b, training, grad=dy)
        assert ours[0].is_contiguous(memory_format=torch._prims_common.suggest_memory_format(x))


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("shape,layout", [CUDA_PATHS[1], CUDA_PATHS[4], CUDA_PATHS[6]])
def test_cuda_primitives_on_each_path(device, shape, layout):
    """The SyncBN primitives on every path, against their formulas in float64."""
    x, dy, (w, b, _, _) = _cuda_inputs(shape, layout, torch.float32, device)
    C, dims = shape[1], [0] + list(range(2, len(shape)))
    view = (1, C) + (1,) * (len(shape) - 2)
    xd, dyd = x.double(), dy.double()
    mean, var = ops.batch_norm_stats(x)
    assert_near(mean, xd.mean(dims), TOL[torch.float32], "mean")
    assert_near(var, xd.var(dims, unbiased=False), TOL[torch.float32], "var")
    invstd = (var + 1e-5).rsqrt()
    xmu = xd - mean.double().view(view)
    scale = (invstd.double() * w.double()).view(view)
    assert_near(ops.batch_norm_elemt(x, w, b, mean, invstd), xmu * scale + b.double().view(view),
                TOL[torch.float32], "elemt")
    sum_dy, sum_dy_xmu, gw, gb = ops.batch_norm_backward_reduce(dy, x, mean, invstd, w,
                                                                [True, True, True])
    assert_near(sum_dy, dyd.sum(dims), TOL[torch.float32], "sum_dy")
    assert_near(sum_dy_xmu, (dyd * xmu).sum(dims), TOL[torch.float32], "sum_dy_xmu")
    assert_near(gw, (dyd * xmu).sum(dims) * invstd.double(), TOL[torch.float32], "grad_weight")
    assert_near(gb, dyd.sum(dims), TOL[torch.float32], "grad_bias")
    n = x.numel() // C
    dx = ops.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, n)
    k = (invstd.double() ** 2 * sum_dy_xmu.double() / n).view(view)
    ref = (dyd - (sum_dy.double() / n).view(view) - xmu * k) * scale
    assert_near(dx, ref, TOL[torch.float32], "backward_elemt")


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """The values of the dense tensor t, in the same layout, one element past a 16-byte
    boundary."""
    base = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = base[1:].as_strided(t.shape, t.stride())
    view.copy_(t)
    assert view.data_ptr() % 16 != 0
    return view


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,layout", [CUDA_PATHS[1], CUDA_PATHS[4], CUDA_PATHS[6],
                                          CUDA_PATHS[7]])
def test_cuda_misaligned_storage(device, dtype, shape, layout):
    """Contiguous (or channels_last) inputs whose storage is not 16-byte aligned take one-value
    packs, with the same results up to rounding as the aligned tensors."""
    x, dy, (w, b, rm, rv) = _cuda_inputs(shape, layout, dtype, device)
    xm, dym = _misaligned(x), _misaligned(dy)
    for training in (True, False):
        shifted, _ = compare_with_native(xm, rm, rv, w, b, training, grad=dym)
        aligned = run(DF.batch_norm, x, rm, rv, w, b, training, grad=dy)
        for name, s, a in zip(["out", "rm", "rv", "gx", "gw", "gb"], shifted, aligned):
            assert_near(s, a, 2 * TOL[dtype], name)


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("shape,layout", [CUDA_PATHS[0], CUDA_PATHS[3], CUDA_PATHS[6],
                                          CUDA_PATHS[8]])
def test_cuda_bitwise_reproducible(device, shape, layout):
    """Two-stage reductions merged in a fixed order, no atomics: every result is the same to the
    bit from run to run."""
    x, dy, (w, b, _, _) = _cuda_inputs(shape, layout, torch.float32, device)
    C = shape[1]

    def once():
        rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
        out, mean, invstd = ops.batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5)
        grads = ops.batch_norm_backward(dy, x, w, mean, invstd, True, [True, True, True])
        sums = ops.batch_norm_backward_reduce(dy, x, mean, invstd, w, [True, True, True])
        return [out, mean, invstd, rm, rv, *grads, *ops.batch_norm_stats(x), *sums]

    for a, b in zip(once(), once()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype,pdtype,tol", [(torch.float32, torch.float32, 1e-5),
                                              (torch.float64, torch.float64, 1e-12),
                                              (torch.bfloat16, torch.float32, 1e-5),
                                              (torch.float16, torch.float16, 2e-3)])
@pytest.mark.parametrize("shape,layout", [CUDA_PATHS[0], CUDA_PATHS[3], CUDA_PATHS[5]])
def test_cuda_running_stats_updated_in_place(device, dtype, pdtype, tol, shape, layout):
    """The kernels write the running statistics where they are (no copy back), in their dtype."""
    x = bn_layout(torch.randn(shape, device=device).to(dtype) + 1, layout)
    C = shape[1]
    rm = (torch.randn(C, device=device) * 0.1).to(pdtype)
    rv = (torch.rand(C, device=device) + 0.5).to(pdtype)
    rm_native, rv_native = rm.clone(), rv.clone()
    pointers, versions = (rm.data_ptr(), rv.data_ptr()), (rm._version, rv._version)
    DF.batch_norm(x, rm, rv, training=True, momentum=0.3)
    F.batch_norm(x, rm_native, rv_native, training=True, momentum=0.3)
    assert (rm.data_ptr(), rv.data_ptr()) == pointers
    assert rm._version > versions[0] and rv._version > versions[1]
    assert rm.dtype == rv.dtype == pdtype
    torch.testing.assert_close(rm, rm_native, rtol=tol, atol=tol)
    torch.testing.assert_close(rv, rv_native, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_cuda_device_mismatch_errors(device):
    """Any tensor on another device than the input is refused by name, before any launch."""
    x = torch.randn(4, 3, 5, device=device)
    on_cpu, on_cuda = torch.ones(3), torch.ones(3, device=device)
    mask = [True, True, True]
    cases = {
        "weight": lambda: ops.batch_norm(x, on_cpu, None, None, None, True, 0.1, 1e-5),
        "bias": lambda: ops.batch_norm(x, None, on_cpu, None, None, True, 0.1, 1e-5),
        "running_mean": lambda: ops.batch_norm(x, None, None, on_cpu.clone(), on_cuda.clone(),
                                               True, 0.1, 1e-5),
        "running_var": lambda: ops.batch_norm(x, None, None, on_cuda.clone(), on_cpu.clone(),
                                              False, 0.1, 1e-5),
        "input' is on cpu and 'weight": lambda: ops.batch_norm(x.cpu(), on_cuda, None, None, None,
                                                               True, 0.1, 1e-5),
        "grad_output": lambda: ops.batch_norm_backward(x.cpu(), x, None, on_cuda, on_cuda, True,
                                                       mask),
        "save_mean": lambda: ops.batch_norm_backward(x, x, None, on_cpu, on_cuda, True, mask),
        "invstd": lambda: ops.batch_norm_elemt(x, None, None, on_cuda, on_cpu),
        "'weight'": lambda: ops.batch_norm_backward_reduce(x, x, on_cuda, on_cuda, on_cpu, mask),
        "sum_dy_xmu": lambda: ops.batch_norm_backward_elemt(x, x, on_cuda, on_cuda, None, on_cuda,
                                                            on_cpu, 20),
    }
    for name, call in cases.items():
        with pytest.raises(RuntimeError, match="expected all tensors to be on the same device.*"
                                               + name):
            call()
    with pytest.raises(RuntimeError, match="expected all tensors to be on the same device"):
        DF.batch_norm(x.requires_grad_(), None, None, on_cpu, None, training=True)


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_cuda_side_stream_and_graph_capture(device):
    """The kernels run on the current stream: a side stream gives the same bits, and the ops
    capture into a CUDA graph (a launch on another stream would break the capture) whose replay
    gives the same bits again, running statistics included."""
    x, dy, (w, b, _, _) = _cuda_inputs((8, 16, 30, 30), "contiguous", torch.float32, device)

    def step():
        rm, rv = torch.zeros(16, device=device), torch.ones(16, device=device)
        out, mean, invstd = ops.batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5)
        grads = ops.batch_norm_backward(dy, x, w, mean, invstd, True, [True, True, True])
        return [out, rm, rv, *grads]

    reference = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = step()
        step()  # warm-up before capture, as torch.cuda.graph asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for r, s, c in zip(reference, on_side, captured):
        assert torch.equal(r, s) and torch.equal(r, c)


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_cuda_second_device(device):
    """Kernels run on the input's device, whatever the current device."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x, dy, (w, b, rm, rv) = _cuda_inputs((4, 13, 9, 11), "channels_last", torch.float32, "cuda:1")
    with torch.cuda.device(0):
        compare_with_native(x, rm, rv, w, b, True, grad=dy)


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_cuda_module_steps(device):
    """dlext.nn.BatchNorm2d on CUDA through train and eval steps, buffers and gradients
    included, in both layouts."""
    for fmt in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        ours, theirs = DN.BatchNorm2d(6).to(device), torch.nn.BatchNorm2d(6).to(device)
        for step, mode in enumerate(["train", "train", "eval", "train"]):
            getattr(ours, mode)()
            getattr(theirs, mode)()
            x = (torch.randn(5, 6, 13, 11, device=device) * (step + 1) + step).contiguous(
                memory_format=fmt)
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = ours(xa), theirs(xb)
            torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
            g = torch.randn_like(ya)
            ya.backward(g)
            yb.backward(g)
            torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-4)
        for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.bigmem
@pytest.mark.slow
@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("shape,last", [((1, 2, 2**30 + 5), (0, 1, -1)),   # planes
                                        ((2**30 + 5, 2), (-1, 1))])          # rows
def test_cuda_past_2_pow_31_elements(device, shape, last):
    """64-bit indexing: channel 1's last value lies past element 2^31; it is reduced, normalised
    and differentiated."""
    try:
        x = torch.zeros(shape, dtype=torch.bfloat16, device=device)
    except RuntimeError:
        pytest.skip("not enough GPU memory for a 2^31-element tensor")
    x[last] = 1.0
    count = x.numel() // 2
    dlext._C.set_poison_outputs(False)  # a full poison pass would double the test's time
    out, mean, invstd = ops.batch_norm(x, None, None, None, None, True, 0.1, 0.0)
    assert mean[0].item() == 0 and invstd[0].item() == 0  # var == eps == 0: invstd 0, as in torch
    torch.testing.assert_close(mean[1].item(), 1.0 / count, rtol=1e-5, atol=0)
    scale = invstd[1].item()
    torch.testing.assert_close(scale, (count / (1 - 1.0 / count)) ** 0.5, rtol=1e-5, atol=0)
    torch.testing.assert_close(out[last].float().item(), (1 - 1.0 / count) * scale, rtol=1e-2,
                               atol=0)
    del out
    sum_dy, sum_dy_xmu, _, _ = ops.batch_norm_backward_reduce(x, x, mean, invstd, None,
                                                              [True, False, False])
    assert sum_dy.tolist() == [0.0, 1.0]
    torch.testing.assert_close(sum_dy_xmu[1].item(), 1 - 1.0 / count, rtol=1e-6, atol=0)
