"""Tolerances and comparisons shared by the test suite and the benchmarks' correctness gate.

One rule (spec §3): a kernel's error against a high-precision reference may be at most
`LOWP_FACTOR` times the error of the same computation done plainly in the input dtype (the
low-precision reference, what eager PyTorch would give), plus a small absolute term; top-k
choices may differ only among near ties. `tolerance` states the bound; the assertions below
apply it to selections, codes and harm scores. `bench/check.py` refuses to time a benchmark
row that breaks it; the tests fail.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["LOWP_FACTOR", "EPS", "CAP", "TIE_RTOL", "PRE_REL_TOL", "BUFFER_ULP", "REFERENCE_TOL", "tolerance",
           "assert_bitwise_equal", "assert_valid_topk", "buffer_rounding", "assert_codes_within_tolerance"]

LOWP_FACTOR = 2.0
# The bound's absolute floor and its ceiling, per dtype, relative to a token's norm.
EPS = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 1e-5}
CAP = {torch.bfloat16: 5e-2, torch.float16: 1e-2, torch.float32: 1e-4}
# How far apart two pre-activations computed in the input dtype may truly be and still come
# out in either order (relative to the token's largest |pre|): a few roundings each side.
TIE_RTOL = {torch.bfloat16: 2.0 ** -6, torch.float16: 2.0 ** -8, torch.float32: 1e-5}
# Relative rounding of the pre-activation buffer the kernels select on (bf16 pre for bf16,
# fp32 pre for fp16 and fp32) plus the fp32 accumulation of a d-long dot product.
PRE_REL_TOL = {torch.bfloat16: 2.0 ** -7, torch.float16: 2e-5, torch.float32: 2e-5}
# One unit in the last place of that buffer, relative: what a code may carry from the rounding
# of x @ W_enc alone (the H200 run of 2026-11-28 showed an h off by 0.013 at 5.69 in bf16, with
# the plain 2x-the-low-precision-reference bound at 0.006; a CPU emulation reproduced it exactly).
BUFFER_ULP = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -23, torch.float32: 2.0 ** -23}

# The CPU reference's output against float64 at the reference's own codes, relative to the
# token's scale: it computes in float32 and rounds y to the input dtype once (half an ulp is
# 2^-9 relative in bf16, 2^-12 in fp16), so a few ulps leave room for sums that cancel.
REFERENCE_TOL = {torch.bfloat16: 2.0 ** -5, torch.float16: 2.0 ** -8, torch.float32: 1e-4}


def tolerance(reference_err: float, dtype: torch.dtype, atol: Optional[float] = None, cap: bool = True) -> float:
    """The most error an output may have: `LOWP_FACTOR * reference_err + atol` (`atol` defaults
    to `EPS[dtype]`), at most `CAP[dtype]` unless `cap` is False."""
    bound = LOWP_FACTOR * reference_err + (EPS[dtype] if atol is None else atol)
    return min(bound, CAP[dtype]) if cap else bound


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor):
    assert a.dtype == b.dtype and a.shape == b.shape
    ai = a.contiguous().view(torch.int16 if a.element_size() == 2
                             else torch.int32 if a.element_size() == 4 else torch.int64)
    bi = b.contiguous().view(ai.dtype)
    assert torch.equal(ai, bi), "tensors differ bitwise"


def assert_valid_topk(pre64: torch.Tensor, idx: torch.Tensor, k: int, tol: torch.Tensor | float) -> None:
    """`idx` `[N, k]` must be a top-k of `pre64` `[N, F]` up to near-ties: every chosen value is
    within `tol` (per token or scalar) of the true k-th largest, and the order is descending up
    to `tol`."""
    idx = idx.reshape(-1, k).long().to(pre64.device)
    if idx.shape[0] == 0:
        return
    pre64 = pre64.reshape(idx.shape[0], -1)
    tol = torch.as_tensor(tol, dtype=torch.float64, device=pre64.device).expand(idx.shape[0])
    kth = torch.sort(pre64, dim=-1, descending=True).values[:, k - 1]
    chosen = torch.gather(pre64, 1, idx)
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all(), "an index was chosen twice"
    short = chosen < kth[:, None] - tol[:, None]
    assert not short.any(), ("chose values below the k-th largest by more than tol at tokens "
                             f"{short.any(-1).nonzero().flatten().tolist()[:8]}")
    unordered = chosen.diff(dim=-1) > tol[:, None]
    assert not unordered.any(), "values not in descending order"


def buffer_rounding(gemm64: torch.Tensor, idx: torch.Tensor, rel: float) -> torch.Tensor:
    """Per chosen code, how far the kernels' pre-activation buffer may be from exact: the GEMM
    output `x @ W_enc` is rounded to the buffer dtype (one unit in the last place, `rel`
    relative) before the fp32 bias is added. `gemm64` `[N, F]`, `idx` `[N, k]` -> `[N, k]`."""
    return rel * torch.gather(gemm64.abs(), 1, idx.long())


def assert_codes_within_tolerance(vals, h, idx, pre64, gemm64, harmful, rel, lowp_err_vals, lowp_err_h):
    """The kernels' codes and harm scores against float64 at the kernels' own features: each
    within the buffer's rounding (`buffer_rounding`) plus LOWP_FACTOR times the low-precision
    reference's error plus an fp32 margin. Rows of NaN (non-finite tokens) must be NaN on both
    sides."""
    idx = idx.long()
    z64 = torch.gather(pre64, 1, idx).clamp_min(0)
    bad = torch.isnan(vals).any(-1)
    z64 = torch.where(bad[:, None], torch.full_like(z64, float("nan")), z64)
    rounding = buffer_rounding(gemm64, idx, rel)
    margin = 1e-5 * (1 + pre64.abs().nan_to_num(0).amax())
    err = (vals.double() - z64).abs()
    assert torch.equal(torch.isnan(vals), torch.isnan(z64))
    assert (err.nan_to_num(0) <= rounding.nan_to_num(0) + LOWP_FACTOR * lowp_err_vals + margin).all(), \
        f"codes off by {err.nan_to_num(0).max().item():.3g}"
    harm = harmful[idx]
    h64 = (z64 * harm).sum(-1)
    h_err = (h.double() - h64).abs()
    h_bound = (rounding * harm).sum(-1).nan_to_num(0) + LOWP_FACTOR * lowp_err_h + margin * harm.sum(-1)
    assert torch.equal(torch.isnan(h), torch.isnan(h64))
    assert (h_err.nan_to_num(0) <= h_bound).all(), f"harm scores off by {h_err.nan_to_num(0).max().item():.3g}"
