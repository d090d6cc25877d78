"""The prebuilt extension: present after the project's set-up, with CUDA kernels wherever the
CUDA toolchain exists (so a CUDA compile error can't hide behind the CPU build)."""
import importlib.util
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("YODA_SPARSE_REQUIRE_EXT", "").strip() != "1",
    reason="only checked where the set-up required the extension (scripts/setup_env.sh sets YODA_SPARSE_REQUIRE_EXT=1)",
)


def test_prebuilt_extension_is_importable():
    assert importlib.util.find_spec("yoda_sparse._C") is not None, "yoda_sparse._C was not built by the install"


def test_cuda_kernels_were_compiled_where_nvcc_exists():
    from yoda_sparse.ops import extension

    reason = extension.cuda_toolchain()
    if reason is not None:
        pytest.skip(f"no CUDA toolchain: {reason}")
    import yoda_sparse._C  # noqa: F401  (registers the ops)

    for op in ("yoda_sparse::ext_yoda_step", "yoda_sparse::ext_masked_l1_loss", "yoda_sparse::ext_masked_l1_fwd",
               "yoda_sparse::ext_masked_l1_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), f"{op} has no CUDA kernel"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), f"{op} has no CPU kernel"
