"""Time-dependent masks, paper eq. 9, and the mask schedule of a whole sampling run.

    M(t)[i, j] = 1  if  T * (M[i, j] + l) >= t  else 0

M is the attention map in [0, 1], l the lower bound in (0, 1), T the number of *training*
timesteps.  Each pixel therefore has an "activation time" ``T * (M + l)``: it is updated at
every step whose timestep is at or below it.  As t falls the active set only grows, and the
fraction of the steps T..1 in which a pixel is updated is ``min(1, M + l)`` (in the limit of
many steps), so a run's pixel-update ratio is ``mean(min(1, M + l))``.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

__all__ = ["time_mask", "activation_time", "check_attention", "MaskSchedule"]


def check_attention(attn: torch.Tensor, *, name: str = "attn", clamp: bool = False) -> torch.Tensor:
    """Validate an attention map: floating [B,1,h,w] (or [B,h,w]) with values in [0, 1].

    NaNs are always an error; values outside [0, 1] are an error unless ``clamp=True``.
    """
    if not isinstance(attn, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(attn).__name__}")
    if not attn.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor with values in [0, 1], got {attn.dtype}")
    if attn.dim() == 3:
        attn = attn.unsqueeze(1)
    if attn.dim() != 4 or attn.shape[1] != 1:
        raise ValueError(f"{name} must have shape [B, 1, H, W] (or [B, H, W]), got {tuple(attn.shape)}")
    if attn.numel() == 0:
        raise ValueError(f"{name} is empty")
    # NaN propagates into both extremes; one host sync for both
    lo, hi = torch.stack(torch.aminmax(attn.detach())).tolist()
    if lo != lo or hi != hi:
        raise ValueError(f"{name} contains NaN")
    if lo < 0 or hi > 1:
        if not clamp:
            raise ValueError(f"{name} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}] (pass clamp=True to clamp)")
        attn = attn.clamp(0, 1)
    return attn


def _check_lower_bound(lower_bound) -> float:
    if isinstance(lower_bound, bool) or not isinstance(lower_bound, numbers.Real):
        raise TypeError(f"lower_bound must be a number in (0, 1), got {type(lower_bound).__name__} {lower_bound!r}")
    lb = float(lower_bound)
    if not 0 < lb < 1:
        raise ValueError(f"lower_bound must lie in (0, 1), got {lower_bound!r}")
    return lb


def _check_T(T) -> int:
    if isinstance(T, bool) or not isinstance(T, numbers.Integral):
        raise TypeError(f"T must be a positive integer (training timesteps), got {type(T).__name__} {T!r}")
    if T < 1:
        raise ValueError(f"T must be a positive integer (training timesteps), got {T!r}")
    return int(T)


def _check_t(t, T: int) -> float:
    """A timestep in [0, T]: a real number, or a tensor holding exactly one real value."""
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise ValueError(f"t must be one timestep (a number or a one-element tensor), got a tensor of shape {tuple(t.shape)}")
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"t must be a real timestep, got a {t.dtype} tensor")
        value = float(t.item())
    elif isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise TypeError(f"t must be a number in [0, T] (or a one-element tensor), got {type(t).__name__} {t!r}")
    else:
        value = float(t)
    if not 0 <= value <= T:  # NaN fails too
        raise ValueError(f"t must lie in [0, T={T}], got {value}")
    return value


def _check_size(size):
    if size is None:
        return None
    try:
        pair = tuple(size)
    except TypeError:
        raise TypeError(f"size must be None or (H, W), got {type(size).__name__} {size!r}") from None
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in pair):
        raise TypeError(f"size must be None or (H, W) of two integers, got {size!r}")
    if min(pair) < 1:
        raise ValueError(f"size must be (H, W) with H, W >= 1, got {size!r}")
    return (int(pair[0]), int(pair[1]))


def _resize(attn: torch.Tensor, size) -> torch.Tensor:
    size = _check_size(size)
    if size is None or tuple(attn.shape[-2:]) == size:
        return attn
    return F.interpolate(attn, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


def activation_time(attn: torch.Tensor, T: int, lower_bound: float, *, size=None, clamp: bool = False) -> torch.Tensor:
    """Per-pixel activation time ``T * (M + l)`` as float64 [B,1,H,W]: the pixel is active
    at every timestep t <= this value.  ``size`` resizes the map (bilinear) to the HR size."""
    T = _check_T(T)
    lb = _check_lower_bound(lower_bound)
    attn = _resize(check_attention(attn, clamp=clamp), size)
    return T * (attn.to(torch.float64) + lb)


def time_mask(attn: torch.Tensor, t, T: int, lower_bound: float, *, size=None, clamp: bool = False) -> torch.Tensor:
    """Eq. 9: boolean mask [B,1,H,W], True where ``T * (attn + lower_bound) >= t``.

    Args:
        attn: attention map, floating [B,1,h,w] in [0, 1]; resized bilinearly to ``size``.
        t: timestep in [0, T] (a Python number or a one-element tensor).
        T: number of training timesteps.
        lower_bound: l in (0, 1).
        size: None or (H, W), positive.
    Strings and other non-numbers are a TypeError, never converted.
    """
    T = _check_T(T)
    t_val = _check_t(t, T)
    return activation_time(attn, T, lower_bound, size=size, clamp=clamp) >= t_val


class MaskSchedule:
    """All masks of one sampling run, from the per-pixel activation time computed once.

    Args:
        attn: attention map [B,1,h,w] in [0, 1] (resized bilinearly to ``size`` if given).
        T: number of training timesteps (eq. 9's T).
        lower_bound: l in (0, 1).
        timesteps: the run's timesteps in the training schedule's units, strictly
            decreasing (default T, T-1, ..., 1; a respaced run passes its
            ``NoiseSchedule.timesteps`` flipped, e.g. 500, 497, ..., 3).
        size: (H, W) of the HR image.

    ``mask(i)`` is the mask of step i (0 = first step, highest t).  Nothing here syncs the
    host per step: masks and tile maps are comparisons on the device.
    """

    def __init__(self, attn, T: int, lower_bound: float, timesteps=None, *, size=None, clamp: bool = False):
        self.T = _check_T(T)
        self.lower_bound = _check_lower_bound(lower_bound)
        self.activation_time = activation_time(attn, T, lower_bound, size=size, clamp=clamp)
        device = self.activation_time.device
        if timesteps is None:
            timesteps = torch.arange(T, 0, -1)
        timesteps = torch.as_tensor(timesteps).reshape(-1).to(torch.float64)
        if timesteps.numel() == 0:
            raise ValueError("timesteps must not be empty")
        if (timesteps < 0).any() or (timesteps > T).any():
            raise ValueError(f"timesteps must lie in [0, T={T}]")
        if timesteps.numel() > 1 and not (timesteps[1:] < timesteps[:-1]).all():
            raise ValueError("timesteps must be strictly decreasing (sampling runs from high t to low t)")
        self.timesteps = timesteps.to(device)
        self.batch_size = self.activation_time.shape[0]
        self.size = tuple(self.activation_time.shape[-2:])

    def __len__(self) -> int:
        return self.timesteps.numel()

    def mask(self, i: int) -> torch.Tensor:
        """Boolean mask [B,1,H,W] of step ``i`` (0-based, in sampling order)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"step index {i} out of range for {len(self)} steps")
        return self.activation_time >= self.timesteps[i]

    def masks(self) -> torch.Tensor:
        """All masks as one boolean tensor [S,B,1,H,W] (memory: S*B*H*W bytes)."""
        return self.activation_time.unsqueeze(0) >= self.timesteps.view(-1, 1, 1, 1, 1)

    @property
    def active_fraction(self) -> torch.Tensor:
        """Fraction of active pixels, float64 [S, B] (step, image)."""
        flat = self.activation_time.flatten(1)  # [B, N]
        srt, _ = flat.sort(dim=1)
        n = flat.shape[1]
        # count of pixels with act >= t  ==  n - (number with act < t)
        below = torch.searchsorted(srt.contiguous(), self.timesteps.view(1, -1).expand(flat.shape[0], -1).contiguous(), side="left")
        return ((n - below).to(torch.float64) / n).transpose(0, 1)

    @property
    def update_ratio(self) -> torch.Tensor:
        """Pixel-update ratio of the run per image, float64 [B]: mean active fraction over the
        steps.  For timesteps T..1 this is ``mean(min(T, floor(T (M + l)))) / T``, which tends
        to ``mean(min(1, M + l))`` as T grows."""
        return self.active_fraction.mean(0)

    def tile_activation_time(self, tile_size) -> torch.Tensor:
        """Per-tile activation time [B, ceil(H/th), ceil(W/tw)]: a tile is active when any of
        its pixels is, i.e. when t <= the max activation time inside it."""
        th, tw = (tile_size, tile_size) if isinstance(tile_size, int) else tuple(tile_size)
        if th < 1 or tw < 1:
            raise ValueError(f"tile_size must be positive, got {tile_size!r}")
        # max_pool2d has no float64 kernel on every device; pad with -inf and reduce by view.
        act = self.activation_time[:, 0]
        B, H, W = act.shape
        ph, pw = (-H) % th, (-W) % tw
        if ph or pw:
            act = F.pad(act, (0, pw, 0, ph), value=float("-inf"))
        return act.view(B, (H + ph) // th, th, (W + pw) // tw, tw).amax(dim=(2, 4))

    def active_tiles(self, tile_size) -> torch.Tensor:
        """Boolean active-tile maps of every step at once: [S, B, nH, nW]."""
        tact = self.tile_activation_time(tile_size)
        return tact.unsqueeze(0) >= self.timesteps.view(-1, 1, 1, 1)

    def check_monotone(self) -> None:
        """Assert that the active set only grows along the run (it does by construction for
        decreasing timesteps; this re-checks the materialised masks)."""
        m = self.masks()
        if m.shape[0] > 1 and (m[:-1] & ~m[1:]).any():
            raise AssertionError("active set shrank between consecutive steps")
