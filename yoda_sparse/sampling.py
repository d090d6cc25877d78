"""A YODA sampler for any noise-prediction network (paper eq. 9 and 11-14), dense or masked.

The library's own samplers (``SR3Diffusion.sample``, ``SRDiffDiffusion.sample``) run this loop;
so can any module object that predicts noise::

    def eps_fn(z_t, t, level, cond):            # your network, wrapped
        return my_unet(torch.cat([cond, z_t], 1), level)

    out = yoda_sample(eps_fn, NoiseSchedule.linear(2000, 1e-6, 1e-2), x_bar=x_up, cond=x_up,
                      attn=attn, lower_bound=0.2, steps=100, generator=torch.Generator().manual_seed(0))
    out.sample                                    # z_0, in the model's space ([-1, 1])

The callable
------------
``model_fn(z_t, t, level, cond)`` returns the predicted noise, a tensor shaped like ``z_t``:

* ``z_t``: float ``[B, C, H, W]``, the current state (``M(t) * z_t`` with ``masked_input``);
* ``t``: int64 ``[B]``, the step's *training* timestep, ``timestep_base + k - 1`` for the k-th
  step of the training schedule (k in 1..T; ``timestep_base=1``, the default, gives this
  library's 1..T; 0 gives 0..T-1, as DDPM, SRDiff and diffusers count);
* ``level``: ``[B]`` of z_t's dtype, sqrt(gamma) of that timestep (what SR3 conditions on);
* ``cond``: whatever was passed as ``cond`` (None by default), unchanged.

When the callable accepts them (a parameter of that name, or ``**kwargs``), it also gets

* ``step``: int, the step index i, 0-based in sampling order (0 = the noisiest step);
* ``mask``: bool ``[B, 1, H, W]``, eq. 9's M(t) of that step (all True for a dense run).

so a sparse engine can compute only the active area of each step.

Randomness: the start noise and each step's noise are drawn on the CPU from ``generator``
(a seed gives the same result on any device); or, with ``seed``, the start noise comes from
a generator seeded with it and each step's noise is made inside the step kernel (Philox at
offset ``(i + 1) * numel``). With an all-True mask the run equals the dense run exactly.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import ops
from .masking import MaskSchedule
from .schedule import NoiseSchedule

__all__ = ["SamplerOutput", "yoda_sample", "run_sampler", "build_masks", "lr_branch_start", "step_keywords"]


@dataclass
class SamplerOutput:
    """sample: the final state z_0 ``[B, C, H, W]`` in the model's space;
    active_fraction: float64 ``[S, B]`` (ones for a dense run); update_ratio: float64 ``[B]``;
    timesteps: the run's training timesteps (1..T) in sampling order, ``[S]``."""

    sample: torch.Tensor
    active_fraction: torch.Tensor
    update_ratio: torch.Tensor
    timesteps: torch.Tensor


def step_keywords(model_fn: Callable) -> frozenset:
    """Which of the per-step keywords (``step``, ``mask``) ``model_fn`` accepts."""
    try:
        params = inspect.signature(model_fn).parameters.values()
    except (TypeError, ValueError):  # some builtins and C callables have no signature
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return frozenset({"step", "mask"})
    names = {p.name for p in params if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)}
    return frozenset(names & {"step", "mask"})


def lr_branch_start(x_bar: torch.Tensor | None, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """The LR-branch state at the first (noisiest) level: x_bar forward-diffused,
    ``level * x_bar + sqrt(1 - level^2) * noise`` with ``level`` [B] = sqrt(gamma_T)."""
    shape = (-1, 1, 1, 1)
    x_bar = torch.zeros_like(noise) if x_bar is None else x_bar
    return level.view(shape) * x_bar + (1 - level.view(shape) ** 2).clamp(min=0).sqrt() * noise


def build_masks(attn, train_steps: int, lower_bound: float, run_schedule: NoiseSchedule, *, size, batch: int, device) -> MaskSchedule:
    """Eq. 9's masks of every step of a run: attention map ``[B, 1, h, w]`` in [0, 1] (resized
    bilinearly to ``size``), T = ``train_steps``, the run's timesteps in sampling order."""
    if not isinstance(attn, torch.Tensor):
        raise TypeError(f"attn must be a torch.Tensor, got {type(attn).__name__}")
    masks = MaskSchedule(attn.to(device), train_steps, lower_bound, timesteps=run_schedule.timesteps.flip(0), size=size)
    if masks.activation_time.shape[0] != batch:
        raise ValueError(f"attn must have one map per image ({batch}), got {masks.activation_time.shape[0]}")
    return masks


def run_sampler(
    model_fn: Callable,
    *,
    shape: tuple[int, int, int, int],
    schedule: NoiseSchedule,
    x_bar: torch.Tensor | None = None,
    cond: Any = None,
    masks: MaskSchedule | None = None,
    lr_branch: str = "forward",
    masked_input: bool = False,
    clip_x0: bool = True,
    variance: str = "fixed_small",
    generator: torch.Generator | None = None,
    seed: int | None = None,
    backend: str | None = None,
    progress: bool = False,
    timestep_base: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    desc: str | None = None,
) -> SamplerOutput:
    """The sampling loop itself (ancestral, eq. 11-14 per step); :func:`yoda_sample` is the
    friendlier entry point. ``schedule`` is the run's schedule (respaced or not), ``masks`` the
    run's :class:`MaskSchedule` (None: dense). See the module docstring for ``model_fn``."""
    from tqdm.auto import tqdm

    if seed is not None and generator is not None:
        raise ValueError("pass either generator or seed, not both")
    B = shape[0]
    S = schedule.num_steps
    train_t = schedule.timesteps.flip(0)  # sampling order, training units (1..T)
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)

    def randn():
        return torch.randn(shape, generator=generator, dtype=dtype).to(device)

    full = torch.ones((B, 1, *shape[2:]), dtype=torch.bool, device=device)
    z = randn()
    if masks is not None:
        level = torch.full((B,), schedule.coefficients(S).noise_level, dtype=dtype, device=device)
        # the same draw serves both areas: each pixel uses exactly one of them, and an
        # all-ones mask then consumes the generator exactly as the dense run does
        z = torch.where(masks.mask(0), z, lr_branch_start(x_bar, z, level))
    # per-step conditioning values, moved to the device once
    levels = schedule.sqrt_alphas_cumprod.to(device=device, dtype=dtype)
    model_t = (train_t + (int(timestep_base) - 1)).to(device)
    keywords = step_keywords(model_fn)
    label = desc or ("yoda" if masks is not None else "dense")
    for i in tqdm(range(S), disable=not progress, desc=label, leave=False):
        t = S - i
        m = masks.mask(i) if masks is not None else full
        inp = z * m if (masks is not None and masked_input) else z
        extra = {}
        if "step" in keywords:
            extra["step"] = i
        if "mask" in keywords:
            extra["mask"] = m
        eps = model_fn(inp, model_t[i].expand(B), levels[t - 1].expand(B), cond, **extra)
        if not isinstance(eps, torch.Tensor) or eps.shape != z.shape:
            got = tuple(eps.shape) if isinstance(eps, torch.Tensor) else type(eps).__name__
            raise ValueError(f"model_fn must return the predicted noise shaped like z_t {tuple(z.shape)}, got {got}")
        noise_kw = dict(seed=seed, offset=(i + 1) * z.numel()) if seed is not None else dict(noise=randn())
        z = ops.yoda_step(
            z, eps.to(z.dtype), x_bar, m, t, schedule, **noise_kw,
            lr_branch=lr_branch, clip_x0=clip_x0, variance=variance, backend=backend,
        )
    if masks is not None:
        frac = masks.active_fraction.cpu()
    else:
        frac = torch.ones((S, B), dtype=torch.float64)
    return SamplerOutput(z, frac, frac.mean(0), train_t.cpu())


def yoda_sample(
    model_fn: Callable,
    schedule: NoiseSchedule,
    *,
    x_bar: torch.Tensor | None = None,
    shape: tuple[int, ...] | None = None,
    cond: Any = None,
    attn: torch.Tensor | None = None,
    lower_bound: float = 0.2,
    steps: int | None = None,
    lr_branch: str = "forward",
    masked_input: bool = False,
    clip_x0: bool = True,
    variance: str = "fixed_small",
    timestep_base: int = 1,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    backend: str | None = None,
    progress: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> SamplerOutput:
    """Sample with YODA (``attn`` given) or densely (``attn=None``) from any noise predictor.

    Args:
        model_fn: ``eps = model_fn(z_t, t, level, cond)`` (see the module docstring; it may also
            take ``step=`` and ``mask=`` keywords).
        schedule: the *training* noise schedule (T steps; eq. 9's T is its length).
        x_bar: the LR branch's mean ``[B, C, H, W]`` in the model's space: the upsampled LR
            image for a model that diffuses the HR image (SR3), None (zero) for one that
            diffuses a residual (SRDiff). Gives shape, dtype and device unless given.
        shape: ``(B, C, H, W)`` of the state; needed when ``x_bar`` is None.
        cond: passed to ``model_fn`` unchanged.
        attn: attention map ``[B, 1, h, w]`` in [0, 1] (resized bilinearly to H x W), or None.
        lower_bound: eq. 9's l in (0, 1).
        steps: respace the schedule to this many steps (``NoiseSchedule.respace``).
        lr_branch, masked_input, clip_x0, variance: as :class:`yoda_sparse.diffusion.YodaSettings`.
        timestep_base: the ``t`` the network gets for the first training timestep (1 or 0).
        generator / seed: randomness (see the module docstring).
    Returns:
        :class:`SamplerOutput`.
    """
    if not callable(model_fn):
        raise TypeError(f"model_fn must be callable, got {type(model_fn).__name__}")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a yoda_sparse.NoiseSchedule (the training schedule), got {type(schedule).__name__}")
    if timestep_base not in (0, 1) or isinstance(timestep_base, bool):
        raise ValueError(f"timestep_base must be 0 or 1, got {timestep_base!r}")
    if x_bar is not None:
        if not isinstance(x_bar, torch.Tensor) or not x_bar.is_floating_point() or x_bar.dim() != 4:
            got = f"{x_bar.dtype} {tuple(x_bar.shape)}" if isinstance(x_bar, torch.Tensor) else type(x_bar).__name__
            raise ValueError(f"x_bar must be a float tensor [B, C, H, W], got {got}")
        if shape is not None and tuple(shape) != tuple(x_bar.shape):
            raise ValueError(f"shape {tuple(shape)} differs from x_bar's {tuple(x_bar.shape)}")
        shape = tuple(x_bar.shape)
        dtype = dtype or x_bar.dtype
        want = torch.device(device) if device is not None else x_bar.device
        same_device = want.type == x_bar.device.type and want.index in (None, x_bar.device.index)
        if x_bar.dtype != dtype or not same_device:
            raise ValueError(f"x_bar is {x_bar.dtype} on {x_bar.device}, but dtype={dtype} and device={device} were asked for")
        device = x_bar.device
    if shape is None:
        raise ValueError("shape (B, C, H, W) is needed when x_bar is None")
    if len(shape) != 4 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"shape must be four positive ints (B, C, H, W), got {shape!r}")
    dtype = dtype or torch.float32
    device = torch.device(device or "cpu")
    run = schedule if steps is None else schedule.respace(int(steps))
    masks = None
    if attn is not None:
        masks = build_masks(attn, schedule.num_steps, lower_bound, run, size=shape[2:], batch=shape[0], device=device)
    return run_sampler(
        model_fn, shape=tuple(shape), schedule=run, x_bar=x_bar, cond=cond, masks=masks,
        lr_branch=lr_branch, masked_input=masked_input, clip_x0=clip_x0, variance=variance,
        generator=generator, seed=seed, backend=backend, progress=progress,
        timestep_base=timestep_base, dtype=dtype, device=device,
    )
