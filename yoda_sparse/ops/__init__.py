"""Public YODA ops: validate, then dispatch to the best registered backend.

* :func:`masked_l1_loss` — eq. 10, the masked L1 noise loss (differentiable).
* :func:`yoda_step` — eq. 11-14, one masked reverse step t -> t-1.
* :func:`sparse_conv2d` — a convolution computed only in listed output tiles, in place, with
  fused prologue (concat, group-norm apply, activation, nearest x2) and epilogue (activation,
  per-channel add, residual); :func:`tile_list` builds its tile lists without a host sync.

Each op has a pure-PyTorch reference (``yoda_sparse.ops.reference``, the truth) and backends
registered in ``yoda_sparse.ops.registry`` (CUDA extension, Triton, C++ CPU). Set
``YODA_SPARSE_BACKEND`` (or pass ``backend=``) to force one.
"""
from __future__ import annotations

import torch

from . import reference, registry
from .reference import LR_BRANCHES, NORMALIZATIONS, VARIANCES
from .registry import NoBackendError, backends, describe, dispatch, register_backend, select
from ..schedule import NoiseSchedule

__all__ = [
    "masked_l1_loss",
    "yoda_step",
    "sparse_conv2d",
    "tile_list",
    "NormParams",
    "step_coefficients",
    "register_backend",
    "backends",
    "select",
    "describe",
    "NoBackendError",
]


# ---------------------------------------------------------------------------- validation
def _check_float(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype} (convert integer images to float first)")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape [B, C, H, W], got {tuple(x.shape)}")
    return x


def _check_like(name: str, x, ref: torch.Tensor, ref_name: str) -> None:
    _check_float(name, x)
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device ({ref.device}), got {x.device}")


def _check_mask(mask, ref: torch.Tensor, *, allow_float: bool) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not (allow_float and mask.is_floating_point()):
        kinds = "bool or floating" if allow_float else "bool (eq. 9 masks are binary)"
        raise TypeError(f"mask must be {kinds}, got {mask.dtype}")
    B, _, H, W = ref.shape
    shape = mask.shape  # read once: each .shape builds a new torch.Size (these checks run every call)
    if len(shape) != 4 or shape[0] != B or shape[1] != 1 or shape[2] != H or shape[3] != W:
        raise ValueError(f"mask must have shape [B, 1, H, W] = {(B, 1, H, W)} (broadcast over channels), got {tuple(shape)}")
    if mask.device != ref.device:
        raise ValueError(f"mask must be on the device of the images ({ref.device}), got {mask.device}")
    if mask.dtype != torch.bool and mask.numel() and not _tracing():
        # weights outside [0, 1] or NaN would give a negative or NaN loss; one host sync, float
        # masks only (eq. 9 masks are bool)
        lo, hi = torch.stack(torch.aminmax(mask.detach())).tolist()
        if lo != lo or hi != hi:
            raise ValueError("mask contains NaN (weights must be finite, in [0, 1])")
        if not (0.0 <= lo and hi <= 1.0):
            raise ValueError(f"mask must hold weights in [0, 1] (finite), got values in [{lo:.4g}, {hi:.4g}]")


def _tracing() -> bool:
    """torch.compile tracing or CUDA-graph capture: no host sync, no data-dependent check."""
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


# ---------------------------------------------------------------------------- masked L1 loss
def masked_l1_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, normalize: str = "all", *, backend: str | None = None) -> torch.Tensor:
    """Eq. 10: ``sum |M(t) * (pred - target)| / denominator``, differentiable in pred and target.

    Args:
        pred, target: floating [B,C,H,W] (the predicted and the true noise), same dtype/device.
        mask: [B,1,H,W] bool (eq. 9) or floating weights; broadcast over channels, never
            materialised per channel. Not differentiated.
        normalize: "all" divides by B*C*H*W, as SR3's L1 loss averages over every element
            (inactive pixels count as zero error); "active" divides by C times the number of
            active pixels (the mean error over the active area; 0 for an empty mask);
            "sum" returns the plain sum.
    Returns: a 0-d tensor of pred's dtype (accumulated in float32, float64 for float64).
    An empty batch (any dimension 0) gives 0 for every ``normalize``. A floating mask must hold
    finite weights in [0, 1] (checked except under torch.compile and CUDA-graph capture).
    """
    _check_float("pred", pred)
    _check_like("target", target, pred, "pred")
    _check_mask(mask, pred, allow_float=True)
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if pred.numel() == 0:  # 0, not 0/0, and still connected to pred and target for autograd
        return (pred - target).abs().sum()
    return dispatch("masked_l1_loss", pred, target, mask, normalize, backend=backend)


# ---------------------------------------------------------------------------- YODA step
def step_coefficients(schedule, t: int, *, lr_branch: str = "forward", variance: str = "fixed_small") -> dict:
    """The scalars a backend needs for reverse step t -> t-1 (see reference.yoda_step_from_coefficients)."""
    if lr_branch not in LR_BRANCHES:
        raise ValueError(f"lr_branch must be one of {LR_BRANCHES}, got {lr_branch!r}")
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    c = schedule.coefficients(t)
    sigma = c.sigma(variance)
    lr_scale, lr_sigma = reference.lr_branch_coefficients(lr_branch, c.alphas_cumprod_prev, sigma)
    return dict(
        sqrt_recip_ac=c.sqrt_recip_alphas_cumprod,
        sqrt_recipm1_ac=c.sqrt_recipm1_alphas_cumprod,
        coef1=c.posterior_mean_coef1,
        coef2=c.posterior_mean_coef2,
        sigma=sigma,
        lr_scale=lr_scale,
        lr_sigma=lr_sigma,
    )


def _step_coefficients_of_run(schedule, t: int, lr_branch: str, variance: str) -> dict:
    """step_coefficients, kept on a NoiseSchedule per (t, lr_branch, variance): a sampler asks
    for the same steps run after run, and on small images the few microseconds of building
    them are a real share of a step. The dict goes to the backends only, which just read it."""
    if not isinstance(schedule, NoiseSchedule) or torch.compiler.is_compiling():
        return step_coefficients(schedule, t, lr_branch=lr_branch, variance=variance)
    cache = schedule.__dict__.setdefault("_step_coefficients_cache", {})
    key = (t, lr_branch, variance)
    coeffs = cache.get(key)
    if coeffs is None:
        coeffs = cache[key] = step_coefficients(schedule, t, lr_branch=lr_branch, variance=variance)
    return coeffs


def yoda_step(
    z_t: torch.Tensor,
    eps_pred: torch.Tensor,
    x_bar: torch.Tensor | None,
    mask: torch.Tensor,
    t: int,
    schedule,
    *,
    noise: torch.Tensor | None = None,
    lr_noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    offset: int = 0,
    lr_branch: str = "forward",
    clip_x0: bool = False,
    clip_range: tuple[float, float] = (-1.0, 1.0),
    variance: str = "fixed_small",
    backend: str | None = None,
) -> torch.Tensor:
    """One YODA reverse step t -> t-1, eq. 11-14.

    Active area (``mask`` True): the DDPM posterior sample from the predicted noise,
    ``mean = coef1 * x0_hat + coef2 * z_t`` with ``x0_hat = (z_t - sqrt(1-gamma_t) eps) / sqrt(gamma_t)``
    (clipped to ``clip_range`` when ``clip_x0``, as SR3's code does), plus ``sigma_t * noise``;
    sigma_t^2 is the posterior variance ("fixed_small") or beta_t ("fixed_large"), 0 at t = 1.

    Rest: the LR branch around ``x_bar`` (the upsampled LR image for SR3; None, meaning 0,
    for SRDiff's residual). ``lr_branch="forward"`` (default, Fig. 2) forward-diffuses x_bar
    to level t-1: ``sqrt(gamma_{t-1}) x_bar + sqrt(1-gamma_{t-1}) lr_noise``;
    ``"literal"`` is eq. 13 as written: ``x_bar + sigma_t lr_noise``.

    Noise: pass ``noise`` (and optionally ``lr_noise``; it defaults to ``noise``, which is
    statistically sound because each pixel uses exactly one of the two) for exact results;
    or ``seed``/``offset`` for counter-based (Philox) noise generated inside the kernel —
    deterministic per backend for the same (seed, offset), element i using counter
    offset + i; or neither, and the noise is drawn with ``generator``.

    Whether the model saw ``M(t) * z_t`` (eq. 11 literal) or ``z_t`` is the sampler's choice;
    this op only consumes the predicted noise.

    Args:
        z_t, eps_pred: floating [B,C,H,W], same dtype and device.
        x_bar: like z_t, or None (0).
        mask: bool [B,1,H,W], eq. 9's M(t).
        t: timestep of ``schedule`` (1..len(schedule)).
        schedule: a :class:`yoda_sparse.NoiseSchedule` (respaced ones included).
    """
    _check_float("z_t", z_t)
    _check_like("eps_pred", eps_pred, z_t, "z_t")
    if x_bar is not None:
        _check_like("x_bar", x_bar, z_t, "z_t")
    _check_mask(mask, z_t, allow_float=False)
    if not hasattr(schedule, "coefficients"):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    t = schedule.check_t(t)
    coeffs = _step_coefficients_of_run(schedule, t, lr_branch, variance)
    lo, hi = (float(v) for v in clip_range)
    if not lo < hi:
        raise ValueError(f"clip_range must be (low, high) with low < high, got {clip_range!r}")
    if noise is not None:
        _check_like("noise", noise, z_t, "z_t")
        if seed is not None:
            raise ValueError("pass either noise or seed, not both")
    if lr_noise is not None:
        if noise is None:
            raise ValueError("lr_noise needs noise too (or neither)")
        _check_like("lr_noise", lr_noise, z_t, "z_t")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    elif noise is None:
        noise = torch.randn(z_t.shape, generator=generator, device=z_t.device, dtype=z_t.dtype)
    return dispatch(
        "yoda_step", z_t, eps_pred, x_bar, mask, noise, lr_noise, seed, offset, coeffs, clip_x0, (lo, hi), backend=backend
    )


# ---------------------------------------------------------------------------- reference backends
def _reference_yoda_step(z_t, eps_pred, x_bar, mask, noise, lr_noise, seed, offset, coeffs, clip_x0, clip_range):
    if noise is None:
        # Counter-based noise on the reference path: a generator seeded from (seed, offset).
        g = torch.Generator(device=z_t.device)
        g.manual_seed((seed * 1_000_003 + offset) % (2**63))
        noise = torch.randn(z_t.shape, generator=g, device=z_t.device, dtype=z_t.dtype)
    return reference.yoda_step_from_coefficients(
        z_t, eps_pred, x_bar, mask, noise, noise if lr_noise is None else lr_noise,
        clip_x0=clip_x0, clip_range=clip_range, **coeffs,
    )


def _masked_l1_signature(pred, target, mask, normalize):
    """What the checks of the masked_l1_loss backends look at (target is like pred, validated),
    for the registry's selection cache: device, dtypes, normalize, and whether a dimension
    exceeds the kernels' int32 limit.  None (no caching) while torch.compile traces: the
    selection then runs once per compilation, and symbolic shapes are not cache keys."""
    if torch.compiler.is_compiling():
        return None
    return pred.device, pred.dtype, mask.dtype, normalize, max(pred.shape) >= 2**31


def _yoda_step_signature(z_t, eps_pred, x_bar, mask, noise, lr_noise, seed, offset, coeffs, clip_x0, clip_range):
    """What the checks of the yoda_step backends look at, for the selection cache: device,
    dtypes, whether noise comes in or is generated (and then whether offset + numel passes
    the 64-bit counters), and the int32 dimension limit. None while torch.compile traces."""
    if torch.compiler.is_compiling():
        return None
    generated = noise is None
    return (z_t.device, z_t.dtype, mask.dtype, generated, seed is None,
            generated and offset + z_t.numel() > 2**63 - 1, max(z_t.shape) >= 2**31)


registry.register_signature("masked_l1_loss", _masked_l1_signature)
registry.register_signature("yoda_step", _yoda_step_signature)
register_backend("masked_l1_loss", "reference", reference.masked_l1_loss, priority=0, cacheable=True)
register_backend("yoda_step", "reference", _reference_yoda_step, priority=0, cacheable=True)

from .sparse_conv import NormParams, sparse_conv2d, tile_list  # noqa: E402,F401
from . import triton_backend  # noqa: E402,F401
from . import triton_sparse_conv  # noqa: E402,F401
from . import cpp_backend  # noqa: E402,F401
