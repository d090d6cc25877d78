"""Training SR3 / SRDiff, dense (paper eq. 8) or YODA (eq. 10), with exact resume and DDP.

    from yoda_sparse.train import TrainConfig, train
    from yoda_sparse.diffusion import YodaSettings
    path = train(TrainConfig(data=["faces/"], out_dir="runs/a", model="sr3_64_256",
                             yoda=YodaSettings("dino_resnet50_max"), attention_weights="dino_r50.pth"))

Optimisation follows the paper: AdamW (lr 5e-5, weight decay 1e-4), L1 noise loss, EMA of the
weights (decay 0.999 with the usual warm-up ``min(decay, (1+n)/(10+n))``), gradient clipping at
norm 1, bf16 autocast on CUDA (fp32 on CPU).  With YODA the attention map of every crop is
computed in the loop, batched on the training device, from the bicubic-upsampled LR crop
(:func:`yoda_sparse.data.attention_for_batch`).

Output folder ``OUT`` (only rank 0 writes): checkpoints following the scheme of
:mod:`yoda_sparse.run_folder` (a kill at any moment leaves a consistent pair to resume from),
plus ``OUT/log.jsonl`` and ``OUT/config.json``.

Exact resume: a run's data order, crops and flips are a function of (seed, step) alone
(:class:`yoda_sparse.data.SampleStream`), the diffusion noise of step s is drawn from a
generator seeded with (seed, rank, s), and the global RNGs (python, numpy, torch CPU and CUDA;
dropout uses them) of every rank are saved and restored.  N steps, a resume and M more steps
therefore give bitwise the same weights as N+M steps on the CPU (tested); on CUDA the data and
noise are the same but kernels need not be bitwise deterministic.

DDP: launched by ``torchrun`` (``WORLD_SIZE`` > 1), the process group is initialised (NCCL on
CUDA, gloo on CPU), the model wrapped in DistributedDataParallel, each rank trains on its own
shard of every epoch, and ``batch_size`` is **per rank**: the effective batch is
``batch_size * world_size``.  Only rank 0 writes checkpoints and logs; all ranks meet at a
barrier after each checkpoint.  Resuming requires the same world size and a folder all ranks see.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .data import ImageFolderPairs, SampleStream, attention_for_batch, batch_iterator, mix_seed
from .diffusion import ScheduleSettings, YodaSettings, build_diffusion
from .run_folder import (
    LATEST_MODEL,
    MODEL_FILE,
    STATE_FILE,
    STATE_FORMAT,
    clean_leftovers,
    find_latest_checkpoint,
    rng_state,
    set_rng_state,
    write_atomic,
    write_checkpoint,
)

__all__ = ["TrainConfig", "train", "add_train_arguments", "train_from_args", "find_latest_checkpoint"]

LOG_FILE = "log.jsonl"
MIXED_PRECISION = ("auto", "bf16", "no")


@dataclass
class TrainConfig:
    """Everything a training run depends on (stored in each checkpoint).

    data: image folders / files (see :func:`yoda_sparse.data.find_images`).
    out_dir: output folder (see the module docstring for its layout).
    model: a registered model config name (``yoda_sparse.models.list_model_configs()``); the SR
        scale comes from it.
    yoda: YODA settings, or None for dense training; ``yoda.attention`` names the attention
        extractor (``gaussian``, ``edge``, ``sift``, ``dino_resnet50_max``, ...).
    schedule: training noise schedule, or None for the model family's published one.
    attention_weights: local weights file for a DINO extractor.
    attention_pretrained: without ``attention_weights``, DINO loads its pretrained weights
        (cache or hub; an error when unavailable).  False trains with a *randomly initialised*
        DINO backbone (seeded from ``seed``): only for tests, and warned about loudly.
    batch_size: per rank (effective batch = batch_size * world size).
    crop_size: HR crop side (None: the model config's image_size); a multiple of the scale and
        of the UNet's size multiple.
    steps: total optimizer steps of the run (a resumed run continues up to it).
    lr, lr_warmup_steps, weight_decay, betas: AdamW, constant lr after a linear warm-up.
    ema_decay, ema_warmup: EMA of the weights, decay ``min(ema_decay, (1+n)/(10+n))`` with warm-up.
    grad_clip: max global gradient norm (None or 0: no clipping).
    mixed_precision: "auto" (bf16 autocast on CUDA, off on CPU), "bf16" (CUDA only) or "no".
    augment / rotate90 / cache_images: see :class:`yoda_sparse.data.ImageFolderPairs`.
    log_every, checkpoint_every, keep_checkpoints: in steps; checkpoint folders kept.
    seed: model init, data order, crops, noise.
    num_workers: DataLoader workers (0: load in the training process).
    device: "cpu", "cuda", "cuda:1", ... or None (CUDA if available; under DDP each rank takes
        cuda:LOCAL_RANK).
    resume: continue from ``out_dir``'s latest checkpoint (a fresh start when there is none).
    """

    data: list[str]
    out_dir: str
    model: str = "sr3_tiny"
    yoda: YodaSettings | None = None
    schedule: ScheduleSettings | None = None
    attention_weights: str | None = None
    attention_pretrained: bool = True
    batch_size: int = 4
    crop_size: int | None = None
    steps: int = 1000
    lr: float = 5e-5
    lr_warmup_steps: int = 0
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    ema_decay: float = 0.999
    ema_warmup: bool = True
    grad_clip: float | None = 1.0
    mixed_precision: str = "auto"
    augment: bool = True
    rotate90: bool = False
    cache_images: bool = True
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    seed: int = 0
    num_workers: int = 0
    device: str | None = None
    resume: bool = False

    def __post_init__(self):
        if isinstance(self.data, (str, os.PathLike)):
            self.data = [self.data]
        self.data = [str(d) for d in self.data]
        if not self.data:
            raise ValueError("data: expected at least one image folder or file, got none")
        self.out_dir = str(self.out_dir)
        if isinstance(self.yoda, dict):
            self.yoda = YodaSettings.from_dict(self.yoda)
        if isinstance(self.schedule, dict):
            self.schedule = ScheduleSettings.from_dict(self.schedule)
        if self.yoda is not None and not self.yoda.attention:
            raise ValueError("yoda.attention: YODA training needs an attention method; use yoda=None for dense training")
        for name in ("batch_size", "steps", "log_every", "checkpoint_every", "keep_checkpoints"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("lr_warmup_steps", "num_workers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if self.crop_size is not None and (isinstance(self.crop_size, bool) or not isinstance(self.crop_size, int) or self.crop_size < 1):
            raise ValueError(f"crop_size must be a positive integer or None, got {self.crop_size!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        self.betas = tuple(float(b) for b in self.betas)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay!r}")
        if self.grad_clip is not None and not self.grad_clip >= 0:
            raise ValueError(f"grad_clip must be >= 0 or None, got {self.grad_clip!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.attention_weights is not None:
            self.attention_weights = str(self.attention_weights)
            if self.yoda is None:
                raise ValueError("attention_weights: given for dense training (yoda=None), which uses no attention")
            if not self.yoda.attention.startswith("dino_"):
                raise ValueError(f"attention_weights: only DINO extractors take a weights file, "
                                 f"attention is {self.yoda.attention!r}")

    @property
    def attention(self) -> str | None:
        """The attention method (``yoda.attention``), None for dense training."""
        return self.yoda.attention if self.yoda is not None else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["yoda"] = self.yoda.to_dict() if self.yoda is not None else None
        d["schedule"] = self.schedule.to_dict() if self.schedule is not None else None
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown train config fields {unknown}; expected a subset of {sorted(names)}")
        return cls(**d)


# ------------------------------------------------------------------------------ distributed
@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self, device: torch.device) -> None:
        if self.active:
            import torch.distributed as dist

            if device.type == "cuda":
                dist.barrier(device_ids=[device.index])
            else:
                dist.barrier()

    def gather(self, obj) -> list:
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


def _resolve_device(requested: str | None, local_rank: int, world: int) -> torch.device:
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(requested)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {requested!r} requested but CUDA is not available")
        if world > 1 or dev.index is None:
            dev = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    return dev


def _init_distributed(requested: str | None) -> tuple[_Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(), _resolve_device(requested, 0, 1)
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = _resolve_device(requested, local, world)
    if dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), local, False), device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), local, True), device


# ------------------------------------------------------------------------------ pieces
def _files_digest(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{Path(p).name}\0{Path(p).stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def _build_attention(cfg: TrainConfig, device: torch.device, dist: _Dist, log):
    """The attention extractor and how its weights were obtained (for the checkpoint)."""
    from .attention import get_attention

    name = cfg.attention
    if not name.startswith("dino_"):
        return get_attention(name).to(device), None
    if cfg.attention_weights is not None:
        return get_attention(name, weights=cfg.attention_weights).to(device), cfg.attention_weights
    if cfg.attention_pretrained:
        from .attention import WeightsUnavailableError

        try:
            return get_attention(name, pretrained=True).to(device), "pretrained"
        except WeightsUnavailableError as e:
            raise WeightsUnavailableError(
                f"{e} For training: attention_weights=FILE (--attention-weights FILE), or, for tests only, "
                f"attention_pretrained=False (--attention-random-weights).") from None
    msg = (f"attention {name!r} uses a RANDOMLY INITIALISED backbone (attention_pretrained=False): "
           f"its maps are not DINO attention and the trained model is only good for tests. "
           f"Pass attention_weights=FILE (--attention-weights) for real training.")
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    if dist.main:
        bar = "!" * 78
        print(f"{bar}\n!! WARNING: {msg}\n{bar}", file=sys.stderr, flush=True)
    # Seeded, so every rank and every resume gets the same random backbone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed("attention", cfg.seed))
        ext = get_attention(name, pretrained=False)
    return ext.to(device), f"random(seed={mix_seed('attention', cfg.seed)})"


class _LossModule(nn.Module):
    """The training loss as a module's forward, so DDP sees (and syncs) every call to the
    network, including SRDiff's ``encode``/``denoise``, which bypass ``model.forward``."""

    def __init__(self, diffusion, autocast_device: str | None = None):
        super().__init__()
        self.net = diffusion.model
        self._diffusion = (diffusion,)  # a tuple: not registered as a submodule twice
        self.autocast_device = autocast_device  # bf16 autocast of the network calls (CUDA)

    def forward(self, hr, lr, attn, generator):
        # training_loss returns the loss in the data's dtype (float32) whatever the network ran in
        with torch.autocast(self.autocast_device or "cpu", dtype=torch.bfloat16, enabled=self.autocast_device is not None):
            return self._diffusion[0].training_loss(hr, lr, attn, generator=generator)


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    src = model.state_dict()
    for k, e in ema.state_dict().items():
        if e.is_floating_point():
            e.lerp_(src[k], 1.0 - decay)
        else:
            e.copy_(src[k])


def _lr_at(cfg: TrainConfig, step: int) -> float:
    if cfg.lr_warmup_steps:
        return cfg.lr * min(1.0, (step + 1) / cfg.lr_warmup_steps)
    return cfg.lr


def _ema_decay_at(cfg: TrainConfig, updates: int) -> float:
    return min(cfg.ema_decay, (1 + updates) / (10 + updates)) if cfg.ema_warmup else cfg.ema_decay


# Fields that fix the sample / noise streams: a resume that changes them can't be exact.
_STREAM_FIELDS = ("model", "yoda", "batch_size", "augment", "rotate90", "seed")
_OPTIM_FIELDS = ("lr", "lr_warmup_steps", "weight_decay", "betas", "ema_decay", "ema_warmup", "grad_clip",
                 "attention_weights", "attention_pretrained", "mixed_precision")


def _check_resume(saved: dict, now: dict, log) -> None:
    bad = [f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}"
           for k in (*_STREAM_FIELDS, "crop_size", "schedule", "world_size", "num_images", "files_digest")
           if saved.get(k) != now.get(k)]
    if bad:
        raise ValueError("resume: this run differs from the checkpoint's in settings that fix the data and "
                         "noise streams (use a new out_dir to train differently): " + "; ".join(bad))
    changed = [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in _OPTIM_FIELDS if saved.get(k) != now.get(k)]
    if changed:
        log("resume: continuing with changed settings (no longer identical to an uninterrupted run): " + ", ".join(changed))


# ------------------------------------------------------------------------------ train
def train(config: TrainConfig, *, log: Callable[[str], None] = print,
          on_finish: Callable[[nn.Module, nn.Module, int], None] | None = None) -> Path:
    """Train as ``config`` says; returns ``OUT/checkpoint-latest.safetensors`` (the final model).

    ``log`` receives the progress lines (rank 0 only).  ``on_finish(model, ema, step)`` is called
    on every rank after the last step with the unwrapped model and its EMA copy.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    cfg = config
    dist, device = _init_distributed(cfg.device)
    try:
        return _train(cfg, dist, device, log if dist.main else (lambda *_: None), on_finish)
    finally:
        if dist.owns_group:
            import torch.distributed as tdist

            tdist.destroy_process_group()


def _train(cfg: TrainConfig, dist: _Dist, device: torch.device, log, on_finish) -> Path:
    from .models import build_model, get_model_config, load_checkpoint

    out = Path(cfg.out_dir)
    model_config = get_model_config(cfg.model)
    scale = model_config.scale
    crop = cfg.crop_size or model_config.image_size
    if cfg.mixed_precision == "bf16" and device.type != "cuda":
        raise ValueError(f"mixed_precision='bf16' needs a CUDA device, training runs on {device}")
    amp = device.type == "cuda" and cfg.mixed_precision in ("auto", "bf16")

    # Model, EMA and attention are built from fixed seeds on every rank (a resume then overwrites them).
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    model = build_model(model_config).to(device)
    # From here on each rank has its own global streams (dropout), saved and restored with checkpoints.
    torch.manual_seed(mix_seed("global", cfg.seed, dist.rank))
    random.seed(mix_seed("python", cfg.seed, dist.rank))
    np.random.seed(mix_seed("numpy", cfg.seed, dist.rank) % 2**32)
    multiple = int(getattr(model, "size_multiple", 1))
    if crop % scale or crop % multiple:
        raise ValueError(f"crop_size must be a multiple of the scale ({scale}) and of the model's size multiple "
                         f"({multiple}) for {cfg.model}, got {crop}")
    diffusion = build_diffusion(model, model_config, schedule=cfg.schedule, yoda=cfg.yoda)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    extractor, attention_source = (None, None)
    if cfg.yoda is not None:
        extractor, attention_source = _build_attention(cfg, device, dist, log)

    pairs = ImageFolderPairs(cfg.data, scale, crop, augment=cfg.augment, rotate90=cfg.rotate90,
                             cache=cfg.cache_images, seed=cfg.seed)
    stream = SampleStream(len(pairs), seed=cfg.seed, rank=dist.rank, world_size=dist.world_size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

    run_info = {**cfg.to_dict(), "crop_size": crop, "schedule": diffusion.schedule_settings.to_dict(),
                "world_size": dist.world_size, "num_images": len(pairs), "files_digest": _files_digest(pairs.paths)}

    # ---- resume or fresh start
    latest = find_latest_checkpoint(out) if out.is_dir() else None
    if latest is not None and not cfg.resume:
        raise ValueError(f"out_dir {str(out)!r} already holds a training run (latest: {latest.name}); "
                         f"pass resume=True (--resume) to continue it, or choose another folder")
    start, train_seconds, state = 0, 0.0, None
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        clean_leftovers(out, latest, log)
    dist.barrier(device)
    if latest is not None:
        state = torch.load(latest / STATE_FILE, map_location="cpu", weights_only=True)
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"resume: {latest / STATE_FILE} has format {state.get('format')!r}, expected {STATE_FORMAT}")
        _check_resume(state["run"], run_info, log)
        raw, saved_config, _ = load_checkpoint(latest / MODEL_FILE, use_ema=False)
        if saved_config.to_dict() != model_config.to_dict():
            raise ValueError(f"resume: {latest / MODEL_FILE} holds model config {saved_config.name!r} "
                             f"that differs from {cfg.model!r}")
        model.load_state_dict(raw.state_dict())
        ema.load_state_dict(load_checkpoint(latest / MODEL_FILE, use_ema=True)[0].state_dict())
        del raw
        optimizer.load_state_dict(state["optimizer"])
        start, train_seconds = int(state["step"]), float(state["train_seconds"])
        log(f"resuming from {latest} at step {start}")
        if start >= cfg.steps:
            log(f"the checkpoint is at step {start} and steps={cfg.steps}: nothing left to train")
    elif cfg.resume:
        log(f"resume: no checkpoint in {out}, starting from step 0")
    if dist.main:
        write_atomic(out / "config.json", json.dumps(run_info, indent=2, sort_keys=True).encode())
        _trim_log(out / LOG_FILE, start)

    net = _LossModule(diffusion, autocast_device="cuda" if amp else None)
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()
    batches = batch_iterator(pairs, stream, start, cfg.batch_size, num_workers=cfg.num_workers,
                             pin_memory=device.type == "cuda")
    noise_gen = torch.Generator()
    extra = {"yoda": cfg.yoda.to_dict() if cfg.yoda is not None else None,
             "train": {"model": cfg.model, "seed": cfg.seed, "crop_size": crop, "batch_size": cfg.batch_size,
                       "world_size": dist.world_size, "attention_weights": attention_source, "dense": cfg.yoda is None}}

    def save(step: int) -> Path | None:
        rngs = dist.gather(rng_state(device))  # every rank's generators, saved by rank 0
        path = None
        if dist.main:
            state = {"format": STATE_FORMAT, "step": step, "optimizer": optimizer.state_dict(), "rng": rngs,
                     "data": stream.position(step, cfg.batch_size), "train_seconds": train_seconds + (time.perf_counter() - t0),
                     "run": run_info}
            ex = {**extra, "train": {**extra["train"], "step": step}}
            path = write_checkpoint(out, step, diffusion=diffusion, model_config=model_config, ema=ema,
                                     extra=ex, state=state, keep=cfg.keep_checkpoints)
            log(f"step {step}: checkpoint {path}")
        dist.barrier(device)
        return path

    if state is not None:
        rngs = state["rng"]
        set_rng_state(rngs[dist.rank], device)
    t0 = time.perf_counter()
    window = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, steps, update-ratio sum, grad-norm sum
    window_t0, last_loss = time.perf_counter(), float("nan")
    step = start
    while step < cfg.steps:
        batch = next(batches)
        hr = batch["hr"].to(device, non_blocking=True)
        lr_img = batch["lr"].to(device, non_blocking=True)
        attn = attention_for_batch(extractor, lr_img, scale) if extractor is not None else None
        for g in optimizer.param_groups:
            g["lr"] = _lr_at(cfg, step)
        noise_gen.manual_seed(mix_seed("noise", cfg.seed, dist.rank, step))
        loss = net(hr, lr_img, attn, noise_gen)
        optimizer.zero_grad(set_to_none=True)
        loss.float().backward()
        if cfg.grad_clip:
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        optimizer.step()
        _ema_update(ema, model, _ema_decay_at(cfg, step))
        step += 1
        window[0] += loss.detach().double()
        window[1] += 1
        window[3] += gnorm.detach().double()
        if attn is not None:
            window[2] += (attn + cfg.yoda.lower_bound).clamp(max=1).mean().double()
        if step % cfg.log_every == 0 or step == cfg.steps:
            w = dist.all_sum(window.clone()).tolist()
            n = w[1] / dist.world_size
            last_loss = w[0] / w[1]
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"training loss became non-finite between steps {step - int(n)} and {step}; "
                                         f"the last good checkpoint is {find_latest_checkpoint(out)}")
            now = time.perf_counter()
            rec = {"step": step, "loss": last_loss, "lr": optimizer.param_groups[0]["lr"],
                   "seconds": round(train_seconds + now - t0, 3), "seconds_per_step": (now - window_t0) / n,
                   "grad_norm": w[3] / w[1], "epoch": stream.position(step, cfg.batch_size)["epoch"]}
            if extractor is not None:
                rec["update_ratio"] = w[2] / w[1]  # mean(min(1, M + l)): expected active fraction over t
            if dist.main:
                with open(out / LOG_FILE, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                log(f"step {step}/{cfg.steps}  loss {last_loss:.4f}  lr {rec['lr']:.2e}  "
                    f"{rec['seconds_per_step']:.3f} s/step" + (f"  update {rec['update_ratio']:.3f}" if extractor is not None else ""))
            window.zero_()
            window_t0 = now
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save(step)
    total = train_seconds + time.perf_counter() - t0
    if dist.main:
        summary = {"final": True, "step": step, "steps_this_run": step - start, "loss": last_loss,
                   "seconds": round(total, 3), "checkpoint": str(out / LATEST_MODEL)}
        with open(out / LOG_FILE, "a") as f:
            f.write(json.dumps(summary) + "\n")
        log(f"done: {step - start} steps this run ({step} in all), last logged loss {last_loss:.4f}, "
            f"{total:.1f} s of training; model {out / LATEST_MODEL}")
    if on_finish is not None:
        on_finish(model, ema, step)
    return out / LATEST_MODEL


def _trim_log(path: Path, step: int) -> None:
    """Keep only the log records up to ``step`` (a resume redoes the steps after it)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if isinstance(rec, dict) and not rec.get("final") and int(rec.get("step", step + 1)) <= step:
            keep.append(line)
    write_atomic(path, "".join(f"{k}\n" for k in keep).encode())


# ------------------------------------------------------------------------------ CLI
def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``yoda-sparse train`` options."""
    p.add_argument("data", nargs="+", help="image folders (searched recursively) or image files")
    p.add_argument("--out", required=True, help="output folder: checkpoints, log.jsonl")
    p.add_argument("--model", default="sr3_tiny", help="model config name (default sr3_tiny)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=4, help="per process (effective: times the number of DDP ranks)")
    p.add_argument("--crop", type=int, default=None, help="HR crop side (default: the model's image_size)")
    p.add_argument("--attention", default="dino_resnet50_max",
                   help="attention map for YODA training (gaussian, edge, sift, dino_resnet50_max, ...), or 'none' for dense")
    p.add_argument("--attention-weights", help="local DINO weights file")
    p.add_argument("--attention-random-weights", action="store_true",
                   help="allow a randomly initialised DINO backbone (tests only)")
    p.add_argument("--lower-bound", type=float, default=0.2, help="l of eq. 9")
    p.add_argument("--lr-branch", choices=["forward", "literal"], default="forward")
    p.add_argument("--masked-input", action="store_true", help="the model sees M(t)*z_t (eq. 11 literally)")
    p.add_argument("--loss-normalize", choices=["all", "active"], default="all")
    p.add_argument("--schedule", choices=["linear", "cosine"], help="noise schedule (default: the family's)")
    p.add_argument("--timesteps", type=int, help="training timesteps T (default: the family's)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--lr-warmup", type=int, default=0, help="linear lr warm-up steps")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999))
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--no-ema-warmup", action="store_true")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--mixed-precision", choices=list(MIXED_PRECISION), default="auto")
    p.add_argument("--no-augment", action="store_true", help="no random flips")
    p.add_argument("--rotate90", action="store_true", help="also random 90-degree rotations")
    p.add_argument("--no-cache", action="store_true", help="decode images for every sample instead of keeping them in memory")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--keep", type=int, default=3, help="checkpoint folders kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA if available)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the parsed ``yoda-sparse train`` options describe."""
    yoda = None
    if args.attention and args.attention.lower() != "none":
        yoda = YodaSettings(attention=args.attention, lower_bound=args.lower_bound, lr_branch=args.lr_branch,
                            masked_input=args.masked_input, loss_normalize=args.loss_normalize)
    schedule = None
    if args.schedule or args.timesteps:
        from .models import get_model_config

        family = get_model_config(args.model).family
        kind = args.schedule or ("linear" if family == "sr3" else "cosine")
        schedule = ScheduleSettings(kind=kind, timesteps=args.timesteps or (500 if family == "sr3" else 100))
    return TrainConfig(
        data=args.data, out_dir=args.out, model=args.model, yoda=yoda, schedule=schedule,
        attention_weights=args.attention_weights, attention_pretrained=not args.attention_random_weights,
        batch_size=args.batch_size, crop_size=args.crop, steps=args.steps, lr=args.lr, lr_warmup_steps=args.lr_warmup,
        weight_decay=args.weight_decay, betas=tuple(args.betas), ema_decay=args.ema_decay,
        ema_warmup=not args.no_ema_warmup, grad_clip=args.grad_clip or None, mixed_precision=args.mixed_precision,
        augment=not args.no_augment, rotate90=args.rotate90, cache_images=not args.no_cache,
        log_every=args.log_every, checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep,
        seed=args.seed, num_workers=args.num_workers, device=args.device, resume=args.resume)


def train_from_args(args: argparse.Namespace) -> int:
    """Run ``yoda-sparse train``; returns the exit status."""
    path = train(config_from_args(args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(train_from_args(add_train_arguments(argparse.ArgumentParser(prog="python -m yoda_sparse.train")).parse_args()))
