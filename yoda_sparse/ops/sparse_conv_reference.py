"""Pure-PyTorch reference of the tile-sparse convolution: the truth its backends are tested
against, and the gather -> conv -> scatter peer of the benchmarks (SIGE's scheme).

For every listed output tile the halo'd input window is gathered into a batch, the batch is
convolved with ``F.conv2d`` (``F.conv_transpose2d`` for transposed convolutions) without
padding, and the valid part of each result is written back into ``out``; nothing else of
``out`` is touched. The prologue (group-norm apply, activation) is applied to the whole input
first, which is what the model computes (a convolution pads its already-activated input).

Arguments arrive validated (see ``yoda_sparse.ops.sparse_conv``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "mish")
PADDING_MODES = ("zeros", "reflect")


def activation(x: torch.Tensor, name: str | None) -> torch.Tensor:
    if name is None:
        return x
    if name == "silu":
        return F.silu(x)
    if name == "mish":
        return F.mish(x)
    raise ValueError(f"activation: expected one of {ACTIVATIONS} or None, got {name!r}")


def group_norm_apply(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight, bias) -> torch.Tensor:
    """``(x - mean[b, g]) * rstd[b, g] * weight[c] + bias[c]`` with groups of C // G consecutive
    channels; mean/rstd [B, G] are given (computed over whatever map the caller chose)."""
    B, C = x.shape[:2]
    G = mean.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = x.to(acc).reshape(B, G, C // G, *x.shape[2:])
    y = (xs - mean.to(acc).view(B, G, 1, 1, 1)) * rstd.to(acc).view(B, G, 1, 1, 1)
    y = y.reshape(x.shape)
    if weight is not None:
        y = y * weight.to(acc).view(1, C, 1, 1)
    if bias is not None:
        y = y + bias.to(acc).view(1, C, 1, 1)
    return y.to(x.dtype)


def prologue(x, x2, norm, act) -> torch.Tensor:
    """The convolution's input: ``act(norm(cat(x, x2)))``."""
    inp = x if x2 is None else torch.cat([x, x2], dim=1)
    if norm is not None:
        inp = group_norm_apply(inp, norm.mean, norm.rstd, norm.weight, norm.bias)
    return activation(inp, act)


def epilogue(y: torch.Tensor, b_idx: torch.Tensor, out_act, add, residual_vals) -> torch.Tensor:
    """conv + bias (already in y) -> out_act -> + add[b, c] -> + residual."""
    y = activation(y, out_act)
    if add is not None:
        y = y + add[b_idx].to(y.dtype).view(y.shape[0], -1, 1, 1)
    if residual_vals is not None:
        y = y + residual_vals
    return y


def _pad(x: torch.Tensor, pads, mode: str) -> torch.Tensor:
    """F.pad with (left, right, top, bottom); negative pads crop. Reflect pads are limited to
    size - 1 by F.pad, so only the first `padding` ring is reflected and the rest (which only
    feeds outputs beyond the image, cropped later) is zeros."""
    return F.pad(x, pads, mode="reflect" if mode == "reflect" else "constant")


def sparse_conv2d(x, x2, weight, bias, tiles: torch.Tensor, count, out, tile, stride, padding,
                  padding_mode, upsample, transposed, norm, act, out_act, add, residual) -> torch.Tensor:
    """Gather -> conv -> scatter over the listed tiles (see the module docstring)."""
    th, tw = tile
    n = tiles.shape[0] if count is None else int(count.reshape(-1)[0])
    idx = tiles[:n].to(device="cpu", dtype=torch.int64)
    if n == 0:
        return out
    B, Cout, Ho, Wo = out.shape
    inp = prologue(x, x2, norm, act)
    if upsample > 1:
        inp = F.interpolate(inp, scale_factor=upsample, mode="nearest")
    Hi, Wi = inp.shape[-2:]
    k_h, k_w = weight.shape[-2:]
    s = stride
    if not transposed:
        # windows: output rows [r0, r0 + th) read input rows [r0*s - p, (r0 + th - 1)*s - p + k)
        win_h, win_w = (th - 1) * s + k_h, (tw - 1) * s + k_w
        # pad by `padding` with the conv's mode, then with zeros so windows of edge tiles exist
        padded = _pad(inp, (padding, padding, padding, padding), padding_mode) if padding else inp
        extra_h = max(0, (-(-Ho // th) * th - 1) * s + k_h - padded.shape[-2])
        extra_w = max(0, (-(-Wo // tw) * tw - 1) * s + k_w - padded.shape[-1])
        padded = F.pad(padded, (0, extra_w, 0, extra_h))
        row0 = idx[:, 1] * th * s
        col0 = idx[:, 2] * tw * s
    else:
        # transposed: output o = i*s - p + kk; output rows [r0, r0+th) need input rows
        # i in [ceil((r0 + p - k + 1) / s), floor((r0 + th - 1 + p) / s)]
        lo_h = -((-(idx[:, 1] * th + padding - k_h + 1)) // s)
        lo_w = -((-(idx[:, 2] * tw + padding - k_w + 1)) // s)
        # the same count for every tile because th and tw are multiples of s (validated)
        win_h = (th - 1 + padding) // s - (-((-(padding - k_h + 1)) // s)) + 1
        win_w = (tw - 1 + padding) // s - (-((-(padding - k_w + 1)) // s)) + 1
        margin = k_h + win_h
        padded = F.pad(inp, (margin, margin + win_w, margin, margin + win_h))
        row0 = lo_h + margin
        col0 = lo_w + margin
    dev = inp.device
    rows = (row0.view(-1, 1) + torch.arange(win_h).view(1, -1)).to(dev)
    cols = (col0.view(-1, 1) + torch.arange(win_w).view(1, -1)).to(dev)
    b_idx = idx[:, 0].to(dev)
    # [N, C, win_h, win_w] batch of halo'd windows
    windows = padded[b_idx.view(-1, 1, 1), :, rows.view(n, -1, 1), cols.view(n, 1, -1)].permute(0, 3, 1, 2)
    if not transposed:
        y = F.conv2d(windows, weight, bias, stride=s)
        oy = torch.zeros(n, dtype=torch.int64)
        ox = torch.zeros(n, dtype=torch.int64)
    else:
        y = F.conv_transpose2d(windows, weight, bias, stride=s)
        # y[j] is output row lo*s + j (unpadded numbering) = row lo*s - p + j
        oy = idx[:, 1] * th - (lo_h * s - padding)
        ox = idx[:, 2] * tw - (lo_w * s - padding)
    ry = (oy.view(-1, 1) + torch.arange(th).view(1, -1)).to(dev)
    rx = (ox.view(-1, 1) + torch.arange(tw).view(1, -1)).to(dev)
    y = y[torch.arange(n, device=dev).view(-1, 1, 1), :, ry.view(n, -1, 1), rx.view(n, 1, -1)].permute(0, 3, 1, 2)
    # output coordinates of each tile pixel; pixels beyond the image are dropped
    orow = (idx[:, 1].view(-1, 1) * th + torch.arange(th).view(1, -1)).to(dev)
    ocol = (idx[:, 2].view(-1, 1) * tw + torch.arange(tw).view(1, -1)).to(dev)
    valid = (orow < Ho).view(n, th, 1) & (ocol < Wo).view(n, 1, tw)
    bb = b_idx.view(-1, 1, 1).expand(n, th, tw)[valid]
    rr = orow.view(n, th, 1).expand(n, th, tw)[valid]
    cc = ocol.view(n, 1, tw).expand(n, th, tw)[valid]
    res = None
    if residual is not None:
        res = residual[b_idx.view(-1, 1, 1), :, orow.clamp(max=Ho - 1).view(n, th, 1),
                       ocol.clamp(max=Wo - 1).view(n, 1, tw)].permute(0, 3, 1, 2)
    y = epilogue(y, b_idx, out_act, add, res)
    vals = y.permute(0, 2, 3, 1)[valid]  # [P, Cout]
    out[bb, :, rr, cc] = vals.to(out.dtype)
    return out
