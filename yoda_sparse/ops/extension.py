"""Find or build the C++/CUDA extension that registers ``torch.ops.yoda_sparse.ext_*``.

Order: the prebuilt module ``yoda_sparse._C`` (built by ``pip install``; in a source checkout
only when it is newer than every file in ``csrc/``, so edited kernels never silently lose to an
old build); else a just-in-time build of ``csrc/`` with :func:`torch.utils.cpp_extension.load`
(ninja, cached in the default torch extensions folder, so only the first use compiles: ~1-2 min
for the CPU sources). The JIT
build includes the CUDA sources only when torch sees a GPU and nvcc is found; elsewhere it is
CPU-only (compiling CUDA code that cannot run would only cost minutes).

``YODA_SPARSE_NO_JIT=1`` disables the JIT build. When nothing can be loaded, :func:`load`
returns the reason (the backend registry shows it) and warns once.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

NO_JIT_ENV = "YODA_SPARSE_NO_JIT"
JIT_NAME = "yoda_sparse_ext"
# The one command that builds the kernels at install time (setup.py prints the same words).
BUILD_COMMAND = "pip install --no-cache-dir --force-reinstall --no-deps yoda-sparse"

# Flags shared with setup.py.  -fno-math-errno lets the noise loop vectorise; -fno-trapping-math
# (as PyTorch's own kernels are built) lets the sparse convolution's activation loops vectorise
# (if-conversion of their clamps and selects; no value changes); -ffp-contract=off keeps the
# Philox normals bit-identical to the CUDA ones (csrc/philox.h).
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
NVCC_FLAGS = ["-O3"]
LD_FLAGS = ["-fopenmp"]
SOURCES_CPU = ["bindings.cpp", "masked_l1_cpu.cpp", "yoda_step_cpu.cpp", "noise_cpu.cpp", "yoda_autograd.cpp",
               "sparse_conv_cpu.cpp", "gemm_cpu.cpp", "group_stats_cpu.cpp"]
SOURCES_CUDA = ["yoda_ops_cuda.cu", "sparse_conv_cuda.cu"]

_lock = threading.Lock()
_state: dict = {}
_link_flags_of: dict = {}


def _loaded_libstdcxx() -> str | None:
    """Path of the libstdc++ this process (torch) has loaded, or None."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    for line in maps:
        fields = line.split()
        path = fields[-1] if fields else ""
        if "/libstdc++.so" in path and Path(path).is_file():
            return path
    return None


def _links_libstdcxx_statically(cxx: str) -> bool:
    """Whether ``cxx -shared`` puts its own static copy of libstdc++ into a shared object.

    Such a toolchain (seen: a GCC under /opt/gcc on a GPU machine's image) gives the extension a
    second C++ runtime next to the one torch loaded, and an exception the extension throws (every
    TORCH_CHECK on bad input) then crashes the process where torch catches it. A probe library
    that throws is linked and its dynamic string table searched for libstdc++'s soname.
    """
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = Path(tmp, "probe.cpp"), Path(tmp, "probe.so")
        src.write_text('#include <stdexcept>\nvoid yoda_probe() { throw std::runtime_error("probe"); }\n')
        try:
            done = subprocess.run([cxx, "-shared", "-fPIC", str(src), "-o", str(lib)], capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return False
        return done.returncode == 0 and lib.is_file() and b"libstdc++.so" not in lib.read_bytes()


def link_flags(cxx: str | None = None) -> list[str]:
    """LD_FLAGS, plus the libstdc++ that torch loaded when the compiler would link its own copy
    statically (see _links_libstdcxx_statically): that shared library on the link line comes
    before the compiler's implicit static one, so the extension uses torch's C++ runtime."""
    cxx = cxx or os.environ.get("CXX", "c++")
    if cxx not in _link_flags_of:
        extra = []
        if sys.platform.startswith("linux") and shutil.which(cxx) and _links_libstdcxx_statically(cxx):
            runtime = _loaded_libstdcxx()
            if runtime is not None:
                extra = [runtime]
        _link_flags_of[cxx] = LD_FLAGS + extra
    return list(_link_flags_of[cxx])


def checkout_csrc_dir() -> Path | None:
    """csrc/ of a source checkout (editable installs), or None."""
    d = Path(__file__).resolve().parents[2] / "csrc"
    return d if (d / "bindings.cpp").is_file() else None


def csrc_dir() -> Path | None:
    """The C++ sources to build from: a source checkout's csrc/, else the copy that installs
    ship as yoda_sparse/_csrc (setup.py), else None."""
    d = checkout_csrc_dir()
    if d is not None:
        return d
    shipped = Path(__file__).resolve().parents[1] / "_csrc"
    return shipped if (shipped / "bindings.cpp").is_file() else None


def nvidia_include_dirs() -> list[str]:
    """CUDA headers shipped in the ``nvidia`` wheels (e.g. nvidia/cu13/include), which torch's
    headers may need next to the toolkit's."""
    try:
        import nvidia  # noqa: F401  (namespace package of the CUDA wheels)
    except ImportError:
        return []
    out = []
    for base in getattr(nvidia, "__path__", []):
        for sub in ("cu13", "cu12"):
            inc = Path(base) / sub / "include"
            if inc.is_dir():
                out.append(str(inc))
    return out


def cuda_toolchain() -> str | None:
    """None when torch has CUDA and nvcc is found, else why not."""
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return "torch is built without CUDA"
    home = cpp_extension.CUDA_HOME
    if home is None:
        return "CUDA_HOME not set and nvcc not found"
    if not (Path(home) / "bin" / "nvcc").exists():
        return f"nvcc not found in {home}/bin"
    return None


def _short(exc: BaseException, limit: int = 600) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    summary = lines[0] if lines else type(exc).__name__
    if errors and errors[0] != summary:
        summary += " | " + errors[0].strip()
    return summary[:limit]


def _jit_build() -> str | None:
    from torch.utils import cpp_extension

    src = csrc_dir()
    if src is None:
        return "the C++ sources (csrc/, shipped as yoda_sparse/_csrc) are not part of this installation"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r}) on PATH"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    with_cuda = torch.cuda.is_available() and cuda_toolchain() is None
    sources = [str(src / s) for s in SOURCES_CPU + (SOURCES_CUDA if with_cuda else [])]
    defines = ["-DYODA_WITH_CUDA"] if with_cuda else []
    try:
        cpp_extension.load(
            name=JIT_NAME + ("_cuda" if with_cuda else "_cpu"),
            sources=sources,
            extra_cflags=CXX_FLAGS + defines,
            extra_cuda_cflags=NVCC_FLAGS + defines,
            extra_ldflags=link_flags(cxx),
            extra_include_paths=[str(src)] + (nvidia_include_dirs() if with_cuda else []),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # compiler errors, missing headers, ...
        return f"JIT build failed: {_short(exc)}"
    _state["mode"] = "jit-cuda" if with_cuda else "jit-cpu"
    return None


def _stale_prebuilt() -> str | None:
    """In a source checkout, a prebuilt module older than csrc/ would run old kernels: say so."""
    spec = importlib.util.find_spec("yoda_sparse._C")
    src = checkout_csrc_dir()  # an install's shipped copy is as old as its build: never stale
    if spec is None or spec.origin is None or src is None:
        return None
    built = Path(spec.origin).stat().st_mtime
    newest = max(f.stat().st_mtime for f in src.iterdir() if f.is_file())
    if newest > built:
        return f"prebuilt {Path(spec.origin).name} is older than csrc/ (rebuild with pip install -e .)"
    return None


def _load() -> str | None:
    stale = _stale_prebuilt()
    if stale is None:
        try:
            importlib.import_module("yoda_sparse._C")
            _state["mode"] = "prebuilt"
            return None
        except ImportError as exc:
            prebuilt = f"prebuilt yoda_sparse._C not importable ({exc})"
    else:
        prebuilt = stale
    absent = importlib.util.find_spec("yoda_sparse._C") is None
    if absent:
        prebuilt = (f"no prebuilt yoda_sparse._C in this installation (it is built at install time only where "
                    f"torch is importable; with torch installed, `{BUILD_COMMAND}` builds it)")
    if os.environ.get(NO_JIT_ENV, "").strip() in ("1", "true", "yes"):
        return f"{prebuilt} and the JIT build is disabled ({NO_JIT_ENV}=1)"
    if absent:  # the JIT build below takes minutes: say why, once, before it starts
        warnings.warn(f"yoda-sparse: {prebuilt}; compiling the C++ kernels just in time now, once "
                      f"(1-2 minutes, cached)", RuntimeWarning, stacklevel=4)
    reason = _jit_build()
    return None if reason is None else f"{prebuilt}; {reason}"


def load() -> str | None:
    """Load the extension once (building it if needed): None on success, else the reason."""
    if "reason" in _state:  # lock-free once decided (also keeps torch.compile tracing simple)
        return _state["reason"]
    with _lock:
        if "reason" not in _state:
            reason = _load()
            _state["reason"] = reason
            if reason is not None:
                warnings.warn(f"yoda_sparse C++/CUDA ops unavailable: {reason}", RuntimeWarning, stacklevel=3)
        return _state["reason"]


def mode() -> str | None:
    """'prebuilt', 'jit-cpu', 'jit-cuda' once loaded, else None."""
    return _state.get("mode")


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the loaded extension registered ``yoda_sparse::<op>`` for ``dispatch_key``."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"yoda_sparse::{op}", dispatch_key)
