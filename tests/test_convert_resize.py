"""yoda_sparse.resize: the three bicubic conventions against known values, Pillow and SRDiff's imresize."""
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from yoda_sparse.resize import UPSAMPLE_METHODS, cubic_kernel, resize, resize_weights, upsample

FIXTURES = Path(__file__).parent / "fixtures" / "public_models"


def test_cubic_kernel_known_values():
    # Keys' kernel with a = -0.5 at quarter points (exact binary fractions)
    x = torch.tensor([0.0, 0.25, 0.75, 1.0, 1.25, 1.75, 2.0, 2.5], dtype=torch.float64)
    want = [1.0, 0.8671875, 0.2265625, 0.0, -0.0703125, -0.0234375, 0.0, 0.0]
    assert cubic_kernel(x).tolist() == want
    assert cubic_kernel(-x).tolist() == want


def test_ramp_upsampled_x2_known_values():
    """A ramp 0, 1, ..., 7 doubled: inside the image all three reproduce the ramp at the output
    centres (o + 0.5) / 2 - 0.5; the first output differs by how each treats the border:
    MATLAB mirrors (-3/32), Pillow drops the outside taps and renormalises (-3/34), torch
    (a = -0.75) repeats the edge (-27/256)."""
    ramp = torch.arange(8, dtype=torch.float64).view(1, 1, 1, 8)
    centres = (torch.arange(16, dtype=torch.float64) + 0.5) / 2 - 0.5
    first = {"matlab_bicubic": Fraction(-3, 32), "pil_bicubic": Fraction(-3, 34), "torch_bicubic": Fraction(-27, 256)}
    for method in UPSAMPLE_METHODS:
        out = resize(ramp.expand(1, 1, 8, 8).contiguous(), (16, 16), method)[0, 0, 0]
        assert out[0].item() == pytest.approx(float(first[method]), abs=1e-15), method
        if method != "torch_bicubic":
            torch.testing.assert_close(out[3:-3], centres[3:-3], rtol=0, atol=1e-14)


@pytest.mark.parametrize("method", UPSAMPLE_METHODS)
def test_constants_stay_constant(method):
    x = torch.full((2, 3, 5, 7), 0.3, dtype=torch.float64)
    torch.testing.assert_close(upsample(x, 3, method), torch.full((2, 3, 15, 21), 0.3, dtype=torch.float64))
    if method != "torch_bicubic":
        assert torch.allclose(resize_weights(method, 7, 3).sum(1), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(8, 8, 32, 32), (5, 7, 15, 21), (16, 12, 4, 3), (10, 9, 7, 13), (3, 3, 12, 12)])
def test_pil_bicubic_matches_pillow_on_float_images(shape):
    h, w, oh, ow = shape
    g = torch.Generator().manual_seed(h * 100 + w)
    x = torch.rand(h, w, generator=g)
    ref = np.asarray(Image.fromarray(x.numpy(), mode="F").resize((ow, oh), Image.BICUBIC))
    torch.testing.assert_close(resize(x, (oh, ow), "pil_bicubic"), torch.from_numpy(ref.copy()), rtol=0, atol=1e-6)


def test_matlab_bicubic_matches_srdiffs_imresize():
    """Outputs of the MATLAB-style imresize SRDiff ships (run outside this project, see the
    fixture README): x4, x3 and 1/4 (antialiased) on float images."""
    g = load_file(str(FIXTURES / "matlab_imresize_golden.safetensors"))
    for name, scale in (("up4", 4.0), ("up3", 3.0), ("down4", 0.25)):
        x, want = g[f"{name}_in"], g[f"{name}_out"]
        if want.dim() == 2:
            want = want[..., None]
        got = resize(x.permute(2, 0, 1), tuple(want.shape[:2]), "matlab_bicubic", scale=scale).permute(1, 2, 0)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_torch_bicubic_is_interpolate_and_dtype_is_kept():
    x = torch.rand(1, 3, 6, 6)
    assert torch.equal(upsample(x, 4), torch.nn.functional.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False))
    assert upsample(x, 2, "matlab_bicubic").dtype == torch.float32
    assert upsample(x.double(), 2, "pil_bicubic").dtype == torch.float64


def test_bad_arguments_name_themselves():
    x = torch.rand(1, 3, 4, 4)
    with pytest.raises(ValueError, match="method"):
        upsample(x, 2, "lanczos")
    with pytest.raises(ValueError, match="scale"):
        upsample(x, 0)
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        upsample(x.to(torch.uint8), 2, "pil_bicubic")
    with pytest.raises(ValueError, match="scale: only matlab_bicubic"):
        resize(x, (8, 8), "pil_bicubic", scale=2.0)
