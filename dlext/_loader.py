"""Load the compiled extension dlext._C and check it was built against the torch in use."""
from __future__ import annotations

import importlib
import warnings

import torch
from torch.torch_version import TorchVersion

_REBUILD = ("dlext must be compiled against the torch it runs with; rebuild it with "
            "`pip install --no-build-isolation .` (or `-e .`) in this environment")


def load_extension():
    try:
        ext = importlib.import_module("dlext._C")
    except ImportError as e:  # missing binary, or an ABI mismatch (undefined symbol)
        raise ImportError(f"dlext._C could not be loaded ({e}). Running torch {torch.__version__}. "
                          f"{_REBUILD}") from e
    built = ext.build_info()["torch_version"]
    # Compare parsed versions (never strings: "2.10" < "2.4" as strings); the local tag (+cu130)
    # does not change the C++ ABI.
    if TorchVersion(built.split("+")[0]) != TorchVersion(torch.__version__.split("+")[0]):
        warnings.warn(f"dlext was built against torch {built} but torch {torch.__version__} is "
                      f"running. {_REBUILD}", RuntimeWarning, stacklevel=3)
    return ext
