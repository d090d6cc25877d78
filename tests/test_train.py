"""Training: data pairs, exact resume, kill-safe checkpoints, DDP (gloo), YODA attention, bad inputs."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from yoda_sparse import train as train_mod
from yoda_sparse.data import ImageFolderPairs, SampleStream, batch_iterator, find_images
from yoda_sparse.diffusion import YodaSettings, load_diffusion
from yoda_sparse.run_folder import LATEST, MODEL_FILE, STATE_FILE
from yoda_sparse.train import (
    TrainConfig,
    add_train_arguments,
    config_from_args,
    find_latest_checkpoint,
    train,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tiny models gain nothing from a second thread, and on a shared 2-core machine OpenMP's
    # spinning threads multiply the CPU time of every step.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """Three real photographs (scikit-image) shrunk to 50..100 px, written as PNG (one in a subfolder)."""
    import skimage.data
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    for name, where in (("astronaut", "."), ("chelsea", "sub"), ("coffee", ".")):
        a = getattr(skimage.data, name)()
        im = Image.fromarray(a).resize((a.shape[1] // 6, a.shape[0] // 6), Image.BICUBIC)
        im.save(root / where / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def one_image(tmp_path_factory) -> Path:
    import skimage.data
    from PIL import Image

    root = tmp_path_factory.mktemp("one")
    a = skimage.data.astronaut()
    Image.fromarray(a).resize((48, 48), Image.BICUBIC).save(root / "astronaut.png")
    return root


def _cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=[str(data)], out_dir=str(out), model="sr3_tiny", batch_size=2, crop_size=32, steps=4,
                log_every=2, checkpoint_every=2, lr=1e-3, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _quiet(*_):
    pass


def _weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"tensor {k} differs"


# ------------------------------------------------------------------------------------ data
def test_pairs_shapes_determinism_and_order(image_dir):
    paths = find_images(image_dir)
    assert [p.name for p in paths] == ["astronaut.png", "coffee.png", "chelsea.png"]  # sorted relative paths
    ds = ImageFolderPairs(image_dir, scale=4, crop_size=32, rotate90=True, seed=3)
    s = ds.sample(1, epoch=0)
    assert s["hr"].shape == (3, 32, 32) and s["lr"].shape == (3, 8, 8)
    assert s["hr"].dtype == torch.float32 and 0 <= s["lr"].min() and s["lr"].max() <= 1
    assert torch.equal(ds[(0, 1)]["hr"], s["hr"])
    again = ImageFolderPairs(image_dir, scale=4, crop_size=32, rotate90=True, seed=3, cache=False)
    assert torch.equal(again.sample(1, 0)["lr"], s["lr"])  # cache on/off and a new object: same pair
    assert any(not torch.equal(ds.sample(1, e)["hr"], s["hr"]) for e in range(1, 4))  # new crop per epoch
    # DDP-style sharding: the two ranks' shares of an epoch cover it, padded by wrapping
    shares = [SampleStream(3, seed=1, rank=r, world_size=2).epoch_indices(5) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 2 and set(shares[0] + shares[1]) == {0, 1, 2}
    st = SampleStream(3, seed=1)
    assert st.batch_keys(1, 2) == [(0, st.epoch_indices(0)[2]), (1, st.epoch_indices(1)[0])]
    # worker processes give the very same batches
    a = batch_iterator(ds, st, 2, 2, num_workers=0)
    b = batch_iterator(ds, st, 2, 2, num_workers=2)
    for _ in range(2):
        x, y = next(a), next(b)
        assert torch.equal(x["hr"], y["hr"]) and torch.equal(x["lr"], y["lr"])


def test_bad_inputs(tmp_path, image_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image files"):
        ImageFolderPairs(empty, 4, 32)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderPairs(tmp_path / "missing", 4, 32)
    with pytest.raises(ValueError, match="crop_size must be a multiple of scale=4"):
        ImageFolderPairs(image_dir, 4, 30)
    with pytest.raises(ValueError, match=r"chelsea.png' is 75x50, smaller than crop_size=64"):
        ImageFolderPairs(image_dir, 4, 64)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png at all")
    for cache in (True, False):
        with pytest.raises(ValueError, match="broken.png"):
            ImageFolderPairs(bad, 4, 32, cache=cache)
    # the same errors through train(), plus the config checks
    with pytest.raises(ValueError, match="no image files"):
        train(_cfg(empty, tmp_path / "o1"), log=_quiet)
    with pytest.raises(ValueError, match=r"crop_size must be a multiple of the scale \(4\) and of the model's size multiple \(4\)"):
        train(_cfg(image_dir, tmp_path / "o2", crop_size=34), log=_quiet)
    with pytest.raises(ValueError, match="broken.png"):
        train(_cfg(bad, tmp_path / "o3"), log=_quiet)
    with pytest.raises(ValueError, match="only DINO extractors take a weights file"):
        _cfg(image_dir, tmp_path, yoda=YodaSettings("gaussian"), attention_weights="x.pth")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        _cfg(image_dir, tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="mixed_precision='bf16' needs a CUDA device"):
        train(_cfg(image_dir, tmp_path / "o4", mixed_precision="bf16", device="cpu"), log=_quiet)


# ------------------------------------------------------------------------------------ resume
@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, image_dir):
    """4 uninterrupted YODA (gaussian) steps, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("ref") / "run"
    path = train(_cfg(image_dir, out, yoda=YodaSettings("gaussian")), log=_quiet)
    return out, _weights(path), torch.load(out / "ckpt-000004" / STATE_FILE, weights_only=True)


def test_resume_is_bitwise_identical(tmp_path, image_dir, reference_run):
    ref_out, ref_weights, ref_state = reference_run
    out = tmp_path / "run"
    train(_cfg(image_dir, out, yoda=YodaSettings("gaussian"), steps=2), log=_quiet)
    assert (out / LATEST).read_text().strip() == "ckpt-000002"
    with pytest.raises(ValueError, match="already holds a training run"):
        train(_cfg(image_dir, out, yoda=YodaSettings("gaussian")), log=_quiet)
    with pytest.raises(ValueError, match="batch_size: checkpoint 2, now 3"):
        train(_cfg(image_dir, out, yoda=YodaSettings("gaussian"), batch_size=3, resume=True), log=_quiet)
    lines = []
    path = train(_cfg(image_dir, out, yoda=YodaSettings("gaussian"), resume=True), log=lines.append)
    assert any("resuming from" in s and "step 2" in s for s in lines)
    _assert_same_tensors(_weights(path), ref_weights)  # model and EMA
    state = torch.load(out / "ckpt-000004" / STATE_FILE, weights_only=True)
    for a, b in zip(state["optimizer"]["state"].values(), ref_state["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if not r.get("final")]
    assert steps == [2, 4] and all(0 < r["update_ratio"] <= 1 for r in recs if not r.get("final"))
    ref_recs = [json.loads(x) for x in (ref_out / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in recs if not r.get("final")] == [r["loss"] for r in ref_recs if not r.get("final")]
    # loadable for sampling, with the YODA settings of the run
    diff, config, extra = load_diffusion(path)
    assert config.name == "sr3_tiny" and diff.yoda.attention == "gaussian" and extra["train"]["step"] == 4
    # resuming a finished run trains nothing and returns the same model
    again = train(_cfg(image_dir, out, yoda=YodaSettings("gaussian"), resume=True), log=_quiet)
    _assert_same_tensors(_weights(again), ref_weights)


class _Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing in the code under test catches it."""


@pytest.mark.parametrize("where", ["model-file", "state-file", "folder-rename", "latest-pointer"])
def test_kill_during_checkpoint_keeps_previous(tmp_path, image_dir, reference_run, monkeypatch, where):
    _, ref_weights, _ = reference_run
    out = tmp_path / "run"
    train(_cfg(image_dir, out, yoda=YodaSettings("gaussian"), steps=2), log=_quiet)
    before = _weights(out / "ckpt-000002" / MODEL_FILE)

    real_replace = os.replace

    def dying_replace(src, dst):
        src, dst = Path(src), Path(dst)
        hit = {
            "model-file": dst.name == MODEL_FILE and ".ckpt-000004" in str(dst),
            "state-file": dst.name == STATE_FILE and ".ckpt-000004" in str(dst),
            "folder-rename": dst.name == "ckpt-000004",
            "latest-pointer": dst.name == LATEST and (out / "ckpt-000004").exists(),
        }[where]
        if hit:
            raise _Killed(where)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(_Killed):
        train(_cfg(image_dir, out, yoda=YodaSettings("gaussian"), resume=True), log=_quiet)
    monkeypatch.setattr(os, "replace", real_replace)

    latest = find_latest_checkpoint(out)
    assert latest == out / "ckpt-000002" and (out / LATEST).read_text().strip() == "ckpt-000002"
    _assert_same_tensors(_weights(latest / MODEL_FILE), before)
    load_diffusion(latest / MODEL_FILE)
    assert torch.load(latest / STATE_FILE, weights_only=True)["step"] == 2
    # and the run resumes to exactly the uninterrupted result, cleaning up what the kill left
    path = train(_cfg(image_dir, out, yoda=YodaSettings("gaussian"), resume=True), log=_quiet)
    _assert_same_tensors(_weights(path), ref_weights)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------ training
def test_loss_decreases_on_one_image(tmp_path, one_image):
    out = tmp_path / "run"
    cfg = _cfg(one_image, out, steps=40, batch_size=4, lr=2e-3, log_every=5, checkpoint_every=100, ema_decay=0.9)
    train(cfg, log=_quiet)
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if '"final"' not in x]
    losses = [r["loss"] for r in recs]
    assert len(losses) == 8 and losses[-1] < 0.6 * losses[0], losses


def test_srdiff_with_random_dino_needs_the_flag(tmp_path, image_dir, monkeypatch):
    out = tmp_path / "run"
    cfg = _cfg(image_dir, out, model="srdiff_tiny", steps=2, yoda=YodaSettings("dino_resnet50_max"),
               attention_pretrained=False)
    with pytest.warns(RuntimeWarning, match="RANDOMLY INITIALISED"):
        path = train(cfg, log=_quiet)
    diff, config, extra = load_diffusion(path)
    assert config.family == "srdiff" and diff.yoda.attention == "dino_resnet50_max"
    assert extra["train"]["attention_weights"].startswith("random(")
    # without the flag a DINO extractor insists on real weights (none are cached or reachable here)
    from yoda_sparse.attention import WeightsUnavailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty torch.hub cache
    with pytest.raises(WeightsUnavailableError, match="DINO ResNet-50"):
        train(_cfg(image_dir, tmp_path / "r2", steps=1, yoda=YodaSettings("dino_resnet50_max")), log=_quiet)


def test_cli_arguments(tmp_path, image_dir):
    p = add_train_arguments(argparse.ArgumentParser())
    args = p.parse_args([str(image_dir), "--out", str(tmp_path / "cli"), "--model", "sr3_tiny", "--steps", "3",
                         "--batch-size", "2", "--crop", "32", "--attention", "gaussian", "--lower-bound", "0.3",
                         "--lr-branch", "literal", "--masked-input", "--seed", "5", "--log-every", "1",
                         "--checkpoint-every", "1", "--keep", "2"])
    cfg = config_from_args(args)
    assert cfg.yoda == YodaSettings("gaussian", lower_bound=0.3, lr_branch="literal", masked_input=True)
    assert (cfg.steps, cfg.batch_size, cfg.crop_size, cfg.seed, cfg.lr, cfg.weight_decay) == (3, 2, 32, 5, 5e-5, 1e-4)
    assert train_mod.train_from_args(args) == 0
    out = tmp_path / "cli"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("ckpt-")) == ["ckpt-000002", "ckpt-000003"]
    _assert_same_tensors(_weights(out / "checkpoint-latest.safetensors"), _weights(out / "ckpt-000003" / MODEL_FILE))
    dense = config_from_args(p.parse_args([str(image_dir), "--out", "x", "--attention", "none",
                                           "--attention-random-weights"]))
    assert dense.yoda is None and dense.attention is None and dense.attention_pretrained is False
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


_DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from yoda_sparse.train import TrainConfig, train

    cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
    def done(model, ema, step):
        import torch.distributed as dist
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "step": step,
                    "world": dist.get_world_size()}, os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))
    train(cfg, on_finish=done)
""")


def test_ddp_two_processes_gloo(tmp_path, image_dir):
    out = tmp_path / "run"
    script = tmp_path / "ddp_train.py"
    script.write_text(_DDP_SCRIPT)
    cfg = _cfg(image_dir, out, steps=3, log_every=1, checkpoint_every=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), json.dumps(cfg.to_dict()), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["step"] == r1["step"] == 3
    for part in ("model", "ema"):
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), f"{part}.{k} differs between ranks"
    # only rank 0 wrote, and what it wrote is rank 0's final model
    assert (out / LATEST).read_text().strip() == "ckpt-000003"
    saved = _weights(out / "checkpoint-latest.safetensors")
    for k, v in r0["model"].items():
        assert torch.equal(saved[k], v)
    state = torch.load(out / "ckpt-000003" / STATE_FILE, weights_only=True)
    assert state["run"]["world_size"] == 2 and len(state["rng"]) == 2
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if not r.get("final")] == [1, 2, 3]  # one writer: no duplicate lines
    assert proc.stdout.count("done:") == 1
    # a DDP run resumes only with its world size (the data shards and RNG states are per rank)
    with pytest.raises(ValueError, match="world_size: checkpoint 2, now 1"):
        train(_cfg(image_dir, out, steps=4, resume=True), log=_quiet)


def test_bf16_autocast_keeps_the_loss_float32():
    # CUDA runs the network under bf16 autocast (train._LossModule); check the dtype plumbing
    # with CPU autocast (the YODA loss op needs pred and target of one dtype).
    from yoda_sparse.diffusion import build_diffusion
    from yoda_sparse.models import build_model, get_model_config

    for name in ("sr3_tiny", "srdiff_tiny"):
        config = get_model_config(name)
        model = build_model(config)
        diff = build_diffusion(model, config, yoda=YodaSettings("gaussian"))
        g = torch.Generator().manual_seed(0)
        net = train_mod._LossModule(diff)
        net.autocast_device = "cpu"
        loss = net(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 8, 8), torch.rand(2, 1, 32, 32), g)
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
