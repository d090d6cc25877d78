"""yoda_sparse.allocator: with freed memory kept, a repeated large allocation stops page-faulting
(run in fresh interpreters: the setting is process-wide)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = r"""
import json, resource, sys, torch
from yoda_sparse.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else None
again = keep_freed_memory() if sys.argv[1] == "tuned" else None
torch.set_num_threads(1)
x = torch.randn(1, 32, 384, 384)  # 18 MiB maps: a step's activations, allocated and freed each round
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    h = torch.cat([torch.nn.functional.silu(x), x], 1) * 2 + 1
    h = torch.nn.functional.group_norm(h, 8)
    del h
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "again": again, "faults": faults}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_kept_memory_is_reused_without_page_faults():
    default, tuned = _probe("default"), _probe("tuned")
    assert tuned["applied"] is True and tuned["again"] is True
    # by default every round maps its large blocks anew and faults their 4 KiB pages in again;
    # kept, the heap settles and a round reuses resident memory
    assert min(default["faults"][1:]) > 10000
    assert min(tuned["faults"][1:]) < 100 and sum(tuned["faults"][1:]) < sum(default["faults"][1:]) / 2


def test_allocated_bytes_follow_allocations():
    from yoda_sparse.allocator import allocated_bytes

    import torch

    before = allocated_bytes()
    if before is None:
        pytest.skip("no mallinfo2 (glibc < 2.33 or another libc)")
    t = torch.empty(48 << 20, dtype=torch.uint8)
    during = allocated_bytes()
    del t
    after = allocated_bytes()
    assert during - before >= 48 << 20
    assert during - after >= 48 << 20
