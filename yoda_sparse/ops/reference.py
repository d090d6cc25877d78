"""Pure-PyTorch reference implementations: the truth every backend is tested against.

These functions take already-validated arguments (see ``yoda_sparse.ops`` for the public,
validating entry points) and are written for clarity, not speed.
"""
from __future__ import annotations

import torch

NORMALIZATIONS = ("all", "active", "sum")
LR_BRANCHES = ("forward", "literal")
VARIANCES = ("fixed_small", "fixed_large")


def masked_l1_denominator(pred: torch.Tensor, mask: torch.Tensor, normalize: str) -> torch.Tensor:
    """The divisor of eq. 10's sum: B*C*H*W ("all"), C * (number of active pixels) ("active",
    at least 1 so an empty mask gives 0 instead of NaN), or 1 ("sum")."""
    # torch.full, not torch.tensor: no host-to-device copy, so the reference can run inside a
    # CUDA-graph capture (the GPU benchmark times it that way)
    if normalize == "all":
        return torch.full((), float(pred.numel()), dtype=torch.float64, device=pred.device)
    if normalize == "sum":
        return torch.full((), 1.0, dtype=torch.float64, device=pred.device)
    active = mask.to(torch.float64).sum() * pred.shape[1]
    return active.clamp(min=1.0)


def masked_l1_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, normalize: str = "all") -> torch.Tensor:
    """Eq. 10: sum(|M(t) * (pred - target)|) / denominator; mask [B,1,H,W] broadcast over C."""
    diff = (pred - target).abs() * mask.to(pred.dtype)
    denom = masked_l1_denominator(pred, mask, normalize)
    acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
    return (diff.to(acc).sum() / denom.to(acc)).to(pred.dtype)


def lr_branch_coefficients(lr_branch: str, alphas_cumprod_prev: float, sigma: float) -> tuple[float, float]:
    """(scale of x_bar, std of the noise) of the LR-branch sample z_{t-1}^{LR}.

    "forward" (Fig. 2, the default): forward-diffuse x_bar to level t-1,
        z = sqrt(gamma_{t-1}) x_bar + sqrt(1 - gamma_{t-1}) eps.
    "literal" (eq. 13 as written): z = x_bar + sigma_t eps with the step's std sigma_t.
    """
    if lr_branch == "forward":
        if not torch.compiler.is_compiling() and not 0.0 <= alphas_cumprod_prev <= 1.0:
            raise ValueError(f"alphas_cumprod_prev must lie in [0, 1], got {alphas_cumprod_prev}")
        # No max(0, .) guard: a NoiseSchedule's betas lie in (0, 1), so 0 < gamma_{t-1} <= 1. And
        # where torch.compile traces these values as symbolic floats (once the case for a
        # NoiseSchedule's), torch 2.11's inductor emitted builtin max() as an int64 max (0 here:
        # the LR branch lost its noise on an H100).
        return alphas_cumprod_prev ** 0.5, (1.0 - alphas_cumprod_prev) ** 0.5
    return 1.0, sigma


def yoda_step_from_coefficients(
    z_t: torch.Tensor,
    eps_pred: torch.Tensor,
    x_bar: torch.Tensor | None,
    mask: torch.Tensor,
    noise: torch.Tensor,
    lr_noise: torch.Tensor,
    *,
    sqrt_recip_ac: float,
    sqrt_recipm1_ac: float,
    coef1: float,
    coef2: float,
    sigma: float,
    lr_scale: float,
    lr_sigma: float,
    clip_x0: bool,
    clip_range: tuple[float, float] = (-1.0, 1.0),
) -> torch.Tensor:
    """Eq. 11-14 given the step's scalars (float64 math for float64 inputs).

    active:  x0 = sqrt_recip_ac z_t - sqrt_recipm1_ac eps  (clipped if clip_x0)
             z_sr = coef1 x0 + coef2 z_t + sigma noise
    rest:    z_lr = lr_scale x_bar + lr_sigma lr_noise      (x_bar None means 0)
    out = where(mask, z_sr, z_lr)
    """
    x0 = sqrt_recip_ac * z_t - sqrt_recipm1_ac * eps_pred
    if clip_x0:
        x0 = x0.clamp(*clip_range)
    z_sr = coef1 * x0 + coef2 * z_t + sigma * noise
    z_lr = lr_sigma * lr_noise
    if x_bar is not None:
        z_lr = z_lr + lr_scale * x_bar
    m = mask if mask.dtype == torch.bool else mask != 0
    return torch.where(m, z_sr, z_lr).to(z_t.dtype)
