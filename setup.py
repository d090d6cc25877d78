"""Packaging: the `yoda_sparse` package plus the top-level `kernels/` folder installed as
`yoda_sparse.kernels` (Triton kernels), and the C++/CUDA extension `yoda_sparse._C` built from
`csrc/`.

The extension is a CUDAExtension when torch has CUDA and nvcc is found (CUDA_HOME, else
/usr/local/cuda, else nvcc on PATH), else a CppExtension (CPU kernels only).  It never fails
the install: without torch, without a C++ compiler, or when compiling fails, a warning is
printed and the pure-Python package is installed (the ops then build just in time on first use,
see yoda_sparse/ops/extension.py).  `YODA_SPARSE_NO_EXT=1` skips the extension;
`YODA_SPARSE_REQUIRE_EXT=1` makes any failure to build it (CUDA included, where nvcc exists)
fail the install.  Without a GPU
to detect, the CUDA code is compiled for TORCH_CUDA_ARCH_LIST (default "8.0;9.0": A100, H100).
"""
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
# csrc/ also ships inside the package (yoda_sparse/_csrc, sources only): an install whose prebuilt
# extension is missing or does not load (another torch, no compiler at build time) can still
# build it just in time on first use.
packages = find_packages(include=["yoda_sparse", "yoda_sparse.*"]) + ["yoda_sparse.kernels", "yoda_sparse._csrc"]


REQUIRE_EXT = os.environ.get("YODA_SPARSE_REQUIRE_EXT", "").strip().lower() in ("1", "true", "yes")


def _warn(message: str) -> None:
    # The project's own set-up (scripts/setup_env.sh, hence CI) sets YODA_SPARSE_REQUIRE_EXT=1
    # so that a C++ or CUDA compile error fails the install instead of being skipped.
    if REQUIRE_EXT:
        raise SystemExit(f"yoda-sparse: {message} (YODA_SPARSE_REQUIRE_EXT=1: the extension is required)")
    print(
        f"WARNING: yoda-sparse: {message}; installing the pure-Python package "
        "(the C++/CUDA ops are built just in time on first use where a compiler exists).",
        file=sys.stderr,
    )


def _build_config():
    """The flags and source lists, shared with the JIT loader (one place to change them)."""
    spec = importlib.util.spec_from_file_location("_yoda_ext_config", ROOT / "yoda_sparse" / "ops" / "extension.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _find_cuda_home() -> None:
    """Prefer a real toolkit folder over an nvcc wrapper script on PATH (torch would take the
    wrapper's parent, e.g. /usr/local, which has no CUDA headers)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    if (Path("/usr/local/cuda") / "bin" / "nvcc").exists():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


def extension_kwargs() -> dict:
    if os.environ.get("YODA_SPARSE_NO_EXT", "").strip().lower() in ("1", "true", "yes"):
        print("yoda-sparse: YODA_SPARSE_NO_EXT set, skipping the C++/CUDA extension", file=sys.stderr)
        return {}
    _find_cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # torch missing or broken in the build environment
        _warn(f"torch is not importable at build time ({type(exc).__name__}: {exc})")
        return {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        _warn(f"no C++ compiler ({cxx!r}) found")
        return {}
    cfg = _build_config()
    cuda_reason = cfg.cuda_toolchain()
    with_cuda = cuda_reason is None
    if not with_cuda:
        print(f"yoda-sparse: building the CPU-only extension ({cuda_reason})", file=sys.stderr)
    elif not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    defines = ["-DYODA_WITH_CUDA"] if with_cuda else []
    sources = [f"csrc/{s}" for s in cfg.SOURCES_CPU + (cfg.SOURCES_CUDA if with_cuda else [])]
    include_dirs = [str(ROOT / "csrc")] + (cfg.nvidia_include_dirs() if with_cuda else [])
    make = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    ext = make(
        name="yoda_sparse._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cfg.CXX_FLAGS + defines, "nvcc": cfg.NVCC_FLAGS + defines},
        extra_link_args=cfg.link_flags(cxx),
        optional=True,  # setuptools then skips a missing output when copying in place
    )

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """A failed build (compiler check, compile or link) warns instead of failing the install."""

        def run(self):
            try:
                super().run()
            except Exception as exc:
                _warn(f"building yoda_sparse._C failed ({type(exc).__name__}: {str(exc)[-500:]})")
                self.extensions = []  # nothing to copy or to list in the wheel

    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension}}


setup(
    packages=packages,
    package_dir={"yoda_sparse.kernels": "kernels", "yoda_sparse._csrc": "csrc"},
    package_data={"yoda_sparse": ["data/*", "checkpoints/*"], "yoda_sparse._csrc": ["*.cpp", "*.cu", "*.h"]},
    include_package_data=True,
    **extension_kwargs(),
)
