"""A meta tensor mixed with real ones: the dispatcher runs the fake kernel (Meta outranks CPU),
which must refuse it as the real kernels refuse mixed devices, never return uninitialised
memory. Every dlext operator, through its raw op; the functional forms through the same path."""
from __future__ import annotations

import pytest
import torch

import dlext  # noqa: F401  (registers the ops)
import dlext.functional as DF

ops = torch.ops.dlext


def meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


x4 = torch.randn(2, 3, 6, 6)
w4 = torch.randn(4, 3, 3, 3)
idx = torch.zeros(2, 3, 3, 3, dtype=torch.long)
logits, labels = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
lse, tw = torch.zeros(2, 4, 1), torch.ones(())

CASES = {
    "relu_backward": lambda: ops.relu_backward(meta(2, 3), torch.randn(2, 3)),
    "max_pool2d_backward": lambda: ops.max_pool2d_backward(
        meta(2, 3, 3, 3), idx, [2, 3, 6, 6], [2, 2], [2, 2], [0, 0], [1, 1], False),
    "conv2d weight": lambda: ops.conv2d(x4, meta(4, 3, 3, 3), None, [1, 1], [0, 0, 0, 0], [1, 1],
                                        1),
    "conv2d bias": lambda: ops.conv2d(x4, w4, meta(4), [1, 1], [0, 0, 0, 0], [1, 1], 1),
    "conv2d_backward": lambda: ops.conv2d_backward(meta(2, 4, 4, 4), x4, w4, [1, 1],
                                                   [0, 0, 0, 0], [1, 1], 1, [True, True, True]),
    "batch_norm": lambda: ops.batch_norm(x4, None, None, meta(3), meta(3), False, 0.1, 1e-5),
    "batch_norm_elemt": lambda: ops.batch_norm_elemt(x4, None, None, meta(3), meta(3)),
    "batch_norm_backward_reduce": lambda: ops.batch_norm_backward_reduce(
        x4, x4, meta(3), meta(3), None, [True, True, True]),
    "batch_norm_backward_elemt": lambda: ops.batch_norm_backward_elemt(
        x4, x4, meta(3), meta(3), None, meta(3), meta(3), 72),
    "batch_norm_backward": lambda: ops.batch_norm_backward(x4, x4, None, meta(3), meta(3), True,
                                                           [True, True, True]),
    "cross_entropy": lambda: ops.cross_entropy(logits, labels, meta(5), 1, -100, 0.0),
    "cross_entropy_backward": lambda: ops.cross_entropy_backward(
        tw, logits, labels, None, meta(2, 4, 1), tw, 1, -100, 0.0, [True, False, False]),
    "F.conv2d": lambda: DF.conv2d(x4, meta(4, 3, 3, 3)),
    "F.batch_norm eval": lambda: DF.batch_norm(x4, meta(3), meta(3)),
    "F.batch_norm weight": lambda: DF.batch_norm(x4, None, None, meta(3), training=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_meta_mixed_with_cpu_is_refused(name):
    with pytest.raises(RuntimeError, match=r"expected all tensors to be on the same device, but "
                                           r"'\w+' is on (cpu|meta) and '\w+' is on (meta|cpu)"):
        CASES[name]()


def test_all_meta_still_traces_shapes():
    """The check compares devices only: all-meta calls describe their outputs as before."""
    out = ops.conv2d(meta(2, 3, 6, 6), meta(4, 3, 3, 3), meta(4), [1, 1], [0, 0, 0, 0], [1, 1], 1)
    assert out.device.type == "meta" and out.shape == (2, 4, 4, 4)
    y, mean, invstd = ops.batch_norm(meta(2, 3, 6, 6), None, None, meta(3), meta(3), True, 0.1,
                                     1e-5)
    assert y.shape == (2, 3, 6, 6) and mean.shape == invstd.shape == (3,)
