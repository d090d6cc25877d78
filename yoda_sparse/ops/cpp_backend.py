"""The C++ (CPU) and CUDA extension backends of the public ops.

Ops (schemas in ``csrc/bindings.cpp``):

* ``yoda_sparse::ext_masked_l1_loss(pred, target, mask, int normalize) -> loss``, what the
  backends call: normalize 0 = "all", 1 = "active", 2 = "sum".  Differentiable in pred and
  target with its autograd in C++ (``csrc/yoda_autograd.cpp``): the forward runs
  ``ext_masked_l1_fwd``, the backward ``ext_masked_l1_bwd``, with no Python autograd Function
  in between (that one cost tens of microseconds per call, most of the time at small images).
  Double backward works: the gradient is linear in the incoming grad and constant (zero
  derivative) in pred and target.
* ``yoda_sparse::ext_masked_l1_fwd(pred, target, mask, int normalize) -> (loss, denom)`` and
  ``ext_masked_l1_bwd(grad, pred, target, mask, denom) -> grad_pred`` (one pass over pred,
  target, mask); grad_target = -grad_pred is formed only when target requires grad.
  ``ext_masked_l1_fwd`` is also differentiable on its own (a Python formula, registered below).
* ``yoda_sparse::ext_masked_l1_fwd_grad(pred, target, mask, int normalize) -> (loss, denom,
  grad_pred)``, CPU only, normalize "all" or "sum": the forward that also writes grad_pred for
  an incoming grad of 1 in the same pass.  ``ext_masked_l1_loss``'s autograd uses it on plain
  CPU tensors; ``loss.backward()`` then costs no second pass over memory.
* ``yoda_sparse::ext_yoda_step(z, eps, x_bar?, mask, noise?, lr_noise?, SymInt seed,
  SymInt offset, Tensor params, bool clip_x0) -> z_prev`` with ``params`` a float64 CPU tensor
  of the step's scalars (:data:`PARAM_ORDER`; a tensor rather than ``float[]`` because under
  torch.compile they are traced SymFloats).  With noise None the kernel draws Philox normals
  from (seed, offset + element index), see ``csrc/philox.h``: float32 normals for every dtype,
  bit-identical between the CPU and the CUDA kernels.

Registered backends: ``"cpp"`` (priority 20) for CPU tensors, ``"cuda_ext"`` (priority 40) for
CUDA tensors, both for float32/float16/bfloat16/float64.  Any strides are read in place (no
``.contiguous()`` copies; views with unit innermost stride take the vectorised path, others
are correct but slower); outputs are channels_last when the first image input is, else
NCHW-contiguous.  The extension is loaded (or built just in time) on first use, see
:mod:`yoda_sparse.ops.extension`; the fake kernels and the Python autograd formula of
``ext_masked_l1_fwd`` are registered right after it loads.
"""
from __future__ import annotations

import threading

import torch

from . import extension
from .registry import register_backend

NORMALIZE_CODES = {"all": 0, "active": 1, "sum": 2}
# order of ext_yoda_step's params tensor: the coefficient dict's keys, then the clip range
COEFF_ORDER = ("sqrt_recip_ac", "sqrt_recipm1_ac", "coef1", "coef2", "sigma", "lr_scale", "lr_sigma")
PARAM_ORDER = COEFF_ORDER + ("clip_lo", "clip_hi")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MAX_DIM = 2**31 - 1

_lock = threading.Lock()
_python_side: list = []


def _output_format(t: torch.Tensor) -> torch.memory_format:
    """The kernels' output layout rule (csrc/yoda_ops.h: output_format)."""
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register_python_side() -> None:
    """Fake kernels and autograd of the C++ ops (needs the library loaded: call once after)."""
    if _python_side:
        return
    with _lock:
        if _python_side:
            return

        @torch.library.register_fake("yoda_sparse::ext_masked_l1_loss")
        def _l1_loss_fake(pred, target, mask, normalize):
            return pred.new_empty(())

        @torch.library.register_fake("yoda_sparse::ext_masked_l1_fwd")
        def _l1_fwd_fake(pred, target, mask, normalize):
            return pred.new_empty(()), pred.new_empty((), dtype=_acc_dtype(pred.dtype))

        @torch.library.register_fake("yoda_sparse::ext_masked_l1_bwd")
        def _l1_bwd_fake(grad, pred, target, mask, denom):
            return torch.empty(pred.shape, dtype=pred.dtype, device=pred.device, memory_format=_output_format(pred))

        @torch.library.register_fake("yoda_sparse::ext_masked_l1_fwd_grad")
        def _l1_fwd_grad_fake(pred, target, mask, normalize):
            grad = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device, memory_format=_output_format(pred))
            return pred.new_empty(()), pred.new_empty((), dtype=_acc_dtype(pred.dtype)), grad

        @torch.library.register_fake("yoda_sparse::ext_yoda_step")
        def _step_fake(z, eps, x_bar, mask, noise, lr_noise, seed, offset, params, clip_x0):
            return torch.empty(z.shape, dtype=z.dtype, device=z.device, memory_format=_output_format(z))

        @torch.library.register_fake("yoda_sparse::ext_sparse_conv2d")
        def _sparse_conv_fake(x, x2, weight, bias, tiles, count, out, tile, stride, padding, padding_mode,
                              upsample, transposed, norm_mean, norm_rstd, norm_weight, norm_bias, act, out_act,
                              add, residual, accumulate):
            return None

        @torch.library.register_fake("yoda_sparse::ext_group_stats")
        def _group_stats_fake(x, x2, groups, eps, weight=None):
            acc = _acc_dtype(x.dtype)
            return x.new_empty((x.shape[0], groups), dtype=acc), x.new_empty((x.shape[0], groups), dtype=acc)

        def _l1_setup(ctx, inputs, output):
            pred, target, mask, _normalize = inputs
            _loss, denom = output
            ctx.save_for_backward(pred, target, mask, denom)
            ctx.mark_non_differentiable(denom)

        def _l1_backward(ctx, grad_loss, _grad_denom):
            pred, target, mask, denom = ctx.saved_tensors
            grad_pred = torch.ops.yoda_sparse.ext_masked_l1_bwd(grad_loss, pred, target, mask, denom)
            grad_target = -grad_pred if ctx.needs_input_grad[1] else None
            return grad_pred if ctx.needs_input_grad[0] else None, grad_target, None, None

        torch.library.register_autograd("yoda_sparse::ext_masked_l1_fwd", _l1_backward, setup_context=_l1_setup)
        _python_side.append(True)


def ensure_loaded() -> str | None:
    """Load the extension and its Python side: None when ready, else the reason."""
    reason = extension.load()
    if reason is None:
        _register_python_side()
    return reason


def _available_cpu() -> str | None:
    return ensure_loaded()


def _available_cuda() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    reason = ensure_loaded()
    if reason is not None:
        return reason
    if not extension.has_kernel("ext_yoda_step", "CUDA"):
        return f"the loaded extension ({extension.mode()}) has no CUDA kernels (built without nvcc)"
    return None


def _check_image(x: torch.Tensor, device_type: str, name: str) -> str | None:
    if x.device.type != device_type:
        return f"{name} is on {x.device.type}, this backend runs on {device_type}"
    if x.dtype not in DTYPES:
        return f"{name} dtype {x.dtype} is not one of float32, float16, bfloat16, float64"
    if max(x.shape) > _MAX_DIM:
        return f"{name} has a dimension over 2**31 - 1: {tuple(x.shape)}"
    return None


def _unsupported_loss(device_type: str):
    def check(pred, target, mask, normalize):
        reason = _check_image(pred, device_type, "pred")
        if reason is None and mask.dtype != torch.bool and mask.dtype not in DTYPES:
            reason = f"mask dtype {mask.dtype} is not bool or one of float32, float16, bfloat16, float64"
        if reason is None and normalize not in NORMALIZE_CODES:
            reason = f"normalize {normalize!r} is not one of {tuple(NORMALIZE_CODES)}"
        return reason

    return check


def _unsupported_step(device_type: str):
    def check(z_t, eps_pred, x_bar, mask, noise, lr_noise, seed, offset, coeffs, clip_x0, clip_range):
        reason = _check_image(z_t, device_type, "z_t")
        if reason is None and mask.dtype != torch.bool and mask.dtype not in DTYPES:
            reason = f"mask dtype {mask.dtype} is not bool or floating"
        if reason is None and noise is None and seed is None:
            reason = "needs either noise tensors or a seed"
        return reason

    return check


def masked_l1_loss(pred, target, mask, normalize):
    """Backend fn of ``masked_l1_loss`` (validated args): a 0-d tensor of pred's dtype.

    ``ext_masked_l1_loss`` has its autograd in C++ (csrc/yoda_autograd.cpp): forward and
    backward each run one kernel, without a Python autograd Function in between."""
    return torch.ops.yoda_sparse.ext_masked_l1_loss.default(pred, target, mask, NORMALIZE_CODES[normalize])


_PARAMS_CACHE: dict[tuple, torch.Tensor] = {}
_PARAMS_CACHE_LIMIT = 4096  # a sampler uses one entry per step; reset rather than grow


def _step_params(coeffs: dict, clip_range) -> torch.Tensor:
    """The float64 CPU params tensor of ``ext_yoda_step`` (read-only for the kernels). A run
    repeats the same steps, so the tensors are cached by value (building one costs a few
    microseconds, as much as a small step's kernel); not while torch.compile traces, where the
    scalars may be symbolic."""
    values = tuple(coeffs[k] for k in COEFF_ORDER) + tuple(clip_range)
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=torch.float64)
    params = _PARAMS_CACHE.get(values)
    if params is None:
        if len(_PARAMS_CACHE) >= _PARAMS_CACHE_LIMIT:
            _PARAMS_CACHE.clear()
        params = _PARAMS_CACHE[values] = torch.tensor(values, dtype=torch.float64)
    return params


def yoda_step(z_t, eps_pred, x_bar, mask, noise, lr_noise, seed, offset, coeffs, clip_x0, clip_range):
    """Backend fn of ``yoda_step`` (validated args): z_{t-1} like z_t."""
    params = _step_params(coeffs, clip_range)
    return torch.ops.yoda_sparse.ext_yoda_step(
        z_t, eps_pred, x_bar, mask, noise, lr_noise, 0 if seed is None else seed, offset, params, bool(clip_x0)
    )


PADDING_CODES = {"zeros": 0, "reflect": 1}
ACT_CODES = {None: 0, "silu": 1, "mish": 2}
SPARSE_CONV_CPU_DTYPES = (torch.float32, torch.float64)


def _unsupported_sparse_conv_cpu(x, x2, weight, bias, tiles, count, out, tile, stride, padding, padding_mode,
                                 upsample, transposed, norm, act, out_act, add, residual):
    if x.device.type != "cpu":
        return f"x is on {x.device.type}, this backend runs on cpu"
    if x.dtype not in SPARSE_CONV_CPU_DTYPES:
        return f"the CPU kernel takes float32 or float64, got {x.dtype}"
    return None


def _unsupported_sparse_conv_cuda(x, x2, weight, bias, tiles, count, out, tile, stride, padding, padding_mode,
                                  upsample, transposed, norm, act, out_act, add, residual):
    if x.device.type != "cuda":
        return f"x is on {x.device.type}, this backend runs on cuda"
    if x.dtype not in DTYPES:
        return f"needs float32/float16/bfloat16/float64, got {x.dtype}"
    if not extension.has_kernel("ext_sparse_conv2d", "CUDA"):
        return f"the loaded extension ({extension.mode()}) has no CUDA sparse convolution"
    return None


def sparse_conv2d(x, x2, weight, bias, tiles, count, out, tile, stride, padding, padding_mode, upsample,
                  transposed, norm, act, out_act, add, residual):
    """Backend fn of ``sparse_conv2d`` (validated args): writes ``out`` in place."""
    # a residual that is out itself becomes the kernel's accumulate flag (no aliased inputs)
    accumulate = residual is not None and residual.data_ptr() == out.data_ptr() and residual.stride() == out.stride()
    torch.ops.yoda_sparse.ext_sparse_conv2d(
        x, x2, weight, bias, tiles, count, out, list(tile), stride, padding, PADDING_CODES[padding_mode], upsample,
        transposed, *(norm if norm is not None else (None, None, None, None)), ACT_CODES[act], ACT_CODES[out_act],
        add, None if accumulate else residual, accumulate)
    return out


register_backend("sparse_conv2d", "cpp", sparse_conv2d, priority=20, unsupported=_unsupported_sparse_conv_cpu,
                 available=_available_cpu, cacheable=True)
# below Triton (30): this one synchronises the host once per call to plan its strips, where the
# Triton kernel reads the tile count on the device (CUDA graphs); which is faster is measured by
# benchmarks/bench_sparse_conv.py on a GPU
register_backend("sparse_conv2d", "cuda_ext", sparse_conv2d, priority=25, unsupported=_unsupported_sparse_conv_cuda,
                 available=_available_cuda, cacheable=True)
# cacheable: the loss checks look only at what ops._masked_l1_signature holds
register_backend("masked_l1_loss", "cpp", masked_l1_loss, priority=20,
                 unsupported=_unsupported_loss("cpu"), available=_available_cpu, cacheable=True)
register_backend("masked_l1_loss", "cuda_ext", masked_l1_loss, priority=40,
                 unsupported=_unsupported_loss("cuda"), available=_available_cuda, cacheable=True)
# cacheable: the step checks look only at what ops._yoda_step_signature holds
register_backend("yoda_step", "cpp", yoda_step, priority=20,
                 unsupported=_unsupported_step("cpu"), available=_available_cpu, cacheable=True)
register_backend("yoda_step", "cuda_ext", yoda_step, priority=40,
                 unsupported=_unsupported_step("cuda"), available=_available_cuda, cacheable=True)
