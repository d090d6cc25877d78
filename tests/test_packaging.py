"""What an install carries: the Triton kernels as yoda_sparse.kernels, and the C++/CUDA sources as
yoda_sparse/_csrc, so an install without a loadable prebuilt extension can still build it just
in time."""
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from yoda_sparse.ops import extension

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_kernels_and_csrc(tmp_path):
    env = {**os.environ, "YODA_SPARSE_NO_EXT": "1"}  # a pure-Python wheel: seconds, no compile
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("yoda_sparse-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for src in extension.SOURCES_CPU + extension.SOURCES_CUDA + ["yoda_ops.h", "philox.h", "cpu_rows.h", "noise_cpu.h"]:
        assert f"yoda_sparse/_csrc/{src}" in names, f"{src} is not shipped"
    assert "yoda_sparse/kernels/yoda_step.py" in names and "yoda_sparse/kernels/masked_l1.py" in names


def test_installed_sources_are_found_and_never_stale(tmp_path, monkeypatch):
    """Outside a checkout the JIT build reads the shipped copy, and the prebuilt module is not
    judged stale against it (its files are as old as the install)."""
    pkg = tmp_path / "site" / "yoda_sparse"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "_csrc").mkdir()
    (pkg / "_csrc" / "bindings.cpp").write_text("// shipped\n")
    monkeypatch.setattr(extension, "__file__", str(pkg / "ops" / "extension.py"))
    assert extension.checkout_csrc_dir() is None
    assert extension.csrc_dir() == pkg / "_csrc"
    assert extension._stale_prebuilt() is None


def test_checkout_sources_come_first():
    if extension.checkout_csrc_dir() is None:
        pytest.skip("not a source checkout")
    assert extension.csrc_dir() == ROOT / "csrc"


# A compiler that links its own static libstdc++ into the extension gives it a second C++ runtime
# next to torch's (seen on a GPU image: every TORCH_CHECK on bad input then crashed the process).
def _gxx():
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("no g++")
    return gxx


def test_a_shared_cxx_runtime_needs_no_extra_link_flags():
    gxx = _gxx()
    assert not extension._links_libstdcxx_statically(gxx)
    assert extension.link_flags(gxx) == extension.LD_FLAGS


def test_a_static_cxx_runtime_is_replaced_by_torchs(tmp_path):
    gxx = _gxx()
    static_archive = subprocess.run([gxx, "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(static_archive):
        pytest.skip("g++ has no static libstdc++ to link")
    wrapper = tmp_path / "g++-static-runtime"
    wrapper.write_text(f'#!/bin/sh\nexec "{gxx}" -static-libstdc++ "$@"\n')
    wrapper.chmod(0o755)
    assert extension._links_libstdcxx_statically(str(wrapper))
    flags = extension.link_flags(str(wrapper))
    runtime = extension._loaded_libstdcxx()
    assert runtime is not None and flags == extension.LD_FLAGS + [runtime]
    # with those flags the same compiler links the shared runtime after all
    src, lib = tmp_path / "probe.cpp", tmp_path / "probe.so"
    src.write_text('#include <stdexcept>\nvoid probe() { throw std::runtime_error("x"); }\n')
    subprocess.run([str(wrapper), "-shared", "-fPIC", str(src), "-o", str(lib), runtime], check=True)
    assert b"libstdc++.so" in lib.read_bytes()


def test_prebuilt_extension_uses_a_shared_cxx_runtime():
    spec = importlib.util.find_spec("yoda_sparse._C")
    if spec is None or spec.origin is None:
        pytest.skip("no prebuilt extension")
    assert b"libstdc++.so" in Path(spec.origin).read_bytes(), f"{spec.origin} carries its own static libstdc++"


@pytest.mark.parametrize(
    "script", ["run.sh", "test.sh", ".ci/run", "scripts/setup_env.sh", "scripts/test_torch.sh", "benchmarks/gpu_check.sh"]
)
def test_shell_scripts_parse(script):
    """Most of these only run on a fresh clone, in CI or on a GPU machine: a syntax error
    there would show up late and cost a run."""
    proc = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_host_path_profiler_runs_on_cpu():
    """benchmarks/profile_host_path.py, with the C++ backend where built (else the reference)."""
    backend = "cpp" if extension.load() is None else "reference"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "profile_host_path.py"), "--device", "cpu", "--backend", backend,
         "--calls", "2", "--top", "3"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    timed = [line for line in proc.stdout.splitlines() if line.endswith("µs/call")]
    assert len(timed) == 6 and all(float(line.split()[-2]) > 0 for line in timed), proc.stdout[:2000]
    assert proc.stdout.count(f"{backend}, by tottime") == 2, proc.stdout[-2000:]
