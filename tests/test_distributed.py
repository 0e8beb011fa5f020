"""dlext.nn.SyncBatchNorm and DistributedDataParallel training, against single-process references.

Two kinds of test:
- in this process: the module against torch.nn.SyncBatchNorm where torch runs on the CPU (not
  distributed), convert_sync_batchnorm, errors, and the synchronised Function over a group of
  one process (a bare ProcessGroup, nothing initialised globally);
- in two worker processes (gloo on the CPU, started once for the file and given one case at a
  time): the synchronised module against BatchNorm on the combined batch, with unequal and empty
  per-process batches, its fallbacks, gradcheck/gradgradcheck across the processes, and DDP
  training against single-process training on the combined batch.
"""
from __future__ import annotations

import copy
import queue
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dlext
import dlext.nn as DN
from conftest import DEVICES
from dlext.sync_batchnorm import _local_row, _merge_rows, _update_running, sync_batch_norm
from helpers import aten_ops_called, assert_no_native, assert_raises_like_torch, make_layout
from test_batch_norm import FORBIDDEN, assert_near
from test_batch_norm import TOL as BN_TOL

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")

WORLD = 2
COLLECTIVE_TIMEOUT_S = 30   # a collective some process never joins fails instead of hanging
CASE_TIMEOUT_S = 120
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def layout(t: torch.Tensor, name: str) -> torch.Tensor:
    """The same values in the named layout; channels_last means channels innermost in any rank."""
    if name == "channels_last":
        if t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        if t.dim() == 5:
            return t.contiguous(memory_format=torch.channels_last_3d)
        perm = [0, *range(2, t.dim()), 1]
        return t.permute(perm).contiguous().permute([perm.index(i) for i in range(t.dim())])
    return make_layout(t, name)


def collectives(names) -> set[str]:
    return {n for n in names if n.split(":")[0] in ("gloo", "nccl")}


def one_process_group(device: str):
    """A ProcessGroup of this process alone, without initialising torch.distributed."""
    store = dist.HashStore()
    if device == "cuda":
        return dist.ProcessGroupNCCL(store, 0, 1)
    return dist.ProcessGroupGloo(store, 0, 1)


@pytest.fixture(scope="module")
def groups():
    """groups(device): this file's one-process group for the device."""
    cache = {}

    def group(device: str):
        if device not in cache:
            cache[device] = one_process_group(device)
        return cache[device]
    return group


def native_bn(dims: int):
    return {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
            5: torch.nn.BatchNorm3d}[dims]


# ============================================================== in this process: the module

@pytest.mark.parametrize("kwargs", [{}, dict(momentum=None), dict(affine=False),
                                    dict(bias=False), dict(track_running_stats=False),
                                    dict(eps=1e-3, momentum=0.3, dtype=torch.float64)])
def test_module_is_a_drop_in_for_torch_sync_batch_norm(kwargs):
    """Not distributed, torch.nn.SyncBatchNorm is BatchNorm on the CPU too: same repr,
    state_dict, outputs, gradients and buffers over train / eval steps."""
    ours, theirs = DN.SyncBatchNorm(5, **kwargs), torch.nn.SyncBatchNorm(5, **kwargs)
    assert isinstance(ours, torch.nn.SyncBatchNorm)
    assert repr(ours) == repr(theirs)
    if theirs.weight is not None:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
    if theirs.bias is not None:
        with torch.no_grad():
            theirs.bias.uniform_(-1, 1)
    ours.load_state_dict(theirs.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    dtype = kwargs.get("dtype", torch.float32)
    tol = TOL[dtype]
    for step, (mode, shape) in enumerate([("train", (6, 5)), ("train", (4, 5, 3, 7)),
                                          ("eval", (3, 5, 2, 2, 3)), ("train", (2, 5, 9))]):
        getattr(ours, mode)()
        getattr(theirs, mode)()
        x = torch.randn(shape, dtype=dtype) * (step + 1) + step
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        torch.testing.assert_close(ya, yb, **tol)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad, **tol)
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        torch.testing.assert_close(a, b, **tol, msg=name)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **tol)


def test_swap_layers_turns_sync_batch_norm_into_dlext_and_back():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.SyncBatchNorm(4),
                                torch.nn.ModuleDict({"bn": torch.nn.SyncBatchNorm(4)}))
    bn = model[1]
    twin = copy.deepcopy(model)
    dlext.swap_layers(model)
    assert model[1] is bn and type(bn) is DN.SyncBatchNorm
    assert type(model[2]["bn"]) is DN.SyncBatchNorm
    assert model.dlext_swapped["1"] == "SyncBatchNorm"
    x = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(model[2]["bn"](model[:2](x)), twin[2]["bn"](twin[:2](x)),
                               rtol=1e-5, atol=1e-5)
    dlext.restore_layers(model)
    assert type(bn) is torch.nn.SyncBatchNorm


def test_module_errors_like_torch():
    ours, theirs = DN.SyncBatchNorm(3), torch.nn.SyncBatchNorm(3)
    for x in (torch.randn(3), torch.randn(4, 0, 5), torch.randn(1, 3)):
        assert_raises_like_torch(lambda: ours(x), lambda: theirs(x))
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
        ours(torch.randn(3))
    with pytest.raises(ValueError, match="number of input channels should be non-zero"):
        ours(torch.randn(4, 0, 5))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        ours(torch.randn(1, 3))


def test_convert_sync_batchnorm():
    """Every BatchNorm*D (torch's, dlext's, SyncBatchNorm) becomes a dlext SyncBatchNorm sharing
    the parameters and buffers, as torch's converter does; the rest is untouched."""
    model = torch.nn.Sequential(
        torch.nn.BatchNorm1d(4, momentum=None), DN.BatchNorm2d(4, eps=1e-3, affine=False),
        torch.nn.Sequential(torch.nn.Linear(4, 4), DN.BatchNorm3d(4, bias=False),
                            torch.nn.SyncBatchNorm(4, track_running_stats=False)),
        DN.SyncBatchNorm(4), DN.ReLU())
    model[1].eval()
    model[0].qconfig = "qconfig"
    old = [model[0], model[1], model[2][1], model[2][2], model[3]]
    reference = torch.nn.SyncBatchNorm.convert_sync_batchnorm(
        torch.nn.Sequential(*[type(m)(4) for m in old]))
    group = object()  # only stored
    converted = DN.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    new = [converted[0], converted[1], converted[2][1], converted[2][2], converted[3]]
    assert converted is model and converted[2][0] is model[2][0] and type(converted[4]) is DN.ReLU
    for a, b in zip(old, new):
        assert type(b) is DN.SyncBatchNorm and b is not a
        assert b.process_group is group
        assert repr(b) == repr(a).replace(type(a).__name__, "SyncBatchNorm")
        assert b.training == a.training
        assert b.weight is a.weight and b.bias is a.bias
        assert b.running_mean is a.running_mean and b.running_var is a.running_var
        assert b.num_batches_tracked is a.num_batches_tracked
        assert b.state_dict().keys() == a.state_dict().keys()
    assert new[0].qconfig == "qconfig" and not hasattr(new[1], "qconfig")
    assert all(type(m) is torch.nn.SyncBatchNorm for m in reference)
    bn = DN.BatchNorm2d(3)
    alone = DN.SyncBatchNorm.convert_sync_batchnorm(bn)
    assert type(alone) is DN.SyncBatchNorm and alone.weight is bn.weight
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(alone(x), torch.nn.BatchNorm2d(3)(x), rtol=1e-5, atol=1e-5)
    assert bn.num_batches_tracked.item() == 1


def test_compile_module_fullgraph():
    """Not distributed, the module compiles into one graph, buffers updated as in eager."""
    eager, ref = DN.SyncBatchNorm(4, momentum=0.3), torch.nn.SyncBatchNorm(4, momentum=0.3)
    compiled = torch.compile(DN.SyncBatchNorm(4, momentum=0.3), fullgraph=True,
                             backend="aot_eager")
    for _ in range(2):
        x = torch.randn(3, 4, 5, 5) + 2
        xs = [x.clone().requires_grad_() for _ in range(3)]
        outs = [m(xi) for m, xi in zip((eager, ref, compiled), xs)]
        for o in outs:
            (o * o).sum().backward()
        for o, xi in zip(outs, xs):
            torch.testing.assert_close(o, outs[1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(xi.grad, xs[1].grad, rtol=1e-4, atol=1e-4)
    for m in (eager, compiled):
        assert m.num_batches_tracked.item() == 2
        torch.testing.assert_close(m.running_var, ref.running_var, rtol=1e-6, atol=1e-6)


# ================================================ in this process: the synchronised Function

def run_sync(x, w, b, rm, rv, group, grad, momentum=0.1, eps=1e-5):
    """sync_batch_norm on copies: (out, running_mean, running_var, dx, dw, db)."""
    xs = x.detach().clone().requires_grad_()
    ws, bs = (None if t is None else t.detach().clone().requires_grad_() for t in (w, b))
    rms, rvs = (None if t is None else t.clone() for t in (rm, rv))
    out = sync_batch_norm(xs, ws, bs, rms, rvs, momentum, eps, group)
    out.backward(grad)
    return out, rms, rvs, xs.grad, None if ws is None else ws.grad, None if bs is None else bs.grad


def run_native(x, w, b, rm, rv, grad, momentum=0.1, eps=1e-5):
    xs = x.detach().clone().requires_grad_()
    ws, bs = (None if t is None else t.detach().clone().requires_grad_() for t in (w, b))
    rms, rvs = (None if t is None else t.clone() for t in (rm, rv))
    out = F.batch_norm(xs, rms, rvs, ws, bs, training=True, momentum=momentum, eps=eps)
    out.backward(grad)
    return out, rms, rvs, xs.grad, None if ws is None else ws.grad, None if bs is None else bs.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout_name", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", [(7, 13), (5, 13, 97), (4, 13, 7, 9), (2, 3, 5, 7, 9),
                                   (0, 3, 5)])
def test_sync_function_in_one_process_group(groups, device, dtype, layout_name, shape):
    """Over a one-process group the synchronised path is training-mode BatchNorm: output,
    gradients and running statistics as native's, the output in the kernels' layout."""
    x = layout((torch.randn(shape, dtype=torch.float64, device=device) * 2 + 1).to(dtype),
               layout_name)
    grad = layout(torch.randn(shape, dtype=torch.float64, device=device).to(dtype), layout_name)
    C, pdtype = shape[1], torch.float32 if dtype == torch.bfloat16 else dtype
    w = torch.rand(C, dtype=pdtype, device=device) + 0.5
    b = torch.randn(C, dtype=pdtype, device=device)
    rm = torch.randn(C, dtype=pdtype, device=device)
    rv = torch.rand(C, dtype=pdtype, device=device) + 0.5
    ours = run_sync(x, w, b, rm, rv, groups(device), grad)
    ref = run_native(*(t.double() for t in (x, w, b, rm, rv, grad)))
    native = run_native(x, w, b, rm, rv, grad)
    for name, o, r, n in zip(["out", "running_mean", "running_var", "dx", "dw", "db"], ours, ref,
                             native):
        assert o.dtype == n.dtype, name
        assert_near(o, r, BN_TOL[dtype], name)
        assert_near(o, n, 2 * BN_TOL[dtype], name + " vs native")
    assert ours[0].stride() == dlext.functional.batch_norm(x, None, None, training=True).stride()


@pytest.mark.parametrize("device", DEVICES)
def test_sync_function_optional_arguments(groups, device):
    x = torch.randn(6, 4, 5, dtype=torch.float64, device=device)
    grad = torch.randn_like(x)
    w = torch.rand(4, dtype=torch.float64, device=device)
    rm = torch.zeros(4, dtype=torch.float64, device=device)
    rv = torch.ones(4, dtype=torch.float64, device=device)
    for args in [(None, None, None, None), (w, None, rm, rv), (None, w, None, None)]:
        ours = run_sync(x, *args, groups(device), grad, momentum=0.7, eps=0.5)
        native = run_native(x, *args, grad, momentum=0.7, eps=0.5)
        for o, n in zip(ours, native):
            if n is None:
                assert o is None
            else:
                torch.testing.assert_close(o, n, **TOL[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
def test_sync_function_errors(groups, device):
    group = groups(device)
    x = torch.randn(4, 3, 5, device=device)
    with pytest.raises(NotImplementedError, match="not implemented for 'Long'"):
        sync_batch_norm(torch.ones(4, 3, dtype=torch.long, device=device), None, None, None, None,
                        0.1, 1e-5, group)
    with pytest.raises(RuntimeError, match="weight should contain 3 elements not 4"):
        sync_batch_norm(x, torch.ones(4, device=device), None, None, None, 0.1, 1e-5, group)
    with pytest.raises(RuntimeError, match="expected 'weight' to have dtype Float"):
        sync_batch_norm(x, torch.ones(3, device=device, dtype=torch.float64), None, None, None,
                        0.1, 1e-5, group)
    with pytest.raises(RuntimeError, match="at least 2 dimensions"):
        sync_batch_norm(x[0, 0], None, None, None, None, 0.1, 1e-5, group)
    ones = torch.ones(3, device=device)
    with pytest.raises(RuntimeError, match=r"expected 'running_mean' to be 1-D with 3 elements "
                                           r"\(one per channel, dim 1 of 'input'\), but got "
                                           r"shape \(3, 1\)"):
        sync_batch_norm(x, None, None, ones.view(3, 1), ones, 0.1, 1e-5, group)
    with pytest.raises(RuntimeError, match="expected 'running_var' to have dtype torch.float32 "
                                           "like 'input', but got torch.float64"):
        sync_batch_norm(x, None, None, None, ones.double(), 0.1, 1e-5, group)
    with pytest.raises(RuntimeError, match=r"expected 'running_mean' to have the dtype of the "
                                           r"other per-channel parameters \(torch.bfloat16\)"):
        sync_batch_norm(x.bfloat16(), ones.bfloat16(), None, ones, ones, 0.1, 1e-5, group)
    rm = torch.zeros(3, device=device)
    with pytest.raises(RuntimeError, match="bias should contain 3 elements not 2"):
        sync_batch_norm(x, None, ones[:2], rm, ones, 0.1, 1e-5, group)
    if not torch.distributed.is_initialized():  # None is the default group, when there is one
        with pytest.raises(RuntimeError, match="process_group is None and no default process "
                                               "group is initialised"):
            sync_batch_norm(x, None, None, None, None, 0.1, 1e-5, None)
    assert torch.equal(rm, torch.zeros(3, device=device))  # nothing updated on an error
    with pytest.raises(TypeError, match="NoneType"):
        sync_batch_norm(x, None, None, rm, ones, None, 1e-5, group)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(5, 3), (3, 2, 5), (2, 2, 3, 2)])
def test_gradcheck_and_gradgradcheck_in_one_process_group(groups, device, seed, shape):
    torch.manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    w = (torch.rand(shape[1], dtype=torch.float64, device=device) + 0.5).requires_grad_()
    b = torch.randn(shape[1], dtype=torch.float64, device=device, requires_grad=True)
    group = groups(device)

    def f(x, w, b):
        return sync_batch_norm(x, w, b, None, None, 0.1, 1e-5, group)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_dlext_kernels_only(groups, device):
    x = torch.randn(4, 3, 5, 6, device=device, requires_grad=True)
    w = torch.randn(3, device=device, requires_grad=True)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    module = DN.SyncBatchNorm(3).to(device)

    def fwd_bwd():
        sync_batch_norm(x, w, None, rm, rv, 0.1, 1e-5, groups(device)).sum().backward()
        for training in (True, False):  # not distributed: plain BatchNorm
            module.train(training)
            module(x).sum().backward()

    _, names = aten_ops_called(fwd_bwd)
    assert {"dlext::batch_norm_stats", "dlext::batch_norm_elemt",
            "dlext::batch_norm_backward_reduce", "dlext::batch_norm_backward_elemt",
            "dlext::batch_norm", "dlext::batch_norm_backward"} <= names
    backend = "nccl" if device == "cuda" else "gloo"
    assert collectives(names) == {f"{backend}:all_gather", f"{backend}:all_reduce"}
    assert_no_native(names, FORBIDDEN, "dlext SyncBatchNorm")


@pytest.mark.parametrize("device", DEVICES)
def test_compile_sync_function(groups, device):
    """Under torch.compile the collectives and the global count break the graph (as in torch's
    SyncBatchNorm); the result is eager's."""
    group = groups(device)

    def f(x, w, rm, rv):
        return sync_batch_norm(x * 1.5, w, None, rm, rv, 0.2, 1e-5, group).square().sum()

    compiled = torch.compile(f, backend="aot_eager")
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64, device=device)
    w = torch.rand(3, dtype=torch.float64, device=device)
    rm = torch.zeros(3, dtype=torch.float64, device=device)
    rv = torch.ones(3, dtype=torch.float64, device=device)
    args_c = [t.clone().requires_grad_(i < 2) for i, t in enumerate((x, w, rm, rv))]
    args_e = [t.clone().requires_grad_(i < 2) for i, t in enumerate((x, w, rm, rv))]
    out_c, out_e = compiled(*args_c), f(*args_e)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    for a, e in zip(args_c, args_e):
        torch.testing.assert_close(a.grad if a.requires_grad else a, e.grad if e.requires_grad
                                   else e)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 5), min_size=1, max_size=4), c=st.integers(1, 5),
       spatial=st.lists(st.integers(1, 4), max_size=3),
       dtype=st.sampled_from([torch.float32, torch.float64]), shift=st.sampled_from([0.0, 1e3]),
       momentum=st.sampled_from([0.0, 0.1, 1.0]))
def test_merged_statistics_equal_those_of_the_whole_batch(sizes, c, spatial, dtype, shift,
                                                          momentum):
    """Any split of a batch over processes (empty parts, and empty batches, included): the rows
    of the parts merged give the whole batch's statistics and running-statistics update."""
    n = sum(sizes)
    x = (torch.randn(n, c, *spatial, dtype=torch.float64) + shift).to(dtype)
    rows = torch.stack([_local_row(part, differentiable=False)
                        for part in x.split(sizes)])
    mean, invstd, m2, count = _merge_rows(rows, 1e-5, dtype)
    rm, rv = torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.5
    rm_ref, rv_ref = rm.clone(), rv.clone()
    _update_running(rm, rv, mean, m2, count, momentum)
    values = x.double().transpose(0, 1).reshape(c, -1)
    assert count == values.shape[1] and mean.dtype == invstd.dtype == dtype
    tol = TOL[dtype]
    if count == 0:
        torch.testing.assert_close(mean, torch.zeros(c, dtype=dtype), rtol=0, atol=0)
        torch.testing.assert_close(invstd, torch.full((c,), 1e-5 ** -0.5, dtype=dtype))
        assert torch.equal(rm, rm_ref) and torch.equal(rv, rv_ref)
        return
    ref_mean, ref_var = values.mean(1), values.var(1, unbiased=False)
    # float32 values 1e3 away from 0 carry 6e-5 of rounding, which the variance keeps.
    torch.testing.assert_close(mean, ref_mean.to(dtype), rtol=tol["rtol"], atol=tol["atol"])
    torch.testing.assert_close(m2 / count, ref_var, rtol=1e-4 if dtype == torch.float32 else
                               1e-10, atol=tol["atol"])
    if count > 1:  # one value: NaN running variance, as single-process BatchNorm
        F.batch_norm(x, rm_ref, rv_ref, training=True, momentum=momentum)
        torch.testing.assert_close(rm, rm_ref, **tol)
        torch.testing.assert_close(rv, rv_ref, rtol=1e-4 if dtype == torch.float32 else 1e-10,
                                   atol=tol["atol"])
    else:  # 0 * NaN is NaN: even momentum 0 gives NaN, as in dlext::batch_norm
        assert rv.isnan().all()


# ================================================================= two processes: the harness

def _worker(rank: int, store: str, tasks, results) -> None:
    """A process of the group: runs the cases it is given until it is terminated."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    dlext._C.set_poison_outputs(True)
    while True:
        case, args = tasks.get()
        torch.manual_seed(0)  # the same data on every process; each takes its part
        try:
            results.put((rank, None, case(rank, *args)))
        except BaseException:  # noqa: BLE001  (reported to the test, which fails)
            results.put((rank, traceback.format_exc(), None))


class Processes:
    """WORLD worker processes in one gloo group, started on first use and after a failure."""

    def __init__(self, tmp_dir):
        self.tmp_dir, self.procs, self.starts = tmp_dir, [], 0

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        self.starts += 1
        store = str(self.tmp_dir / f"store{self.starts}")
        self.tasks = [ctx.Queue() for _ in range(WORLD)]
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, args=(r, store, self.tasks[r], self.results),
                                  daemon=True) for r in range(WORLD)]
        for p in self.procs:
            p.start()

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
            p.join()
        self.procs = []

    def run(self, case, *args) -> list:
        """case(rank, *args) on every process; its results in rank order. A failure on any
        process fails the test with that process's traceback (and restarts the processes)."""
        if not self.procs:
            self.start()
        for q in self.tasks:
            q.put((case, args))
        answers: dict[int, tuple] = {}
        for _ in range(CASE_TIMEOUT_S):
            try:
                rank, error, value = self.results.get(timeout=1)
                answers[rank] = (error, value)
            except queue.Empty:
                if not all(p.is_alive() for p in self.procs):
                    break
            if len(answers) == WORLD:
                break
        errors = [f"process {r}:\n{e}" for r, (e, _) in sorted(answers.items()) if e]
        if len(answers) < WORLD:
            errors.append(f"processes {sorted(set(range(WORLD)) - set(answers))} did not "
                          f"answer (exit codes {[p.exitcode for p in self.procs]})")
        if errors:
            self.close()
            pytest.fail(f"{case.__name__}{args} failed:\n" + "\n".join(errors))
        return [answers[r][1] for r in range(WORLD)]


@pytest.fixture(scope="module")
def processes(tmp_path_factory):
    procs = Processes(tmp_path_factory.mktemp("dist"))
    yield procs
    procs.close()


def part(rank: int, sizes) -> slice:
    """This process's rows of a batch split as `sizes` over the processes."""
    return slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))


def all_reduced(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


# ============================================================== two processes: SyncBatchNorm

def _case_matches_combined_batch(rank, shape, sizes, dtype, layout_name, kwargs):
    """Training steps then evaluation: each process's output and input gradient are its rows of
    native BatchNorm's on the combined batch; the summed weight/bias gradients, the running
    statistics and num_batches_tracked are native's. (Evaluation without running statistics
    normalises with the local batch's, unsynchronised, as torch's SyncBatchNorm does.)"""
    C, n = shape[1], sum(sizes)
    pdtype = torch.float32 if dtype == torch.bfloat16 else dtype
    ref = native_bn(len(shape))(C, dtype=pdtype, **kwargs)
    if ref.weight is not None:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            if ref.bias is not None:
                ref.bias.uniform_(-1, 1)
    ours = DN.SyncBatchNorm(C, dtype=pdtype, **kwargs)
    ours.load_state_dict(ref.state_dict())
    rows, tol = part(rank, sizes), TOL[dtype]
    for step, mode in enumerate(["train", "train", "train", "eval"]):
        ours.train(mode == "train")
        ref.train(mode == "train")
        full = torch.randn(n, *shape[1:], dtype=torch.float64) * (step + 1) + step
        x_all = layout(full.to(dtype), layout_name)
        g_all = layout(torch.randn(full.shape, dtype=torch.float64).to(dtype), layout_name)
        local = mode == "eval" and not kwargs.get("track_running_stats", True)
        mine = slice(None) if local else rows  # this process's rows of the reference
        x_ref = (x_all[rows] if local else x_all).detach().requires_grad_()
        y_ref = ref(x_ref)
        y_ref.backward(g_all[rows] if local else g_all)
        x = x_all[rows].detach().requires_grad_()
        y = ours(x)
        y.backward(g_all[rows])
        torch.testing.assert_close(y, y_ref[mine], **tol)
        torch.testing.assert_close(x.grad, x_ref.grad[mine], **tol)
        for p, q in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad if local else all_reduced(p.grad), q.grad, **tol)
            p.grad = q.grad = None
        for (name, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
            torch.testing.assert_close(a, b, **tol, msg=name)


@pytest.mark.parametrize("shape,sizes,dtype,layout_name,kwargs", [
    ((0, 5, 4, 7), (3, 4), torch.float64, "contiguous", {}),
    ((0, 5, 4, 7), (6, 0), torch.float64, "channels_last", dict(momentum=None)),
    ((0, 5, 4, 7), (0, 5), torch.float32, "strided", dict(bias=False)),
    ((0, 13), (1, 6), torch.float32, "contiguous", dict(affine=False)),
    ((0, 3, 97), (2, 5), torch.float64, "transposed", dict(momentum=None, eps=0.1)),
    ((0, 3, 2, 3, 5), (2, 1), torch.float64, "channels_last", dict(track_running_stats=False)),
    ((0, 6, 5, 5), (4, 3), torch.bfloat16, "channels_last", {}),
])
def test_sync_batch_norm_matches_combined_batch(processes, shape, sizes, dtype, layout_name,
                                                kwargs):
    processes.run(_case_matches_combined_batch, shape, sizes, dtype, layout_name, kwargs)


def _case_when_it_synchronises(rank):
    """As torch decides: training over a group of more than one process synchronises;
    evaluation, and groups of one process, are local BatchNorm without a collective."""
    singles = [dist.new_group([r]) for r in range(WORLD)]  # every process creates every group
    both = dist.new_group(list(range(WORLD)))
    sizes = (3, 5)
    full = torch.randn(sum(sizes), 4, 6, dtype=torch.float64) + torch.arange(4.0).view(1, 4, 1)
    x = full[part(rank, sizes)]
    w, b = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)

    def module(**kwargs):
        m = DN.SyncBatchNorm(4, dtype=torch.float64, **kwargs)
        with torch.no_grad():
            m.weight.copy_(w)
            m.bias.copy_(b)
            if m.running_mean is not None:
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 1.5)
        return m

    def check(m, inp, stats, training, synchronised, momentum=0.1):
        rm, rv = (None, None) if stats is None else (t.clone() for t in stats)
        y, names = aten_ops_called(m, inp)
        assert bool(collectives(names)) == synchronised, collectives(names)
        ref = F.batch_norm(full if synchronised else inp, rm, rv, w, b, training=training,
                           momentum=momentum)
        torch.testing.assert_close(y, ref[part(rank, sizes)] if synchronised else ref,
                                   **TOL[torch.float64])
        if stats is not None:
            torch.testing.assert_close(m.running_mean, rm, **TOL[torch.float64])
            torch.testing.assert_close(m.running_var, rv, **TOL[torch.float64])

    m = module().eval()
    check(m, x, (m.running_mean, m.running_var), False, False)
    check(module(track_running_stats=False).eval(), x, None, True, False)
    m = module(process_group=singles[rank])
    check(m, x, (m.running_mean, m.running_var), True, False)
    m = module(process_group=both)
    check(m, x, (m.running_mean, m.running_var), True, True)
    m = module(momentum=None)  # the first batch's statistics: a cumulative average
    check(m, x, (m.running_mean, m.running_var), True, True, momentum=1.0)
    m.eval()
    check(m, x, (m.running_mean, m.running_var), False, False)


def test_when_it_synchronises(processes):
    processes.run(_case_when_it_synchronises)


# Helpers that make a function of the whole batch, the same on every process, of the
# synchronised layer, so torch.autograd.gradcheck can differentiate it on each process in step:
# _Scatter takes this process's rows of the batch, _Gather puts every process's rows back
# together; _Replicate hands a value to the local computation, whose gradient _Reduce sums.

class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, full, rows):
        ctx.rows, ctx.n = rows, full.shape[0]
        return full[rows].clone()

    @staticmethod
    def backward(ctx, grad):
        return _Gather.apply(grad, ctx.n, ctx.rows), None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, n, rows):
        ctx.rows = rows
        full = local.new_zeros((n, *local.shape[1:]))
        full[rows] = local
        dist.all_reduce(full)
        return full

    @staticmethod
    def backward(ctx, grad):
        return _Scatter.apply(grad, ctx.rows), None, None


class _Replicate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        return _Reduce.apply(grad)


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return all_reduced(t)

    @staticmethod
    def backward(ctx, grad):
        return _Replicate.apply(grad)


def _case_gradcheck(rank, seed, shape, sizes):
    torch.manual_seed(seed)
    x = torch.randn(sum(sizes), *shape[1:], dtype=torch.float64, requires_grad=True)
    w = (torch.rand(shape[1], dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    rows = part(rank, sizes)

    def f(x, w, b):
        y = sync_batch_norm(_Scatter.apply(x, rows), _Replicate.apply(w), _Replicate.apply(b),
                            None, None, 0.1, 1e-5, dist.group.WORLD)
        return _Gather.apply(y, x.shape[0], rows)

    torch.testing.assert_close(f(x, w, b), F.batch_norm(x, None, None, w, b, training=True),
                               **TOL[torch.float64])
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("seed,shape,sizes", [(0, (0, 2, 3), (2, 3)), (1, (0, 2, 2, 2), (3, 0))])
def test_gradcheck_and_gradgradcheck_across_processes(processes, seed, shape, sizes):
    processes.run(_case_gradcheck, seed, shape, sizes)


# ===================================================================== two processes: DDP

def _model(sync: bool) -> torch.nn.Module:
    """A small CNN of dlext layers (BatchNorm when `sync`, ReLU, max-pooling) and torch Linear
    layers; without `sync`, one that DDP trains exactly like the combined batch as it is."""
    torch.manual_seed(1)
    norm = (lambda c, cls: cls(c).double()) if sync else (lambda c, cls: torch.nn.Identity())
    model = torch.nn.Sequential(
        norm(3, DN.BatchNorm2d), DN.ReLU(), DN.MaxPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(27, 6), norm(6, DN.BatchNorm1d), DN.ReLU(inplace=True),
        torch.nn.Linear(6, 4)).double()
    with torch.no_grad():
        for m in model:
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def _native_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose dlext layers are their torch.nn parents (only forward differs)."""
    twin = copy.deepcopy(model)
    for m in twin:
        if type(m).__module__ == "dlext.nn":
            m.__class__ = type(m).__bases__[0]
    assert not any(type(m).__module__ == "dlext.nn" for m in twin)
    return twin


def _case_ddp_training(rank, sync, per_process, steps):
    """DDP of dlext layers: after each SGD step every parameter and buffer equals
    single-process training of native layers on the combined batch. DDP refuses SyncBatchNorm
    layers in a CPU module when it is built (torch's SyncBatchNorm has no CPU kernels), so the
    BatchNorm layers of the model DDP wraps are converted afterwards, in place."""
    model = _model(sync)
    ref = _native_twin(model)
    start = {k: v.clone() for k, v in ref.state_dict().items()}
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    if sync:
        DN.SyncBatchNorm.convert_sync_batchnorm(ddp.module)
        assert sum(type(m) is DN.SyncBatchNorm for m in model.modules()) == 2
    opt = torch.optim.SGD(ddp.parameters(), lr=0.2, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9)
    rows = part(rank, [per_process] * WORLD)
    for _ in range(steps):
        x = torch.randn(per_process * WORLD, 3, 7, 7, dtype=torch.float64)
        target = torch.randint(0, 4, (per_process * WORLD,))
        for net, optim, inp, tgt in ((ddp, opt, x[rows], target[rows]), (ref, opt_ref, x, target)):
            optim.zero_grad()
            F.cross_entropy(net(inp), tgt).backward()
            optim.step()
        for (name, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    assert all(not torch.equal(v, start[k]) for k, v in ref.state_dict().items())


@pytest.mark.parametrize("sync", [False, True])
def test_ddp_training_equals_combined_batch(processes, sync):
    processes.run(_case_ddp_training, sync, 5, 3)
