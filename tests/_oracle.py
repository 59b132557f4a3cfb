"""A direct, dense float64 statement of spec §2, written independently of the reference.

Selection is a plain Python sort per token (value descending, index ascending), the codes are
a dense [N, F] matrix and the decode a dense matmul: slow and obviously right, for tiny sizes.
The tolerances the kernels are held to live in `safedig_kernels.testing`.
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


def selection_margin(x, W_enc, b_enc, b_dec, k, harmful=None, tau=None):
    """How far (float64) the finite tokens of `x` are from a point where the top-k set, a code's
    ReLU or the gate switches: the smallest of the gap between the k-th and (k+1)-th largest
    pre-activation, the |value| of a selected pre-activation, and |h - tau| (with `harmful` and
    a scalar `tau`). A finite-difference gradient check is valid when its perturbations move
    the pre-activations by much less than this."""
    pre, chosen, z, bad = dense_codes64(x, W_enc, b_enc, b_dec, k)
    margin = float("inf")
    for n in range(pre.shape[0]):
        if bad[n]:
            continue
        top = torch.sort(pre[n], descending=True).values
        if k < top.numel():
            margin = min(margin, float(top[k - 1] - top[k]))
        margin = min(margin, float(top[:k].abs().min()))
        if harmful is not None and tau is not None:
            h = float((z[n] * harmful.cpu().double()).sum())
            margin = min(margin, abs(h - float(tau)))
    return margin
