"""What this dlext binary holds: build configuration, compiled backends, registered operators.

`python -m dlext info` prints it.
"""
from __future__ import annotations

import platform

import torch


def build_info() -> dict:
    from dlext import _C
    return dict(_C.build_info())


def registered_ops() -> dict[str, list[str]]:
    """Each dlext operator with the backends (CPU, CUDA) that have a kernel for it."""
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("dlext::"))
    return {n: [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(n, k)]
            for n in names}


def report() -> str:
    import dlext
    info = build_info()
    ops = registered_ops()
    backends = ["CPU"] + (["CUDA"] if info["with_cuda"] else [])
    lines = [
        f"dlext {dlext.__version__}",
        f"torch {torch.__version__} (dlext built against {info['torch_version']}), "
        f"Python {platform.python_version()}, {platform.machine()}",
        f"compiled backends: {', '.join(backends)}",
        f"  CPU: vectorisation {info['cpu_capability']}, {torch.get_num_threads()} threads",
    ]
    if info["with_cuda"]:
        lines.append(f"  CUDA: {info['cuda_version']}, archs {info['cuda_archs']}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            lines.append(f"device cuda:{i}: {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    else:
        lines.append("devices: cpu only (no CUDA device visible)")
    lines.append(f"registered ops ({len(ops)}):")
    width = max((len(n) for n in ops), default=0)
    for name, keys in ops.items():
        lines.append(f"  {name:<{width}}  {', '.join(keys) or '(no kernels)'}")
    return "\n".join(lines)
