"""Triton backend of ``sparse_conv2d``: the implicit-GEMM kernel of
``yoda_sparse.kernels.sparse_conv`` behind a ``torch.library.triton_op``
(``yoda_sparse::sparse_conv2d_triton``, mutating ``out``), registered at priority 30 (between
the CUDA extension and the C++ CPU backend).

Serves CUDA tensors of float16/bfloat16/float32, and CPU tensors of float16/float32 in
Triton's interpreter when forced (TRITON_INTERPRET=1 set before importing). Transposed
convolutions are left to the other backends. The tile list's count is read on the device, so
calls never synchronise the host.
"""
from __future__ import annotations

from typing import Optional

import torch

from .registry import register_backend
from .triton_backend import _IMPORT_ERROR, _interpreter_forced_only, _runs_eagerly, interpret_requested

try:
    from yoda_sparse.kernels import sparse_conv as _kernel_module

    _KERNEL_ERROR = _IMPORT_ERROR
except Exception as exc:  # no triton: the backend says why
    _kernel_module = None
    _KERNEL_ERROR = f"triton backend unavailable: {type(exc).__name__}: {exc}"

_INTERPRETED = _KERNEL_ERROR is None and _kernel_module.interpreted()
_ACT_NAMES = {0: None, 1: "silu", 2: "mish"}
_ACT_CODES = {None: 0, "silu": 1, "mish": 2}

if _KERNEL_ERROR is None:
    from torch.library import triton_op

    @triton_op("yoda_sparse::sparse_conv2d_triton", mutates_args={"out"})
    def sparse_conv2d_triton(
        x: torch.Tensor, x2: Optional[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
        tiles: torch.Tensor, count: torch.Tensor, out: torch.Tensor, th: int, tw: int, stride: int, padding: int,
        reflect: bool, upsample: int, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], act: int,
        out_act: int, add: Optional[torch.Tensor], residual: Optional[torch.Tensor],
    ) -> None:
        """out[listed tiles] = conv of the prologue'd input, epilogue applied (see the kernel)."""
        _kernel_module.sparse_conv2d(x, x2, weight, bias, tiles, count, out, (th, tw), stride, padding, reflect,
                                     upsample, scale, shift, _ACT_NAMES[act], _ACT_NAMES[out_act], add, residual)

    if _INTERPRETED:
        # keep the op opaque to functionalization under the interpreter (see triton_backend)
        from torch._subclasses.functional_tensor import FunctionalTensorMode

        def _opaque(mode, op, types, args, kwargs):
            return mode.__torch_dispatch__(op, types, args, kwargs)

        sparse_conv2d_triton.register_torch_dispatch(FunctionalTensorMode, _opaque)


def _norm_scale_shift(norm, B: int, C: int, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Group-norm apply folded into float32 [B, C] scale and shift."""
    if norm is None:
        return None, None
    G = norm.mean.shape[1]
    rstd = norm.rstd.to(torch.float32).repeat_interleave(C // G, dim=1)
    mean = norm.mean.to(torch.float32).repeat_interleave(C // G, dim=1)
    w = norm.weight.to(torch.float32) if norm.weight is not None else torch.ones(C, device=device)
    b = norm.bias.to(torch.float32) if norm.bias is not None else torch.zeros(C, device=device)
    scale = (rstd * w).contiguous()
    shift = (b - mean * scale).contiguous()
    return scale, shift


def _unsupported(x, x2, weight, bias, tiles, count, out, tile, stride, padding, padding_mode, upsample,
                 transposed, norm, act, out_act, add, residual) -> Optional[str]:
    if _KERNEL_ERROR is not None:
        return _KERNEL_ERROR
    if transposed:
        return "transposed convolutions are left to the other backends"
    if x.device.type == "cuda":
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"needs float16/bfloat16/float32 tensors, got {x.dtype}"
        return None
    if not interpret_requested():
        return (f"needs CUDA tensors, got {x.device.type} (set TRITON_INTERPRET=1 before importing yoda_sparse "
                "to run the kernel on CPU in Triton's interpreter)")
    if not _INTERPRETED:
        return "TRITON_INTERPRET=1 was set after yoda_sparse.kernels was imported; set it before importing yoda_sparse"
    if x.dtype not in (torch.float16, torch.float32):
        return f"the Triton interpreter supports float16/float32 here, got {x.dtype}"
    return None


def _sparse_conv2d(x, x2, weight, bias, tiles, count, out, tile, stride, padding, padding_mode, upsample,
                   transposed, norm, act, out_act, add, residual):
    B = x.shape[0]
    cin = x.shape[1] + (0 if x2 is None else x2.shape[1])
    scale, shift = _norm_scale_shift(norm, B, cin, x.device)
    if count is None:
        count = torch.full((1,), tiles.shape[0], dtype=torch.int32, device=x.device)
    reflect = padding_mode == "reflect"
    if _runs_eagerly(x, x2, weight, bias, tiles, count, out, add, residual):
        from torch._library.triton import set_wrap_triton_enabled

        with set_wrap_triton_enabled(False):
            _kernel_module.sparse_conv2d(x, x2, weight, bias, tiles, count, out, tuple(tile), stride, padding, reflect,
                                         upsample, scale, shift, act, out_act, add, residual)
        return out
    torch.ops.yoda_sparse.sparse_conv2d_triton(x, x2, weight, bias, tiles, count, out, tile[0], tile[1], stride,
                                               padding, reflect, upsample, scale, shift, _ACT_CODES[act],
                                               _ACT_CODES[out_act], add, residual)
    return out


register_backend("sparse_conv2d", "triton", _sparse_conv2d, priority=30, unsupported=_unsupported,
                 available=lambda: _KERNEL_ERROR, forced_only=_interpreter_forced_only, cacheable=True,
                 env=("TRITON_INTERPRET",))
