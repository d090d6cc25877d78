"""Shared test setup.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; the variable
must be set before any kernel module is imported, so it is set here, first.
"""
import os

import pytest

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard dependency
    _has_cuda = False

if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the sparse engine's cost model caches its measurements in the user's cache folder: the
# tests keep theirs in a temporary one
if "YODA_SPARSE_CACHE" not in os.environ:
    import tempfile

    os.environ["YODA_SPARSE_CACHE"] = tempfile.mkdtemp(prefix="yoda-sparse-test-cache-")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if _has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
