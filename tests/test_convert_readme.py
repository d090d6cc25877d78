"""The README's "Bring your own model" snippets run as written (with the fixture checkpoints
standing in for the public files they name)."""
import re
import shlex
import shutil
from pathlib import Path

import pytest

from yoda_sparse.cli import main

ROOT = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures" / "public_models"
# the files the README names -> the fixtures that stand in for them
STAND_INS = {
    "I640000_E37_gen.pth": "sr3_tiny_gen.pth",
    "sr_sr3_16_128.json": "sr3_tiny_config.json",
    "model_ckpt_steps_400000.ckpt": "srdiff_tiny.ckpt",
}


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"### {title}")
    end = text.find("\n### ", start + 4)
    end2 = text.find("\n## ", start + 4)
    ends = [e for e in (end, end2) if e != -1]
    return text[start:min(ends) if ends else len(text)]


def _blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    for name, fixture in STAND_INS.items():
        shutil.copy(FIX / fixture, tmp_path / name)
    from yoda_sparse.imageio import save_image
    import torch

    save_image(torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0)), tmp_path / "photo.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_converted_checkpoint_route(workdir, capsys):
    section = _section("A checkpoint of the public SR3 or SRDiff code")
    (shell,) = _blocks(section, "bash")
    for line in shell.strip().splitlines():
        argv = shlex.split(line)
        assert argv[0] == "yoda-sparse"
        assert main(argv[1:] + ["--no-progress"] if argv[1] == "upscale" else argv[1:]) == 0, line
    assert (workdir / "sr" / "photo_x4.png").is_file() and (workdir / "sr3_16_128.safetensors").is_file()
    (code,) = _blocks(section, "python")
    (workdir / "srdiff_div2k.safetensors").unlink()  # the snippet converts it again
    exec(compile(code, "README:converted", "exec"), {})
    assert "torch.Size([1, 3, 64, 64])" in capsys.readouterr().out


def test_own_module_route(capsys):
    (code,) = _blocks(_section("Your own module"), "python")
    exec(compile(code, "README:own-module", "exec"), {})
    assert "torch.Size([1, 3, 32, 32])" in capsys.readouterr().out


def test_diffusers_route(capsys):
    pytest.importorskip("diffusers")
    (code,) = _blocks(_section("diffusers"), "python")
    exec(compile(code, "README:diffusers", "exec"), {})
    assert "torch.Size([1, 3, 32, 32])" in capsys.readouterr().out
