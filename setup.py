"""Build dlext._C with torch.utils.cpp_extension and ninja.

CPU sources are always built. CUDA sources are built when a GPU is visible and a CUDA toolkit is
found, or when FORCE_CUDA=1 (e.g. to compile for a GPU on a machine without one). The build says
what it builds and why. Honoured environment: FORCE_CUDA, TORCH_CUDA_ARCH_LIST (default: the
visible GPUs' architectures, else "8.0;9.0+PTX"), MAX_JOBS, CUDA_HOME, DLEXT_CPU_CAPABILITY
(AVX2 or DEFAULT; default: what torch detects on this CPU).

Build against the torch you run with: `pip install --no-build-isolation .` (see README.md).
"""
from __future__ import annotations

import glob
import os
import platform
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import toolchain  # noqa: E402

# torch.utils.cpp_extension reads CUDA_HOME once, at import: settle it first. Where nvcc on PATH
# is a wrapper script, cpp_extension's own guess (two folders above it) is not a toolkit.
CUDA_HOME, CUDA_HOME_HOW = toolchain.find_cuda_home()
if CUDA_HOME and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.torch_version import TorchVersion  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

MIN_TORCH = "2.4"
DEFAULT_ARCHS = "8.0;9.0+PTX"


def log(msg: str) -> None:
    print(f"[dlext build] {msg}", flush=True)


def decide_cuda() -> tuple[bool, str]:
    forced = os.environ.get("FORCE_CUDA", "0") == "1"
    if torch.version.cuda is None:
        if forced:
            raise SystemExit("FORCE_CUDA=1, but this torch is a CPU-only build; install a CUDA build")
        return False, "this torch is a CPU-only build"
    if CUDA_HOME is None:
        if forced:
            raise SystemExit("FORCE_CUDA=1, but no CUDA toolkit was found (no nvcc, no CUDA_HOME)")
        return False, "no CUDA toolkit found"
    if forced:
        return True, "FORCE_CUDA=1"
    if torch.cuda.is_available():
        return True, f"{torch.cuda.device_count()} GPU(s) visible and a CUDA toolkit at {CUDA_HOME}"
    return False, "no GPU visible (set FORCE_CUDA=1 to build the CUDA kernels anyway)"


def cuda_arch_list() -> tuple[str, str]:
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"], "TORCH_CUDA_ARCH_LIST"
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    if caps:
        archs = [f"{major}.{minor}" for major, minor in caps]
        archs[-1] += "+PTX"
        return ";".join(archs), "the visible GPUs"
    return DEFAULT_ARCHS, "default (no GPU visible)"


def cpu_capability() -> str:
    wanted = os.environ.get("DLEXT_CPU_CAPABILITY") or torch.backends.cpu.get_cpu_capability()
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return "AVX2" if x86 and wanted.upper() in ("AVX2", "AVX512") else "DEFAULT"


def write_build_config(path: str, values: dict[str, str]) -> None:
    with open(os.path.join(ROOT, "csrc", "build_config.h.in")) as f:
        text = f.read()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.exists(path) or open(path).read() != text:  # keep ninja's timestamps
        with open(path, "w") as f:
            f.write(text)


def make_extension():
    if TorchVersion(torch.__version__) < MIN_TORCH:
        raise SystemExit(f"dlext needs torch >= {MIN_TORCH}, found {torch.__version__}")
    with_cuda, why = decide_cuda()
    cpu_cap = cpu_capability()
    cpp = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*/*.cpp"))
    cu = sorted(glob.glob("csrc/*/*.cu"))

    cxx = ["-O3", "-fopenmp", "-fvisibility-inlines-hidden", "-Wno-unknown-pragmas",
           f"-DCPU_CAPABILITY={cpu_cap}"]
    if cpu_cap == "AVX2":
        cxx += ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    gen_dir = os.path.join("build", "generated")
    archs = ""
    if with_cuda:
        archs, archs_from = cuda_arch_list()
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        cxx.append("-DDLEXT_WITH_CUDA")
        for d in toolchain.missing_cuda_library_include_dirs(CUDA_HOME):
            # After the toolkit's own headers: only what the toolkit lacks comes from the wheels.
            cxx += ["-idirafter", d]
            nvcc += ["-isystem", d]
            log(f"CUDA library headers not in the toolkit; using {d}")
        log(f"building CPU + CUDA kernels: {why}")
        log(f"CUDA toolkit: {CUDA_HOME} ({CUDA_HOME_HOW}); archs {archs} (from {archs_from})")
    else:
        log(f"building CPU kernels only: {why}")
    log(f"CPU vectorisation: {cpu_cap}; parallel compile jobs: "
        f"{os.environ.get('MAX_JOBS', 'all cores (set MAX_JOBS to limit)')}")

    write_build_config(os.path.join(gen_dir, "build_config.h"), {
        "DLEXT_BUILD_TORCH_VERSION": torch.__version__,
        "DLEXT_BUILD_CUDA_VERSION": (torch.version.cuda or "") if with_cuda else "",
        "DLEXT_BUILD_CUDA_ARCHS": archs,
        "DLEXT_BUILD_CPU_CAPABILITY": cpu_cap,
    })
    kwargs = dict(
        name="dlext._C",
        include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, gen_dir)],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    if with_cuda:
        return CUDAExtension(sources=cpp + cu, **kwargs)
    return CppExtension(sources=cpp, **kwargs)


setup(
    packages=find_packages(include=["dlext", "dlext.*"]),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
