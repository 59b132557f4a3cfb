"""`safedig::sparse_decode`: `b_dec + sum_j vals[j] * W_dec[idx[j]]`, and its backward.

One program per (token, d-block) gathers the token's k decoder rows for its block of d,
K_BLOCK rows at a time, and accumulates in fp32. Rows whose code is 0 are never read.

Backward (`safedig::sparse_decode_backward`, docs/spec.md "Gradients"): the gradient of a code
is the dot product of grad_out with its decoder row, one program per token gathering the same k
rows; the gradient of a decoder row f sums `vals * grad_out` over the tokens that chose f. That
sum runs per feature, not per token, so no two programs write one row and no float atomics are
needed: the (token, slot) pairs are sorted by feature once (`pairs_by_feature`, a stable
`torch.sort`, so each feature's tokens come in ascending order and the sum is deterministic) and
one program per (feature, d-block) reads its tokens' rows (`_feature_rows_kernel`). The encoder
and steer backwards use the same two pieces.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .._checks import check_sparse_decode, check_sparse_decode_backward, check_sparse_decode_types, float64_allowed
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


@triton.jit
def _row_dots(g_row_ptr, stride_gd, W_ptr, stride_wf, rows_idx, need, d,
              K_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """dots[j] = sum_d g[d] * W[rows_idx[j], d] over the whole of d for the rows with `need`, 0 for
    the others (never read). `g` is one strided row; W's rows are contiguous."""
    dots = tl.zeros([K_BLOCK], dtype=tl.float32)
    row_ptrs = W_ptr + rows_idx.to(tl.int64)[:, None] * stride_wf
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < d
        g = tl.load(g_row_ptr + offs_d.to(tl.int64) * stride_gd, mask=dmask, other=0.0).to(tl.float32)
        rows = tl.load(row_ptrs + offs_d[None, :], mask=need[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        dots += tl.sum(rows * g[None, :], axis=1)
    return dots


@triton.jit
def _sparse_decode_bwd_kernel(
    dvals_ptr,
    g_ptr, idx_ptr, W_dec_ptr,
    stride_gb, stride_gt, stride_gd, stride_wf, T, F, d,
    K: tl.constexpr, K_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per token: dvals[n, j] = <grad_out[n], W_dec[idx[n, j]]> for every code, zero
    or not (the decode is linear in vals); NaN for an index outside [0, F), as the forward."""
    n = tl.program_id(0).to(tl.int64)
    g_row = g_ptr + (n // T) * stride_gb + (n % T) * stride_gt
    for kb in range(0, K, K_BLOCK):
        ks = kb + tl.arange(0, K_BLOCK)
        kmask = ks < K
        j = tl.load(idx_ptr + n * K + ks, mask=kmask, other=0)
        outside = kmask & ((j < 0) | (j >= F))
        dots = _row_dots(g_row, stride_gd, W_dec_ptr, stride_wf, j, kmask & ~outside, d, K_BLOCK, BLOCK_D)
        tl.store(dvals_ptr + n * K + ks, tl.where(outside, float("nan"), dots), mask=kmask)


@triton.jit
def _feature_rows_kernel(
    out_ptr, wsum_ptr,
    src_ptr, sub_ptr, w_ptr, order_ptr, offsets_ptr,
    stride_sb, stride_st, stride_sd, T, d,
    K: tl.constexpr, PAIRS: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SUB: tl.constexpr, HAS_WSUM: tl.constexpr,
):
    """One program per (feature f, d-block): out[f] = sum over the (token n, slot j) pairs that chose
    f of w[n, j] * (src[n] - sub), in fp32, PAIRS pairs at a time; with HAS_WSUM, d-block 0 also
    writes wsum[f] = sum of those w. The pairs of f are order[offsets[f] : offsets[f + 1]], flat ids
    n * K + j. A pair whose weight is 0 is never read (a non-finite token's row stays out of the
    sum). Every feature's row is written, zero when no token chose it: no memset."""
    f = tl.program_id(0).to(tl.int64)
    d_block = tl.program_id(1)
    offs_d = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < d
    start = tl.load(offsets_ptr + f)
    end = tl.load(offsets_ptr + f + 1)
    if HAS_SUB:
        sub = tl.load(sub_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    w_acc = tl.zeros([PAIRS], dtype=tl.float32)
    for p0 in range(start, end, PAIRS):
        ps = p0 + tl.arange(0, PAIRS)
        pmask = ps < end
        q = tl.load(order_ptr + ps, mask=pmask, other=0)
        w = tl.load(w_ptr + q, mask=pmask, other=0.0)
        n = q // K
        need = pmask & (w != 0.0)
        rows_ptr = src_ptr + (n // T) * stride_sb + (n % T) * stride_st
        rows = tl.load(rows_ptr[:, None] + offs_d[None, :].to(tl.int64) * stride_sd,
                       mask=need[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        if HAS_SUB:
            rows = rows - sub[None, :]
        acc += tl.sum(tl.where(need[:, None], w[:, None] * rows, 0.0), axis=0)
        w_acc += w
    tl.store(out_ptr + f * d + offs_d, acc.to(out_ptr.dtype.element_ty), mask=dmask)
    if HAS_WSUM:
        tl.store(wsum_ptr + f, tl.sum(w_acc, axis=0), mask=d_block == 0)


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


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """`[N, d]` or `[B, T, d]` as a `[B, T, d]` view (T = 1 for `[N, d]`): what the kernels index
    with (n // T, n % T) and three strides, so strided activations and gradients need no copy."""
    return t if t.dim() == 3 else t.unsqueeze(1)


def pairs_by_feature(idx2: torch.Tensor, F: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, slot) pairs of `idx2` `[N, k]` grouped by feature: `order` (int64 `[N * k]`, flat
    pair ids n * k + j sorted by feature, by token within one: the sort is stable) and `offsets`
    (int64 `[F + 1]`): feature f's pairs are order[offsets[f] : offsets[f + 1]]. Ids outside
    [0, F) fall outside every span. Sizes depend on shapes only; no host sync."""
    keys = idx2.reshape(-1)
    sorted_keys, order = torch.sort(keys, stable=True)
    bounds = torch.arange(F + 1, device=keys.device, dtype=keys.dtype)
    return order, torch.searchsorted(sorted_keys, bounds)


def _feature_rows(out: torch.Tensor, wsum: Optional[torch.Tensor], src3: torch.Tensor, sub: Optional[torch.Tensor],
                  w2: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, cfg) -> None:
    """out `[F, d]` (its dtype) = per feature, the sum of w2 `[N, k]` (fp32) times the rows of
    src3 `[B, T, d]` (minus `sub` `[d]`) of the tokens that chose it; `wsum` `[F]` fp32 the sum of
    those weights (`_feature_rows_kernel`)."""
    F, d = out.shape
    launchable(_feature_rows_kernel)[(F, cdiv(d, cfg["BLOCK_D"]))](
        out, wsum if wsum is not None else out, src3, sub if sub is not None else out, w2.contiguous(), order,
        offsets, src3.stride(0), src3.stride(1), src3.stride(2), src3.shape[1], d,
        K=w2.shape[1], PAIRS=cfg["PAIRS"], BLOCK_D=cfg["BLOCK_D"], HAS_SUB=sub is not None,
        HAS_WSUM=wsum is not None, num_warps=cfg["num_warps"],
    )


def _sparse_decode_bwd(grad_out: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, W_dec: torch.Tensor,
                       codes_grad: bool = True, weight_grads: bool = True, launch: Optional[LaunchConfig] = None
                       ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launcher. `grad_out` `[..., d]` (any strides), `vals` fp32 / `idx` `[..., k]`. Returns dvals
    (vals' shape, fp32), dW_dec `[F, d]` and db_dec `[d]` (W_dec's dtype); None for what was not
    asked. No host sync; allocations depend on shapes only."""
    F, d = W_dec.shape
    k = vals.shape[-1]
    g3 = as_rows(grad_out)
    N = g3.shape[0] * g3.shape[1]
    cfg = _launch.backward_config(d, k, launch)
    idx2 = idx.reshape(N, k).to(torch.int32).contiguous()
    dvals = dW_dec = db_dec = None
    if codes_grad:
        dvals = torch.empty(vals.shape, device=vals.device, dtype=vals.dtype)
        if N > 0:
            W_rows = W_dec if W_dec.stride(1) == 1 else W_dec.contiguous()
            launchable(_sparse_decode_bwd_kernel)[(N,)](
                dvals, g3, idx2, W_rows, g3.stride(0), g3.stride(1), g3.stride(2), W_rows.stride(0), g3.shape[1], F, d,
                K=k, K_BLOCK=cfg["K_BLOCK"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"])
    if weight_grads:
        order, offsets = pairs_by_feature(idx2, F)
        dW_dec = torch.empty(F, d, device=W_dec.device, dtype=W_dec.dtype)
        _feature_rows(dW_dec, None, g3, None, vals.reshape(N, k), order, offsets, cfg)
        db_dec = g3.reshape(N, d).sum(0, dtype=torch.float32).to(W_dec.dtype)
    return dvals, dW_dec, db_dec


@torch.library.triton_op("safedig::sparse_decode", mutates_args=())
def _sparse_decode_op(vals: torch.Tensor, idx: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    check_sparse_decode(vals, idx, W_dec, b_dec, float64_allowed(vals))
    if not use_triton_for(vals):
        return reference.sparse_decode(vals, idx, W_dec, b_dec)
    k = vals.shape[-1]
    out = _sparse_decode_fwd(vals.reshape(-1, k), idx.reshape(-1, k), W_dec, b_dec)
    return out.reshape(*vals.shape[:-1], W_dec.shape[1])


@_sparse_decode_op.register_fake
def _(vals, idx, W_dec, b_dec):
    check_sparse_decode(vals, idx, W_dec, b_dec, float64_allowed(vals))
    return vals.new_empty(*vals.shape[:-1], W_dec.shape[1], dtype=W_dec.dtype)


@torch.library.triton_op("safedig::sparse_decode_backward", mutates_args=())
def _sparse_decode_backward_op(grad_out: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, W_dec: torch.Tensor,
                               codes_grad: bool, weight_grads: bool
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dvals, dW_dec, db_dec (docs/spec.md "Gradients"); what was not asked comes back empty `[0]`."""
    check_sparse_decode_backward(grad_out, vals, idx, W_dec, float64_allowed(vals))
    if use_triton_for(vals) and _launch.current(None).backward == "triton":
        grads = _sparse_decode_bwd(grad_out, vals, idx, W_dec, codes_grad, weight_grads)
    else:  # the CPU, or the torch-op alternative on CUDA (in the input dtype, as the eager reference)
        grads = reference.sparse_decode_backward(grad_out, vals, idx, W_dec, upcast=not use_triton_for(vals),
                                                 weight_grads=weight_grads)
    return or_empty(grads, (codes_grad, weight_grads, weight_grads), (vals, W_dec, W_dec))


@_sparse_decode_backward_op.register_fake
def _(grad_out, vals, idx, W_dec, codes_grad, weight_grads):
    check_sparse_decode_backward(grad_out, vals, idx, W_dec, float64_allowed(vals))
    F, d = W_dec.shape
    return (vals.new_empty(vals.shape if codes_grad else (0,)),
            W_dec.new_empty((F, d) if weight_grads else (0,)), W_dec.new_empty((d,) if weight_grads else (0,)))


def or_empty(grads: tuple, asked: tuple, likes: tuple) -> tuple:
    """What a backward op returns: each gradient asked for, contiguous; for one not asked, an
    empty `[0]` tensor of its dtype (an op returns tensors, never None)."""
    return tuple(g.contiguous() if want else like.new_empty(0) for g, want, like in zip(grads, asked, likes))


def _sparse_decode_setup_context(ctx, inputs, output) -> None:
    vals, idx, W_dec, _ = inputs
    ctx.save_for_backward(vals, idx, W_dec)


def _sparse_decode_backward(ctx, grad_out):
    vals, idx, W_dec = ctx.saved_tensors
    need = ctx.needs_input_grad
    dvals, dW_dec, db_dec = torch.ops.safedig.sparse_decode_backward(grad_out, vals, idx, W_dec, need[0],
                                                                     need[2] or need[3])
    return dvals if need[0] else None, None, dW_dec if need[2] else None, db_dec if need[3] else None


_sparse_decode_op.register_autograd(_sparse_decode_backward, setup_context=_sparse_decode_setup_context)


def sparse_decode(vals: torch.Tensor, idx: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """Reconstruction from TopK codes: `b_dec + sum_j vals[..., j] * W_dec[idx[..., j]]`.

    `vals` fp32 and `idx` int32/int64, both `[N, k]` or `[B, T, k]`; `W_dec` `[F, d]`, `b_dec`
    `[d]`. Returns `[..., d]` in W_dec's dtype. Indices must lie in [0, F); on CUDA a token
    with an index outside comes back NaN (checking on the host would need a sync), on the CPU
    it raises. Differentiable in vals, W_dec and b_dec; on the CPU vals and the decoder may be
    float64 (the reference computes in it).
    """
    check_sparse_decode_types(vals, idx, W_dec, b_dec)
    return torch.ops.safedig.sparse_decode(vals, idx, W_dec, b_dec)
