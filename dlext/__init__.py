"""dlext: hand-written C++ and CUDA kernels for the layers of a CNN, bound into PyTorch.

    import dlext.functional as DF   # torch.nn.functional signatures
    import dlext.nn as DN           # drop-in torch.nn layers
    torch.ops.dlext.<op>            # the raw registered operators
"""
import torch  # noqa: F401  (libtorch must be loaded before the extension)

from dlext._loader import load_extension

_C = load_extension()

from dlext import autograd  # noqa: E402,F401  (registers fake kernels and autograd)
from dlext import functional, nn  # noqa: E402,F401
from dlext.info import build_info, registered_ops  # noqa: E402,F401
from dlext.swap import restore_layers, swap_layers  # noqa: E402,F401
from dlext import models  # noqa: E402,F401

__version__ = "0.1.0"


def cross_entropy_check_targets(enabled: bool) -> bool:
    """Whether cross_entropy on CUDA raises IndexError for a class index outside [0, C) that is
    not ignore_index, as it does on the CPU; returns the previous setting.

    On by default (DLEXT_CE_CHECK_TARGETS=0 at start-up turns it off). The kernels find such a
    target for the cost of an integer minimum, but raising it waits for them: one host
    synchronisation per forward and backward. Off (and always while a CUDA graph is being
    captured), nothing is read out of bounds and the row's loss and gradient are NaN.
    """
    return _C.set_cross_entropy_check_targets(bool(enabled))
