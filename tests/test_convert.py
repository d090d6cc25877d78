"""Converters of public SR3 / SRDiff checkpoints: outputs equal the public code's (golden
fixtures made by running it, see fixtures/public_models/README.md), the converted files are
self-describing, and bad files are refused with errors that name what was expected."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from yoda_sparse.cli import main
from yoda_sparse.diffusion import ScheduleSettings, load_diffusion
from yoda_sparse.integrations import convert_sr3, convert_srdiff, sr3_state_dict, srdiff_state_dict
from yoda_sparse.integrations._checkpoints import fold_weight_norm, schedule_from_buffers
from yoda_sparse.models import read_checkpoint_metadata, sinusoidal_embedding

FIX = Path(__file__).parent / "fixtures" / "public_models"
SR3_FILE, SR3_CONFIG, SRDIFF_FILE = FIX / "sr3_tiny_gen.pth", FIX / "sr3_tiny_config.json", FIX / "srdiff_tiny.ckpt"
TOL = dict(rtol=0, atol=1e-5)  # fp32, as the issue asks


@pytest.fixture(scope="module")
def sr3_converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("sr3") / "sr3.safetensors"
    convert_sr3(SR3_FILE, out, config=SR3_CONFIG)
    return out


@pytest.fixture(scope="module")
def srdiff_converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("srdiff") / "srdiff.safetensors"
    convert_srdiff(SRDIFF_FILE, out)
    return out


def _as_image(public_sample):
    return ((public_sample + 1) / 2).clamp(0, 1)  # the public outputs are in [-1, 1]


# ------------------------------------------------------------------------------------- SR3
def test_sr3_noise_prediction_x_up_and_sampling_equal_the_public_code(sr3_converted):
    g = load_file(str(FIX / "sr3_golden.safetensors"))
    diff, cfg, extra = load_diffusion(sr3_converted)
    assert cfg.noise_level_scale == 1.0 and extra["preprocess"]["upsample"] == "pil_bicubic"
    with torch.no_grad():
        eps = diff.model(g["unet_input"], g["noise_level"])
    torch.testing.assert_close(eps, g["eps"], **TOL)
    x_up, _, _ = diff._prepare(g["lr"] * 2 - 1)
    torch.testing.assert_close(x_up, g["x_up"], **TOL)
    # the public p_sample_loop with torch.manual_seed(1234): same draws from the same generator
    res = diff.sample(g["lr"], None, generator=torch.Generator().manual_seed(1234), progress=False)
    torch.testing.assert_close(res.images, _as_image(g["sample"]), **TOL)


def test_sr3_layout_inferred_from_the_weights_equals_the_configs(tmp_path):
    cfg_a, state_a, sched_a = sr3_state_dict(SR3_FILE, config=SR3_CONFIG)
    notes = []
    cfg_b, state_b, sched_b = sr3_state_dict(SR3_FILE, scale=4, image_size=32, norm_groups=4, notes=notes)
    assert cfg_a == cfg_b and sched_a == sched_b == ScheduleSettings("linear", 12, 1e-4, 0.3).to_dict()
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert notes == []
    # norm groups are not in the weights: the public default (32) cannot serve 8 channels
    with pytest.raises(ValueError, match=r"norm_groups: not stored in the weights.*\[8, 16\]"):
        sr3_state_dict(SR3_FILE, scale=4)
    cfg_c, _, _ = sr3_state_dict(SR3_FILE, scale=4, norm_groups=4)
    assert cfg_c.image_size == 16 and cfg_c.attn_resolutions == (4,)  # attention stays on level 2


def test_sr3_unet_alone_dataparallel_prefix_and_safetensors_are_read(tmp_path):
    from safetensors.torch import save_file

    state = torch.load(SR3_FILE, weights_only=True)
    unet_only = {k[len("denoise_fn."):]: v for k, v in state.items() if k.startswith("denoise_fn.")}
    dp = {"module." + k: v for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "gen.safetensors"))
    ref = sr3_state_dict(state, config=SR3_CONFIG)[1]
    for obj in (unet_only, dp, tmp_path / "gen.safetensors"):
        got = sr3_state_dict(obj, config=SR3_CONFIG)[1]
        assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_sr3_errors_name_the_key_and_both_shapes():
    state = dict(torch.load(SR3_FILE, weights_only=True))
    key = "denoise_fn.downs.1.res_block.noise_func.noise_func.0.weight"
    state[key] = torch.zeros(8, 9)
    with pytest.raises(ValueError, match=r"key 'denoise_fn\.downs\.1\.res_block\.noise_func\.noise_func\.0\.weight'.*\(8, 9\).*\(8, 8\)"):
        sr3_state_dict(state, config=SR3_CONFIG)
    state = dict(torch.load(SR3_FILE, weights_only=True))
    del state["denoise_fn.mid.0.attn.qkv.weight"]
    with pytest.raises(ValueError, match="middle block has no attention"):
        sr3_state_dict(state, config=SR3_CONFIG)
    state = dict(torch.load(SR3_FILE, weights_only=True))
    state["denoise_fn.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"'denoise_fn\.extra\.weight'.*no place"):
        sr3_state_dict(state, config=SR3_CONFIG)
    with pytest.raises(ValueError, match="scale"):
        sr3_state_dict(SR3_FILE)
    with pytest.raises(ValueError, match="expected keys 'denoise_fn.downs.0.weight'"):
        sr3_state_dict({"conv.weight": torch.zeros(1)}, scale=4)
    with pytest.raises(ValueError, match="optimizer state"):
        sr3_state_dict({"epoch": 1, "iter": 2, "optimizer": {}}, scale=4)
    with pytest.raises(ValueError, match="convert srdiff"):
        sr3_state_dict(torch.load(SRDIFF_FILE, weights_only=True), scale=4)
    with pytest.raises(ValueError, match="contradicts"):
        sr3_state_dict(SR3_FILE, config=SR3_CONFIG, scale=8)


# ---------------------------------------------------------------------------------- SRDiff
def test_srdiff_condition_noise_prediction_x_up_and_sampling_equal_the_public_code(srdiff_converted):
    g = load_file(str(FIX / "srdiff_golden.safetensors"))
    diff, cfg, extra = load_diffusion(srdiff_converted)
    assert cfg.embedding_freq_shift == 1 and cfg.timestep_zero_based
    assert extra["preprocess"] == {"upsample": "matlab_bicubic", "input_scale": 255 / 256}
    with torch.no_grad():
        cond = diff.model.encode(g["lr"] * 2 - 1)
        eps = diff.model.denoise(g["x_t"], g["t"] + 1, g["cond"])  # this library counts 1..T
    torch.testing.assert_close(cond, g["cond"], **TOL)
    torch.testing.assert_close(eps, g["eps"], **TOL)
    x_up, _, _ = diff._prepare(g["lr"] * 2 - 1)
    torch.testing.assert_close(x_up, g["img_lr_up"], **TOL)
    res = diff.sample(g["lr"], None, generator=torch.Generator().manual_seed(4321), progress=False)
    torch.testing.assert_close(res.images, _as_image(g["sample"]), **TOL)


def test_srdiff_embedding_convention_is_what_makes_the_difference(srdiff_converted):
    """Without the stored fidelity options the same weights predict something else: the
    frequencies and the timestep offset are not cosmetic."""
    g = load_file(str(FIX / "srdiff_golden.safetensors"))
    for flag in ("freq_shift", "zero_based"):
        diff, _, _ = load_diffusion(srdiff_converted)
        if flag == "freq_shift":
            diff.model.unet.time_embed.freq_shift = 0  # yoda-sparse's 1e4^(-k/half)
        else:
            diff.model.unet.timestep_zero_based = False  # t in 1..T reaches the network
        with torch.no_grad():
            eps = diff.model.denoise(g["x_t"], g["t"] + 1, g["cond"])
        assert (eps - g["eps"]).abs().max() > 1e-4, flag


def test_sinusoid_frequencies():
    t = torch.tensor([0.0, 3.0, 97.0])
    dim, half = 16, 8
    for shift in (0, 1):
        freqs = torch.tensor([1e4 ** (-k / (half - shift)) for k in range(half)], dtype=torch.float64)
        want = torch.cat([torch.sin(t.double()[:, None] * freqs), torch.cos(t.double()[:, None] * freqs)], 1)
        torch.testing.assert_close(sinusoidal_embedding(t, dim, freq_shift=shift).double(), want, rtol=0, atol=5e-5)
    with pytest.raises(ValueError, match="freq_shift"):
        sinusoidal_embedding(t, dim, freq_shift=2)


def test_srdiff_weight_norm_is_folded():
    ckpt = torch.load(SRDIFF_FILE, weights_only=True)
    state = dict(ckpt["state_dict"]["model"])
    key = "denoise_fn.downs.0.0.block1.block.1.weight"
    w = state.pop(key)
    g = w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    state[key + "_g"], state[key + "_v"] = g, w * 2.0  # g * v / |v| == w
    folded, names = fold_weight_norm(state)
    torch.testing.assert_close(folded[key], w, rtol=1e-6, atol=1e-7)
    notes = []
    _, out, _ = srdiff_state_dict({"state_dict": {"model": state}}, notes=notes)
    ref = srdiff_state_dict(SRDIFF_FILE)[1]
    torch.testing.assert_close(out["unet.down_blocks.0.0.conv1.weight"], ref["unet.down_blocks.0.0.conv1.weight"], rtol=1e-6, atol=1e-7)
    assert any("weight norm" in n for n in notes)


def test_srdiff_errors_name_what_was_expected():
    ckpt = torch.load(SRDIFF_FILE, weights_only=True)
    model = dict(ckpt["state_dict"]["model"])
    bad = dict(model)
    bad["denoise_fn.mlp.2.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"key 'denoise_fn\.mlp\.2\.weight'.*\(3, 3\).*\(8, 32\)"):
        srdiff_state_dict({"state_dict": {"model": bad}})
    with pytest.raises(ValueError, match="use_attn"):
        srdiff_state_dict({**model, "denoise_fn.mid_attn.fn.g": torch.zeros(1)})
    with pytest.raises(ValueError, match="up_input"):
        srdiff_state_dict({**model, "denoise_fn.up_proj.1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"\['state_dict'\]\['model'\]"):
        srdiff_state_dict({"state_dict": {"rrdb": {}}})
    with pytest.raises(ValueError, match="convert sr3"):
        srdiff_state_dict(torch.load(SR3_FILE, weights_only=True))
    with pytest.raises(ValueError, match="not an SRDiff checkpoint"):
        srdiff_state_dict({"conv.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="contradicts"):
        srdiff_state_dict(SRDIFF_FILE, timesteps=100)


# ----------------------------------------------------------------------------- shared parts
class _NeedsCode:
    pass


def test_pickles_that_need_code_are_refused(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"net": _NeedsCode(), "w": torch.zeros(1)}, path)
    for convert in (sr3_state_dict, srdiff_state_dict):
        with pytest.raises(ValueError, match="needs code to load.*weights_only=True"):
            convert(path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        srdiff_state_dict(tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match="path"):
        srdiff_state_dict(tmp_path / "missing.ckpt")


def test_schedules_are_recognised_from_float32_buffers():
    def buf(s):
        return s.build().betas.to(torch.float32)

    public = ScheduleSettings("linear", 2000, 1e-6, 1e-2)  # the public SR3 configs' schedule
    assert schedule_from_buffers(buf(public), "x") == public.to_dict()
    assert schedule_from_buffers(buf(ScheduleSettings("cosine", 100)), "x") == ScheduleSettings("cosine", 100).to_dict()
    quad = torch.linspace(1e-4 ** 0.5, 0.02 ** 0.5, 50, dtype=torch.float64) ** 2
    d = schedule_from_buffers(quad.float(), "x")
    assert d["kind"] == "explicit" and len(d["betas"]) == 50
    torch.testing.assert_close(ScheduleSettings.from_dict(d).build().betas, quad, rtol=1e-6, atol=0)
    assert schedule_from_buffers(None, "x") is None


def test_converted_files_are_self_describing_and_sample_with_yoda(sr3_converted, srdiff_converted, tmp_path):
    for path, family, codebase in ((sr3_converted, "sr3", "Janspiry"), (srdiff_converted, "srdiff", "LeiaLi")):
        cfg, extra = read_checkpoint_metadata(path)
        assert cfg.family == family and extra["family"] == family
        src = extra["converted_from"]
        assert src["codebase"].startswith(codebase) and len(src["sha256"]) == 64 and src["trained_with_yoda"] is False
        assert set(extra) >= {"schedule", "yoda", "preprocess"}
        diff, _, _ = load_diffusion(path)
        lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        attn = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))
        res = diff.sample(lr, attn, steps=4, generator=torch.Generator().manual_seed(2), progress=False)
        assert res.images.shape == (1, 3, 32, 32) and torch.isfinite(res.images).all()
        assert 0 < float(res.update_ratio[0]) < 1


def test_cli_convert_and_upscale_a_converted_model(tmp_path, capsys):
    from yoda_sparse.imageio import save_image

    out = tmp_path / "srdiff.safetensors"
    assert main(["convert", "srdiff", str(SRDIFF_FILE), "--out", str(out), "--attention", "gaussian"]) == 0
    printed = capsys.readouterr().out
    assert "timestep_zero_based=True" in printed and "pretraining head" in printed
    assert main(["convert", "srdiff", str(SRDIFF_FILE), "--out", str(out)]) == 1
    assert "exists" in capsys.readouterr().err
    assert main(["convert", "sr3", str(SR3_FILE), "--out", str(tmp_path / "x.safetensors")]) == 1
    assert "error: scale" in capsys.readouterr().err
    assert main(["convert", "sr3", str(SR3_FILE), "--out", str(tmp_path / "x.safetensors"), "--scale", "4",
                 "--attention", "nope"]) == 1
    assert "--attention: unknown method 'nope'" in capsys.readouterr().err
    save_image(torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0)), tmp_path / "lr.png")
    assert main(["upscale", str(tmp_path / "lr.png"), "--out", str(tmp_path), "--checkpoint", str(out),
                 "--no-progress", "--device", "cpu"]) == 0
    assert (tmp_path / "lr_x4.png").is_file() and "update ratio" in capsys.readouterr().out


def test_existing_checkpoints_sample_as_before():
    """The shipped demo checkpoints give what they gave before issue 15 (samples recorded with
    the code of commit 84c460e; the refactor was checked bit for bit on this machine)."""
    import yoda_sparse

    want = load_file(str(Path(__file__).parent / "fixtures" / "demo_checkpoint_samples.safetensors"))
    folder = Path(yoda_sparse.__file__).parent / "checkpoints"
    for name in ("sr3_yoda_demo", "srdiff_yoda_demo"):
        diff, _, extra = load_diffusion(folder / f"{name}.safetensors")
        assert "preprocess" not in extra and diff.preprocess.upsample == "torch_bicubic"
        g = torch.Generator().manual_seed(5)
        lr = torch.rand(1, 3, 8, 8, generator=g)
        attn = torch.rand(1, 1, 32, 32, generator=g)
        for kind, a in (("yoda", attn), ("dense", None)):
            res = diff.sample(lr, a, steps=10, generator=torch.Generator().manual_seed(1), progress=False)
            torch.testing.assert_close(res.images, want[f"{name}-{kind}"], rtol=0, atol=1e-5)
