"""Packaging: the `yoda_sparse` package plus the top-level `kernels/` folder installed as
`yoda_sparse.kernels` (Triton kernels), and the C++/CUDA extension `yoda_sparse._C` built from
`csrc/`.  Metadata (name, version, dependencies, license) lives in pyproject.toml.

The extension is built whenever torch is importable: in the build environment itself
(`pip install --no-build-isolation .`, `python -m build --no-isolation`), or, under pip's
build isolation (plain `pip install .`), from the interpreter pip installs into when torch is
installed there (its site-packages are appended to the build's sys.path, after the isolated
build tools, so the extension is compiled against exactly the torch it will run with).  It is a
CUDAExtension when torch has CUDA and nvcc is found (CUDA_HOME, else /usr/local/cuda, else nvcc
on PATH), else a CppExtension (CPU kernels only); without a GPU to detect, the CUDA code is
compiled for TORCH_CUDA_ARCH_LIST (default "8.0;9.0": A100, H100/H200).  Release builds carry
no debug info (-g0, linked with --strip-debug); YODA_SPARSE_DEBUG=1 keeps it.

It never fails the install: without torch, without a C++ compiler, or when compiling fails, the
pure-Python package is installed and a banner says so and names the command that builds the
kernels (pip shows a successful build's output only with -v; the package repeats the message
when it first needs the kernels, and then compiles them just in time where it can, see
yoda_sparse/ops/extension.py).  `YODA_SPARSE_NO_EXT=1` skips the extension;
`YODA_SPARSE_REQUIRE_EXT=1` makes any failure to build it (CUDA included, where nvcc exists)
fail the install.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent

# Data-only folders are packages too (named explicitly: find_packages only finds folders with
# an __init__.py). csrc/ ships inside the package as yoda_sparse/_csrc (sources only), so an
# install whose prebuilt extension is missing or does not load (another torch, no compiler at
# build time) can still build it just in time on first use.
DATA_PACKAGES = ["yoda_sparse.checkpoints", "yoda_sparse.kernels", "yoda_sparse._csrc"]
PACKAGE_DIR = {"yoda_sparse.kernels": "kernels", "yoda_sparse._csrc": "csrc"}
PACKAGE_DATA = {
    "yoda_sparse.checkpoints": ["*.safetensors", "*.txt"],
    "yoda_sparse._csrc": ["*.cpp", "*.cu", "*.cuh", "*.h", "*.hpp"],
}

# the same words as yoda_sparse.ops.extension.BUILD_COMMAND (a test keeps them equal)
BUILD_COMMAND = "pip install --no-cache-dir --force-reinstall --no-deps yoda-sparse"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


REQUIRE_EXT = _flag("YODA_SPARSE_REQUIRE_EXT")


def _say(message: str) -> None:
    print(f"yoda-sparse: {message}", file=sys.stderr, flush=True)


def _pure_python(reason: str) -> None:
    """The extension is not built: fail under YODA_SPARSE_REQUIRE_EXT, else say what is installed."""
    # The project's own set-up (scripts/setup_env.sh, hence CI) sets YODA_SPARSE_REQUIRE_EXT=1
    # so that a C++ or CUDA compile error fails the install instead of being skipped.
    if REQUIRE_EXT:
        raise SystemExit(f"yoda-sparse: {reason} (YODA_SPARSE_REQUIRE_EXT=1: the extension is required)")
    bar = "=" * 88
    print(
        f"\n{bar}\nWARNING: yoda-sparse: {reason}.\n"
        "Installing the pure-Python package WITHOUT the compiled C++/CUDA kernels: the ops still run\n"
        "(compiled just in time on first use where a C++ compiler and ninja exist, else through\n"
        "Triton or PyTorch). To build the kernels at install time, install torch first, then:\n"
        f"    {BUILD_COMMAND}\n"
        "(from a clone: pip install --force-reinstall --no-deps .)\n"
        f"{bar}\n",
        file=sys.stderr,
        flush=True,
    )


def torch_site_of(python: list) -> "str | None":
    """The site-packages folder from which the interpreter ``python`` (a command list) imports
    torch, or None.  Run without the build's PYTHONPATH/PYTHONNOUSERSITE: under pip's build
    isolation this is the environment pip installs into."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    probe = "import os, torch; print(os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__))))"
    try:
        done = subprocess.run(python + ["-c", probe], env=env, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError):
        return None
    site = done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else ""
    return site if site and (Path(site) / "torch" / "__init__.py").is_file() else None


def _import_torch():
    """torch, importing it from the target environment when the build environment lacks it;
    or a string saying why it is not importable."""
    try:
        import torch

        return torch
    except Exception as exc:  # torch missing or broken in the build environment
        here = f"{type(exc).__name__}: {exc}"
    site = torch_site_of([sys.executable])
    if site is None or site in sys.path:
        return (f"torch is not importable at build time ({here}), neither in the build environment nor in "
                f"the interpreter pip installs into")
    sys.path.append(site)  # after the isolated build tools: they keep precedence
    try:
        import torch
    except Exception as exc:
        return f"torch from {site} fails to import in the build ({type(exc).__name__}: {exc})"
    _say(f"building against torch {torch.__version__} from {site} (the environment pip installs into)")
    bindir = os.path.dirname(sys.executable)  # its ninja, where a venv holds one
    if shutil.which("ninja") is None and Path(bindir, "ninja").exists():
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    return torch


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


def release_flags() -> "tuple[list, list]":
    """(compile, link) flags that keep debug info out of a release build (the extension linked
    with it was 16 MB instead of 3 MB); none with YODA_SPARSE_DEBUG=1."""
    if _flag("YODA_SPARSE_DEBUG") or not sys.platform.startswith("linux"):
        return [], []
    return ["-g0"], ["-Wl,--strip-debug"]


def extension_kwargs() -> dict:
    if _flag("YODA_SPARSE_NO_EXT"):
        _say("YODA_SPARSE_NO_EXT set: installing the pure-Python package, without the C++/CUDA extension")
        return {}
    _find_cuda_home()
    torch = _import_torch()
    if isinstance(torch, str):
        _pure_python(torch)
        return {}
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        _pure_python(f"no C++ compiler ({cxx!r}) found")
        return {}
    cfg = _build_config()
    cuda_reason = cfg.cuda_toolchain()
    with_cuda = cuda_reason is None
    if not with_cuda:
        _say(f"building the CPU-only extension ({cuda_reason})")
    elif not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    defines = ["-DYODA_WITH_CUDA"] if with_cuda else []
    compile_release, link_release = release_flags()
    sources = [f"csrc/{s}" for s in cfg.SOURCES_CPU + (cfg.SOURCES_CUDA if with_cuda else [])]
    include_dirs = [str(ROOT / "csrc")] + (cfg.nvidia_include_dirs() if with_cuda else [])
    make = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    ext = make(
        name="yoda_sparse._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cfg.CXX_FLAGS + compile_release + defines, "nvcc": cfg.NVCC_FLAGS + defines},
        extra_link_args=cfg.link_flags(cxx) + link_release,
        optional=True,  # setuptools then skips a missing output when copying in place
    )
    what = "CPU and CUDA kernels (TORCH_CUDA_ARCH_LIST=%s)" % os.environ.get("TORCH_CUDA_ARCH_LIST", "this GPU") \
        if with_cuda else "CPU kernels"

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """A failed build (compiler check, compile or link) warns instead of failing the install."""

        def run(self):
            try:
                super().run()
            except Exception as exc:
                _pure_python(f"building yoda_sparse._C failed ({type(exc).__name__}: {str(exc)[-500:]})")
                self.extensions = []  # nothing to copy or to list in the wheel
                return
            _say(f"built yoda_sparse._C with {what} against torch {torch.__version__}")

    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension}}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import torch_site_of
    setup(
        packages=find_packages(include=["yoda_sparse", "yoda_sparse.*"]) + DATA_PACKAGES,
        package_dir=PACKAGE_DIR,
        package_data=PACKAGE_DATA,
        include_package_data=False,  # exactly the files above (MANIFEST.in shapes the sdist only)
        **extension_kwargs(),
    )
