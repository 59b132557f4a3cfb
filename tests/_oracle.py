"""A direct, dense float64 statement of SPEC §2, written independently of the reference.

Selection is a plain Python sort per token (value descending, index ascending), the codes are
a dense [N, F] matrix and the decode a dense matmul: slow and obviously right, for tiny sizes.
"""
from __future__ import annotations

import torch


def dense_codes64(x, W_enc, b_enc, b_dec, k):
    """Returns (pre [N, F], idx list of lists, dense z [N, F], bad [N]) in float64."""
    d = x.shape[-1]
    x64 = x.detach().reshape(-1, d).double().cpu()
    pre = (x64 - b_dec.double().cpu()) @ W_enc.double().cpu() + b_enc.double().cpu()
    N, F = pre.shape
    bad = ~(torch.isfinite(x64).all(-1) & torch.isfinite(pre).all(-1))
    z = torch.zeros(N, F, dtype=torch.float64)
    chosen = []
    for n in range(N):
        if bad[n]:
            chosen.append(list(range(k)))
            continue
        row = [float(v) + 0.0 for v in pre[n]]
        order = sorted(range(F), key=lambda j: (-row[j], j))[:k]
        chosen.append(order)
        for j in order:
            z[n, j] = max(row[j], 0.0)
    return pre, chosen, z, bad


def dense_steer64(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, k, chosen=None):
    """y [N, d] and h [N] in float64. `chosen` (per-token index lists) overrides the selection,
    so a kernel's own choice among near-ties can be scored exactly."""
    d = x.shape[-1]
    x64 = x.detach().reshape(-1, d).double().cpu()
    pre, sel, _, bad = dense_codes64(x, W_enc, b_enc, b_dec, k)
    if chosen is not None:
        sel = chosen
    N, F = pre.shape
    z = torch.zeros(N, F, dtype=torch.float64)
    for n in range(N):
        if not bad[n]:
            for j in sel[n]:
                z[n, int(j)] = max(float(pre[n, int(j)]), 0.0)
    H = harmful.cpu().double()
    h = (z * H).sum(-1)
    x_hat_safe = b_dec.double().cpu() + (z * (1 - H)) @ W_dec.double().cpu()
    r = (z * H) @ W_dec.double().cpu()
    b, g, t = float(beta), float(gamma), float(tau)
    gate = (h > t) & ~bad & torch.tensor(b != 0 or g != 0)
    y = torch.where(gate[:, None], x64 + (b * (x_hat_safe - x64) - g * r), x64)
    h = torch.where(bad, torch.full_like(h, float("nan")), h)
    return y, h


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor):
    assert a.dtype == b.dtype and a.shape == b.shape
    ai = a.contiguous().view(torch.int16 if a.element_size() == 2 else torch.int32 if a.element_size() == 4 else torch.int64)
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
    assert not short.any(), f"chose values below the k-th largest by more than tol at tokens {short.any(-1).nonzero().flatten().tolist()[:8]}"
    unordered = chosen.diff(dim=-1) > tol[:, None]
    assert not unordered.any(), "values not in descending order"


def buffer_rounding(gemm64: torch.Tensor, idx: torch.Tensor, rel: float) -> torch.Tensor:
    """Per chosen code, how far the kernels' pre-activation buffer may be from exact: the GEMM
    output `x @ W_enc` is rounded to the buffer dtype (one unit in the last place, `rel`
    relative) before the fp32 bias is added. `gemm64` `[N, F]`, `idx` `[N, k]` -> `[N, k]`."""
    return rel * torch.gather(gemm64.abs(), 1, idx.long())


def assert_codes_within_tolerance(vals, h, idx, pre64, gemm64, harmful, rel, lowp_err_vals, lowp_err_h):
    """The kernels' codes and harm scores against float64 at the kernels' own features: each
    within the buffer's rounding (`buffer_rounding`) plus twice the low-precision reference's
    error plus an fp32 margin. Rows of NaN (non-finite tokens) must be NaN on both sides."""
    idx = idx.long()
    z64 = torch.gather(pre64, 1, idx).clamp_min(0)
    bad = torch.isnan(vals).any(-1)
    z64 = torch.where(bad[:, None], torch.full_like(z64, float("nan")), z64)
    rounding = buffer_rounding(gemm64, idx, rel)
    margin = 1e-5 * (1 + pre64.abs().nan_to_num(0).amax())
    err = (vals.double() - z64).abs()
    assert torch.equal(torch.isnan(vals), torch.isnan(z64))
    assert (err.nan_to_num(0) <= rounding.nan_to_num(0) + 2 * lowp_err_vals + margin).all(), \
        f"codes off by {err.nan_to_num(0).max().item():.3g}"
    harm = harmful[idx]
    h64 = (z64 * harm).sum(-1)
    h_err = (h.double() - h64).abs()
    h_bound = (rounding * harm).sum(-1).nan_to_num(0) + 2 * lowp_err_h + margin * harm.sum(-1)
    assert torch.equal(torch.isnan(h), torch.isnan(h64))
    assert (h_err.nan_to_num(0) <= h_bound).all(), f"harm scores off by {h_err.nan_to_num(0).max().item():.3g}"
