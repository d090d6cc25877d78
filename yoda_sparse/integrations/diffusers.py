"""YODA sampling for diffusers: :class:`YodaScheduler` and :class:`YodaSuperResolutionPipeline`.

Needs the optional ``diffusers`` package (``pip install yoda-sparse[diffusers]``).

``YodaScheduler`` takes every setting of diffusers' ``DDPMScheduler`` (a DDPM config loads into
it and back) and steps with YODA's eq. 11-14 through :func:`yoda_sparse.ops.yoda_step`. The
per-pixel mask is state, not a step argument: :meth:`YodaScheduler.set_attention` stores an
attention map, eq. 9's lower bound and the LR branch's mean x_bar; each :meth:`~YodaScheduler.step`
then updates the active area of that timestep, ``M(t) = T (M + l) >= t + 1`` (diffusers counts
timesteps 0..T-1, eq. 9 counts 1..T), and keeps the rest on the LR branch. Without attention
(or with a map whose mask is all on) a step is DDPM's step: the same timesteps, coefficients
and noise draws, so a run equals ``DDPMScheduler``'s with the same generator.

``YodaSuperResolutionPipeline`` is the pixel-space analogue of diffusers'
``LDMSuperResolutionPipeline``: a ``UNet2DModel`` with ``2 * 3`` input channels sees
``cat([z_t, x_up], dim=1)`` (the noisy HR image first, then the upsampled LR image in [-1, 1]).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch

try:
    from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DModel
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
    from diffusers.utils import BaseOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("yoda_sparse.integrations.diffusers needs the optional diffusers package: "
                      "pip install 'yoda-sparse[diffusers]'") from e

from .. import ops
from ..masking import activation_time, check_attention
from ..resize import UPSAMPLE_METHODS, upsample
from ..sampling import lr_branch_start
from ..schedule import NoiseSchedule

__all__ = ["YodaScheduler", "YodaSchedulerOutput", "YodaSuperResolutionPipeline", "YodaPipelineOutput"]

_VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large"}
_DDPM_KEYS = frozenset(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}


@dataclass
class YodaSchedulerOutput(BaseOutput):
    """prev_sample: z_{t-1} [B, C, H, W]; pred_original_sample: the (clipped) x0 estimate."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class YodaScheduler(SchedulerMixin, ConfigMixin):
    """DDPM ancestral sampling with YODA's area mask (eq. 9, 11-14).

    Args (beyond ``DDPMScheduler``'s, which keep their meaning and defaults):
        lower_bound: eq. 9's l in (0, 1), used by :meth:`set_attention` unless it is given one.
        lr_branch: "forward" (Fig. 2: inactive pixels hold x_bar forward-diffused to the next
            level) or "literal" (eq. 13 as written).
        masked_input: the model is meant to see ``M(t) * z_t`` (eq. 11 literally); the pipeline
            reads this and masks the model input.

    Not supported (a ValueError says so): dynamic ``thresholding`` (the step clips x0 to
    ``[-clip_sample_range, clip_sample_range]`` or not at all), the ``learned`` /
    ``learned_range`` / ``fixed_large_log`` variances, and ``rescale_betas_zero_snr`` (its
    last level has no signal, so x0 cannot be recovered from eps).
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        lower_bound: float = 0.2,
        lr_branch: str = "forward",
        masked_input: bool = False,
    ):
        if thresholding:
            raise ValueError("thresholding: dynamic thresholding is not supported by YodaScheduler (x0 is clipped to "
                             "[-clip_sample_range, clip_sample_range] when clip_sample is set)")
        if variance_type not in _VARIANCES:
            raise ValueError(f"variance_type: YodaScheduler supports {sorted(_VARIANCES)}, got {variance_type!r}")
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"prediction_type: expected 'epsilon', 'sample' or 'v_prediction', got {prediction_type!r}")
        if rescale_betas_zero_snr:
            raise ValueError("rescale_betas_zero_snr: a zero-SNR last level is not supported by YodaScheduler")
        if lr_branch not in ops.LR_BRANCHES:
            raise ValueError(f"lr_branch: expected one of {ops.LR_BRANCHES}, got {lr_branch!r}")
        if not 0 < float(lower_bound) < 1:
            raise ValueError(f"lower_bound: expected a value in (0, 1), got {lower_bound!r}")
        # diffusers' own DDPM scheduler computes the betas and the timesteps of every spacing,
        # so both are DDPM's to the last bit
        self._ddpm = DDPMScheduler(**{k: v for k, v in self.config.items() if k in _DDPM_KEYS})
        self.betas = self._ddpm.betas
        self.alphas = self._ddpm.alphas
        self.alphas_cumprod = self._ddpm.alphas_cumprod
        self.init_noise_sigma = 1.0
        self.custom_timesteps = False
        self.num_inference_steps = None
        self.timesteps = self._ddpm.timesteps
        self._build_run()
        self._attention = None
        self._x_bar = None
        self._lower_bound = float(lower_bound)
        self._activation = None  # (size, device, tensor), computed once per image size

    # ------------------------------------------------------------------ timesteps
    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps: list[int] | None = None):
        """As ``DDPMScheduler.set_timesteps`` (spacing ``linspace`` / ``leading`` / ``trailing``,
        ``steps_offset``, or custom descending ``timesteps``)."""
        self._ddpm.set_timesteps(num_inference_steps=num_inference_steps, device=device, timesteps=timesteps)
        self.timesteps = self._ddpm.timesteps
        self.num_inference_steps = self._ddpm.num_inference_steps
        self.custom_timesteps = self._ddpm.custom_timesteps
        self._build_run()

    def _build_run(self) -> None:
        # DDPM steps t -> the next timestep of the list (the last one to "clean", alpha-bar 1):
        # a chain a NoiseSchedule holds exactly, with its steps at the training timesteps t + 1.
        asc = sorted(int(t) for t in self.timesteps.cpu().tolist())
        ac = self.alphas_cumprod.to(torch.float64)[asc]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        self._run = NoiseSchedule(1.0 - ac / prev, timesteps=torch.tensor(asc) + 1, train_steps=self.config.num_train_timesteps)
        self._position = {t: i + 1 for i, t in enumerate(asc)}

    def previous_timestep(self, timestep):
        return self._ddpm.previous_timestep(timestep)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ------------------------------------------------------------------ the YODA state
    def set_attention(self, attention: torch.Tensor, lower_bound: float | None = None, x_bar: torch.Tensor | None = None) -> None:
        """Hold an attention map ``[B, 1, h, w]`` in [0, 1] (resized bilinearly to the sample's
        size), eq. 9's lower bound (default: the config's) and the LR branch's mean ``x_bar``
        (the upsampled LR image in the model's space for a model that diffuses the HR image;
        None, meaning 0, for one that diffuses a residual)."""
        attention = check_attention(attention, name="attention")
        lb = self.config.lower_bound if lower_bound is None else float(lower_bound)
        if not 0 < lb < 1:
            raise ValueError(f"lower_bound: expected a value in (0, 1), got {lower_bound!r}")
        if x_bar is not None and (not isinstance(x_bar, torch.Tensor) or x_bar.dim() != 4 or x_bar.shape[0] != attention.shape[0]):
            got = tuple(x_bar.shape) if isinstance(x_bar, torch.Tensor) else type(x_bar).__name__
            raise ValueError(f"x_bar: expected [B={attention.shape[0]}, C, H, W] like the samples, got {got}")
        self._attention, self._lower_bound, self._x_bar, self._activation = attention, lb, x_bar, None

    def clear_attention(self) -> None:
        """Back to dense DDPM steps."""
        self._attention, self._x_bar, self._activation = None, None, None

    @property
    def has_attention(self) -> bool:
        return self._attention is not None

    def mask(self, timestep, sample: torch.Tensor) -> torch.Tensor:
        """Eq. 9's bool mask ``[B, 1, H, W]`` at diffusers timestep ``timestep`` for ``sample``'s
        batch and size (all True without attention)."""
        B, _, H, W = sample.shape
        if self._attention is None:
            return torch.ones((B, 1, H, W), dtype=torch.bool, device=sample.device)
        if self._activation is None or self._activation[0] != (H, W) or self._activation[1] != sample.device:
            act = activation_time(self._attention.to(sample.device), self.config.num_train_timesteps, self._lower_bound, size=(H, W))
            if act.shape[0] != B:
                raise ValueError(f"attention: one map per image expected ({B}), got {act.shape[0]}")
            self._activation = ((H, W), sample.device, act)
        return self._activation[2] >= int(timestep) + 1

    def _x_bar_for(self, sample: torch.Tensor):
        if self._attention is None or self._x_bar is None:
            return None
        if self._x_bar.shape != sample.shape:
            raise ValueError(f"x_bar: shape {tuple(self._x_bar.shape)} differs from the sample's {tuple(sample.shape)}")
        return self._x_bar.to(device=sample.device, dtype=sample.dtype)

    def initial_sample(self, noise: torch.Tensor) -> torch.Tensor:
        """The first state of a run from prior noise: the noise where the first timestep's mask
        is on, the LR branch (x_bar forward-diffused to that level) elsewhere. The noise itself
        without attention (or with an all-on first mask)."""
        if self._attention is None:
            return noise
        t0 = int(self.timesteps[0])
        level = torch.full((noise.shape[0],), self._run.coefficients(self._position[t0]).noise_level,
                           dtype=noise.dtype, device=noise.device)
        return torch.where(self.mask(t0, noise), noise, lr_branch_start(self._x_bar_for(noise), noise, level))

    # ------------------------------------------------------------------ one step
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One reverse step at diffusers timestep ``timestep``: eq. 11-14 with this timestep's mask.

        Noise is drawn as ``DDPMScheduler.step`` draws it (``randn_tensor`` of the model
        output's shape, only when ``timestep > 0``) and serves both areas.
        """
        t = int(timestep)
        if t not in self._position:
            raise ValueError(f"timestep: {t} is not one of this scheduler's timesteps (call set_timesteps first)")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output: expected the sample's shape {tuple(sample.shape)}, got {tuple(model_output.shape)}")
        k = self._position[t]
        c = self._run.coefficients(k)
        a, b = c.alphas_cumprod ** 0.5, (1.0 - c.alphas_cumprod) ** 0.5
        kind = self.config.prediction_type
        out_dtype = sample.dtype
        if kind != "epsilon":
            # the step works on eps; from x0 or v it is recovered as x0 = (z - b eps) / a, which
            # near zero SNR (a -> 0) amplifies float32 rounding by 1/a: do these in float64
            sample, model_output = sample.to(torch.float64), model_output.to(torch.float64)
        if kind == "epsilon":
            eps = model_output
        elif kind == "sample":
            eps = (sample - a * model_output) / b
        else:  # v_prediction
            eps = a * model_output + b * sample
        eps = eps.to(sample.dtype)
        if t > 0:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=out_dtype)
        else:
            noise = torch.zeros(model_output.shape, device=model_output.device, dtype=out_dtype)
        r = float(self.config.clip_sample_range)
        x_bar = self._x_bar_for(sample)
        mask = self.mask(t, sample)
        variance = _VARIANCES[self.config.variance_type]
        prev = ops.yoda_step(
            sample, eps, x_bar, mask, k, self._run, noise=noise.to(sample.dtype),
            lr_branch=self.config.lr_branch, clip_x0=bool(self.config.clip_sample), clip_range=(-r, r),
            variance=variance,
        )
        if k == 1 and t > 0 and variance == "fixed_large":
            # DDPM's last step adds noise when its timestep is above 0 (e.g. with steps_offset):
            # with "fixed_large" that noise has the step's beta (with "fixed_small" it is 0)
            prev = torch.where(mask, prev + c.beta ** 0.5 * noise.to(sample.dtype), prev)
        prev = prev.to(out_dtype)
        x0 = c.sqrt_recip_alphas_cumprod * sample - c.sqrt_recipm1_alphas_cumprod * eps
        if self.config.clip_sample:
            x0 = x0.clamp(-r, r)
        x0 = x0.to(out_dtype)
        if not return_dict:
            return (prev, x0)
        return YodaSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """Forward diffusion, exactly ``DDPMScheduler.add_noise``."""
        return self._ddpm.add_noise(original_samples, noise, timesteps)


@dataclass
class YodaPipelineOutput(BaseOutput):
    """images: PIL images, ``np.ndarray`` [B, H, W, 3] or a tensor [B, 3, H, W] in [0, 1];
    update_ratio: float64 [B], the mean fraction of pixels each step updated (1 when dense)."""

    images: list | np.ndarray | torch.Tensor
    update_ratio: torch.Tensor


class YodaSuperResolutionPipeline(DiffusionPipeline):
    """Super-resolution with a concatenation-conditioned ``UNet2DModel`` and a :class:`YodaScheduler`.

    ``pipe(image, attention=None, scale=4, num_inference_steps=100, generator=None)``: the LR
    image is upsampled (``upsample``: torch / PIL / MATLAB bicubic) to x_up; the UNet sees
    ``cat([z_t, x_up])``. With ``attention`` ([B, 1, h, w] in [0, 1]) the run is YODA's, the
    LR branch around x_up; without it the run is dense, exactly DDPM's.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: YodaScheduler):
        super().__init__()
        if not isinstance(scheduler, YodaScheduler):
            raise TypeError(f"scheduler: expected a YodaScheduler (YodaScheduler.from_config(other.config) converts "
                            f"a DDPM config), got {type(scheduler).__name__}")
        self.register_modules(unet=unet, scheduler=scheduler)

    @staticmethod
    def _to_tensor(image) -> torch.Tensor:
        import PIL.Image

        if isinstance(image, PIL.Image.Image):
            image = [image]
        if isinstance(image, (list, tuple)) and image and all(isinstance(i, PIL.Image.Image) for i in image):
            arrays = [np.asarray(i.convert("RGB"), dtype=np.float32) / 255.0 for i in image]
            if len({a.shape for a in arrays}) != 1:
                raise ValueError(f"image: the images differ in size {[a.shape[:2] for a in arrays]}")
            return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        if isinstance(image, torch.Tensor):
            if image.dim() != 4 or image.shape[1] != 3 or not image.is_floating_point():
                raise ValueError(f"image: expected a float tensor [B, 3, h, w] in [0, 1], got {image.dtype} {tuple(image.shape)}")
            return image
        raise TypeError(f"image: expected a PIL image, a list of them or a tensor [B, 3, h, w], got {type(image).__name__}")

    @torch.no_grad()
    def __call__(self, image, attention: torch.Tensor | None = None, *, lower_bound: float | None = None,
                 scale: int = 4, upsample_method: str = "torch_bicubic", num_inference_steps: int = 100,
                 generator: torch.Generator | None = None, output_type: str = "pil", return_dict: bool = True):
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type: expected 'pil', 'np' or 'pt', got {output_type!r}")
        if upsample_method not in UPSAMPLE_METHODS:
            raise ValueError(f"upsample_method: expected one of {UPSAMPLE_METHODS}, got {upsample_method!r}")
        in_ch = self.unet.config.in_channels
        if in_ch != 6 or self.unet.config.out_channels != 3:
            raise ValueError(f"unet: expected 6 input channels (z_t and x_up) and 3 output channels, got "
                             f"{in_ch} and {self.unet.config.out_channels}")
        dtype = self.unet.dtype
        lr = self._to_tensor(image).to(device=self.device, dtype=dtype)
        x_up = upsample(lr, scale, upsample_method) * 2 - 1
        B, _, H, W = x_up.shape
        sched = self.scheduler
        sched.set_timesteps(num_inference_steps, device=self.device)
        if attention is not None:
            sched.set_attention(attention.to(self.device), lower_bound=lower_bound, x_bar=x_up)
        else:
            sched.clear_attention()
        latents = randn_tensor((B, 3, H, W), generator=generator, device=self.device, dtype=dtype) * sched.init_noise_sigma
        latents = sched.initial_sample(latents)
        fractions = []
        for t in self.progress_bar(sched.timesteps):
            m = sched.mask(t, latents)
            fractions.append(m.flatten(1).to(torch.float64).mean(1).cpu())
            z = latents * m if (sched.config.masked_input and sched.has_attention) else latents
            model_input = sched.scale_model_input(torch.cat([z, x_up], dim=1), t)
            eps = self.unet(model_input, t).sample
            latents = sched.step(eps, t, latents, generator=generator).prev_sample
        images = ((latents + 1) / 2).clamp(0, 1)
        ratio = torch.stack(fractions).mean(0)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, ratio)
        return YodaPipelineOutput(images=images, update_ratio=ratio)
