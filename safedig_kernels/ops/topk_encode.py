"""`safedig::topk_encode`: encoder GEMM plus exact top-k selection.

Design (spec §6, option b): cuBLAS computes the pre-activations once into a buffer (fp32 with
the folded encoder bias added in its epilogue where torch can ask for that, else in the input
dtype with the fp32 bias added on load); `_topk_select_kernel` reads each row and selects its
top k, one program per token:

1. pass 1 loads the row chunk by chunk as [GROUPS, GS] tiles and keeps each group's maximum.
   The k-th largest group maximum L is a lower bound on the k-th largest value (k groups each
   hold a value >= L);
2. pass 2 sends the candidates `v >= L` (typically ~1.2 k of them) to a small scratch row,
   each taking a slot from a per-row atomic counter: no block-wide scan or reduction per chunk;
3. each candidate's rank under (value descending, index ascending) is counted against all the
   others; candidates of rank < k are written to their rank's slot, so the result comes out
   sorted with the exact tie order of spec §2, whatever order the atomics gave the scratch row.

When the candidates overflow the scratch row (heavy ties) or k > 64, an exact fallback finds
the k-th largest key by bisection and keeps exactly k candidates, lower indices first among
equals. Non-finite rows get NaN values over indices 0..k-1.

Backward (`safedig::topk_encode_backward`, docs/spec.md "Gradients"), with the selection held
fixed: a code's gradient reaches its pre-activation where the code is positive. dx gathers the
token's k encoder columns as rows of `W_enc^T` (`_encoder_bwd_kernel`, the decode's gather over a
transposed copy of W_enc unless W_enc already is one: a column of a row-major [d, F] matrix is
F elements apart); dW_enc and db_enc sum per feature over the tokens that chose it
(`sparse_decode._feature_rows_kernel`, no atomics); db_dec = -W_enc @ db_enc.

Measured on an H200 (2026-11-28, torch 2.11 / triton 3.6, FLUX 4x shape): the first version,
which compacted with a block-wide cumsum and sum per chunk, spent 0.31 ms selecting after a
0.46 ms GEMM, far from the 0.03 ms a read of the buffer costs; the per-chunk collectives (each
a barrier) were the cost, hence the tiles and the atomic counter.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from .. import reference
from .._checks import (
    check_topk_encode,
    check_topk_encode_backward,
    check_topk_encode_types,
    code_dtype,
    float64_allowed,
)
from .._library import mm_has_out_dtype, use_triton_for
from . import _launch, _tuning
from ._launch import LaunchConfig
from ._triton import cdiv, launchable, tl, triton
from .sparse_decode import _feature_rows, _weighted_row_sum, as_rows, or_empty, pairs_by_feature


@triton.jit
def _finish_values(v, valid):
    v = tl.where(v == 0.0, 0.0, v)  # -0.0 -> +0.0: equal values must tie, not order by sign
    return v, valid & ~((v == v) & (tl.abs(v) < float("inf")))


@triton.jit
def _load_tile(pre_row_ptr, bias_ptr, start, F, GROUPS: tl.constexpr, GS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Row elements start .. start + GROUPS*GS as a [GROUPS, GS] tile (group g = one row)."""
    offs = start + tl.arange(0, GROUPS)[:, None] * GS + tl.arange(0, GS)[None, :]
    valid = offs < F
    v = tl.load(pre_row_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v = v + tl.load(bias_ptr + offs, mask=valid, other=0.0)
    v, nonfinite = _finish_values(v, valid)
    return v, offs, valid, nonfinite


@triton.jit
def _load_row_chunk(pre_row_ptr, bias_ptr, start, F, CHUNK: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Row elements start .. start + CHUNK as a flat vector (the exact fallback's view)."""
    offs = start + tl.arange(0, CHUNK)
    valid = offs < F
    v = tl.load(pre_row_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v = v + tl.load(bias_ptr + offs, mask=valid, other=0.0)
    v, _ = _finish_values(v, valid)
    return v, offs, valid


@triton.jit
def _ordered_key(v):
    # int32 key with the order of the float values (finite values only).
    bits = v.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _exact_candidates(pre_row, bias_ptr, cand_vals, cand_idx, F, K: tl.constexpr, CHUNK: tl.constexpr,
                      NUM_CHUNKS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Exact fallback: bisect for T, the K-th largest key (count(key >= T) >= K > count(key > T)),
    then write every key > T and the first K - count(key > T) keys == T, in index order, to the
    scratch row. Returns the number written (K)."""
    row_max = tl.full([CHUNK], float("-inf"), tl.float32)
    row_min = tl.full([CHUNK], float("inf"), tl.float32)
    for c in range(NUM_CHUNKS):
        v3, offs3, valid3 = _load_row_chunk(pre_row, bias_ptr, c * CHUNK, F, CHUNK, HAS_BIAS)
        row_max = tl.maximum(row_max, tl.where(valid3, v3, float("-inf")))
        row_min = tl.minimum(row_min, tl.where(valid3, v3, float("inf")))
    lo = _ordered_key(tl.min(row_min, axis=0)).to(tl.int64)
    hi = _ordered_key(tl.max(row_max, axis=0)).to(tl.int64)
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        count = tl.zeros([], dtype=tl.int32)
        for c in range(NUM_CHUNKS):
            v4, offs4, valid4 = _load_row_chunk(pre_row, bias_ptr, c * CHUNK, F, CHUNK, HAS_BIAS)
            count += tl.sum((valid4 & (_ordered_key(v4).to(tl.int64) >= mid)).to(tl.int32), axis=0)
        if count >= K:
            lo = mid
        else:
            hi = mid - 1
    n_above = tl.zeros([], dtype=tl.int32)
    for c in range(NUM_CHUNKS):
        v5, offs5, valid5 = _load_row_chunk(pre_row, bias_ptr, c * CHUNK, F, CHUNK, HAS_BIAS)
        n_above += tl.sum((valid5 & (_ordered_key(v5).to(tl.int64) > lo)).to(tl.int32), axis=0)
    n_tied = tl.zeros([], dtype=tl.int32)
    n_kept = tl.zeros([], dtype=tl.int32)
    for c in range(NUM_CHUNKS):
        v6, offs6, valid6 = _load_row_chunk(pre_row, bias_ptr, c * CHUNK, F, CHUNK, HAS_BIAS)
        key = _ordered_key(v6).to(tl.int64)
        tied = valid6 & (key == lo)
        tie_rank = n_tied + tl.cumsum(tied.to(tl.int32), axis=0)
        kept = (valid6 & (key > lo)) | (tied & (tie_rank <= K - n_above))
        pos = n_kept + tl.cumsum(kept.to(tl.int32), axis=0) - 1
        tl.store(cand_vals + pos, v6, mask=kept)
        tl.store(cand_idx + pos, offs6.to(tl.int32), mask=kept)
        n_tied += tl.sum(tied.to(tl.int32), axis=0)
        n_kept += tl.sum(kept.to(tl.int32), axis=0)
    return n_kept


@triton.jit
def _rank_and_store(out_vals, out_idx, cand_vals, cand_idx, n_cand, K: tl.constexpr, CAND: tl.constexpr,
                    RANK_BLOCK: tl.constexpr):
    """Rank each scratch candidate against all of them under (value desc, index asc); those of
    rank < K land in their output slot. Scratch is read past L1 (.cg): other programs wrote it."""
    ks = tl.arange(0, CAND)
    cmask = ks < n_cand
    cv = tl.load(cand_vals + ks, mask=cmask, other=float("-inf"), cache_modifier=".cg")
    ci = tl.load(cand_idx + ks, mask=cmask, other=0, cache_modifier=".cg")
    rank = tl.zeros([CAND], dtype=tl.int32)
    for jb in range(0, n_cand, RANK_BLOCK):
        js = jb + tl.arange(0, RANK_BLOCK)
        jmask = js < n_cand
        jv = tl.load(cand_vals + js, mask=jmask, other=float("-inf"), cache_modifier=".cg")
        ji = tl.load(cand_idx + js, mask=jmask, other=0, cache_modifier=".cg")
        cand_beats = (jv[None, :] > cv[:, None]) | ((jv[None, :] == cv[:, None]) & (ji[None, :] < ci[:, None]))
        rank += tl.sum((cand_beats & jmask[None, :]).to(tl.int32), axis=1)
    chosen = cmask & (rank < K)
    tl.store(out_vals + rank, tl.maximum(cv, 0.0), mask=chosen)
    tl.store(out_idx + rank, ci, mask=chosen)


@triton.jit
def _store_nonfinite(out_vals, out_idx, K: tl.constexpr, CAND: tl.constexpr):
    ks = tl.arange(0, CAND)
    tl.store(out_vals + ks, tl.full([CAND], float("nan"), tl.float32), mask=ks < K)
    tl.store(out_idx + ks, ks.to(tl.int32), mask=ks < K)


@triton.jit
def _lower_bound(gmax, K: tl.constexpr, GROUPS: tl.constexpr):
    """The K-th largest of the group maxima (ties by group index, so exactly one group has rank
    K - 1; groups past F hold -inf and rank last): a lower bound on the K-th largest value."""
    gi = tl.arange(0, GROUPS)
    group_beats = (gmax[None, :] > gmax[:, None]) | ((gmax[None, :] == gmax[:, None]) & (gi[None, :] < gi[:, None]))
    grank = tl.sum(group_beats.to(tl.int32), axis=1)
    return tl.max(tl.where(grank == K - 1, gmax, float("-inf")), axis=0)


@triton.jit
def _select_row(
    row, vals_ptr, idx_ptr, cand_val_ptr, cand_idx_ptr, count_ptr, pre_ptr, bias_ptr, stride_pre, F,
    K: tl.constexpr, CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr, GROUPS: tl.constexpr,
    CAND: tl.constexpr, RANK_BLOCK: tl.constexpr, EXACT_ONLY: tl.constexpr, HAS_BIAS: tl.constexpr,
    LOAD_STAGES: tl.constexpr,
):
    """The "row" algorithm for one row, by one program: both passes walk the row chunk by chunk
    and the row's top k land, sorted, at vals/idx[row]. Also the first half of the one-launch
    small-N steer kernel (ops/steer.py)."""
    pre_row = pre_ptr + row * stride_pre
    cand_vals = cand_val_ptr + row * CAND
    cand_idx = cand_idx_ptr + row * CAND
    GS: tl.constexpr = CHUNK // GROUPS

    # Pass 1: finiteness and the group maxima, accumulated element-wise across chunks so the
    # block-wide reductions (each a barrier) happen once per row, not once per chunk.
    # (Triton lesson, 3.6-3.9: a name reused inside a later loop becomes loop-carried and must
    # keep its shape, so each loop has names of its own.)
    bad_acc = tl.zeros([GROUPS, GS], dtype=tl.int32)
    gmax = tl.full([GROUPS], float("-inf"), tl.float32)
    for c in tl.range(0, NUM_CHUNKS, num_stages=LOAD_STAGES):
        v1, offs1, valid1, bad1 = _load_tile(pre_row, bias_ptr, c * CHUNK, F, GROUPS, GS, HAS_BIAS)
        bad_acc = bad_acc | bad1.to(tl.int32)
        gmax = tl.maximum(gmax, tl.max(tl.where(valid1, v1, float("-inf")), axis=1))
    n_bad = tl.max(tl.max(bad_acc, axis=1), axis=0)

    if n_bad > 0:
        _store_nonfinite(vals_ptr + row * K, idx_ptr + row * K, K, CAND)
    else:
        n_cand = tl.zeros([], dtype=tl.int32)
        if not EXACT_ONLY:
            lower = _lower_bound(gmax, K, GROUPS)
            # The row's slot counter is this program's alone: zeroing it here saves the launcher
            # a memset launch; the barrier orders the store before every thread's atomics.
            tl.store(count_ptr + row, 0)
            tl.debug_barrier()
            # Pass 2: each candidate v >= L takes a scratch slot from the row's counter.
            counter = count_ptr + row + tl.zeros([GROUPS, GS], dtype=tl.int32)
            for c in tl.range(0, NUM_CHUNKS, num_stages=LOAD_STAGES):
                v2, offs2, valid2, _ = _load_tile(pre_row, bias_ptr, c * CHUNK, F, GROUPS, GS, HAS_BIAS)
                is_cand = valid2 & (v2 >= lower)
                slot = tl.atomic_add(counter, 1, mask=is_cand, sem="relaxed")
                keep = is_cand & (slot < CAND)
                tl.store(cand_vals + slot, v2, mask=keep)
                tl.store(cand_idx + slot, offs2.to(tl.int32), mask=keep)
            tl.debug_barrier()  # every slot taken; read the total through the atomic unit
            n_cand = tl.atomic_add(count_ptr + row, 0, sem="relaxed")
        if EXACT_ONLY or n_cand > CAND:
            n_cand = _exact_candidates(pre_row, bias_ptr, cand_vals, cand_idx, F, K, CHUNK, NUM_CHUNKS, HAS_BIAS)
        tl.debug_barrier()  # the scratch row was written by other threads of this program
        _rank_and_store(vals_ptr + row * K, idx_ptr + row * K, cand_vals, cand_idx, n_cand, K, CAND, RANK_BLOCK)


@triton.jit
def _topk_select_kernel(
    vals_ptr, idx_ptr, cand_val_ptr, cand_idx_ptr, count_ptr,
    pre_ptr, bias_ptr,
    stride_pre, F,
    K: tl.constexpr, CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr, GROUPS: tl.constexpr,
    CAND: tl.constexpr, RANK_BLOCK: tl.constexpr, EXACT_ONLY: tl.constexpr, HAS_BIAS: tl.constexpr,
    LOAD_STAGES: tl.constexpr = 1,
):
    """One program per row ("row" algorithm).

    LOAD_STAGES > 1 asks Triton to software-pipeline the chunk loads (cp.async into shared
    memory, the next chunks in flight while one is reduced): a sweep knob for a program that
    otherwise waits out each chunk's load latency in turn. 1: plain loops."""
    _select_row(tl.program_id(0).to(tl.int64), vals_ptr, idx_ptr, cand_val_ptr, cand_idx_ptr, count_ptr, pre_ptr,
                bias_ptr, stride_pre, F, K, CHUNK, NUM_CHUNKS, GROUPS, CAND, RANK_BLOCK, EXACT_ONLY, HAS_BIAS,
                LOAD_STAGES)


@triton.jit
def _group_max_kernel(
    gmax_ptr, count_ptr,
    pre_ptr, bias_ptr,
    stride_pre, F,
    CHUNK: tl.constexpr, GROUPS: tl.constexpr, NUM_CHUNKS: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """"split" algorithm, step 1, one program per (row, chunk): the chunk's group maxima, NaN
    for a group holding a non-finite value. gmax is [rows, NUM_CHUNKS, GROUPS] fp32. Chunk 0
    also zeroes the row's slot counter for step 3 (a launch later), saving a memset launch."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    if c == 0:
        tl.store(count_ptr + row, 0)
    v, offs, valid, bad = _load_tile(pre_ptr + row * stride_pre, bias_ptr, c * CHUNK, F, GROUPS, CHUNK // GROUPS,
                                     HAS_BIAS)
    g = tl.max(tl.where(valid, v, float("-inf")), axis=1)
    g = tl.where(tl.max(bad.to(tl.int32), axis=1) > 0, float("nan"), g)
    tl.store(gmax_ptr + (row * NUM_CHUNKS + c) * GROUPS + tl.arange(0, GROUPS), g)


@triton.jit
def _split_bound_kernel(
    lower_ptr, gmax_ptr,
    K: tl.constexpr, NUM_CHUNKS: tl.constexpr, CHUNKS_POW2: tl.constexpr, GROUPS: tl.constexpr,
    EXACT_ONLY: tl.constexpr,
):
    """"split" step 2, one program per row: the bound L from the row's group maxima; NaN marks
    a row holding a non-finite value."""
    row = tl.program_id(0).to(tl.int64)
    ci = tl.arange(0, CHUNKS_POW2)
    parts = tl.load(gmax_ptr + (row * NUM_CHUNKS + ci[:, None]) * GROUPS + tl.arange(0, GROUPS)[None, :],
                    mask=ci[:, None] < NUM_CHUNKS, other=float("-inf"))
    n_bad = tl.sum(tl.sum((parts != parts).to(tl.int32), axis=1), axis=0)
    if EXACT_ONLY:
        lower = tl.full([], float("-inf"), tl.float32)
    else:
        lower = _lower_bound(tl.max(parts, axis=0), K, GROUPS)
    tl.store(lower_ptr + row, tl.where(n_bad > 0, float("nan"), lower))


@triton.jit
def _split_candidates_kernel(
    cand_val_ptr, cand_idx_ptr, count_ptr,
    lower_ptr, pre_ptr, bias_ptr,
    stride_pre, F,
    CHUNK: tl.constexpr, GROUPS: tl.constexpr, CAND: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """"split" step 3, one program per (row, chunk): send the chunk's candidates v >= L to the
    row's scratch slots. Many small programs keep many loads in flight, where one program per
    row waited on each of its chunks in turn."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    lower = tl.load(lower_ptr + row)
    if lower == lower:  # NaN: non-finite row, nothing to select
        v, offs, valid, _ = _load_tile(pre_ptr + row * stride_pre, bias_ptr, c * CHUNK, F, GROUPS, CHUNK // GROUPS,
                                       HAS_BIAS)
        is_cand = valid & (v >= lower)
        counter = count_ptr + row + tl.zeros([GROUPS, CHUNK // GROUPS], dtype=tl.int32)
        slot = tl.atomic_add(counter, 1, mask=is_cand, sem="relaxed")
        keep = is_cand & (slot < CAND)
        tl.store(cand_val_ptr + row * CAND + slot, v, mask=keep)
        tl.store(cand_idx_ptr + row * CAND + slot, offs.to(tl.int32), mask=keep)


@triton.jit
def _split_rank_kernel(
    vals_ptr, idx_ptr, cand_val_ptr, cand_idx_ptr, count_ptr,
    lower_ptr, pre_ptr, bias_ptr,
    stride_pre, F,
    K: tl.constexpr, CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr, CAND: tl.constexpr,
    RANK_BLOCK: tl.constexpr, EXACT_ONLY: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """"split" step 4, one program per row: rank the candidates (or take the exact fallback)."""
    row = tl.program_id(0).to(tl.int64)
    cand_vals = cand_val_ptr + row * CAND
    cand_idx = cand_idx_ptr + row * CAND
    lower = tl.load(lower_ptr + row)
    if lower != lower:
        _store_nonfinite(vals_ptr + row * K, idx_ptr + row * K, K, CAND)
    else:
        n_cand = tl.load(count_ptr + row)
        if EXACT_ONLY or n_cand > CAND:
            n_cand = _exact_candidates(pre_ptr + row * stride_pre, bias_ptr, cand_vals, cand_idx, F, K, CHUNK,
                                       NUM_CHUNKS, HAS_BIAS)
            tl.debug_barrier()  # the scratch row was written by other threads of this program
        _rank_and_store(vals_ptr + row * K, idx_ptr + row * K, cand_vals, cand_idx, n_cand, K, CAND, RANK_BLOCK)


@triton.jit
def _encoder_rows_sum(dpre_ptr, idx_ptr, W_t_ptr, n, stride_wf, F, offs_d, dmask,
                      K: tl.constexpr, K_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """sum_j dpre[n, j] * W_enc^T[idx[n, j]] over one block of d, fp32; rows with dpre 0 unread."""
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for kb in range(0, K, K_BLOCK):
        ks = kb + tl.arange(0, K_BLOCK)
        kmask = ks < K
        w = tl.load(dpre_ptr + n * K + ks, mask=kmask, other=0.0)
        j = tl.load(idx_ptr + n * K + ks, mask=kmask, other=0)
        acc = _weighted_row_sum(acc, w, j, kmask, W_t_ptr, stride_wf, F, offs_d, dmask)
    return acc


@triton.jit
def _encoder_bwd_kernel(
    dx_ptr,
    gy_ptr, blend_ptr, touched_ptr, dpre_ptr, idx_ptr, W_t_ptr,
    stride_gb, stride_gt, stride_gd, stride_wf, T, F, d,
    K: tl.constexpr, K_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, PASS_THROUGH: tl.constexpr,
):
    """One program per (token n, d-block): dx[n] = sum_j dpre[n, j] * W_enc^T[idx[n, j]] (only rows
    with a non-zero dpre are read). PASS_THROUGH (steer's backward) adds grad_y's own path:
    dx = grad_y - blend[n] * grad_y + that sum for a token the forward steered or whose harm
    score has a gradient (touched[n]), else grad_y itself, selected, so bitwise."""
    n = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < d
    if PASS_THROUGH:
        g = tl.load(gy_ptr + (n // T) * stride_gb + (n % T) * stride_gt + offs_d.to(tl.int64) * stride_gd, mask=dmask,
                    other=0.0)
        if tl.load(touched_ptr + n) != 0:
            gf = g.to(tl.float32)
            acc = _encoder_rows_sum(dpre_ptr, idx_ptr, W_t_ptr, n, stride_wf, F, offs_d, dmask, K, K_BLOCK, BLOCK_D)
            out = (gf + (acc - tl.load(blend_ptr + n) * gf)).to(dx_ptr.dtype.element_ty)
        else:
            out = g
    else:
        acc = _encoder_rows_sum(dpre_ptr, idx_ptr, W_t_ptr, n, stride_wf, F, offs_d, dmask, K, K_BLOCK, BLOCK_D)
        out = acc.to(dx_ptr.dtype.element_ty)
    tl.store(dx_ptr + n * d + offs_d, out, mask=dmask)


def encoder_bias(W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """`b_enc - b_dec @ W_enc` in fp32, `[F]`: folds the input centring into the bias, so the
    GEMM reads x as it is (no rounded `x - b_dec` copy)."""
    if W_enc.dtype != torch.float32 and W_enc.is_cuda and mm_has_out_dtype():
        centre = torch.mm(b_dec.unsqueeze(0), W_enc, out_dtype=torch.float32).squeeze(0)
    else:
        centre = b_dec.float() @ W_enc.float()
    return b_enc.float() - centre


def _encoder_gemm(x2: torch.Tensor, W_enc: torch.Tensor, enc_bias: torch.Tensor, pre_dtype: torch.dtype,
                  bias_in_gemm: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`x2 @ W_enc` as a `pre_dtype` buffer. Returns (pre, the fp32 bias the select kernels add on
    load, or None when the GEMM added it: `_launch.bias_in_gemm` says when)."""
    if x2.dtype == torch.float32:
        return torch.addmm(enc_bias, x2, W_enc), None
    if pre_dtype == x2.dtype:
        if bias_in_gemm:  # the bias in the output dtype: cuBLASLt's epilogue, one rounding after it
            return torch.addmm(enc_bias.to(pre_dtype), x2, W_enc), None
        return torch.mm(x2, W_enc), enc_bias
    if x2.is_cuda:
        return torch.mm(x2, W_enc, out_dtype=pre_dtype), enc_bias
    return torch.mm(x2.to(pre_dtype), W_enc.to(pre_dtype)), enc_bias  # CPU under the interpreter


def _topk_encode_fwd(x2: torch.Tensor, W_enc: torch.Tensor, enc_bias: torch.Tensor, k: int,
                     launch: Optional[LaunchConfig] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher. `x2` `[N, d]` (any strides), `enc_bias` fp32 `[F]`. Returns vals fp32 and idx
    int32, `[N, k]`. No host sync; allocations depend on shapes only."""
    N = x2.shape[0]
    F = W_enc.shape[1]
    vals = torch.empty(N, k, device=x2.device, dtype=torch.float32)
    idx = torch.empty(N, k, device=x2.device, dtype=torch.int32)
    if N == 0:
        return vals, idx
    pre_dtype = _launch.pre_dtype_for(x2.dtype, x2.device, launch)
    bias_in_gemm = _launch.bias_in_gemm(x2.dtype, pre_dtype, launch)
    passes = _launch.row_passes(N, F, pre_dtype)
    pass_rows = passes[0][1]
    enc_bias = enc_bias.contiguous()
    if launch is None and _tuning.enabled() and not _launch.symbolic(N):
        launch = _tuned_select(x2, W_enc, enc_bias, k, pre_dtype, bias_in_gemm, pass_rows, vals, idx)
    cfg = _launch.select_config(F, k, launch)
    algo = _launch.resolve_select_algo(launch, N)  # by N, so every row pass of one call runs the same kernels
    scratch = _SelectScratch(pass_rows, cfg, x2.device, algo)
    for start, stop in passes:
        rows = stop - start  # narrow, not [start:stop]: Python indexing cannot trace fake CUDA tensors on a CPU build
        pre, bias_on_load = _encoder_gemm(x2.narrow(0, start, rows), W_enc, enc_bias, pre_dtype, bias_in_gemm)
        _select(vals.narrow(0, start, rows), idx.narrow(0, start, rows), scratch, pre, bias_on_load, k, cfg, algo)
    return vals, idx


def _tuned_select(x2, W_enc, enc_bias, k: int, pre_dtype, bias_in_gemm: bool, rows: int, vals, idx
                  ) -> Optional[LaunchConfig]:
    """The selection chosen on this card for this call's key (`_tuning`): timed now, on the first
    pass's pre-activations, when it was not yet and timing is possible; None: the heuristics."""
    F = W_enc.shape[1]
    key = _tuning.select_key(x2.shape[0], F, k, pre_dtype, not bias_in_gemm, x2.device)
    choice = _tuning.chosen(key)
    if choice is not None or not _tuning.can_time(x2.device):
        return choice
    pre, bias_on_load = _encoder_gemm(x2.narrow(0, 0, rows), W_enc, enc_bias, pre_dtype, bias_in_gemm)
    out_vals, out_idx = vals.narrow(0, 0, rows), idx.narrow(0, 0, rows)  # rewritten by the chosen one after

    def run(candidate: LaunchConfig) -> None:
        cfg = _launch.select_config(F, k, candidate)
        algo = _launch.resolve_select_algo(candidate, rows)
        _select(out_vals, out_idx, _SelectScratch(rows, cfg, x2.device, algo), pre, bias_on_load, k, cfg, algo)

    return _tuning.choose(key, run, x2.device)


class _SelectScratch:
    """Per-row candidate slots and their atomic counters, plus the split algorithm's group
    maxima and bounds (only when it runs), reused across row passes."""

    def __init__(self, rows: int, cfg: Mapping, device: torch.device, algo: str = "split"):
        self.vals = torch.empty(rows, cfg["CAND"], device=device, dtype=torch.float32)
        self.idx = torch.empty(rows, cfg["CAND"], device=device, dtype=torch.int32)
        self.count = torch.empty(rows, device=device, dtype=torch.int32)
        if algo == "split":
            self.gmax = torch.empty(rows, cfg["NUM_CHUNKS"], cfg["GROUPS"], device=device, dtype=torch.float32)
            self.lower = torch.empty(rows, device=device, dtype=torch.float32)


def _select(vals, idx, scratch: _SelectScratch, pre, bias: Optional[torch.Tensor], k: int, cfg: Mapping,
            algo: str) -> None:
    """Top k of each row of `pre` (+ `bias`) into vals/idx with the "row" or "split" kernels.
    The kernels zero the scratch counters themselves (no memset launch)."""
    rows, F = pre.shape
    common = dict(HAS_BIAS=bias is not None, CHUNK=cfg["CHUNK"], NUM_CHUNKS=cfg["NUM_CHUNKS"], GROUPS=cfg["GROUPS"],
                  num_warps=cfg["num_warps"])
    bias = bias if bias is not None else pre  # never read when HAS_BIAS is False
    if algo == "row":
        launchable(_topk_select_kernel)[(rows,)](
            vals, idx, scratch.vals, scratch.idx, scratch.count, pre, bias, pre.stride(0), F,
            K=k, CAND=cfg["CAND"], RANK_BLOCK=cfg["RANK_BLOCK"], EXACT_ONLY=cfg["EXACT_ONLY"],
            LOAD_STAGES=cfg["LOAD_STAGES"], **common)
        return
    grid = (rows, cfg["NUM_CHUNKS"])
    launchable(_group_max_kernel)[grid](scratch.gmax, scratch.count, pre, bias, pre.stride(0), F, **common)
    launchable(_split_bound_kernel)[(rows,)](scratch.lower, scratch.gmax, K=k, NUM_CHUNKS=cfg["NUM_CHUNKS"],
                                 CHUNKS_POW2=cfg["CHUNKS_POW2"], GROUPS=cfg["GROUPS"], EXACT_ONLY=cfg["EXACT_ONLY"],
                                 num_warps=cfg["num_warps"])
    if not cfg["EXACT_ONLY"]:
        launchable(_split_candidates_kernel)[grid](
            scratch.vals, scratch.idx, scratch.count, scratch.lower, pre, bias, pre.stride(0), F,
            CHUNK=cfg["CHUNK"], GROUPS=cfg["GROUPS"], CAND=cfg["CAND"], HAS_BIAS=common["HAS_BIAS"],
            num_warps=cfg["num_warps"])
    launchable(_split_rank_kernel)[(rows,)](
        vals, idx, scratch.vals, scratch.idx, scratch.count, scratch.lower, pre, bias, pre.stride(0), F,
        K=k, CHUNK=cfg["CHUNK"], NUM_CHUNKS=cfg["NUM_CHUNKS"], CAND=cfg["CAND"], RANK_BLOCK=cfg["RANK_BLOCK"],
        EXACT_ONLY=cfg["EXACT_ONLY"], HAS_BIAS=common["HAS_BIAS"], num_warps=cfg["num_warps"])


def matvec_fp32(W: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`W @ v` in fp32 for `W` `[m, n]` in its dtype and `v` fp32 `[n]`. bf16 on CUDA: cuBLAS with
    `out_dtype`, no fp32 copy of W (v rounded to bf16 on the way in: its range is fp32's). fp16:
    an fp32 copy of W, since v, a gradient summed over tokens (loss-scaled, in mixed precision),
    can pass fp16's 65504."""
    if W.dtype == v.dtype:
        return W @ v
    if W.dtype == torch.bfloat16 and W.is_cuda and mm_has_out_dtype():
        return torch.mm(W, v.to(W.dtype).unsqueeze(1), out_dtype=torch.float32).squeeze(1)
    return W.float() @ v.float()


def encoder_rows(W_enc: torch.Tensor) -> torch.Tensor:
    """`W_enc^T` `[F, d]` with contiguous rows: W_enc's columns, which the backward gathers per code."""
    W_t = W_enc.t()
    # clone, not contiguous(): the latter cannot run on fake CUDA tensors in a CPU-only torch (2.13)
    return W_t if W_t.stride(1) == 1 else W_t.clone(memory_format=torch.contiguous_format)


def _encoder_bwd(dx: torch.Tensor, x3: torch.Tensor, dpre: torch.Tensor, idx2: torch.Tensor, W_enc: torch.Tensor,
                 cfg, gy3: Optional[torch.Tensor] = None, blend: Optional[torch.Tensor] = None,
                 touched: Optional[torch.Tensor] = None) -> None:
    """dx `[N, d]`-shaped (contiguous, x's dtype) from dpre / idx2 `[N, k]` (`_encoder_bwd_kernel`);
    with gy3 (steer's backward) also grad_y's pass-through."""
    B, T, d = x3.shape
    W_t = encoder_rows(W_enc)
    through = gy3 is not None
    g = gy3 if through else x3
    launchable(_encoder_bwd_kernel)[(B * T, cdiv(d, cfg["BLOCK_D"]))](
        dx, g, blend if through else dpre, touched if through else dpre, dpre, idx2, W_t,
        g.stride(0), g.stride(1), g.stride(2), W_t.stride(0), T, W_t.shape[0], d,
        K=dpre.shape[1], K_BLOCK=cfg["K_BLOCK"], BLOCK_D=cfg["BLOCK_D"], PASS_THROUGH=through,
        num_warps=cfg["num_warps"])


def _encoder_weight_grads(x3: torch.Tensor, dpre: torch.Tensor, idx2: torch.Tensor, W_enc: torch.Tensor,
                          b_dec: torch.Tensor, cfg, pairs: Optional[tuple] = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dW_enc^T `[F, d]`, db_enc `[F]` (the weights' dtype) and db_dec's encoder part (fp32 `[d]`,
    -W_enc @ db_enc) from dpre `[N, k]`: per feature, the centred rows x - b_dec of the tokens
    that chose it (`_feature_rows_kernel`)."""
    d, F = W_enc.shape
    order, offsets = pairs if pairs is not None else pairs_by_feature(idx2, F)
    dW_enc_t = torch.empty(F, d, device=W_enc.device, dtype=W_enc.dtype)
    db_enc = torch.empty(F, device=W_enc.device, dtype=torch.float32)
    _feature_rows(dW_enc_t, db_enc, x3, b_dec.contiguous(), dpre, order, offsets, cfg)
    return dW_enc_t, db_enc.to(W_enc.dtype), -matvec_fp32(W_enc, db_enc)


def _topk_encode_bwd(grad_vals: torch.Tensor, x: torch.Tensor, W_enc: torch.Tensor, b_dec: torch.Tensor,
                     vals: torch.Tensor, idx: torch.Tensor, input_grad: bool = True, weight_grads: bool = True,
                     launch: Optional[LaunchConfig] = None) -> tuple:
    """Launcher. `grad_vals`, `vals` fp32 and `idx` `[..., k]`, `x` `[N, d]` or `[B, T, d]` (any
    strides). Returns dx (x's shape and dtype), dW_enc^T `[F, d]`, db_enc `[F]`, db_dec `[d]`; None
    for what was not asked. No host sync; allocations depend on shapes only."""
    x3 = as_rows(x)
    N, d, k = x3.shape[0] * x3.shape[1], x3.shape[2], vals.shape[-1]
    cfg = _launch.backward_config(d, k, launch)
    vals2 = vals.reshape(N, k)
    dpre = torch.where(vals2 > 0, grad_vals.reshape(N, k).float(), 0.0).contiguous()  # NaN codes: 0
    idx2 = idx.reshape(N, k).to(torch.int32).contiguous()
    dx = dW_enc_t = db_enc = db_dec = None
    if input_grad:
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        if N > 0:
            _encoder_bwd(dx, x3, dpre, idx2, W_enc, cfg)
    if weight_grads:
        dW_enc_t, db_enc, db_dec = _encoder_weight_grads(x3, dpre, idx2, W_enc, b_dec, cfg)
        db_dec = db_dec.to(b_dec.dtype)
    return dx, dW_enc_t, db_enc, db_dec


@torch.library.triton_op("safedig::topk_encode", mutates_args=())
def _topk_encode_op(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
                    k: int, enc_bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    check_topk_encode(x, W_enc, b_enc, b_dec, k, enc_bias, float64_allowed(x))
    if not use_triton_for(x):
        return reference.topk_encode(x, W_enc, b_enc, b_dec, k)
    if enc_bias is None:
        enc_bias = encoder_bias(W_enc, b_enc, b_dec)
    d = x.shape[-1]
    vals, idx = _topk_encode_fwd(x.reshape(-1, d), W_enc, enc_bias, k)
    return vals.reshape(*x.shape[:-1], k), idx.reshape(*x.shape[:-1], k)


@_topk_encode_op.register_fake
def _(x, W_enc, b_enc, b_dec, k, enc_bias=None):
    check_topk_encode(x, W_enc, b_enc, b_dec, k, enc_bias, float64_allowed(x))
    lead = x.shape[:-1]
    return x.new_empty(*lead, k, dtype=code_dtype(x)), x.new_empty(*lead, k, dtype=torch.int32)


@torch.library.triton_op("safedig::topk_encode_backward", mutates_args=())
def _topk_encode_backward_op(grad_vals: torch.Tensor, x: torch.Tensor, W_enc: torch.Tensor, b_dec: torch.Tensor,
                             vals: torch.Tensor, idx: torch.Tensor, input_grad: bool, weight_grads: bool
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx, dW_enc^T `[F, d]`, db_enc, db_dec (docs/spec.md "Gradients"); what was not asked comes
    back empty `[0]`."""
    check_topk_encode_backward(grad_vals, x, W_enc, b_dec, vals, idx, float64_allowed(x))
    if use_triton_for(x) and _launch.current(None).backward == "triton":
        grads = _topk_encode_bwd(grad_vals, x, W_enc, b_dec, vals, idx, input_grad, weight_grads)
    else:  # the CPU, or the torch-op alternative on CUDA (in the input dtype, as the eager reference)
        grads = reference.topk_encode_backward(grad_vals, x, W_enc, b_dec, vals, idx, upcast=not use_triton_for(x),
                                               weight_grads=weight_grads)
    return or_empty(grads, (input_grad,) + (weight_grads,) * 3, (x, W_enc, W_enc, b_dec))


@_topk_encode_backward_op.register_fake
def _(grad_vals, x, W_enc, b_dec, vals, idx, input_grad, weight_grads):
    check_topk_encode_backward(grad_vals, x, W_enc, b_dec, vals, idx, float64_allowed(x))
    d, F = W_enc.shape
    return (torch.empty_like(x, memory_format=torch.contiguous_format) if input_grad else x.new_empty(0),
            W_enc.new_empty((F, d) if weight_grads else (0,)), W_enc.new_empty((F,) if weight_grads else (0,)),
            b_dec.new_empty((d,) if weight_grads else (0,)))


def _topk_encode_setup_context(ctx, inputs, output) -> None:
    x, W_enc, _, b_dec, _, _ = inputs
    vals, idx = output
    ctx.save_for_backward(x, W_enc, b_dec, vals, idx)


def _topk_encode_backward(ctx, grad_vals, _grad_idx):
    """Gradients for x, W_enc, b_enc, b_dec; none for k, and none for enc_bias: a cache of
    `b_enc - b_dec @ W_enc`, whose gradient reaches those three (docs/spec.md "Gradients")."""
    x, W_enc, b_dec, vals, idx = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dW_enc_t, db_enc, db_dec = torch.ops.safedig.topk_encode_backward(grad_vals, x, W_enc, b_dec, vals, idx,
                                                                          need[0], any(need[1:4]))
    return (dx if need[0] else None, dW_enc_t.t() if need[1] else None, db_enc if need[2] else None,
            db_dec if need[3] else None, None, None)


_topk_encode_op.register_autograd(_topk_encode_backward, setup_context=_topk_encode_setup_context)


def topk_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, k: int,
                *, enc_bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK-SAE codes of `x` `[N, d]` or `[B, T, d]` (any strides).

    `W_enc` `[d, F]`, `b_enc` `[F]`, `b_dec` `[d]` in x's dtype and device; `1 <= k <= 256`.
    `enc_bias` optionally passes a cached `b_enc - b_dec @ W_enc` (fp32 `[F]`) to skip a GEMV.
    Returns `vals` fp32 `[..., k]` (ReLU'd, descending) and `idx` int32 `[..., k]`.
    Differentiable in x, W_enc, b_enc and b_dec through vals, the selection held fixed; on the
    CPU every tensor may be float64 (the reference computes in it; vals are then float64).
    """
    check_topk_encode_types(x, W_enc, b_enc, b_dec, k, enc_bias)
    return torch.ops.safedig.topk_encode(x, W_enc, b_enc, b_dec, k, enc_bias)
