"""Training losses and samplers, dense and YODA, for the two model families.

* :class:`SR3Diffusion` — SR3: the UNet sees ``cat(x_up, z_t)`` and the continuous noise level
  sqrt(gamma); the diffused variable is the HR image; the LR branch's mean is x_bar = x_up.
* :class:`SRDiffDiffusion` — SRDiff: an RRDB encoder conditions a UNet that denoises the
  residual ``(hr - x_up) * res_rescale``; the LR branch's mean is x_bar = 0 (paper Sec. 4.1).

Images at this layer's API are float [B,3,H,W] in [0, 1]; internally they live in [-1, 1].

What the model sees in the inactive area, identically in training and sampling:
* ``YodaSettings.masked_input=False`` (default): the current state z_t, whose inactive part is
  the LR branch. With the Fig. 2 reading (``lr_branch="forward"``) that part is x_bar
  forward-diffused to level t, so training builds it as ``sqrt(gamma_t) x_bar + sqrt(1-gamma_t) eps``;
  with the literal eq. 13 it is ``x_bar + sigma_{t+1} eps``.
* ``masked_input=True``: eq. 11 literally, the model sees ``M(t) * z_t`` (zeros outside).

The first state z_T is prior noise in the active area and the LR branch at level T elsewhere,
so a YODA run with an all-ones mask is exactly the dense run.
"""
from __future__ import annotations

import abc
import numbers
from dataclasses import asdict, dataclass, field, fields

import torch

from . import ops
from .masking import activation_time
from .resize import UPSAMPLE_METHODS, upsample
from .sampling import build_masks, run_sampler
from .schedule import NoiseSchedule

__all__ = [
    "YodaSettings", "ScheduleSettings", "Preprocess", "SampleResult", "SR3Diffusion", "SRDiffDiffusion",
    "build_diffusion", "load_diffusion",
]


@dataclass
class YodaSettings:
    """How YODA was trained / is sampled; stored in every checkpoint.

    attention: name of the attention extractor (``yoda_sparse.attention.get_attention``).
    lower_bound: l of eq. 9. The paper does not state its value; 0.2 is this library's default.
    lr_branch: "forward" (Fig. 2, default) or "literal" (eq. 13 as written).
    masked_input: the model sees M(t) * z_t (eq. 11 literal) instead of z_t.
    clip_x0: clip the predicted x0 to [-1, 1] in each step, as SR3's and SRDiff's code do.
    variance: "fixed_small" (posterior variance, as SR3's/SRDiff's code) or "fixed_large" (beta_t).
    loss_normalize: eq. 10's normalisation ("all" as SR3's L1 mean, or "active").
    """

    attention: str | None = "dino_resnet50_max"
    lower_bound: float = 0.2
    lr_branch: str = "forward"
    masked_input: bool = False
    clip_x0: bool = True
    variance: str = "fixed_small"
    loss_normalize: str = "all"

    def __post_init__(self):
        if not 0 < float(self.lower_bound) < 1:
            raise ValueError(f"lower_bound must lie in (0, 1), got {self.lower_bound!r}")
        if self.lr_branch not in ops.LR_BRANCHES:
            raise ValueError(f"lr_branch must be one of {ops.LR_BRANCHES}, got {self.lr_branch!r}")
        if self.variance not in ops.VARIANCES:
            raise ValueError(f"variance must be one of {ops.VARIANCES}, got {self.variance!r}")
        if self.loss_normalize not in ops.NORMALIZATIONS:
            raise ValueError(f"loss_normalize must be one of {ops.NORMALIZATIONS}, got {self.loss_normalize!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "YodaSettings":
        return cls(**_known_fields(cls, d, "yoda settings"))


@dataclass
class ScheduleSettings:
    """The training noise schedule: kind "linear" (SR3) or "cosine" (SRDiff), T steps; or
    "explicit" with its ``betas`` listed (what a converted model's file gives when it is
    neither; ``timesteps`` is then their count)."""

    kind: str = "linear"
    timesteps: int = 500
    start: float = 1e-6
    end: float = 1e-2
    betas: tuple | None = None

    def __post_init__(self):
        if self.betas is not None:
            self.betas = tuple(float(b) for b in self.betas)
        if self.kind == "explicit":
            if not self.betas:
                raise ValueError("schedule settings: kind 'explicit' needs betas")
            if len(self.betas) != self.timesteps:
                raise ValueError(f"schedule settings: {len(self.betas)} betas for timesteps={self.timesteps}")
        elif self.betas is not None:
            raise ValueError(f"schedule settings: betas are only for kind 'explicit', got kind {self.kind!r}")

    def build(self) -> NoiseSchedule:
        if self.kind == "linear":
            return NoiseSchedule.linear(self.timesteps, self.start, self.end)
        if self.kind == "cosine":
            return NoiseSchedule.cosine(self.timesteps)
        if self.kind == "explicit":
            return NoiseSchedule(list(self.betas))
        raise ValueError(f"schedule kind must be 'linear', 'cosine' or 'explicit', got {self.kind!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["betas"] is None:  # absent, as in the checkpoints written before it existed
            del d["betas"]
        else:
            d["betas"] = list(d["betas"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ScheduleSettings":
        return cls(**_known_fields(cls, d, "schedule settings"))


@dataclass
class Preprocess:
    """How the upsampled LR image x_up is made; stored in checkpoints (absent: the defaults).

    upsample: one of ``yoda_sparse.resize.UPSAMPLE_METHODS``: "torch_bicubic" (yoda-sparse's
        own models), "pil_bicubic" (the public SR3 code), "matlab_bicubic" (SRDiff's code).
    input_scale: the LR image in [0, 1] is multiplied by this before upsampling: SRDiff's data
        code resizes the 8-bit LR divided by 256, i.e. 255/256 of the [0, 1] image.
    """

    upsample: str = "torch_bicubic"
    input_scale: float = 1.0

    def __post_init__(self):
        if self.upsample not in UPSAMPLE_METHODS:
            raise ValueError(f"upsample must be one of {UPSAMPLE_METHODS}, got {self.upsample!r}")
        if not 0 < float(self.input_scale) <= 1:
            raise ValueError(f"input_scale must lie in (0, 1], got {self.input_scale!r}")
        self.input_scale = float(self.input_scale)

    def x_up(self, lr_m: torch.Tensor, scale: int) -> torch.Tensor:
        """x_up in [-1, 1] from the LR image in [-1, 1]."""
        if self.upsample == "torch_bicubic" and self.input_scale == 1.0:
            return upsample(lr_m, scale)  # bicubic is linear: upsampling [-1, 1] directly, as always
        return upsample((lr_m + 1) / 2 * self.input_scale, scale, self.upsample) * 2 - 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(**_known_fields(cls, d, "preprocess settings"))


def _known_fields(cls, d: dict, what: str) -> dict:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {what} fields {unknown}; expected a subset of {sorted(names)}")
    return dict(d)


@dataclass
class SampleResult:
    """images: float [B,3,H,W] in [0,1]; active_fraction: float64 [S,B] (1 for dense runs);
    update_ratio: float64 [B]; timesteps: the run's training-schedule timesteps [S]."""

    images: torch.Tensor
    active_fraction: torch.Tensor
    update_ratio: torch.Tensor
    timesteps: torch.Tensor
    extras: dict = field(default_factory=dict)


def _check_images(name: str, x, channels: int = 3) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor in [0, 1], got {x.dtype}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} must have shape [B, {channels}, H, W], got {tuple(x.shape)}")
    _check_range(name, x)
    return x


def _check_range(name: str, x: torch.Tensor) -> None:
    """Values finite and in [0, 1] (one host sync; skipped under torch.compile / graph capture)."""
    if x.numel() == 0 or torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    lo, hi = torch.stack(torch.aminmax(x.detach())).tolist()
    if not (0.0 <= lo and hi <= 1.0):  # NaN fails too
        raise ValueError(f"{name} must hold finite values in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")


class _DiffusionSR(abc.ABC):
    family = ""

    def __init__(self, model, schedule: ScheduleSettings | None = None, yoda: YodaSettings | None = None, *, scale: int,
                 preprocess: Preprocess | None = None):
        self.model = model
        self.schedule_settings = schedule or self.default_schedule()
        self.schedule = self.schedule_settings.build()
        self.yoda = yoda or YodaSettings()
        self.scale = int(scale)
        self.preprocess = preprocess or Preprocess()

    # ----------------------------------------------------------------- family hooks
    @staticmethod
    @abc.abstractmethod
    def default_schedule() -> ScheduleSettings:
        """The family's published training schedule."""

    @abc.abstractmethod
    def _prepare(self, lr_m: torch.Tensor):
        """Per-run conditioning from the LR image in [-1,1]: returns (x_up, x_bar, cond)."""

    @abc.abstractmethod
    def _predict_noise(self, z, t_train: torch.Tensor, level: torch.Tensor, x_up, cond):
        """The model's noise prediction for state z at training timestep t_train / level sqrt(gamma)."""

    @abc.abstractmethod
    def _target(self, hr_m, x_up):
        """The diffused variable x0 for an HR image in [-1,1]."""

    @abc.abstractmethod
    def _to_image(self, z0, x_up):
        """The final state back to an image in [0,1]."""

    # ----------------------------------------------------------------- shared
    def _check_pair(self, hr, lr):
        _check_images("hr", hr)
        _check_images("lr", lr)
        if hr.shape[0] != lr.shape[0]:
            raise ValueError(f"hr and lr must have the same batch size, got {hr.shape[0]} and {lr.shape[0]}")
        if (hr.shape[2], hr.shape[3]) != (lr.shape[2] * self.scale, lr.shape[3] * self.scale):
            raise ValueError(f"hr {tuple(hr.shape[2:])} must be lr {tuple(lr.shape[2:])} times the model's scale {self.scale}")

    @staticmethod
    def _check_batch(attn_like: torch.Tensor, batch: int) -> None:
        # attn's values are validated once, where the masks are built (masking.check_attention)
        if attn_like.shape[0] != batch:
            raise ValueError(f"attn must have one map per image ({batch}), got {attn_like.shape[0]}")

    def _lr_branch_at(self, x_bar, t: torch.Tensor, noise, level: torch.Tensor):
        """The LR-branch state at training timestep t [B] (what sampling leaves there)."""
        shape = (-1, 1, 1, 1)
        x_bar = torch.zeros_like(noise) if x_bar is None else x_bar
        if self.yoda.lr_branch == "forward":
            return level.view(shape) * x_bar + (1 - level.view(shape) ** 2).clamp(min=0).sqrt() * noise
        # literal eq. 13: x_bar + sigma_{t+1} eps (the std of the step that produced level t);
        # at t = T the run starts from the forward-diffused LR image.
        T = self.schedule.num_steps
        nxt = (t + 1).clamp(max=T)
        sig = torch.tensor([self.schedule.coefficients(int(k)).sigma(self.yoda.variance) for k in nxt.tolist()],
                           dtype=noise.dtype, device=noise.device)
        literal = x_bar + sig.view(shape) * noise
        start = level.view(shape) * x_bar + (1 - level.view(shape) ** 2).clamp(min=0).sqrt() * noise
        return torch.where((t == T).view(shape), start, literal)

    def training_loss(self, hr: torch.Tensor, lr: torch.Tensor, attn: torch.Tensor | None = None, *, generator=None) -> torch.Tensor:
        """Dense L1 noise loss (paper eq. 8) or, with an attention map, YODA's eq. 10.

        hr [B,3,H,W], lr [B,3,H/s,W/s] in [0,1]; attn [B,1,h,w] in [0,1] or None.
        Timesteps are drawn uniformly from 1..T; SR3 draws a continuous noise level between
        sqrt(gamma_t) and sqrt(gamma_{t-1}) as its code does, SRDiff uses sqrt(gamma_t).
        """
        self._check_pair(hr, lr)
        B, device = hr.shape[0], hr.device
        hr_m, lr_m = hr * 2 - 1, lr * 2 - 1
        x_up, x_bar, cond = self._prepare(lr_m)
        x0 = self._target(hr_m, x_up)
        T = self.schedule.num_steps
        t = torch.randint(1, T + 1, (B,), generator=generator, device="cpu").to(device)
        level = self._training_level(t, generator).to(device=device, dtype=hr.dtype)
        noise = torch.randn(x0.shape, generator=generator, device="cpu", dtype=hr.dtype).to(device)
        z = level.view(-1, 1, 1, 1) * x0 + (1 - level.view(-1, 1, 1, 1) ** 2).clamp(min=0).sqrt() * noise
        mask = None
        if attn is not None:
            act = activation_time(attn, T, self.yoda.lower_bound, size=hr.shape[-2:])
            self._check_batch(act, B)
            mask = act >= t.view(-1, 1, 1, 1).to(act.dtype)
            z = torch.where(mask, z, self._lr_branch_at(x_bar, t, noise, level))
            if self.yoda.masked_input:
                z = z * mask
        # under autocast the network may answer in bf16/fp16: the loss is taken in the data's dtype
        eps = self._predict_noise(z, t, level, x_up, cond).to(noise.dtype)
        if mask is None:
            return (eps - noise).abs().mean()
        return ops.masked_l1_loss(eps, noise, mask, normalize=self.yoda.loss_normalize)

    def _training_level(self, t: torch.Tensor, generator) -> torch.Tensor:
        return self.schedule.sqrt_alphas_cumprod[t.cpu() - 1].to(torch.float32)

    @torch.no_grad()
    def sample(
        self,
        lr: torch.Tensor,
        attn: torch.Tensor | None = None,
        *,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        progress: bool = True,
        backend: str | None = None,
        engine: str = "auto",
        engine_options: dict | None = None,
    ) -> SampleResult:
        """Ancestral sampling, dense (attn None) or YODA (eq. 11-14), of the whole batch.

        lr: [B,3,h,w] in [0,1]; attn: [B,1,*,*] in [0,1] (resized to the HR size);
        steps: respace the training schedule to this many steps (paper: 500 -> 200).
        Noise: by default drawn on the CPU from ``generator``, so a seed gives the same result
        on any device. With ``seed``, the start noise comes from a generator seeded with it
        and every step's noise is generated inside the step kernel (counter-based Philox at
        offset ``step * numel``): no noise tensor is drawn, copied or read per step, the fast
        path on a GPU; reproducible per backend.
        engine: "dense" runs the whole UNet every step; "sparse" runs it on the active tiles
        of each step's mask with cached activations elsewhere (:class:`yoda_sparse.sparse.
        SparseUNet`, options in ``engine_options``); "auto" is sparse for YODA sampling of a
        model the engine supports whose dense step is large enough for it to pay
        (``AUTO_MIN_GFLOPS``) and for whose masks the engine's cost model, measured on this
        device, predicts a saving (``AUTO_MAX_PREDICTED_RATIO``), else dense. Each call starts
        a fresh engine cache.
        """
        _check_images("lr", lr)
        if seed is not None and generator is not None:
            raise ValueError("pass either generator or seed, not both")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, numbers.Integral)
                                  or not 1 <= steps <= self.schedule.num_steps):
            raise ValueError(f"steps must be an integer in [1, {self.schedule.num_steps}] (the training steps), got {steps!r}")
        B = lr.shape[0]
        H, W = lr.shape[2] * self.scale, lr.shape[3] * self.scale
        sched = self.schedule if steps is None else self.schedule.respace(int(steps))
        masks = None
        if attn is not None:
            masks = build_masks(attn, self.schedule.num_steps, self.yoda.lower_bound, sched, size=(H, W), batch=B, device=lr.device)
        sparse_engine, predicted = self._sparse_engine(engine, engine_options, yoda_run=attn is not None,
                                                       size=(B, H, W), masks=masks, dtype=lr.dtype)
        lr_m = lr * 2 - 1
        x_up, x_bar, cond = self._prepare(lr_m)
        predictor = self.noise_predictor(x_up) if sparse_engine is None else self._engine_predictor(sparse_engine, x_up)
        out = run_sampler(
            predictor, shape=(B, 3, H, W), schedule=sched, x_bar=x_bar, cond=cond, masks=masks,
            lr_branch=self.yoda.lr_branch, masked_input=self.yoda.masked_input, clip_x0=self.yoda.clip_x0,
            variance=self.yoda.variance, generator=generator, seed=seed, backend=backend, progress=progress,
            dtype=lr.dtype, device=lr.device,
        )
        extras = {"engine": "sparse" if sparse_engine is not None else "dense"}
        if predicted is not None:
            extras["predicted_time_ratio"] = predicted
        if sparse_engine is not None:
            extras["engine_summary"] = sparse_engine.summary()
        return SampleResult(self._to_image(out.sample, x_up), out.active_fraction, out.update_ratio, out.timesteps,
                            extras)

    def noise_predictor(self, x_up: torch.Tensor):
        """The per-step model call of :meth:`sample`, for :func:`yoda_sparse.sampling.run_sampler`:
        ``fn(z_t, t, level, cond, *, step, mask) -> eps`` with t the 1-based training timestep
        [B], level sqrt(gamma) [B], cond the family's conditioning (SRDiff's encoder features),
        step the 0-based step index and mask that step's M(t) [B,1,H,W] (unused here: every
        pixel is computed; a sparse engine computes only the active ones)."""

        def predict(z, t, level, cond, *, step=None, mask=None):
            return self._predict_noise(z, t, level, x_up, cond)

        return predict

    def _engine_predictor(self, engine, x_up: torch.Tensor):
        """The per-step model call through a SparseUNet: the same signature as
        :meth:`noise_predictor`'s, computing only the active tiles of each step's mask."""

        def predict(z, t, level, cond, *, step=None, mask=None):
            return engine(z, mask, **self._engine_inputs(t, level, x_up, cond))

        return predict

    # "auto" runs the sparse engine from this much dense work per step on: below it, the engine's
    # per-layer overheads (host time, norm statistics) cost more than sparsity saves (measured on
    # a 2-core CPU: the 0.26 M-parameter demo model, ~0.3 GFLOP per step at 128x128, ran slower
    # sparse; the 97.8 M-parameter SR3 at 256x256, ~400 GFLOP, ran 30-50% faster)
    AUTO_MIN_GFLOPS = 20.0
    # ... and when the cost model predicts at most this sparse/dense time for the run's masks
    # (SparseUNet.predicted_time_ratio). The prediction leaves probes and per-step fixed costs
    # out: on the 2-core CPU (SR3 16->128, 256x256, 20 steps, three runs) measured ratios ran
    # 0.09-0.19 above it (coffee's scattered edges 0.06-0.27: 0.74 predicted, 0.80-1.01
    # measured), so from 0.85 on sparsity would not pay
    AUTO_MAX_PREDICTED_RATIO = 0.85

    def _sparse_engine(self, engine: str, options: dict | None, *, yoda_run: bool, size=None, masks=None,
                       dtype: torch.dtype = torch.float32):
        """(engine, predicted time ratio): a fresh SparseUNet for "sparse", and for "auto" on a
        YODA run whose dense step costs at least AUTO_MIN_GFLOPS and whose masks the cost model
        predicts a saving for, else None; the prediction where "auto" made one, else None."""
        if engine not in ("dense", "sparse", "auto"):
            raise ValueError(f"engine: expected 'dense', 'sparse' or 'auto', got {engine!r}")
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"engine_options: expected a dict of SparseUNet options, got {type(options).__name__}")
        if engine == "dense" or (engine == "auto" and not yoda_run):
            if options:
                raise ValueError("engine_options: only with engine='sparse' or 'auto'")
            return None, None
        from .sparse import SparseUNet, UnsupportedLayerError

        try:
            eng = SparseUNet(self.model, **(options or {}))
        except UnsupportedLayerError:
            if engine == "auto":
                return None, None
            raise
        if engine == "auto" and size is not None and eng.dense_gflops(*size) < self.AUTO_MIN_GFLOPS:
            return None, None
        if engine == "auto" and masks is not None:
            predicted = eng.predicted_time_ratio(masks, dtype)
            return (None if predicted > self.AUTO_MAX_PREDICTED_RATIO else eng), predicted
        return eng, None

    @abc.abstractmethod
    def _engine_inputs(self, t_train, level, x_up, cond) -> dict:
        """The keyword inputs of SparseUNet.predict besides the state and the mask."""

    # ----------------------------------------------------------------- checkpoints
    def checkpoint_extra(self) -> dict:
        extra = {"family": self.family, "schedule": self.schedule_settings.to_dict(), "yoda": self.yoda.to_dict()}
        if self.preprocess != Preprocess():
            extra["preprocess"] = self.preprocess.to_dict()
        return extra

    def save(self, path, model_config, *, ema=None, extra: dict | None = None) -> None:
        from .models.checkpoint import save_checkpoint

        save_checkpoint(path, self.model, model_config, extra={**self.checkpoint_extra(), **(extra or {})}, ema=ema)


class SR3Diffusion(_DiffusionSR):
    """SR3 (Saharia et al.): UNet(cat(x_up, z_t), sqrt(gamma)) predicts the noise of the HR image."""

    family = "sr3"

    @staticmethod
    def default_schedule() -> ScheduleSettings:
        return ScheduleSettings("linear", 500, 1e-6, 1e-2)

    def _prepare(self, lr_m):
        x_up = self.preprocess.x_up(lr_m, self.scale)
        return x_up, x_up, None

    def _target(self, hr_m, x_up):
        return hr_m

    def _training_level(self, t, generator):
        # SR3 samples sqrt(gamma) uniformly between the levels of t and t-1 so the model
        # learns a continuum of noise levels (this is what makes respacing work).
        hi = self.schedule.sqrt_alphas_cumprod[t.cpu() - 1]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), self.schedule.sqrt_alphas_cumprod[:-1]])
        lo_level = prev[t.cpu() - 1]
        u = torch.rand(t.shape, generator=generator, dtype=torch.float64)
        return (hi + (lo_level - hi) * u).to(torch.float32)

    def _predict_noise(self, z, t_train, level, x_up, cond):
        return self.model(torch.cat([x_up, z], dim=1), level)

    def _engine_inputs(self, t_train, level, x_up, cond):
        return {"noise_level": level, "x_up": x_up}

    def _to_image(self, z0, x_up):
        return ((z0 + 1) / 2).clamp(0, 1)


class SRDiffDiffusion(_DiffusionSR):
    """SRDiff (Li et al.): a UNet conditioned on RRDB features denoises the residual
    (hr - x_up) * res_rescale; the LR branch's mean is 0."""

    family = "srdiff"

    def __init__(self, model, schedule=None, yoda=None, *, scale: int, res_rescale: float = 2.0, preprocess=None):
        super().__init__(model, schedule, yoda, scale=scale, preprocess=preprocess)
        self.res_rescale = float(res_rescale)

    @staticmethod
    def default_schedule() -> ScheduleSettings:
        return ScheduleSettings("cosine", 100)

    def _prepare(self, lr_m):
        x_up = self.preprocess.x_up(lr_m, self.scale)
        return x_up, None, self.model.encode(lr_m)

    def _target(self, hr_m, x_up):
        return (hr_m - x_up) * self.res_rescale

    def _predict_noise(self, z, t_train, level, x_up, cond):
        return self.model.denoise(z, t_train, cond)

    def _engine_inputs(self, t_train, level, x_up, cond):
        return {"t": t_train, "cond": cond}

    def _to_image(self, z0, x_up):
        return ((x_up + z0 / self.res_rescale + 1) / 2).clamp(0, 1)


def build_diffusion(model, model_config, *, schedule: ScheduleSettings | dict | None = None, yoda: YodaSettings | dict | None = None,
                    preprocess: Preprocess | dict | None = None):
    """The diffusion wrapper of the model's family."""
    if isinstance(schedule, dict):
        schedule = ScheduleSettings.from_dict(schedule)
    if isinstance(yoda, dict):
        yoda = YodaSettings.from_dict(yoda)
    if isinstance(preprocess, dict):
        preprocess = Preprocess.from_dict(preprocess)
    family = getattr(model_config, "family", None)
    if family == "sr3":
        return SR3Diffusion(model, schedule, yoda, scale=model_config.scale, preprocess=preprocess)
    if family == "srdiff":
        if schedule is None:
            schedule = ScheduleSettings("cosine", int(getattr(model_config, "timesteps", 100)))
        return SRDiffDiffusion(model, schedule, yoda, scale=model_config.scale, res_rescale=getattr(model_config, "res_rescale", 2.0),
                               preprocess=preprocess)
    raise ValueError(f"unknown model family {family!r}")


def load_diffusion(path, *, expected_family: str | None = None, map_location="cpu", use_ema: bool | None = None):
    """Load a checkpoint written by :meth:`save` / ``yoda-sparse train``: (diffusion, model_config, extra).

    ``use_ema=None`` takes the EMA weights when the checkpoint has them (they are what one
    samples with), the raw weights otherwise.
    """
    from pathlib import Path

    from .models.checkpoint import _read_metadata, load_checkpoint

    if use_ema is None:
        use_ema = _read_metadata(Path(path)).get("has_ema") == "true"
    model, config, extra = load_checkpoint(path, expected_family=expected_family, map_location=map_location, use_ema=use_ema)
    model.eval()
    extra = extra or {}
    yoda = extra.get("yoda")
    if "yoda" in extra and yoda is None:
        # trained dense: default step settings and no attention method, so callers sample
        # dense unless they name an attention map themselves
        yoda = YodaSettings(attention=None)
    diff = build_diffusion(model, config, schedule=extra.get("schedule"), yoda=yoda, preprocess=extra.get("preprocess"))
    return diff, config, extra

