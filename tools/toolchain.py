"""Where the toolchain lives: CUDA toolkit, the CUDA library headers of the `nvidia` wheels, torch.

One place for the path-finding that setup.py and the CMake helper share. Nothing here is
hard-coded to one machine: every path is derived from nvcc itself, from the installed torch or
from the installed `nvidia` packages.

Run as a script it prints the -D arguments CMake needs to find Torch (and CUDA):
    cmake -S . -B build/cmake $(python tools/toolchain.py --cmake-args [--cuda])
"""
from __future__ import annotations

import glob
import importlib.util
import os
import platform
import shutil
import subprocess
import sys

# Header that ATen's CUDA headers pull in and that toolkits without the math libraries lack.
_CUDA_LIBRARY_HEADERS = ("cusparse.h", "cublas_v2.h")


def _nvcc_reported_home(nvcc: str) -> str | None:
    """Ask nvcc where it really lives (works through wrapper scripts and symlinks)."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ _HERE_="):
            return os.path.dirname(line.split("=", 1)[1].strip())
    return None


def _is_toolkit(home: str | None) -> bool:
    return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")) \
        and os.path.isfile(os.path.join(home, "bin", "nvcc"))


def find_cuda_home() -> tuple[str | None, str]:
    """Return (CUDA toolkit root or None, how it was found)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var], f"${var}"
    nvcc = shutil.which("nvcc")
    if nvcc:
        guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _is_toolkit(guess):
            return guess, f"nvcc on PATH ({nvcc})"
        reported = _nvcc_reported_home(nvcc)
        if _is_toolkit(reported):
            return reported, f"nvcc on PATH is a wrapper; nvcc --dryrun reports {reported}"
    if _is_toolkit("/usr/local/cuda"):
        return "/usr/local/cuda", "default location"
    return None, "no nvcc on PATH and no CUDA_HOME"


def nvidia_wheel_dirs(sub: str) -> list[str]:
    """`include` or `lib` folders of the nvidia-* wheels torch depends on (cu13 and cu12 layouts)."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for root in spec.submodule_search_locations:
        for d in sorted(glob.glob(os.path.join(root, "*", sub))):
            if os.path.isdir(d):
                found.append(d)
    return found


def missing_cuda_library_include_dirs(cuda_home: str) -> list[str]:
    """nvidia-wheel include dirs that provide the CUDA library headers the toolkit lacks."""
    toolkit_inc = os.path.join(cuda_home, "include")
    missing = [h for h in _CUDA_LIBRARY_HEADERS if not os.path.isfile(os.path.join(toolkit_inc, h))]
    if not missing:
        return []
    dirs = []
    for d in nvidia_wheel_dirs("include"):
        if any(os.path.isfile(os.path.join(d, h)) for h in missing):
            dirs.append(d)
    return dirs


def nvidia_lib_with(name_prefix: str) -> str | None:
    """Path of the first shared library starting with name_prefix in the nvidia wheels."""
    for d in nvidia_wheel_dirs("lib"):
        hits = sorted(glob.glob(os.path.join(d, name_prefix + "*")))
        if hits:
            return hits[0]
    return None


def cmake_args(with_cuda: bool) -> list[str]:
    import torch  # noqa: PLC0415  (only the CMake helper needs torch at import time)

    cap = torch.backends.cpu.get_cpu_capability()
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    args = [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DDLEXT_CPU_CAPABILITY={'AVX2' if x86 and cap in ('AVX2', 'AVX512') else 'DEFAULT'}"]
    if torch.version.cuda is None:
        return args + ["-DDLEXT_WITH_CUDA=OFF"]
    # A CUDA build of torch: its CMake config looks for CUDA even for a CPU-only target.
    home, _ = find_cuda_home()
    if home is None:
        raise SystemExit("torch is a CUDA build, so CMake needs a CUDA toolkit (nvcc); none found")
    # Without an arch list torch's CMake config probes for GPUs, which fails where there are none.
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    args += [f"-DTORCH_CUDA_ARCH_LIST={archs}", f"-DCUDAToolkit_ROOT={home}", f"-DCUDA_TOOLKIT_ROOT_DIR={home}",
             f"-DCMAKE_CUDA_COMPILER={os.path.join(home, 'bin', 'nvcc')}"]
    cudart = os.path.join(home, "lib64", "libcudart.so")
    if os.path.exists(cudart):
        args.append(f"-DCUDA_CUDART_LIBRARY={cudart}")
    nvrtc = nvidia_lib_with("libnvrtc.so")
    if nvrtc:
        args += [f"-DCUDA_nvrtc_LIBRARY={nvrtc}", f"-DCUDA_NVRTC_LIB={nvrtc}"]
    extra_inc = missing_cuda_library_include_dirs(home)
    if extra_inc:
        args.append(f"-DDLEXT_EXTRA_CUDA_INCLUDE_DIRS={';'.join(extra_inc)}")
    args.append(f"-DDLEXT_WITH_CUDA={'ON' if with_cuda else 'OFF'}")
    args.append(f"-DDLEXT_RUNTIME_LIBRARY_PATH={runtime_library_path()}")
    return args


def runtime_library_path() -> str:
    """LD_LIBRARY_PATH entries a CMake-linked program needs to run (the nvidia wheels' libs)."""
    return os.pathsep.join(nvidia_wheel_dirs("lib"))


if __name__ == "__main__":
    if "--cmake-args" in sys.argv:
        print(" ".join(cmake_args("--cuda" in sys.argv)))
    elif "--ld-library-path" in sys.argv:
        print(runtime_library_path())
    else:
        home, why = find_cuda_home()
        print(f"CUDA_HOME={home} ({why})")
        if home:
            print("extra include dirs:", missing_cuda_library_include_dirs(home))
