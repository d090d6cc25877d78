"""The command line end to end on a tiny random model (bad input included)."""
import json

import pytest
import torch

from yoda_sparse.cli import main
from yoda_sparse.diffusion import ScheduleSettings, YodaSettings, build_diffusion
from yoda_sparse.imageio import save_image
from yoda_sparse.models import build_model, get_model_config


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name in ("sr3_tiny", "srdiff_tiny"):
        cfg = get_model_config(name)
        torch.manual_seed(0)
        model = build_model(cfg)
        sched = ScheduleSettings("linear", 20, 1e-4, 0.1) if cfg.family == "sr3" else ScheduleSettings("cosine", 20)
        diff = build_diffusion(model, cfg, schedule=sched, yoda=YodaSettings(attention="gaussian", lower_bound=0.3))
        path = root / f"{name}.safetensors"
        diff.save(path, cfg, ema=model.state_dict())
        out[name] = path
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    torch.manual_seed(1)
    paths = {}
    for name, (h, w) in {"a": (13, 11), "b": (16, 16)}.items():  # odd sizes: padded and cropped back
        paths[name] = root / f"{name}.png"
        save_image(torch.rand(3, h, w), paths[name])
    return paths


def test_upscale_end_to_end(tiny_checkpoints, images, tmp_path, capsys):
    out = tmp_path / "sr"
    out.mkdir()
    rc = main(["upscale", str(images["a"]), str(images["b"]), "--out", str(out), "--checkpoint",
               str(tiny_checkpoints["sr3_tiny"]), "--steps", "4", "--save-attention", "--save-masks", "--no-progress"])
    assert rc == 0
    from PIL import Image

    assert Image.open(out / "a_x4.png").size == (44, 52)
    assert Image.open(out / "b_x4.png").size == (64, 64)
    assert (out / "a_attention.png").exists() and (out / "a_masks.png").exists()
    assert "update ratio" in capsys.readouterr().out
    rc = main(["upscale", str(images["a"]), "--out", str(out), "--checkpoint", str(tiny_checkpoints["srdiff_tiny"]),
               "--steps", "3", "--dense", "--no-progress", "--overwrite"])  # a_x4.png exists
    assert rc == 0


def test_upscale_is_seeded(tiny_checkpoints, images, tmp_path):
    outs = []
    for k in range(2):
        out = tmp_path / f"o{k}"
        out.mkdir()
        main(["upscale", str(images["b"]), "--out", str(out), "--checkpoint", str(tiny_checkpoints["sr3_tiny"]),
              "--steps", "3", "--seed", "5", "--no-progress"])
        outs.append((out / "b_x4.png").read_bytes())
    assert outs[0] == outs[1]


def test_eval_end_to_end(tiny_checkpoints, images, tmp_path):
    from yoda_sparse.imageio import bundled_images

    data = tmp_path / "hr"
    data.mkdir()
    img = bundled_images()["astronaut"]()[:, ::8, ::8][:, :40, :40]
    save_image(img, data / "astro.png")
    out = tmp_path / "eval"
    rc = main(["eval", str(data), "--checkpoint", str(tiny_checkpoints["sr3_tiny"]), "--out", str(out), "--steps", "3",
               "--dense", "--crop", "32", "--ratio-methods", "edge"])
    assert rc == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["summary"]) == {"yoda", "dense", "bicubic"}
    assert report["lpips"].startswith("LPIPS unavailable")
    assert 0 < report["summary"]["yoda"]["update_ratio"] <= 1
    for f in ("results.csv", "update_ratio.png", "refined_area.png"):
        assert (out / f).exists()


@pytest.mark.parametrize("case", ["corrupt", "missing_out", "wrong_scale", "tiny_image", "missing_ckpt"])
def test_bad_input_is_one_line_and_nonzero(case, tiny_checkpoints, images, tmp_path, capsys):
    ckpt = str(tiny_checkpoints["sr3_tiny"])
    out = tmp_path / "out"
    out.mkdir()
    img = str(images["a"])
    args = ["upscale", img, "--out", str(out), "--checkpoint", ckpt, "--steps", "2", "--no-progress"]
    if case == "corrupt":
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"\x89PNG not really")
        args[1] = str(bad)
    elif case == "missing_out":
        args[3] = str(tmp_path / "nope")
    elif case == "wrong_scale":
        args += ["--scale", "8"]
    elif case == "tiny_image":
        small = tmp_path / "small.png"
        save_image(torch.rand(3, 4, 4), small)
        args[1] = str(small)
    elif case == "missing_ckpt":
        args[5] = str(tmp_path / "none.safetensors")
    rc = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert not list(out.glob("*.png"))  # nothing half-written


def test_wrong_family_checkpoint(tiny_checkpoints):
    from yoda_sparse.diffusion import load_diffusion

    with pytest.raises(ValueError, match="expected sr3"):
        load_diffusion(tiny_checkpoints["srdiff_tiny"], expected_family="sr3")


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "yoda_step" in out and "reference" in out


def test_upscale_and_eval_on_the_sparse_engine(tiny_checkpoints, images, tmp_path):
    """--engine sparse (with engine options) runs both families end to end; --engine dense and
    the sparse engine agree where every pixel is active from the first step (lower bound 1)."""
    from yoda_sparse.imageio import bundled_images

    for name in ("sr3_tiny", "srdiff_tiny"):
        out = tmp_path / name
        out.mkdir()
        rc = main(["upscale", str(images["b"]), "--out", str(out), "--checkpoint", str(tiny_checkpoints[name]),
                   "--steps", "3", "--engine", "sparse", "--sparse-tile", "4", "--refresh-every", "2",
                   "--refresh-above", "0.9", "--dense-threshold", "2.0", "--no-progress"])
        assert rc == 0 and (out / "b_x4.png").exists()
    hr = tmp_path / "hr"
    hr.mkdir()
    save_image(bundled_images()["coffee"]()[:, :64, :64], hr / "coffee.png")
    rc = main(["eval", str(hr), "--checkpoint", str(tiny_checkpoints["sr3_tiny"]), "--out", str(tmp_path / "ev"),
               "--steps", "2", "--crop", "32", "--ratio-methods", "", "--engine", "sparse", "--halo", "1", "--norm-stats", "probed",
               "--probes", "2"])
    assert rc == 0
    with pytest.raises(SystemExit):
        main(["upscale", str(images["b"]), "--out", str(tmp_path), "--checkpoint", str(tiny_checkpoints["sr3_tiny"]),
              "--engine", "fastest"])


def test_bench_command_writes_its_table_and_plots(tmp_path, capsys):
    rc = main(["bench", "--model", "sr3_tiny", "--size", "32", "--steps", "3", "--sources", "disk:0.5", "ones",
               "--out", str(tmp_path / "b"), "--no-progress", "--dense-threshold", "2.0", "--repeats", "2"])
    assert rc == 0
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert [r["source"] for r in report["runs"]] == ["disk:0.5", "ones"]
    for r in report["runs"]:
        assert r["dense"]["seconds"] > 0 and r["sparse"]["seconds"] > 0 and 0 < r["update_ratio"] <= 1
        for engine in ("dense", "sparse"):  # the median of the repeats
            assert len(r[engine]["runs"]) == 2 and r[engine]["seconds"] == sum(r[engine]["runs"]) / 2
    assert len(report["per_step"]["sparse"]) == 2 * 3  # the first round's steps, per source
    assert report["runs"][1]["psnr_sparse_vs_dense"] == float("inf")  # all-ones: the same computation
    for r in report["runs"]:  # read in an untimed run of each engine (the timed ones carry no watcher)
        assert r["dense"]["peak_bytes"] > 0 and r["sparse"]["peak_bytes"] > 0
    for f in ("bench.md", "time_ratio.png", "step_time.png"):
        assert (tmp_path / "b" / f).stat().st_size > 0
    assert "ratio" in capsys.readouterr().out
    rc = main(["bench", "--model", "sr3_tiny", "--size", "32", "--steps", "2", "--sources", "ones",
               "--out", str(tmp_path / "c"), "--no-progress", "--no-memory"])
    assert rc == 0
    report = json.loads((tmp_path / "c" / "bench.json").read_text())
    assert report["runs"][0]["dense"]["peak_bytes"] is None and report["runs"][0]["sparse"]["peak_bytes"] is None
    assert "| - / - |" in (tmp_path / "c" / "bench.md").read_text()
    assert main(["bench", "--steps", "0"]) == 1  # a ValueError naming --steps
    assert "--steps" in capsys.readouterr().err


def test_engine_arguments_parse_refresh_above_and_none():
    import argparse

    from yoda_sparse.bench import add_engine_arguments, engine_options_from_args

    q = argparse.ArgumentParser()
    add_engine_arguments(q)
    assert engine_options_from_args(q.parse_args([])) == {}
    assert engine_options_from_args(q.parse_args(["--refresh-above", "0.7", "--refresh-every", "8"])) == {
        "refresh_above": 0.7, "refresh_every": 8}
    assert engine_options_from_args(q.parse_args(["--refresh-above", "none"])) == {"refresh_above": None}
    with pytest.raises(SystemExit):
        q.parse_args(["--refresh-above", "often"])
