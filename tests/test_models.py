"""Models and layer swapping: dlext's LeNet-5 / ResNets and dlext.swap_layers against torch."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import dlext
import dlext.nn as DN
from dlext.models import lenet5, resnet18, resnet34, resnet50


def max_abs_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def max_rel_diff(a, b) -> float:
    """Largest difference of each tensor pair relative to that tensor's largest magnitude."""
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item() for x, y in zip(a, b))


@pytest.mark.parametrize("factory,tv_factory", [(resnet18, torchvision.models.resnet18),
                                                (resnet34, torchvision.models.resnet34),
                                                (resnet50, torchvision.models.resnet50)])
def test_resnets_load_torchvision_weights(factory, tv_factory):
    torch.manual_seed(0)
    tv = tv_factory().double().eval()
    ours = factory().double().eval()
    assert list(ours.state_dict()) == list(tv.state_dict())
    ours.load_state_dict(tv.state_dict())
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    torch.testing.assert_close(ours(x), tv(x), rtol=1e-10, atol=1e-10)
    kinds = {type(m) for m in ours.modules()}
    assert {DN.Conv2d, DN.BatchNorm2d, DN.ReLU, DN.MaxPool2d} <= kinds
    assert nn.Conv2d not in kinds and nn.BatchNorm2d not in kinds


@pytest.mark.parametrize("tv_factory", [torchvision.models.resnet18, torchvision.models.resnet50])
def test_swapped_torchvision_resnet_equals_native_in_train_and_eval(tv_factory):
    torch.manual_seed(0)
    native = tv_factory().double()
    ours = dlext.swap_layers(copy.deepcopy(native))
    assert set(ours.dlext_swapped.values()) == {"Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"}
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    for training in (True, False):
        native.train(training)
        ours.train(training)
        native.zero_grad()
        ours.zero_grad()
        a, b = native(x), ours(x)
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)
        a.square().sum().backward()
        b.square().sum().backward()
        assert max_rel_diff([p.grad for p in ours.parameters()],
                            [p.grad for p in native.parameters()]) < 1e-10
        assert max_abs_diff(list(ours.buffers()), list(native.buffers())) < 1e-12


class Nested(nn.Module):
    """Sequential, ModuleDict and plain attributes, nested."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.parts = nn.ModuleDict({"pool": nn.MaxPool2d(2),
                                    "inner": nn.Sequential(nn.Conv2d(4, 4, 1))})

    def forward(self, x):
        return self.parts["inner"](self.parts["pool"](self.stem(x)))


def test_swap_keeps_identity_parameters_hooks_and_mode_and_restores():
    torch.manual_seed(0)
    model = Nested().eval()
    conv = model.stem[0]
    weight = conv.weight
    before = weight.detach().clone()
    calls = []
    conv.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(1, 3, 9, 9)
    ref = model(x)
    assert dlext.swap_layers(model) is model
    assert model.stem[0] is conv and type(conv) is DN.Conv2d and conv.weight is weight
    assert type(model.parts["inner"][0]) is DN.Conv2d and type(model.parts["pool"]) is DN.MaxPool2d
    assert not model.training and not model.stem[1].training
    out = model(x)
    torch.testing.assert_close(out, ref)
    assert len(calls) == 2                      # the hook survived the swap
    out.sum().backward()
    opt.step()                                  # the optimizer still holds the same parameters
    assert not torch.equal(conv.weight.detach(), before)
    dlext.restore_layers(model)
    assert type(conv) is nn.Conv2d and type(model.parts["pool"]) is nn.MaxPool2d
    assert model.dlext_swapped == {}


def test_swap_include_and_exclude():
    def make():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 4, 1),
                                                                         nn.ReLU()))
    m = dlext.swap_layers(make(), include=[nn.Conv2d])
    assert set(m.dlext_swapped.values()) == {"Conv2d"} and type(m[1]) is nn.ReLU
    m = dlext.swap_layers(make(), exclude=["2.*"])
    assert set(m.dlext_swapped) == {"0", "1"} and type(m[2][0]) is nn.Conv2d
    m = dlext.swap_layers(make(), include=["ReLU"], exclude=["1"])
    assert set(m.dlext_swapped) == {"2.1"}


def test_swap_leaves_user_subclasses_alone():
    class MyConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    m = dlext.swap_layers(nn.Sequential(MyConv(1, 1, 1)))
    assert type(m[0]) is MyConv and m.dlext_swapped == {}


def test_lenet5_shapes_and_native_twin():
    torch.manual_seed(0)
    ours = lenet5()
    torch.manual_seed(0)
    native = lenet5(native=True)
    assert list(ours.state_dict()) == list(native.state_dict())
    native.load_state_dict(ours.state_dict())
    x = torch.randn(5, 1, 32, 32)
    assert ours(x).shape == (5, 10)
    torch.testing.assert_close(ours(x), native(x), rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in ours.parameters()) == 61706     # the classic LeNet-5 count


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = resnet18(num_classes=7)
    model.train()
    model(torch.randn(2, 3, 32, 32))              # move the running statistics
    path = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), path)
    native = torchvision.models.resnet18(num_classes=7)
    native.load_state_dict(torch.load(path))
    again = resnet18(num_classes=7)
    again.load_state_dict(torch.load(path))
    native.eval()
    again.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again(x), native(x), rtol=1e-4, atol=1e-4)


def _train_steps(model, loss_fn, batches, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["lenet5", "resnet18"])
def test_float64_training_matches_native_step_for_step(name):
    torch.manual_seed(0)
    if name == "lenet5":
        ours, native = lenet5().double(), lenet5(native=True).double()
        shape, classes = (6, 1, 32, 32), 10
    else:
        ours, native = resnet18(num_classes=4).double(), resnet18(num_classes=4, native=True).double()
        shape, classes = (8, 3, 48, 48), 4   # 2x2 at layer4: 32 values per BN channel
    native.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(shape, generator=g, dtype=torch.float64),
                torch.randint(0, classes, shape[:1], generator=g)) for _ in range(4)]
    a = _train_steps(ours, DN.CrossEntropyLoss(), batches)
    b = _train_steps(native, nn.CrossEntropyLoss(), batches)
    # float64 rounding differs between the kernels (summation order) and SGD with momentum
    # amplifies it a little each step; a wrong term would show at 1e-2, not 1e-8.
    assert max(abs(x - y) / abs(y) for x, y in zip(a, b)) < 1e-8
    assert max_rel_diff(list(ours.parameters()), list(native.parameters())) < 1e-8
    if name == "resnet18":
        assert max_rel_diff([b for b in ours.buffers() if b.is_floating_point()],
                            [b for b in native.buffers() if b.is_floating_point()]) < 1e-8


def test_autocast_treats_dlext_ops_like_their_native_twins():
    """CPU autocast (bfloat16): convolutions in bfloat16, the loss in float32, as for torch.nn."""
    torch.manual_seed(0)
    ours, native = lenet5(), lenet5(native=True)
    native.load_state_dict(ours.state_dict())
    x, y = torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))
    seen = {}

    def record(module, inputs, output):   # returns None: a hook's result would replace the output
        seen["conv"] = output.dtype

    ours.features[0].register_forward_hook(record)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ours(x), native(x)
        la, lb = DN.CrossEntropyLoss()(a, y), nn.CrossEntropyLoss()(b, y)
    assert seen["conv"] == torch.bfloat16 and a.dtype == b.dtype == torch.bfloat16
    assert la.dtype == lb.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    la.backward()
    lb.backward()
    for p, q in zip(ours.parameters(), native.parameters()):
        assert p.grad.dtype == q.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("name", ["lenet5", "resnet18"])
def test_compile_fullgraph_over_a_dlext_model(name):
    torch.manual_seed(0)
    model = (lenet5() if name == "lenet5" else resnet18(num_classes=5)).double()
    twin = copy.deepcopy(model)
    shape = (4, 1, 32, 32) if name == "lenet5" else (2, 3, 32, 32)
    x, y = torch.randn(shape, dtype=torch.float64), torch.randint(0, 5, shape[:1])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss_c = DN.CrossEntropyLoss()(compiled(x), y)
    loss_e = DN.CrossEntropyLoss()(twin(x), y)
    loss_c.backward()
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    assert max_rel_diff([p.grad for p in model.parameters()],
                        [p.grad for p in twin.parameters()]) < 1e-12
    for b, c in zip(model.buffers(), twin.buffers()):   # running stats updated the same way
        torch.testing.assert_close(b, c)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", ["lenet5", "resnet18"])
def test_torch_export_of_a_dlext_model(name, mode, strict):
    """torch.export traces the Functions' forwards (non-strict export with grad mode on, where
    the in-place ops' Autograd kernel once refused parameters that require grad); the exported
    program computes what the model does, running statistics included."""
    torch.manual_seed(0)
    model = lenet5() if name == "lenet5" else resnet18(num_classes=5)
    getattr(model, mode)()
    twin = copy.deepcopy(model)
    shape = (4, 1, 32, 32) if name == "lenet5" else (2, 3, 32, 32)
    x = torch.randn(shape)
    exported = torch.export.export(model, (x,), strict=strict).module()
    torch.testing.assert_close(exported(x), twin(x), rtol=1e-5, atol=1e-5)
    twin_buffers = dict(twin.named_buffers())
    for key, b in exported.named_buffers():
        torch.testing.assert_close(b, twin_buffers[key], msg=key)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fx_symbolic_trace_and_feature_extraction(mode):
    """dlext.functional hands torch.fx proxies to __torch_function__ as torch.nn.functional does,
    so symbolic tracing (torch.nn layers are leaves, dlext's are traced into) records
    dlext.functional calls, and torchvision's feature extractor works on a swapped model."""
    from torchvision.models.feature_extraction import create_feature_extractor

    import dlext.functional as DF

    torch.manual_seed(0)
    model = getattr(resnet18(num_classes=5), mode)()
    twin = copy.deepcopy(model)
    traced = torch.fx.symbolic_trace(model)
    called = {n.target for n in traced.graph.nodes if n.op == "call_function"}
    assert {DF.conv2d, DF.batch_norm, DF.relu, DF.max_pool2d} <= called
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(traced(x), twin(x), rtol=1e-5, atol=1e-5)
    swapped = dlext.swap_layers(torchvision.models.resnet18(num_classes=5))
    getattr(swapped, mode)()
    reference = copy.deepcopy(swapped)
    features = create_feature_extractor(swapped, {"layer2": "mid", "fc": "out"})(x)
    torch.testing.assert_close(features["out"], reference(x), rtol=1e-5, atol=1e-5)
    assert features["mid"].shape == (2, 128, 4, 4)


def test_functional_forms_keep_tensor_subclasses():
    """__torch_function__ subclasses see the dlext.functional call, as with torch's."""
    seen = []

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__module__", None))
            return super().__torch_function__(func, types, args, kwargs or {})

    import dlext.functional as DF

    x = torch.randn(2, 3, 6, 6).as_subclass(Logged)
    w = torch.randn(4, 3, 3, 3)
    out = DF.cross_entropy(DF.max_pool2d(DF.relu(DF.batch_norm(
        DF.conv2d(x, w), None, None, training=True)), 2).flatten(1), torch.tensor([0, 1]))
    assert isinstance(out, Logged)
    assert seen.count("dlext.functional") == 5


def test_overrides_receive_the_call_torch_gives_them():
    """A __torch_function__ override sees dlext's functional call in the form it sees torch's:
    the same function name, positional count and keyword names."""
    import torch.nn.functional as F

    import dlext.functional as DF

    class Recorder(torch.Tensor):
        calls: list = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if getattr(func, "__module__", "") in ("torch.nn.functional", "dlext.functional"):
                cls.calls.append((func.__name__, len(args), sorted(kwargs or {})))
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))

    x = torch.randn(2, 3, 6, 6).as_subclass(Recorder)
    logits, t = torch.randn(2, 5).as_subclass(Recorder), torch.tensor([0, 1])
    for lib in (F, DF):  # (torch's conv2d is a C builtin: not recorded here)
        lib.max_pool2d(x, 2)
        lib.max_pool2d(x, 2, return_indices=True)
        lib.relu(x)
        lib.batch_norm(x, None, None, training=True)
        lib.cross_entropy(logits, t, label_smoothing=0.1)
    half = len(Recorder.calls) // 2
    assert half == 5 and Recorder.calls[:half] == Recorder.calls[half:]
    Recorder.calls.clear()
    DF.conv2d(x, torch.randn(4, 3, 3, 3), None, 1, 1)
    assert Recorder.calls == [("conv2d", 2, ["bias", "dilation", "groups", "padding", "stride"])]


@pytest.mark.parametrize("layer", ["BatchNorm2d", "SyncBatchNorm"])
def test_fx_traces_batch_norm_layers(layer):
    """The BatchNorm layers under torch.fx: no branch on proxies; the traced module updates the
    running statistics as the eager one. momentum=None (1 / num_batches_tracked, a buffer update
    fx runs once at trace time instead of recording it) is refused, not traced wrong."""
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="cannot trace a dlext BatchNorm layer with momentum"):
        torch.fx.symbolic_trace(getattr(DN, layer)(3, momentum=None))
    module = getattr(DN, layer)(3)
    twin = copy.deepcopy(module)
    traced = torch.fx.symbolic_trace(module)
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5)
        torch.testing.assert_close(traced(x), twin(x), rtol=1e-6, atol=1e-6)
    twin_buffers = dict(twin.named_buffers())
    for key, b in traced.named_buffers():
        torch.testing.assert_close(b, twin_buffers[key], rtol=1e-6, atol=1e-7, msg=key)
