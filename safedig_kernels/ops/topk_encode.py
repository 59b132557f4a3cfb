"""`safedig::topk_encode`: encoder GEMM plus exact top-k selection.

Design (SPEC §6, option b): cuBLAS computes `x @ W_enc` once into a pre-activation buffer;
`_topk_select_kernel` reads each row once more, adds the folded encoder bias in fp32 and
selects the top k, one program per token:

1. pass 1 takes the maximum of each of GROUPS strided groups of the row. The k-th largest
   group maximum L is a lower bound on the k-th largest value (k groups hold a value >= L);
2. pass 2 compacts the candidates `v >= L` (typically ~1.2 k of them) into a small scratch row;
3. each candidate's rank under (value descending, index ascending) is counted against all the
   others; candidates of rank < k are written to their rank's slot, so the result comes out
   sorted with the exact tie order of SPEC §2.

When the candidates overflow the scratch row (heavy ties) or k > 64, an exact fallback finds
the k-th largest key by bisection and keeps exactly k candidates, lower indices first among
equals. Non-finite rows get NaN values over indices 0..k-1.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .._checks import check_encoder, check_k
from .._library import mm_has_out_dtype, use_triton_for
from ._triton import tl, triton

# Bytes of pre-activations materialised at once; larger inputs are processed in row chunks.
PRE_BUFFER_BYTES = 1 << 30


@triton.jit
def _load_row_chunk(pre_row_ptr, bias_ptr, start, F, CHUNK: tl.constexpr):
    offs = start + tl.arange(0, CHUNK)
    valid = offs < F
    v = tl.load(pre_row_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    v = v + tl.load(bias_ptr + offs, mask=valid, other=0.0)
    v = tl.where(v == 0.0, 0.0, v)  # -0.0 -> +0.0: equal values must tie, not order by sign
    return v, offs, valid


@triton.jit
def _ordered_key(v):
    # int32 key with the order of the float values (finite values only).
    bits = v.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _topk_select_kernel(
    vals_ptr, idx_ptr, cand_val_ptr, cand_idx_ptr,
    pre_ptr, bias_ptr,
    stride_pre, F,
    K: tl.constexpr, CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr, GROUPS: tl.constexpr,
    CAND: tl.constexpr, RANK_BLOCK: tl.constexpr, EXACT_ONLY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    pre_row = pre_ptr + row * stride_pre
    out_vals = vals_ptr + row * K
    out_idx = idx_ptr + row * K
    cand_vals = cand_val_ptr + row * CAND
    cand_idx = cand_idx_ptr + row * CAND
    GS: tl.constexpr = CHUNK // GROUPS

    # Pass 1: finiteness and the group maxima, accumulated element-wise across chunks so the
    # block-wide reductions (each a barrier) happen once per row, not once per chunk.
    nonfinite = tl.zeros([CHUNK], dtype=tl.int32)
    gmax = tl.full([GROUPS], float("-inf"), tl.float32)
    for c in range(NUM_CHUNKS):
        v, offs, valid = _load_row_chunk(pre_row, bias_ptr, c * CHUNK, F, CHUNK)
        nonfinite = nonfinite | (valid & ~((v == v) & (tl.abs(v) < float("inf")))).to(tl.int32)
        if not EXACT_ONLY:
            vg = tl.reshape(tl.where(valid, v, float("-inf")), (GROUPS, GS))
            gmax = tl.maximum(gmax, tl.max(vg, axis=1))
    n_bad = tl.max(nonfinite, axis=0)

    ks = tl.arange(0, CAND)
    if n_bad > 0:
        tl.store(out_vals + ks, tl.full([CAND], float("nan"), tl.float32), mask=ks < K)
        tl.store(out_idx + ks, ks.to(tl.int32), mask=ks < K)
    else:
        n_cand = tl.zeros([], dtype=tl.int32)
        if not EXACT_ONLY:
            # L = the K-th largest group maximum (ties broken by group index, so exactly one
            # group has rank K - 1). Groups past F hold -inf and rank last.
            # (Triton lesson, 3.6-3.9: a name reused inside a later loop becomes loop-carried and
            # must keep its shape, so every block here has a name of its own.)
            gi = tl.arange(0, GROUPS)
            group_beats = (gmax[None, :] > gmax[:, None]) | ((gmax[None, :] == gmax[:, None]) & (gi[None, :] < gi[:, None]))
            grank = tl.sum(group_beats.to(tl.int32), axis=1)
            lower = tl.max(tl.where(grank == K - 1, gmax, float("-inf")), axis=0)
            # Pass 2: compact the candidates v >= L.
            for c in range(NUM_CHUNKS):
                v, offs, valid = _load_row_chunk(pre_row, bias_ptr, c * CHUNK, F, CHUNK)
                is_cand = valid & (v >= lower)
                pos = n_cand + tl.cumsum(is_cand.to(tl.int32), axis=0) - 1
                keep = is_cand & (pos < CAND)
                tl.store(cand_vals + pos, v, mask=keep)
                tl.store(cand_idx + pos, offs.to(tl.int32), mask=keep)
                n_cand += tl.sum(is_cand.to(tl.int32), axis=0)

        if EXACT_ONLY or n_cand > CAND:
            # Exact fallback: bisect for T, the K-th largest key: count(key >= T) >= K > count(key > T).
            row_max = tl.full([CHUNK], float("-inf"), tl.float32)
            row_min = tl.full([CHUNK], float("inf"), tl.float32)
            for c in range(NUM_CHUNKS):
                v, offs, valid = _load_row_chunk(pre_row, bias_ptr, c * CHUNK, F, CHUNK)
                row_max = tl.maximum(row_max, tl.where(valid, v, float("-inf")))
                row_min = tl.minimum(row_min, tl.where(valid, v, float("inf")))
            lo = _ordered_key(tl.min(row_min, axis=0)).to(tl.int64)
            hi = _ordered_key(tl.max(row_max, axis=0)).to(tl.int64)
            while lo < hi:
                mid = lo + (hi - lo + 1) // 2
                count = tl.zeros([], dtype=tl.int32)
                for c in range(NUM_CHUNKS):
                    v, offs, valid = _load_row_chunk(pre_row, bias_ptr, c * CHUNK, F, CHUNK)
                    count += tl.sum((valid & (_ordered_key(v).to(tl.int64) >= mid)).to(tl.int32), axis=0)
                if count >= K:
                    lo = mid
                else:
                    hi = mid - 1
            n_above = tl.zeros([], dtype=tl.int32)
            for c in range(NUM_CHUNKS):
                v, offs, valid = _load_row_chunk(pre_row, bias_ptr, c * CHUNK, F, CHUNK)
                n_above += tl.sum((valid & (_ordered_key(v).to(tl.int64) > lo)).to(tl.int32), axis=0)
            # Keep every key > T and the first (K - n_above) keys == T in index order.
            n_tied = tl.zeros([], dtype=tl.int32)
            n_cand = tl.zeros([], dtype=tl.int32)
            for c in range(NUM_CHUNKS):
                v, offs, valid = _load_row_chunk(pre_row, bias_ptr, c * CHUNK, F, CHUNK)
                key = _ordered_key(v).to(tl.int64)
                tied = valid & (key == lo)
                tie_rank = n_tied + tl.cumsum(tied.to(tl.int32), axis=0)
                keep = (valid & (key > lo)) | (tied & (tie_rank <= K - n_above))
                pos = n_cand + tl.cumsum(keep.to(tl.int32), axis=0) - 1
                tl.store(cand_vals + pos, v, mask=keep)
                tl.store(cand_idx + pos, offs.to(tl.int32), mask=keep)
                n_tied += tl.sum(tied.to(tl.int32), axis=0)
                n_cand += tl.sum(keep.to(tl.int32), axis=0)

        # The scratch row was written by other threads of this program.
        tl.debug_barrier()

        # Rank each candidate against all candidates; rank < K lands in its output slot.
        cmask = ks < n_cand
        cv = tl.load(cand_vals + ks, mask=cmask, other=float("-inf"))
        ci = tl.load(cand_idx + ks, mask=cmask, other=0)
        rank = tl.zeros([CAND], dtype=tl.int32)
        for jb in range(0, n_cand, RANK_BLOCK):
            js = jb + tl.arange(0, RANK_BLOCK)
            jmask = js < n_cand
            jv = tl.load(cand_vals + js, mask=jmask, other=float("-inf"))
            ji = tl.load(cand_idx + js, mask=jmask, other=0)
            cand_beats = (jv[None, :] > cv[:, None]) | ((jv[None, :] == cv[:, None]) & (ji[None, :] < ci[:, None]))
            rank += tl.sum((cand_beats & jmask[None, :]).to(tl.int32), axis=1)
        chosen = cmask & (rank < K)
        tl.store(out_vals + rank, tl.maximum(cv, 0.0), mask=chosen)
        tl.store(out_idx + rank, ci, mask=chosen)


def select_config(F: int, k: int, chunk: Optional[int] = None, num_warps: Optional[int] = None) -> dict:
    """Launch settings for `_topk_select_kernel`: a small heuristic, not autotuned.

    CHUNK elements of the row are held at once (more per chunk: fewer loop trips, more
    registers); GROUPS = 2 * next_pow2(k) groups leave ~1.2 k candidates on random data, and
    CAND = 4 * next_pow2(k) scratch slots leave room for skewed rows before the fallback.
    """
    k_pow2 = triton.next_power_of_2(k)
    if chunk is None:
        chunk = min(triton.next_power_of_2(F), 4096)
    exact_only = k_pow2 > 64
    groups = min(2 * k_pow2, chunk)
    if groups < k:  # a chunk this small cannot give k groups: the bound would not hold
        exact_only = True
    cand = k_pow2 if exact_only else 4 * k_pow2
    return dict(
        CHUNK=chunk, NUM_CHUNKS=triton.cdiv(F, chunk), GROUPS=max(groups, 1), CAND=cand,
        RANK_BLOCK=min(cand, 32), EXACT_ONLY=exact_only,
        num_warps=num_warps or (8 if chunk >= 4096 else 4),
    )


def encoder_bias(W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """`b_enc - b_dec @ W_enc` in fp32, `[F]`: folds the input centring into the bias, so the
    GEMM reads x as it is (no rounded `x - b_dec` copy)."""
    if W_enc.dtype != torch.float32 and W_enc.is_cuda and mm_has_out_dtype():
        centre = torch.mm(b_dec[None], W_enc, out_dtype=torch.float32)[0]
    else:
        centre = b_dec.float() @ W_enc.float()
    return b_enc.float() - centre


def pre_dtype_for(x_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Pre-activation buffer dtype. bf16 stays bf16 (SPEC §6: written once, read once); fp16
    goes to fp32 where cuBLAS can write it, since DiT activations overflow fp16 pre-activations."""
    if x_dtype == torch.float16 and (device.type != "cuda" or mm_has_out_dtype()):
        return torch.float32
    return x_dtype


def _gemm(x2: torch.Tensor, W_enc: torch.Tensor, pre_dtype: torch.dtype) -> torch.Tensor:
    if pre_dtype == x2.dtype:
        return torch.mm(x2, W_enc)
    if x2.is_cuda:
        return torch.mm(x2, W_enc, out_dtype=pre_dtype)
    return torch.mm(x2.to(pre_dtype), W_enc.to(pre_dtype))  # CPU under the interpreter


def _topk_encode_fwd(x2: torch.Tensor, W_enc: torch.Tensor, enc_bias: torch.Tensor, k: int,
                     pre_dtype: Optional[torch.dtype] = None, chunk: Optional[int] = None,
                     num_warps: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher. `x2` `[N, d]` (any strides), `enc_bias` fp32 `[F]`. Returns vals fp32 and idx
    int32, `[N, k]`. No host sync; allocations depend on shapes only. `pre_dtype`, `chunk`
    and `num_warps` override the defaults (benchmarks sweep them)."""
    N = x2.shape[0]
    F = W_enc.shape[1]
    vals = torch.empty(N, k, device=x2.device, dtype=torch.float32)
    idx = torch.empty(N, k, device=x2.device, dtype=torch.int32)
    if N == 0:
        return vals, idx
    pre_dtype = pre_dtype or pre_dtype_for(x2.dtype, x2.device)
    cfg = select_config(F, k, chunk, num_warps)
    rows_per_pass = max(1, PRE_BUFFER_BYTES // (F * torch.finfo(pre_dtype).bits // 8))
    cand_vals = torch.empty(min(N, rows_per_pass), cfg["CAND"], device=x2.device, dtype=torch.float32)
    cand_idx = torch.empty(min(N, rows_per_pass), cfg["CAND"], device=x2.device, dtype=torch.int32)
    enc_bias = enc_bias.contiguous()
    for start in range(0, N, rows_per_pass):
        stop = min(N, start + rows_per_pass)
        pre = _gemm(x2[start:stop], W_enc, pre_dtype)
        _select(vals[start:stop], idx[start:stop], cand_vals, cand_idx, pre, enc_bias, k, cfg)
    return vals, idx


def _select(vals, idx, cand_vals, cand_idx, pre, enc_bias, k: int, cfg: dict) -> None:
    meta = {n: cfg[n] for n in ("CHUNK", "NUM_CHUNKS", "GROUPS", "CAND", "RANK_BLOCK", "EXACT_ONLY")}
    _topk_select_kernel[(pre.shape[0],)](
        vals, idx, cand_vals, cand_idx, pre, enc_bias, pre.stride(0), pre.shape[1],
        K=k, num_warps=cfg["num_warps"], **meta,
    )


def _check(x, W_enc, b_enc, b_dec, k, enc_bias):
    _, F = check_encoder(x, W_enc, b_enc, b_dec)
    check_k(k, F)
    if enc_bias is not None:
        if enc_bias.shape != (F,) or enc_bias.dtype != torch.float32 or enc_bias.device != x.device:
            raise ValueError(f"enc_bias must be float32 [F] = [{F}] on {x.device}, got "
                             f"{enc_bias.dtype} {tuple(enc_bias.shape)} on {enc_bias.device}")


@torch.library.custom_op("safedig::topk_encode", mutates_args=())
def _topk_encode_op(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
                    k: int, enc_bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, W_enc, b_enc, b_dec, k, enc_bias)
    if not use_triton_for(x):
        return reference.topk_encode(x, W_enc, b_enc, b_dec, k)
    if enc_bias is None:
        enc_bias = encoder_bias(W_enc, b_enc, b_dec)
    d = x.shape[-1]
    vals, idx = _topk_encode_fwd(x.reshape(-1, d), W_enc, enc_bias, k)
    return vals.reshape(*x.shape[:-1], k), idx.reshape(*x.shape[:-1], k)


@_topk_encode_op.register_fake
def _(x, W_enc, b_enc, b_dec, k, enc_bias=None):
    _check(x, W_enc, b_enc, b_dec, k, enc_bias)
    lead = x.shape[:-1]
    return x.new_empty(*lead, k, dtype=torch.float32), x.new_empty(*lead, k, dtype=torch.int32)


def topk_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, k: int,
                *, enc_bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK-SAE codes of `x` `[N, d]` or `[B, T, d]` (any strides).

    `W_enc` `[d, F]`, `b_enc` `[F]`, `b_dec` `[d]` in x's dtype and device; `1 <= k <= 256`.
    `enc_bias` optionally passes a cached `b_enc - b_dec @ W_enc` (fp32 `[F]`) to skip a GEMV.
    Returns `vals` fp32 `[..., k]` (ReLU'd, descending) and `idx` int32 `[..., k]`.
    """
    _check(x, W_enc, b_enc, b_dec, k, enc_bias)  # clear errors before the dispatcher's own
    return torch.ops.safedig.topk_encode(x, W_enc, b_enc, b_dec, k, enc_bias)
