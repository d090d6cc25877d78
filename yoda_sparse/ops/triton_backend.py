"""Triton backend of the YODA ops: ``torch.library.triton_op`` wrappers around the kernels in
``yoda_sparse.kernels`` plus their registry entries (priority 30: below the CUDA extension,
above the C++ CPU backend). Eager calls of the public ops launch the kernels directly (see
"eager fast path" below); torch.compile, fake tensors and torch.func go through the ops.

Operators (namespace ``yoda_sparse``):

* ``masked_l1_fwd_triton(pred, target, mask, normalize) -> (loss, denom)``, differentiable in
  pred and target through ``register_autograd`` (denom is not differentiable);
* ``masked_l1_bwd_triton(grad, pred, target, mask, denom, need_pred, need_target) ->
  (grad_pred, grad_target)``;
* ``yoda_step_triton(z, eps, x_bar, mask, noise, lr_noise, seed, offset, <7 coefficients>,
  clip_x0, clip_lo, clip_hi) -> out``.

Each has an explicit fake kernel (shapes/strides only) instead of the triton_op default of
tracing the launcher, because under TRITON_INTERPRET=1 the launchers call the raw interpreted
kernel (see ``yoda_sparse.kernels.launcher``), which cannot run on fake tensors; for the same
reason the ops stay opaque to torch.compile under the interpreter (on a GPU, inductor sees the
kernels as usual).

Where they run: CUDA tensors of float16/bfloat16/float32; or, when TRITON_INTERPRET=1 was
set before yoda_sparse was imported, CPU tensors of float16/float32 in Triton's interpreter
(how the tests run without a GPU). float64 goes to the other backends: the kernels
accumulate in float32.
"""
import os
from typing import Optional

import torch

from .registry import register_backend

try:
    import triton  # noqa: F401
    from torch.library import triton_op, wrap_triton  # noqa: F401  (torch >= 2.6)

    from yoda_sparse.kernels import output_like
    from yoda_sparse.kernels import masked_l1 as _masked_l1_module
    from yoda_sparse.kernels import yoda_step as _yoda_step_module
    from yoda_sparse.kernels.masked_l1 import masked_l1_backward, masked_l1_forward
    from yoda_sparse.kernels.yoda_step import yoda_step as yoda_step_kernel

    _IMPORT_ERROR = None
except Exception as exc:  # no triton, or a torch without triton_op: the backend reports why
    _IMPORT_ERROR = f"triton backend unavailable: {type(exc).__name__}: {exc}"

_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRETER_DTYPES = (torch.float16, torch.float32)
_TRUE = ("1", "true", "yes", "on")


def interpret_requested() -> bool:
    """TRITON_INTERPRET is set to a true value (kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def _available() -> Optional[str]:
    return _IMPORT_ERROR


def _where_unsupported(x: torch.Tensor, mask: torch.Tensor, kernels_interpreted: bool) -> Optional[str]:
    """None when the kernels can run on tensors like ``x`` (and ``mask``), else why not."""
    if x.dtype == torch.float64:
        return "float64 is left to the other backends (the kernels accumulate in float32)"
    if x.device.type == "cuda":
        if x.dtype not in _CUDA_DTYPES:
            return f"needs float16/bfloat16/float32 tensors, got {x.dtype}"
        return None
    if not interpret_requested():
        return (
            f"needs CUDA tensors, got {x.device.type} (set TRITON_INTERPRET=1 before importing "
            "yoda_sparse to run the kernels on CPU in Triton's interpreter)"
        )
    if x.device.type != "cpu":
        return f"the Triton interpreter runs on CPU or CUDA tensors, got {x.device.type}"
    if not kernels_interpreted:
        return "TRITON_INTERPRET=1 was set after yoda_sparse.kernels was imported; set it before importing yoda_sparse"
    if x.dtype not in _INTERPRETER_DTYPES:
        return f"the Triton interpreter supports float16/float32 here, got {x.dtype} (its bfloat16 arithmetic is wrong)"
    if mask.is_floating_point() and mask.dtype not in _INTERPRETER_DTYPES + (torch.float64,):
        return f"the Triton interpreter supports float16/float32/float64 masks here, got {mask.dtype}"
    return None


# ---------------------------------------------------------------------------- torch.library ops
if _IMPORT_ERROR is None:

    @triton_op("yoda_sparse::masked_l1_fwd_triton", mutates_args=())
    def masked_l1_fwd_triton(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, normalize: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 10 forward: (loss in pred's dtype, float32 denominator), both 0-d."""
        return masked_l1_forward(pred, target, mask, normalize)

    @masked_l1_fwd_triton.register_fake
    def _masked_l1_fwd_fake(pred, target, mask, normalize):
        return pred.new_empty(()), pred.new_empty((), dtype=torch.float32)

    @triton_op("yoda_sparse::masked_l1_bwd_triton", mutates_args=())
    def masked_l1_bwd_triton(
        grad: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, denom: torch.Tensor,
        need_pred: bool, need_target: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(grad_pred, grad_target); one not needed comes back as an empty [0] tensor."""
        return masked_l1_backward(grad, pred, target, mask, denom, need_pred, need_target)

    @masked_l1_bwd_triton.register_fake
    def _masked_l1_bwd_fake(grad, pred, target, mask, denom, need_pred, need_target):
        return (
            output_like(pred) if need_pred else pred.new_empty(0),
            output_like(pred) if need_target else pred.new_empty(0),
        )

    def _masked_l1_setup_context(ctx, inputs, output):
        pred, target, mask, _ = inputs
        _, denom = output
        ctx.save_for_backward(pred, target, mask, denom)
        ctx.mark_non_differentiable(denom)

    def _masked_l1_backward(ctx, grad_loss, _grad_denom):
        pred, target, mask, denom = ctx.saved_tensors
        need_pred, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_pred, grad_target = torch.ops.yoda_sparse.masked_l1_bwd_triton(
            grad_loss, pred, target, mask, denom, need_pred, need_target
        )
        return (grad_pred if need_pred else None), (grad_target if need_target else None), None, None

    masked_l1_fwd_triton.register_autograd(_masked_l1_backward, setup_context=_masked_l1_setup_context)

    @triton_op("yoda_sparse::yoda_step_triton", mutates_args=())
    def yoda_step_triton(
        z: torch.Tensor, eps: torch.Tensor, x_bar: Optional[torch.Tensor], mask: torch.Tensor,
        noise: Optional[torch.Tensor], lr_noise: Optional[torch.Tensor], seed: Optional[int], offset: int,
        sqrt_recip_ac: float, sqrt_recipm1_ac: float, coef1: float, coef2: float, sigma: float,
        lr_scale: float, lr_sigma: float, clip_x0: bool, clip_lo: float, clip_hi: float,
    ) -> torch.Tensor:
        """Eq. 11-14, one fused masked reverse step (see yoda_sparse.kernels.yoda_step)."""
        coeffs = dict(
            sqrt_recip_ac=sqrt_recip_ac, sqrt_recipm1_ac=sqrt_recipm1_ac, coef1=coef1, coef2=coef2,
            sigma=sigma, lr_scale=lr_scale, lr_sigma=lr_sigma,
        )
        return yoda_step_kernel(z, eps, x_bar, mask, noise, lr_noise, seed, offset, coeffs, clip_x0, clip_lo, clip_hi)

    @yoda_step_triton.register_fake
    def _yoda_step_fake(z, eps, x_bar, mask, noise, lr_noise, seed, offset, *scalars):
        return output_like(z)

    if _masked_l1_module.interpreted() or _yoda_step_module.interpreted():
        # Interpreted kernels can't be traced into a graph (wrap_triton returns them raw and
        # they would run on fake tensors), so under TRITON_INTERPRET=1 torch.compile/AOT
        # autograd keep these ops opaque, as for a custom_op: fake kernel at trace time,
        # the interpreted kernel at run time. Compiled kernels keep triton_op's decomposition.
        from torch._subclasses.functional_tensor import FunctionalTensorMode

        def _opaque_under_functionalization(mode, op, types, args, kwargs):
            return mode.__torch_dispatch__(op, types, args, kwargs)

        for _op in (masked_l1_fwd_triton, masked_l1_bwd_triton, yoda_step_triton):
            _op.register_torch_dispatch(FunctionalTensorMode, _opaque_under_functionalization)


# ---------------------------------------------------------------------------- registry backends
# Whether each kernel module was created interpreted is fixed at import: decided here once,
# so dispatch inside torch.compile never walks Triton's kernel objects.
_L1_INTERPRETED = _IMPORT_ERROR is None and _masked_l1_module.interpreted()
_STEP_INTERPRETED = _IMPORT_ERROR is None and _yoda_step_module.interpreted()


def _masked_l1_unsupported(pred, target, mask, normalize):
    return _where_unsupported(pred, mask, _L1_INTERPRETED)


# ---------------------------------------------------------------------------- eager fast path
# Outside torch.compile, the public ops call the kernel launchers directly instead of going
# through the triton_op: torch.library's layers (its Python autograd, the redispatch, the
# custom-op wrapper's alias check, the dynamo-disabled backend function) cost more host time per
# call than the launches themselves (benchmarks/profile_host_path.py). Same launchers, same bits.
# The triton_ops stay the path under torch.compile and wherever a tensor subclass, a dispatch
# mode (fake or functional tensors) or a torch.func transform is in play, which they handle.
#
# The launches run with wrap_triton disabled, as triton_op's own eager path does: enabled, a
# wrapped kernel goes through the triton_kernel_wrapper higher-order op (pytree flattening,
# signature inspection), which made the first version of this path twice as slow as the op
# path on an H200. The flag is thread-local, so the backward sets it again on autograd's thread.
try:
    from torch._library.triton import set_wrap_triton_enabled as _set_wrap_triton_enabled
except ImportError:  # a torch without it: always the op path
    _set_wrap_triton_enabled = None


def _runs_eagerly(*tensors) -> bool:
    if torch.compiler.is_compiling():  # first: dynamo folds it to True and stops here
        return False
    if _set_wrap_triton_enabled is None:
        return False
    if torch._C._len_torch_dispatch_stack() > 0 or torch._C._are_functorch_transforms_active():
        return False
    return all(t is None or type(t) is torch.Tensor for t in tensors)


if _IMPORT_ERROR is None:

    class _MaskedL1Eager(torch.autograd.Function):
        """Eq. 10 with the Triton launchers as forward and backward (the fast path's autograd)."""

        @staticmethod
        def forward(ctx, pred, target, mask, normalize):
            with _set_wrap_triton_enabled(False):
                loss, denom = masked_l1_forward(pred, target, mask, normalize)
            ctx.save_for_backward(pred, target, mask, denom)
            return loss

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_loss):
            pred, target, mask, denom = ctx.saved_tensors
            need_pred, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            with _set_wrap_triton_enabled(False):
                grad_pred, grad_target = masked_l1_backward(grad_loss, pred, target, mask, denom, need_pred, need_target)
            return (grad_pred if need_pred else None), (grad_target if need_target else None), None, None


def _masked_l1_loss(pred, target, mask, normalize):
    if _runs_eagerly(pred, target, mask):
        if torch.is_grad_enabled() and (pred.requires_grad or target.requires_grad):
            return _MaskedL1Eager.apply(pred, target, mask, normalize)
        with _set_wrap_triton_enabled(False):
            return masked_l1_forward(pred, target, mask, normalize)[0]
    return torch.ops.yoda_sparse.masked_l1_fwd_triton(pred, target, mask, normalize)[0]


def _yoda_step_unsupported(z_t, eps_pred, x_bar, mask, noise, lr_noise, seed, offset, coeffs, clip_x0, clip_range):
    reason = _where_unsupported(z_t, mask, _STEP_INTERPRETED)
    if reason is None and noise is None and offset + z_t.numel() > 2**63 - 1:
        return f"offset + numel must stay below 2**63 for in-kernel noise, got offset={offset}"
    return reason


def _yoda_step(z_t, eps_pred, x_bar, mask, noise, lr_noise, seed, offset, coeffs, clip_x0, clip_range):
    lo, hi = clip_range
    if _runs_eagerly(z_t, eps_pred, x_bar, mask, noise, lr_noise) and not (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (z_t, eps_pred, x_bar, noise, lr_noise))
    ):  # the step has no gradient: a graph-recording call keeps the op's error for that
        with _set_wrap_triton_enabled(False):
            return yoda_step_kernel(z_t, eps_pred, x_bar, mask, noise, lr_noise, seed, offset, coeffs, bool(clip_x0), float(lo), float(hi))
    return torch.ops.yoda_sparse.yoda_step_triton(
        z_t, eps_pred, x_bar, mask, noise, lr_noise, seed, offset,
        float(coeffs["sqrt_recip_ac"]), float(coeffs["sqrt_recipm1_ac"]), float(coeffs["coef1"]),
        float(coeffs["coef2"]), float(coeffs["sigma"]), float(coeffs["lr_scale"]), float(coeffs["lr_sigma"]),
        bool(clip_x0), float(lo), float(hi),
    )


def _interpreter_forced_only(x: torch.Tensor, *_args, **_kwargs) -> Optional[str]:
    # Triton's interpreter is a testing tool, orders of magnitude slower than the C++ kernels:
    # CPU tensors reach it only when this backend is forced.
    if x.device.type != "cuda":
        return "CPU tensors run in Triton's interpreter only when forced (backend='triton' or YODA_SPARSE_BACKEND)"
    return None


# cacheable: the loss checks look at the signature's device and dtypes, TRITON_INTERPRET and
# whether the kernels were created interpreted (fixed at import)
register_backend("masked_l1_loss", "triton", _masked_l1_loss, priority=30, unsupported=_masked_l1_unsupported,
                 available=_available, forced_only=_interpreter_forced_only, cacheable=True,
                 env=("TRITON_INTERPRET",))
register_backend("yoda_step", "triton", _yoda_step, priority=30, unsupported=_yoda_step_unsupported,
                 available=_available, forced_only=_interpreter_forced_only, cacheable=True,
                 env=("TRITON_INTERPRET",))
