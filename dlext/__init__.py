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
