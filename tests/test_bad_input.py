"""Bad input, the list of promises (issue 13): each test is one row of what a hostile but
realistic user tried, and asserts what happens now.  Errors are one line naming the argument
(the flag, on the command line); nothing is clamped, cast, dropped or overwritten silently."""
from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch

from yoda_sparse import diffusion as diffusion_mod
from yoda_sparse import ops, time_mask
from yoda_sparse.cli import main
from yoda_sparse.diffusion import ScheduleSettings, YodaSettings, build_diffusion, load_diffusion
from yoda_sparse.imageio import save_image
from yoda_sparse.models import build_model, get_model_config


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; a shared 2-core machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    cfg = get_model_config("sr3_tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    diff = build_diffusion(model, cfg, schedule=ScheduleSettings("linear", 20, 1e-4, 0.1),
                           yoda=YodaSettings(attention="gaussian", lower_bound=0.3))
    path = tmp_path_factory.mktemp("ckpt") / "sr3_tiny.safetensors"
    diff.save(path, cfg, ema=model.state_dict())
    return path


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory) -> Path:
    """Three 48x40 HR images."""
    root = tmp_path_factory.mktemp("hr")
    g = torch.Generator().manual_seed(3)
    for name in ("a", "b", "c"):
        save_image(torch.rand(3, 40, 48, generator=g), root / f"{name}.png")
    return root


@pytest.fixture
def count_samples(monkeypatch):
    """How many times a diffusion sampler ran (to show a check came before any sampling)."""
    calls = []
    real = diffusion_mod._DiffusionSR.sample

    def counting(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(diffusion_mod._DiffusionSR, "sample", counting)
    return calls


def _one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def _lr(folder, name="pic.png", size=(12, 16), seed=0) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.rand(3, *size, generator=torch.Generator().manual_seed(seed)), path)
    return path


def _upscale(ckpt, out, *inputs, extra=()):
    return main(["upscale", *map(str, inputs), "--out", str(out), "--checkpoint", str(ckpt), "--steps", "2",
                 "--no-progress", *extra])


# ------------------------------------------------------------------------ upscale: outputs
def test_same_named_inputs_from_two_folders_get_distinct_outputs(ckpt, tmp_path):
    a, b = _lr(tmp_path / "a", seed=1), _lr(tmp_path / "b", seed=2)
    out = tmp_path / "out"
    out.mkdir()
    assert _upscale(ckpt, out, a, b) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_pic_x4.png", "b_pic_x4.png"]
    assert (out / "a_pic_x4.png").read_bytes() != (out / "b_pic_x4.png").read_bytes()


def test_existing_output_is_an_error_unless_overwrite(ckpt, tmp_path, capsys, count_samples):
    src = _lr(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "pic_x4.png").write_bytes(b"keep me")
    assert _upscale(ckpt, out, src) == 1
    msg = _one_line_error(capsys)
    assert "pic_x4.png exists" in msg and "--overwrite" in msg
    assert (out / "pic_x4.png").read_bytes() == b"keep me" and not count_samples
    assert _upscale(ckpt, out, src, extra=["--overwrite"]) == 0
    assert (out / "pic_x4.png").read_bytes()[:4] == b"\x89PNG"


def test_the_same_file_twice_is_an_error(ckpt, tmp_path, capsys):
    src = _lr(tmp_path)
    assert _upscale(ckpt, tmp_path, src, tmp_path / "." / "pic.png") == 1
    assert "are the same file" in _one_line_error(capsys)


# ------------------------------------------------------------------------ options name the flag
@pytest.mark.parametrize("command", ["upscale", "eval"])
@pytest.mark.parametrize("steps", ["0", "-3", "two"])
def test_bad_steps_name_the_flag(command, steps, ckpt, tmp_path, capsys):
    src = _lr(tmp_path)
    args = [command, str(src), "--out", str(tmp_path / "o"), "--checkpoint", str(ckpt), "--steps", steps]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    msg = _one_line_error(capsys)
    assert "argument --steps:" in msg and repr(steps) in msg
    assert not (tmp_path / "o").exists()


def test_steps_above_the_training_schedule_name_the_flag(ckpt, tmp_path, capsys):
    assert _upscale(ckpt, tmp_path, _lr(tmp_path), extra=["--steps", "21"]) == 1
    assert "--steps must be at most the checkpoint's 20 training steps, got 21" in _one_line_error(capsys)


@pytest.mark.parametrize("payload", [b"\xff" * 64, b""])
def test_corrupt_attention_weights_name_the_option_and_file(payload, ckpt, tmp_path, capsys):
    bad = tmp_path / "dino.safetensors"
    bad.write_bytes(payload)
    assert _upscale(ckpt, tmp_path, _lr(tmp_path), extra=["--attention", "dino_resnet50_max",
                                                           "--attention-weights", str(bad)]) == 1
    msg = _one_line_error(capsys)
    assert "--attention-weights" in msg and str(bad) in msg


def test_weights_for_a_method_without_weights(ckpt, tmp_path, capsys):
    w = tmp_path / "w.pth"
    torch.save({"a": torch.zeros(1)}, w)
    assert _upscale(ckpt, tmp_path, _lr(tmp_path), extra=["--attention-weights", str(w)]) == 1
    assert "--attention-weights: attention method 'gaussian' takes no weights file" in _one_line_error(capsys)


# ------------------------------------------------------------------------ eval
def _eval(ckpt, out, *data, extra=()):
    return main(["eval", *map(str, data), "--checkpoint", str(ckpt), "--out", str(out), "--steps", "2",
                 "--ratio-methods", "gaussian", *extra])


def test_eval_skips_a_corrupt_image_keeps_the_others_and_exits_nonzero(ckpt, hr_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for p in hr_dir.iterdir():
        (data / p.name).write_bytes(p.read_bytes())
    (data / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "eval"
    assert _eval(ckpt, out, data) == 1
    captured = capsys.readouterr()
    assert captured.out.index("skipping") < captured.out.index("[1/2]")  # reported before sampling
    assert "1 of 3 images skipped" in captured.err and "--skip-bad" in captured.err
    report = json.loads((out / "results.json").read_text())
    assert report["images"] == 2 and report["complete"] is True
    assert [s["image"] for s in report["skipped"]] == [str(data / "b.png")]
    assert "corrupt or truncated" in report["skipped"][0]["reason"]
    assert sorted({Path(r["image"]).name for r in report["per_image"]}) == ["a.png", "c.png"]
    assert _eval(ckpt, tmp_path / "eval2", data, extra=["--skip-bad"]) == 0


def test_eval_image_smaller_than_the_crop_is_named_with_its_size_before_sampling(ckpt, hr_dir, tmp_path, capsys, count_samples):
    small = tmp_path / "small.png"
    save_image(torch.rand(3, 20, 36), small)
    assert _eval(ckpt, tmp_path / "e", small, extra=["--crop", "32"]) == 1
    msg = _one_line_error(capsys)
    assert str(small) in msg and "36x20" in msg and "32x32 crop (--crop 32)" in msg
    assert not count_samples


@pytest.mark.parametrize("crop, expect", [("30", "--crop must be a multiple of 4"), ("0", "argument --crop"),
                                          ("-8", "argument --crop"), ("512", "smaller than the 512x512 crop")])
def test_eval_crop_out_of_range_is_an_error(crop, expect, ckpt, hr_dir, tmp_path, capsys, count_samples):
    out = tmp_path / "e"
    try:
        rc = _eval(ckpt, out, hr_dir, extra=["--crop", crop])
    except SystemExit as e:
        rc = e.code
    assert rc in (1, 2)
    assert expect in _one_line_error(capsys)
    assert not count_samples and not out.exists()


def test_eval_records_the_crop_used(ckpt, hr_dir, tmp_path):
    out = tmp_path / "e"
    assert _eval(ckpt, out, hr_dir / "a.png", extra=["--crop", "36"]) == 0
    assert json.loads((out / "results.json").read_text())["crop"] == 36


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_eval_limit_out_of_range_is_an_error(limit, ckpt, hr_dir, tmp_path, capsys):
    out = tmp_path / "e"
    with pytest.raises(SystemExit) as exc:
        _eval(ckpt, out, hr_dir, extra=["--limit", limit])
    assert exc.value.code == 2 and "argument --limit: must be a positive integer" in _one_line_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("limit, error", [(0, ValueError), (-1, ValueError), (1.5, TypeError), ("2", TypeError)])
def test_evaluate_api_limit_names_the_argument(limit, error, ckpt, hr_dir, tmp_path):
    from yoda_sparse.evaluate import evaluate

    with pytest.raises(error, match="^limit must be a positive integer"):
        evaluate(ckpt, [hr_dir], tmp_path / "e", limit=limit, log=lambda *_: None)


def test_eval_into_a_read_only_folder_fails_before_sampling(ckpt, hr_dir, tmp_path, capsys, count_samples):
    if os.geteuid() == 0:  # root writes into a mode-0555 folder; procfs refuses new files even to root
        out = Path("/proc/self")
    else:
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o555)
    assert _eval(ckpt, out, hr_dir) == 1
    msg = _one_line_error(capsys)
    assert f"--out folder {out} is not writable" in msg
    assert not count_samples


def test_eval_existing_results_are_an_error_unless_overwrite(ckpt, hr_dir, tmp_path, capsys):
    out = tmp_path / "e"
    out.mkdir()
    (out / "results.json").write_text("{}")
    assert _eval(ckpt, out, hr_dir / "a.png", extra=["--crop", "32"]) == 1
    assert "results.json exists; pass --overwrite" in _one_line_error(capsys)
    assert _eval(ckpt, out, hr_dir / "a.png", extra=["--crop", "32", "--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["images"] == 1


def test_eval_keeps_finished_results_when_a_run_fails_midway(ckpt, hr_dir, tmp_path, monkeypatch):
    from yoda_sparse.evaluate import evaluate

    real = diffusion_mod._DiffusionSR.sample
    calls = []

    def failing_second_image(self, *a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("simulated failure")
        return real(self, *a, **k)

    monkeypatch.setattr(diffusion_mod._DiffusionSR, "sample", failing_second_image)
    with pytest.raises(RuntimeError, match="simulated"):
        evaluate(ckpt, [hr_dir], tmp_path / "e", steps=2, crop=32, ratio_methods=(), log=lambda *_: None)
    report = json.loads((tmp_path / "e" / "results.json").read_text())
    assert report["complete"] is False and report["images"] == 1
    assert {r["run"] for r in report["per_image"]} == {"yoda", "bicubic"}


# ------------------------------------------------------------------------ Python API
@pytest.mark.parametrize("kwargs, error, name", [
    (dict(t="100"), TypeError, "t"),
    (dict(lower_bound="0.2"), TypeError, "lower_bound"),
    (dict(t=torch.tensor([3.0, 4.0])), ValueError, "t"),
    (dict(size=(0, 4)), ValueError, "size"),
    (dict(size=(4,)), TypeError, "size"),
    (dict(T="500"), TypeError, "T"),
    (dict(t=float("nan")), ValueError, "t"),
])
def test_time_mask_refuses_and_names_the_argument(kwargs, error, name):
    args = dict(attn=torch.rand(1, 1, 8, 8), t=100, T=500, lower_bound=0.2)
    args.update(kwargs)
    with pytest.raises(error, match=f"^{name} must"):
        time_mask(args.pop("attn"), args.pop("t"), args.pop("T"), args.pop("lower_bound"), **args)


def test_time_mask_still_takes_numbers_and_one_element_tensors():
    attn = torch.rand(1, 1, 8, 8)
    expect = time_mask(attn, 100, 500, 0.2)
    for t in (100.0, torch.tensor(100), torch.tensor([100.0])):
        assert torch.equal(time_mask(attn, t, 500, 0.2), expect)


@pytest.mark.parametrize("normalize", ["all", "active", "sum"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_masked_l1_loss_of_an_empty_batch_is_zero(normalize, mask_dtype):
    pred = torch.randn(0, 3, 4, 4, requires_grad=True)
    loss = ops.masked_l1_loss(pred, torch.randn(0, 3, 4, 4), torch.ones(0, 1, 4, 4, dtype=mask_dtype), normalize)
    assert loss.item() == 0.0 and not math.isnan(loss.item())
    loss.backward()
    assert pred.grad.shape == pred.shape


@pytest.mark.parametrize("bad", [float("nan"), -1.0, 1.5, float("inf")])
def test_masked_l1_loss_refuses_float_masks_outside_0_1(bad):
    pred = torch.randn(2, 3, 4, 4)
    mask = torch.full((2, 1, 4, 4), 0.5)
    mask[1, 0, 2, 3] = bad
    with pytest.raises(ValueError, match="^mask "):
        ops.masked_l1_loss(pred, pred + 1, mask)


def test_masked_l1_loss_float_mask_in_range_still_works():
    pred = torch.zeros(1, 1, 2, 2)
    mask = torch.tensor([[[[0.0, 0.5], [1.0, 0.25]]]])
    assert ops.masked_l1_loss(pred, pred + 1, mask, "sum").item() == pytest.approx(1.75)


@pytest.mark.parametrize("make_lr", [lambda lr: lr * 5, lambda lr: lr.masked_fill(lr > 0.5, float("nan")),
                                     lambda lr: lr - 1])
def test_sample_refuses_images_outside_0_1(make_lr, ckpt):
    diff, _, _ = load_diffusion(ckpt)
    with pytest.raises(ValueError, match=r"^lr must hold finite values in \[0, 1\]"):
        diff.sample(make_lr(torch.rand(1, 3, 8, 8)), steps=1, progress=False)


@pytest.mark.parametrize("steps", [0, -3, 21, 2.5, "2"])
def test_sample_steps_name_the_argument(steps, ckpt):
    diff, _, _ = load_diffusion(ckpt)
    with pytest.raises(ValueError, match="^steps must be an integer in \\[1, 20\\]"):
        diff.sample(torch.rand(1, 3, 8, 8), steps=steps, progress=False)


# ------------------------------------------------------------------------ files
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_train_checkpoints_and_upscale_outputs_get_umask_filtered_modes(tmp_path, ckpt):
    from yoda_sparse.train import TrainConfig, train

    data = tmp_path / "data"
    data.mkdir()
    save_image(torch.rand(3, 40, 40), data / "x.png")
    old = os.umask(0o022)
    try:
        train(TrainConfig(data=[str(data)], out_dir=str(tmp_path / "run"), model="sr3_tiny", batch_size=1,
                          crop_size=32, steps=1, log_every=1, checkpoint_every=1, seed=0), log=lambda *_: None)
        out = tmp_path / "sr"
        out.mkdir()
        assert _upscale(ckpt, out, _lr(tmp_path)) == 0
    finally:
        os.umask(old)
    run = tmp_path / "run"
    files = [run / "checkpoint-latest.safetensors", run / "latest", run / "config.json",
             *sorted((run / "ckpt-000001").iterdir()), out / "pic_x4.png"]
    assert {f.name: _mode(f) for f in files} == {f.name: 0o644 for f in files}
