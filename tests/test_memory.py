"""Memory: self-attention on the fused SDPA kernels, the peak-memory estimate against the peak RSS
of a real run, and the refusal that names --tile.

Measured with benchmarks/peak_memory.py on a 2-core AMD EPYC (demo checkpoint sr3_tiny, 1 step,
see benchmarks/RESULTS.md): `upscale` of a 3000x20 image (output 12000x80) peaks at 1.0 GiB RSS
(151 MiB above the idle process) with the default tiles, 1.8 GiB untiled (issue 13 saw 19 GB and
the OOM killer); a 2048x2048 image (output 8192x8192, 361 tiles) at 3.0 GiB.  Those runs take
minutes to half an hour here, so the suite runs a smaller untiled case whose attention would
need 0.8 GB more on the math path, and checks the estimates of the issue's cases.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from yoda_sparse.cli import main
from yoda_sparse.diffusion import load_diffusion
from yoda_sparse.imageio import save_image
from yoda_sparse.memory import (
    MEMORY_LIMIT_ENV,
    InsufficientMemoryError,
    MemoryEstimate,
    available_memory,
    check_memory,
    estimate_sample_memory,
    traced_peak_bytes,
)
from yoda_sparse.models.layers import SelfAttention
from yoda_sparse.tiling import default_overlap

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "yoda_sparse" / "checkpoints" / "sr3_yoda_demo.safetensors"
MiB = 1 << 20


def test_self_attention_of_60000_positions_stays_linear():
    """The 3000x20 case's attention level: 60000 positions.  The math path (before the fix)
    held two [60000, 60000] float32 matrices, 28.8 GB; the fused kernel needs the inputs'
    size a few times over."""
    attn = SelfAttention(32, 1, 8)
    x_bytes = 32 * 3000 * 20 * 4
    peak = traced_peak_bytes(lambda: attn(torch.empty(1, 32, 3000, 20)))
    assert peak <= 12 * x_bytes  # 77 MB; the math path: 28.8 GB


def test_traced_peak_counts_what_is_alive():
    def two_then_one():
        a = torch.empty(1000)  # 4 kB
        b = a + 1  # 8 kB alive
        del a
        return b * 2  # b and the result: 8 kB again

    assert traced_peak_bytes(two_then_one) == 8000


@pytest.mark.parametrize("method", ["matlab_bicubic", "pil_bicubic"])
def test_a_traced_call_leaves_no_fake_tensor_in_the_resize_cache(method):
    # the estimate runs _prepare (x_up) under fakes; resize's weight cache must still hold
    # real matrices afterwards (a fake one broke the next real upscale of that size)
    from torch._subclasses.fake_tensor import FakeTensor

    from yoda_sparse.resize import resize, resize_weights

    size = (13, 29)  # a size no other test resizes to
    traced_peak_bytes(lambda: resize(torch.empty(1, 3, 5, 7), size, method))
    x = torch.rand(1, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    out = resize(x, size, method)
    assert not isinstance(out, FakeTensor) and not isinstance(resize_weights(method, 5, 13), FakeTensor)
    expected = torch.einsum("oh,bchw,pw->bcop", resize_weights(method, 5, 13), x.double(),
                            resize_weights(method, 7, 29)).float()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_estimate_of_the_issue_cases_on_the_tiny_checkpoint():
    diff, _, _ = load_diffusion(DEMO)
    wide = estimate_sample_memory(diff, (20, 3000), attention="edge", tile=512, overlap=64, save=True)
    untiled = estimate_sample_memory(diff, (20, 3000), attention="edge", save=True)
    big = estimate_sample_memory(diff, (2048, 2048), attention="gaussian", tile=512, overlap=64, save=True)
    assert wide.total < 1 << 30 and untiled.total < 2 << 30 and big.total < 4 << 30
    assert wide.parts["UNet activations"] < untiled.parts["UNet activations"] / 10  # tiles bound the UNet's part


def test_estimate_bounds_the_peak_rss_of_an_untiled_run():
    """A real run in a fresh process: 2000x80 output untiled (10000 positions at the attention
    level, 0.8 GB more on the math path).  Measured here: 193 MiB above the idle process (peak
    RSS 1.06 GiB), estimate 284 MiB."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peak_memory.py"), "--case", "500x20:gaussian:0",
                          "--threads", "1", "--json", "/dev/stdout"], capture_output=True, text=True, cwd=ROOT,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout[out.stdout.index("{\n"):])["results"][0]
    assert result["rc"] == 0
    assert result["run"] <= result["estimate"] <= 4 * max(result["run"], 64 * MiB)
    assert result["run"] < 300 * MiB


def test_upscale_refuses_a_run_that_does_not_fit_and_names_tile(tmp_path, monkeypatch, capsys):
    src = tmp_path / "big.png"
    save_image(torch.rand(3, 160, 160), src)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "300M")
    rc = main(["upscale", str(src), "--out", str(out), "--checkpoint", str(DEMO), "--steps", "1", "--tile", "0",
               "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert "needs about" in err[0] and "capped by $YODA_SPARSE_MEMORY_LIMIT" in err[0]
    assert "pass --tile " in err[0]
    assert not any(out.iterdir())
    tile = int(err[0].split("pass --tile ")[1].split()[0])
    diff, _, _ = load_diffusion(DEMO)
    overlap = default_overlap(tile, diff.scale)
    assert estimate_sample_memory(diff, (160, 160), attention="edge", tile=tile, overlap=overlap, save=True).total <= 300e6


def test_a_whole_image_too_large_for_any_tile_says_so(tmp_path, monkeypatch):
    diff, _, _ = load_diffusion(DEMO)
    est = estimate_sample_memory(diff, (4096, 4096), attention="edge", tile=512, overlap=64, save=True)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "1G")
    with pytest.raises(InsufficientMemoryError, match="upscaling x.png needs about"):
        check_memory(est, "cpu", what="upscaling x.png")


def test_available_memory_and_its_cap(monkeypatch):
    monkeypatch.delenv(MEMORY_LIMIT_ENV, raising=False)
    free = available_memory("cpu")
    assert free is None or free > 0
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "2G")
    assert available_memory("cpu") == min(free or 2 << 30, 2 << 30)
    check_memory(MemoryEstimate(1 << 30), "cpu")  # fits: no error
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "lots")
    with pytest.raises(ValueError, match=f"^{MEMORY_LIMIT_ENV} must be a size"):
        available_memory("cpu")
