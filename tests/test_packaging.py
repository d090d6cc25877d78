"""What an install carries: the Triton kernels as yoda_sparse.kernels, and the C++/CUDA sources as
yoda_sparse/_csrc, so an install without a loadable prebuilt extension can still build it just
in time."""
import os
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
