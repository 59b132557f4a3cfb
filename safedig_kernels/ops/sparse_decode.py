"""`safedig::sparse_decode`: `b_dec + sum_j vals[j] * W_dec[idx[j]]`.

One program per (token, d-block) gathers the token's k decoder rows for its block of d,
K_BLOCK rows at a time, and accumulates in fp32. Rows whose code is 0 are never read.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .._checks import check_sparse_decode, check_sparse_decode_types
from .._library import use_triton_for
from . import _launch
from ._launch import LaunchConfig
from ._triton import cdiv, launchable, tl, triton


@triton.jit
def _weighted_row_sum(acc, w, rows_idx, kmask, W_dec_ptr, stride_wf, F, offs_d, dmask):
    """acc[d] += sum_j w[j] * W_dec[rows_idx[j], d], reading only rows with w[j] != 0.

    An index outside [0, F) is never dereferenced; it turns the sum into NaN instead, the one
    way to report it from the device without a host sync."""
    need = kmask & (w != 0.0)
    outside = need & ((rows_idx < 0) | (rows_idx >= F))
    need = need & ~outside
    ptrs = W_dec_ptr + rows_idx.to(tl.int64)[:, None] * stride_wf + offs_d[None, :]
    rows = tl.load(ptrs, mask=need[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    w = tl.where(outside, float("nan"), tl.where(need, w, 0.0))
    return acc + tl.sum(w[:, None] * rows, axis=0)


@triton.jit
def _sparse_decode_kernel(
    out_ptr,
    vals_ptr, idx_ptr, W_dec_ptr, b_dec_ptr,
    stride_wf, F, d,
    K: tl.constexpr, K_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < d
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for kb in range(0, K, K_BLOCK):
        ks = kb + tl.arange(0, K_BLOCK)
        kmask = ks < K
        z = tl.load(vals_ptr + n * K + ks, mask=kmask, other=0.0)
        j = tl.load(idx_ptr + n * K + ks, mask=kmask, other=0)
        acc = _weighted_row_sum(acc, z, j, kmask, W_dec_ptr, stride_wf, F, offs_d, dmask)
    acc += tl.load(b_dec_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + n * d + offs_d, acc.to(out_ptr.dtype.element_ty), mask=dmask)


def _sparse_decode_fwd(vals2: torch.Tensor, idx2: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
                       launch: Optional[LaunchConfig] = None) -> torch.Tensor:
    """Launcher. `vals2` fp32 / `idx2` int32 `[N, k]`; returns `[N, d]` in W_dec's dtype."""
    N, k = vals2.shape
    d = W_dec.shape[1]
    out = torch.empty(N, d, device=vals2.device, dtype=W_dec.dtype)
    if N == 0:
        return out
    cfg = _launch.decode_config(d, k, launch)
    W_dec = W_dec if W_dec.stride(1) == 1 else W_dec.contiguous()
    grid = (N, cdiv(d, cfg["BLOCK_D"]))
    launchable(_sparse_decode_kernel)[grid](
        out, vals2.contiguous(), idx2.to(torch.int32).contiguous(), W_dec, b_dec.contiguous(),
        W_dec.stride(0), W_dec.shape[0], d, K=k, **cfg,
    )
    return out


@torch.library.triton_op("safedig::sparse_decode", mutates_args=())
def _sparse_decode_op(vals: torch.Tensor, idx: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    check_sparse_decode(vals, idx, W_dec, b_dec)
    if not use_triton_for(vals):
        return reference.sparse_decode(vals, idx, W_dec, b_dec)
    k = vals.shape[-1]
    out = _sparse_decode_fwd(vals.reshape(-1, k), idx.reshape(-1, k), W_dec, b_dec)
    return out.reshape(*vals.shape[:-1], W_dec.shape[1])


@_sparse_decode_op.register_fake
def _(vals, idx, W_dec, b_dec):
    check_sparse_decode(vals, idx, W_dec, b_dec)
    return vals.new_empty(*vals.shape[:-1], W_dec.shape[1], dtype=W_dec.dtype)


def sparse_decode(vals: torch.Tensor, idx: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """Reconstruction from TopK codes: `b_dec + sum_j vals[..., j] * W_dec[idx[..., j]]`.

    `vals` fp32 and `idx` int32/int64, both `[N, k]` or `[B, T, k]`; `W_dec` `[F, d]`, `b_dec`
    `[d]`. Returns `[..., d]` in W_dec's dtype. Indices must lie in [0, F); on CUDA a token
    with an index outside comes back NaN (checking on the host would need a sync), on the CPU
    it raises.
    """
    check_sparse_decode_types(vals, idx, W_dec, b_dec)
    return torch.ops.safedig.sparse_decode(vals, idx, W_dec, b_dec)
