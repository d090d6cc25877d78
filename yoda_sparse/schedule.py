"""Noise schedules for DDPM-style super-resolution (SR3, SRDiff) and their respacing.

Notation (the paper's names vs. the code's):

* The YODA paper's eq. 1-3 write ``alpha_t`` for the *noise variance* of step t, which DDPM
  and this code call ``betas[t-1]``; its ``gamma_t = prod_{i<=t} (1 - alpha_i)`` is this
  code's ``alphas_cumprod[t-1]`` (DDPM's alpha-bar).
* The paper's eq. 6-7 are copied from SR3, where ``alpha_t`` means ``1 - beta_t``; this code
  calls that ``alphas[t-1]``.

Timesteps follow the paper: t runs from T (pure noise) down to 1; t = 0 is the clean image
with gamma_0 = 1.  Arrays are indexed by ``t - 1``.  All arrays are float64 on the CPU: they
are computed once and the per-step scalars are read from them (no device sync per step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["NoiseSchedule"]


def _as_float64(name: str, values) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64).detach().cpu().reshape(-1).clone()
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite, got {t}")
    return t


@dataclass(frozen=True)
class StepCoefficients:
    """The scalars one reverse step t -> t-1 needs (all Python floats).

    x0_hat = sqrt_recip_alphas_cumprod * z_t - sqrt_recipm1_alphas_cumprod * eps
    mean   = posterior_mean_coef1 * x0_hat + posterior_mean_coef2 * z_t
    """

    t: int
    alphas_cumprod: float  # gamma_t
    alphas_cumprod_prev: float  # gamma_{t-1} (1 at t = 1)
    beta: float
    sqrt_recip_alphas_cumprod: float
    sqrt_recipm1_alphas_cumprod: float
    posterior_mean_coef1: float
    posterior_mean_coef2: float
    posterior_variance: float  # "fixed_small" in diffusers' words
    noise_level: float  # sqrt(gamma_t): what SR3 conditions on

    def sigma(self, variance: str) -> float:
        """Standard deviation of the active-area sample; 0 on the last step (t = 1)."""
        if variance not in ("fixed_small", "fixed_large"):
            raise ValueError(f"variance must be 'fixed_small' or 'fixed_large', got {variance!r}")
        if self.t <= 1:
            return 0.0
        return math.sqrt(self.posterior_variance if variance == "fixed_small" else self.beta)


class NoiseSchedule:
    """A discrete variance schedule of ``T`` steps.

    Build with :meth:`linear` (SR3), :meth:`cosine` (SRDiff) or from explicit ``betas``.

    Attributes (float64 CPU tensors of length T, index ``t - 1``; read-only: the per-step
    scalars are copied from them once, at construction):
        betas: per-step noise variance beta_t (the paper's alpha_t in eq. 1-3).
        alphas: 1 - beta_t (SR3's alpha_t, the paper's eq. 6-7).
        alphas_cumprod: gamma_t = prod_{i<=t} alphas_i (DDPM's alpha-bar).
        alphas_cumprod_prev: gamma_{t-1}, with gamma_0 = 1.
        posterior_variance: beta_t (1 - gamma_{t-1}) / (1 - gamma_t)  (q(z_{t-1}|z_t, z_0)).
        posterior_mean_coef1/2: coefficients of z_0 and z_t in the posterior mean.
        timesteps: for a respaced schedule, the training-schedule timestep (1..T_train) each
            step corresponds to; ``arange(1, T+1)`` otherwise.
    """

    def __init__(self, betas, *, timesteps=None, train_steps: int | None = None):
        betas = _as_float64("betas", betas)
        if (betas <= 0).any() or (betas >= 1).any():
            raise ValueError("betas must lie in (0, 1)")
        self.betas = betas
        self.num_steps = int(betas.numel())
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        ac, acp = self.alphas_cumprod, self.alphas_cumprod_prev
        self.sqrt_alphas_cumprod = ac.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ac).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / ac).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / ac - 1.0).sqrt()
        self.posterior_variance = betas * (1.0 - acp) / (1.0 - ac)
        self.posterior_mean_coef1 = betas * acp.sqrt() / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - acp) * self.alphas.sqrt() / (1.0 - ac)
        if timesteps is None:
            timesteps = torch.arange(1, self.num_steps + 1)
        self.timesteps = torch.as_tensor(timesteps, dtype=torch.long).reshape(-1)
        if self.timesteps.numel() != self.num_steps:
            raise ValueError("timesteps must have one entry per step")
        self.train_steps = int(train_steps) if train_steps is not None else self.num_steps
        # Every sampling step reads its scalars from these Python lists: ten float(tensor[i])
        # cost ~10 us, as much as a small image's step kernel. Under torch.compile they are
        # constants, so a step's scalars are baked into the graph, never traced as tensor
        # reads (torch 2.6's dynamo cannot trace float(tensor[i]) in a full graph, and torch
        # 2.11's inductor once miscompiled arithmetic on such traced scalars).
        self._coefficient_columns = {
            field: getattr(self, attr).tolist() for field, attr in self._COEFFICIENT_FIELDS
        }

    # ------------------------------------------------------------------ constructors
    @classmethod
    def linear(cls, T: int, start: float = 1e-6, end: float = 1e-2) -> "NoiseSchedule":
        """SR3's linear schedule of betas from ``start`` to ``end`` over ``T`` steps."""
        _check_steps("T", T)
        if not (0 < start <= end < 1):
            raise ValueError(f"need 0 < start <= end < 1, got start={start}, end={end}")
        return cls(torch.linspace(start, end, T, dtype=torch.float64))

    @classmethod
    def cosine(cls, T: int, s: float = 0.008, max_beta: float = 0.999) -> "NoiseSchedule":
        """The cosine schedule (Nichol & Dhariwal), used by SRDiff: gamma(t) = f(t)/f(0),
        f(t) = cos^2(((t/T) + s)/(1 + s) * pi/2); betas clipped at ``max_beta``."""
        _check_steps("T", T)
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        ac = f / f[0]
        betas = (1 - ac[1:] / ac[:-1]).clamp(max=max_beta)
        return cls(betas)

    # ------------------------------------------------------------------ respacing
    def respace(self, n: int) -> "NoiseSchedule":
        """A schedule of ``n`` steps that keeps the cumulative noise levels of ``n`` evenly
        spaced training steps (paper: 500 -> 200).

        The kept training timesteps always include T (so sampling starts at the same noise
        level) and are stored in ``timesteps``; betas are recomputed as
        ``1 - gamma_k / gamma_{k-1}`` between consecutive kept steps, so ``alphas_cumprod`` of
        the result equals ``self.alphas_cumprod`` at the kept steps exactly (to rounding).
        """
        _check_steps("n", n)
        if n > self.num_steps:
            raise ValueError(f"n must be <= the schedule's {self.num_steps} steps, got {n}")
        # Evenly spaced in (0, T], ending exactly at T.
        kept = torch.round(torch.linspace(self.num_steps / n, self.num_steps, n, dtype=torch.float64)).long()
        kept = torch.unique(kept.clamp(1, self.num_steps))
        if kept.numel() != n:  # cannot happen for n <= T, but never silently change n
            raise RuntimeError(f"respacing to {n} steps produced {kept.numel()} distinct steps")
        ac = self.alphas_cumprod[kept - 1]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        betas = 1.0 - ac / prev
        return NoiseSchedule(betas, timesteps=self.timesteps[kept - 1], train_steps=self.train_steps)

    # ------------------------------------------------------------------ per step
    def check_t(self, t: int, name: str = "t") -> int:
        if isinstance(t, torch.Tensor):
            if t.numel() != 1:
                raise ValueError(f"{name} must be a single timestep, got shape {tuple(t.shape)}")
            t = t.item()
        if isinstance(t, bool) or not float(t).is_integer():
            raise TypeError(f"{name} must be an integer timestep, got {t!r}")
        t = int(t)
        if not 1 <= t <= self.num_steps:
            raise ValueError(f"{name} must be in [1, {self.num_steps}] for this schedule, got {t}")
        return t

    _COEFFICIENT_FIELDS = (
        ("alphas_cumprod", "alphas_cumprod"), ("alphas_cumprod_prev", "alphas_cumprod_prev"), ("beta", "betas"),
        ("sqrt_recip_alphas_cumprod", "sqrt_recip_alphas_cumprod"),
        ("sqrt_recipm1_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"),
        ("posterior_mean_coef1", "posterior_mean_coef1"), ("posterior_mean_coef2", "posterior_mean_coef2"),
        ("posterior_variance", "posterior_variance"), ("noise_level", "sqrt_alphas_cumprod"),
    )

    def coefficients(self, t: int) -> StepCoefficients:
        """The scalars of reverse step t -> t-1 (t in 1..T of *this* schedule)."""
        t = self.check_t(t)
        i = t - 1
        return StepCoefficients(t=t, **{field: column[i] for field, column in self._coefficient_columns.items()})

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward diffusion, paper eq. 3: z_t = sqrt(gamma_t) x0 + sqrt(1 - gamma_t) eps.

        ``t`` is a LongTensor [B] of timesteps in 1..T.
        """
        t = torch.as_tensor(t, device=x0.device).long().reshape(-1)
        if t.numel() != x0.shape[0]:
            raise ValueError(f"t must have one timestep per batch element ({x0.shape[0]}), got {t.numel()}")
        shape = (-1,) + (1,) * (x0.dim() - 1)
        a = self.sqrt_alphas_cumprod.to(x0.device)[t - 1].to(x0.dtype).reshape(shape)
        b = self.sqrt_one_minus_alphas_cumprod.to(x0.device)[t - 1].to(x0.dtype).reshape(shape)
        return a * x0 + b * noise

    def __len__(self) -> int:
        return self.num_steps

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(steps={self.num_steps}, train_steps={self.train_steps}, "
            f"beta=[{self.betas[0].item():.3g}..{self.betas[-1].item():.3g}])"
        )


def _check_steps(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
