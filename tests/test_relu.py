"""ReLU: dlext.functional.relu / dlext.nn.ReLU / torch.ops.dlext.relu* against torch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dlext
import dlext.functional as DF
import dlext.nn as DN
from conftest import DEVICES
from helpers import aten_ops_called, assert_no_native, make_layout

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
INT_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]
SHAPES = [(), (0,), (1,), (7,), (13, 97), (3, 5, 7, 9), (2, 3, 0, 4), (1025,), (4, 3, 13, 17)]
LAYOUTS = ["contiguous", "transposed", "strided", "channels_last"]


def random_input(shape, dtype, device):
    """Values of both signs with zeros, -0.0 and (for floats) NaN and infinities mixed in."""
    if dtype.is_floating_point:
        x = torch.randn(shape, dtype=torch.float64, device=device) * 3
        if x.numel() >= 8:
            flat = x.view(-1)
            flat[0], flat[1], flat[2] = 0.0, -0.0, float("nan")
            flat[3], flat[4] = float("inf"), float("-inf")
        return x.to(dtype)
    lo = 0 if dtype == torch.uint8 else -100
    return torch.randint(lo, 100, shape, dtype=dtype, device=device)


def layouts_for(shape):
    return [lay for lay in LAYOUTS if lay != "channels_last" or len(shape) == 4]


CASES = [(s, lay) for s in SHAPES for lay in layouts_for(s)]


def assert_identical(out, ref):
    """Bit-for-bit agreement: values, NaNs in the same places and the sign of zero."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    if out.dtype.is_floating_point:
        assert torch.equal(torch.signbit(out), torch.signbit(ref))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + INT_DTYPES)
@pytest.mark.parametrize("shape,layout", CASES)
def test_forward_matches_native(device, dtype, shape, layout):
    x = make_layout(random_input(shape, dtype, device), layout)
    out = DF.relu(x)
    ref = F.relu(x)
    assert_identical(out, ref)
    if layout in ("contiguous", "channels_last", "transposed") and x.numel() > 0:
        assert out.stride() == ref.stride(), "a dense input's layout must be kept, as torch does"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,layout", CASES)
def test_backward_matches_native(device, dtype, shape, layout):
    x = make_layout(random_input(shape, dtype, device), layout)
    grad = make_layout(torch.randn(shape, device=device).to(dtype), layout)
    xa = x.detach().requires_grad_()
    xb = x.detach().requires_grad_()
    DF.relu(xa).backward(grad)
    F.relu(xb).backward(grad)
    assert_identical(xa.grad, xb.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_backward_with_stride_zero_grad(device, reduce):
    """.sum()/.mean() hand backward an expanded grad_output whose strides are all 0."""
    x = torch.randn(6, 7, 9, device=device, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    getattr(DF.relu(xa), reduce)().backward()
    getattr(F.relu(xb), reduce)().backward()
    assert_identical(xa.grad, xb.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_is_zero_at_zero_and_passes_nan(device):
    x = torch.tensor([-1.0, -0.0, 0.0, 2.0, float("nan")], device=device, requires_grad=True)
    DF.relu(x).backward(torch.ones(5, device=device))
    assert x.grad.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 4), (2, 3, 5, 7)])
def test_gradcheck_and_gradgradcheck(device, seed, shape):
    torch.manual_seed(seed)
    # Keep values away from the kink at 0, where finite differences are meaningless.
    x = torch.randn(shape, dtype=torch.float64, device=device)
    x = (x + 0.1 * x.sign()).requires_grad_()
    assert torch.autograd.gradcheck(DF.relu, (x,))
    assert torch.autograd.gradgradcheck(DF.relu, (x,))
    inplace = lambda t: DF.relu(t.clone(), inplace=True)  # noqa: E731
    assert torch.autograd.gradcheck(inplace, (x,))
    assert torch.autograd.gradgradcheck(inplace, (x,))
    assert torch.autograd.gradgradcheck(torch.ops.dlext.relu, (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_inplace(device, dtype, layout):
    x = make_layout(random_input((4, 3, 5, 7), dtype, device), layout)
    ref = F.relu(x)
    version = x._version
    out = DF.relu(x, inplace=True)
    assert out is x
    assert x._version > version
    assert_identical(x, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_autograd(device):
    x = torch.randn(5, 6, device=device, requires_grad=True)
    y = x * 2
    DF.relu(y, inplace=True)
    y.sum().backward()
    torch.testing.assert_close(x.grad, 2.0 * (x > 0).float(), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_refused_inplace_leaves_the_tensor_untouched(device):
    """torch refuses these before writing; so must dlext (a Function is refused after its
    forward has already written)."""
    leaf = torch.tensor([-1.0, 2.0], device=device, requires_grad=True)
    with torch.no_grad():
        no_grad_view = leaf[:]
    multi_output_view = (leaf * 1).unbind()[0]
    for t, words in ((leaf, "a leaf Variable that requires grad is being used in an in-place"),
                     (leaf[:1], "a view of a leaf Variable that requires grad"),
                     (no_grad_view, "A view was created in no_grad mode"),
                     (multi_output_view, "output of a function that returns multiple views")):
        before, version = t.detach().clone(), t._version
        with pytest.raises(RuntimeError, match=words):
            F.relu(t, inplace=True)  # torch's own refusal, for the record
        with pytest.raises(RuntimeError, match=words):
            DF.relu(t, inplace=True)
        assert torch.equal(t.detach(), before) and t._version == version
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad"):
        DN.ReLU(inplace=True)(torch.nn.Parameter(torch.tensor([-1.0], device=device)))


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_on_a_tensor_saved_for_backward_is_caught(device):
    """Autograd's version counter must see our in-place write, as it sees torch's."""
    x = torch.randn(5, device=device, requires_grad=True)
    y = x.exp()                 # exp saves its output for backward
    DF.relu(y, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_errors(device):
    for bad in (torch.ones(3, dtype=torch.bool, device=device),
                torch.ones(3, dtype=torch.complex64, device=device)):
        for inplace in (False, True):  # torch's exception type; the words may differ
            with pytest.raises(Exception) as native:
                F.relu(bad.clone(), inplace=inplace)
            with pytest.raises(native.type, match="not supported for"):
                DF.relu(bad.clone(), inplace=inplace)
    with pytest.raises(TypeError, match="must be Tensor"):
        DF.relu([1.0, 2.0])
    y = torch.ones(3, 4, device=device)
    with pytest.raises(RuntimeError, match="'grad_output' to have the shape of 'result'"):
        torch.ops.dlext.relu_backward(torch.ones(4, 3, device=device), y)
    with pytest.raises(RuntimeError, match="'grad_output' to have the same dtype as 'result'"):
        torch.ops.dlext.relu_backward(torch.ones(3, 4, device=device, dtype=torch.float64), y)


def test_module_is_a_drop_in():
    for inplace in (False, True):
        ours, theirs = DN.ReLU(inplace=inplace), torch.nn.ReLU(inplace=inplace)
        assert isinstance(ours, torch.nn.ReLU)
        assert repr(ours) == repr(theirs)
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        x = torch.randn(4, 5)
        assert_identical(ours(x.clone()), theirs(x.clone()))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(3, 5, 7, device=device)
    for args in [(x,), (x.requires_grad_(),), (x.detach().transpose(0, 2),)]:
        torch.library.opcheck(torch.ops.dlext.relu.default, args)
    torch.library.opcheck(torch.ops.dlext.relu_.default, (torch.randn(3, 5, device=device),))
    y = torch.randn(4, 6, device=device).relu()
    torch.library.opcheck(torch.ops.dlext.relu_backward.default, (torch.randn(4, 6, device=device), y))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    def f(t):
        return DF.relu(t * 1.5 - 0.2).sum() + DF.relu(t.clone(), inplace=True).mean()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 9, device=device, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_c, out_e = compiled(xa), f(xb)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(xa.grad, xb.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_inplace_without_grad(device):
    """In-place ReLU on a tensor that needs no gradient (inference, frozen layers) is the raw
    mutating op, which compiles into one graph (a Function marking its input dirty would not)."""
    def f(t):
        y = t * 2.0
        DF.relu(y, inplace=True)
        return y + 1

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 7, device=device)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), F.relu(x * 2.0) + 1, rtol=0, atol=0)
    torch.testing.assert_close(compiled(x), F.relu(x * 2.0) + 1, rtol=0, atol=0)
    model = dlext.models.lenet5().to(device).eval()
    with torch.no_grad():
        images = torch.randn(3, 1, 32, 32, device=device)
        compiled_model = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled_model(images), model(images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_dlext_kernels_only(device):
    forbidden = {"aten::relu", "aten::relu_", "aten::clamp", "aten::clamp_", "aten::clamp_min",
                 "aten::clamp_min_", "aten::threshold", "aten::threshold_",
                 "aten::threshold_backward", "aten::maximum", "aten::where", "aten::le", "aten::gt"}
    x = torch.randn(8, 9, device=device, requires_grad=True)

    def fwd_bwd():
        y = DF.relu(x * 1)
        y.backward(torch.ones_like(y))
        DF.relu(x.detach().clone(), inplace=True)

    _, names = aten_ops_called(fwd_bwd)
    assert {"dlext::relu", "dlext::relu_backward", "dlext::relu_"} <= names
    assert_no_native(names, forbidden, "dlext relu")


@pytest.mark.bigmem
@pytest.mark.slow
def test_past_2_pow_31_elements():
    """64-bit indexing: elements beyond index 2^31 are read and written."""
    n = 2**31 + 5
    try:
        x = torch.full((n,), -1, dtype=torch.int8)
    except RuntimeError:
        pytest.skip("not enough memory for a 2^31-element tensor")
    x[-3:] = torch.tensor([7, -2, 9], dtype=torch.int8)
    x[2**31 - 1] = 5
    dlext._C.set_poison_outputs(False)  # a full poison pass would double the test's time
    y = DF.relu(x)
    assert y[-3:].tolist() == [7, 0, 9] and y[2**31 - 1].item() == 5
    assert y.sum(dtype=torch.int64).item() == 21
    del y
    DF.relu(x, inplace=True)
    assert x.sum(dtype=torch.int64).item() == 21


@pytest.mark.parametrize("device", DEVICES)
def test_raw_inplace_op_is_safe_under_autograd(device):
    """torch.ops.dlext.relu_ bumps the version counter and refuses tensors that require grad."""
    a = torch.randn(5, device=device, requires_grad=True)
    w = torch.randn(5, device=device)
    z = a * w                           # saves w for backward
    torch.ops.dlext.relu_(w)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()
    with pytest.raises(RuntimeError, match="argument 'self' requires grad"):
        torch.ops.dlext.relu_(a * 1)
    with torch.no_grad():
        y = a * 1
        torch.ops.dlext.relu_(y)
    assert_identical(y, F.relu(a.detach()))


@pytest.mark.parametrize("device", DEVICES)
def test_raw_functional_op_is_differentiable(device):
    x = torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.ops.dlext.relu(x)
    y.backward(torch.ones_like(y))
    assert_identical(x.grad, (x > 0).double())


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_and_subnormal_values_keep_their_sign(device):
    """Comparisons are exact in the input dtype: 1e-300 is positive, -5e-324 is negative."""
    x = torch.tensor([1e-300, -1e-300, 5e-324, -5e-324, 1e-40, -1e-40], dtype=torch.float64,
                     device=device, requires_grad=True)
    xf = x.detach().float()             # 1e-40 is subnormal in float32
    assert_identical(DF.relu(x), F.relu(x))
    assert_identical(DF.relu(xf), F.relu(xf))
    DF.relu(x).backward(torch.ones_like(x))
    assert x.grad.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
