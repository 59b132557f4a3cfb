"""Pure-PyTorch reference for every op: the spec (docs/spec.md §2) written as code.

It is the CPU path of the `safedig` ops, the oracle the kernels are tested against, and a
baseline in the benchmarks. Same signatures as the ops. It trusts its arguments: the ops check
them once on the way in (`_checks`), and a call straight to the reference is plain PyTorch.

`upcast=True` (default) computes in float32, or in float64 when `x` is float64 (the oracle
mode for tests). `upcast=False` computes in the input dtype, as plain eager PyTorch would
(pre-activations and the reconstruction rounded to bf16/fp16): the low-precision reference
whose own error sets the kernels' tolerance.

The `*_backward` functions are the ops' gradients (docs/spec.md, "Gradients"), written out: the
top-k set and the gate held fixed, a non-finite token contributing nothing but its pass-through.
They are the ops' backward on CPU tensors, the oracle of the backward kernels and, with
`upcast=False`, the torch-op alternative to them on a GPU. They scatter the k codes of each token
into a dense `[N, F]` matrix and use GEMMs (deterministic, no atomics, no host sync), where a
sparse kernel reads only the selected rows. Autograd through `steer` / `topk_encode` /
`sparse_decode` above gives the same gradients on finite tokens (tests hold the two together).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["select_topk", "encoder_preactivations", "topk_encode", "sparse_decode", "steer", "steer_from_codes",
           "gather_sum", "per_token", "encoder_backward", "topk_encode_backward", "sparse_decode_backward",
           "steer_backward"]


def _compute_dtype(x: torch.Tensor, upcast: bool) -> torch.dtype:
    if not upcast:
        return x.dtype
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def select_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over the last dim of `pre` `[..., F]`: values descending, equal values by
    lower index first, -0.0 equal to +0.0. Returns (values in pre's dtype, int64 indices)."""
    pre = pre + 0.0  # turns -0.0 into +0.0 so the two tie instead of ordering by sign bit
    if pre.dtype == torch.float64:
        vals, idx = torch.sort(pre, dim=-1, descending=True, stable=True)
        return vals[..., :k], idx[..., :k]
    # float32 or narrower (exact in float32): a 32-bit key ordered like the values, with the
    # inverted index in the low 17 bits, makes every key unique, so topk has no ties to break.
    Fdim = pre.shape[-1]
    bits = pre.float().view(torch.int32).to(torch.int64)
    key = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    inv_idx = (Fdim - 1) - torch.arange(Fdim, device=pre.device, dtype=torch.int64)
    _, idx = torch.topk(key * (1 << 17) + inv_idx, k, dim=-1, sorted=True)
    return torch.gather(pre, -1, idx), idx


def encoder_preactivations(x, W_enc, b_enc, b_dec, upcast: bool = True) -> torch.Tensor:
    """`(x - b_dec) @ W_enc + b_enc`, `[..., F]`, in the compute dtype."""
    cd = _compute_dtype(x, upcast)
    return (x.to(cd) - b_dec.to(cd)) @ W_enc.to(cd) + b_enc.to(cd)


def _nonfinite_tokens(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    # A NaN/Inf activation makes every pre-activation non-finite; checking pre as well keeps
    # the reference in step with the kernels, which only see pre.
    return ~(torch.isfinite(x).all(-1) & torch.isfinite(pre).all(-1))


def _topk_from_pre(x, pre, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    vals, idx = select_topk(pre, k)
    vals = torch.relu(vals)
    bad = _nonfinite_tokens(x, pre)
    # Non-finite tokens: NaN values over the fixed indices 0..k-1, so a decode stays in bounds.
    vals = torch.where(bad[..., None], torch.full_like(vals, float("nan")), vals)
    iota = torch.arange(k, device=idx.device, dtype=idx.dtype).expand_as(idx)
    idx = torch.where(bad[..., None], iota, idx)
    return vals, idx, bad


def topk_encode(x, W_enc, b_enc, b_dec, k: int, upcast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK-SAE codes of `x` `[N, d]` or `[B, T, d]`.

    Returns `vals` `[..., k]` (ReLU'd top-k pre-activations; float32, float64 in float64 mode)
    and `idx` `[..., k]` int32, sorted by value descending then index ascending.
    """
    pre = encoder_preactivations(x, W_enc, b_enc, b_dec, upcast)
    vals, idx, _ = _topk_from_pre(x, pre, k)
    out_dtype = torch.float64 if vals.dtype == torch.float64 else torch.float32
    return vals.to(out_dtype), idx.to(torch.int32)


def gather_sum(idx: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """`sum_j weights[n, j] * table[idx[n, j]]` `[N, d]` for 2-D `idx`/`weights` `[N, k]`, without
    an `[N, k, d]` gather; differentiable in `weights` and `table` (SAE training uses it)."""
    if idx.shape[0] == 0:
        return table.new_zeros(0, table.shape[1])
    return F.embedding_bag(idx.long(), table, per_sample_weights=weights.to(table.dtype), mode="sum")


def sparse_decode(vals, idx, W_dec, b_dec, upcast: bool = True) -> torch.Tensor:
    """`b_dec + sum_j vals[..., j] * W_dec[idx[..., j]]`, `[..., d]` in W_dec's dtype."""
    cd = _compute_dtype(W_dec, upcast)
    lead = vals.shape[:-1]
    k = vals.shape[-1]
    out = b_dec.to(cd) + gather_sum(idx.reshape(-1, k), vals.reshape(-1, k), W_dec.to(cd))
    return out.reshape(*lead, W_dec.shape[1]).to(W_dec.dtype)


def steer_from_codes(x, vals, idx, W_dec, b_dec, harmful, beta, gamma, tau, upcast: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """spec §2 steps 2-4 given a token's codes: `x` `[N, d]`, `vals`/`idx` `[N, k]` (NaN values
    mark a non-finite token); `beta`, `gamma`, `tau` 0-d or one per token `[N]`. Returns
    (y `[N, d]` in x's dtype, h `[N]`). Tests use it to score a kernel's own choice among
    near-tied features exactly."""
    cd = _compute_dtype(x, upcast)
    bad = torch.isnan(vals).any(-1)
    is_harm = harmful[idx.long()]
    zero = torch.zeros((), dtype=vals.dtype, device=vals.device)
    harm_vals = torch.where(is_harm, vals, zero)
    safe_vals = torch.where(is_harm, zero, vals)
    h = harm_vals.float().sum(-1) if cd != torch.float64 else harm_vals.sum(-1)
    h = torch.where(bad, torch.full_like(h, float("nan")), h)

    Wd = W_dec.to(cd)
    xc = x.to(cd)
    b, g = (t.to(cd).unsqueeze(-1) if t.dim() else t.to(cd) for t in (beta, gamma))
    x_hat_safe = b_dec.to(cd) + gather_sum(idx, safe_vals, Wd)
    r = gather_sum(idx, harm_vals, Wd)
    steered = (xc + (b * (x_hat_safe - xc) - g * r)).to(x.dtype)
    # Select rather than add a zero update: keeps beta = gamma = 0 and ungated tokens bitwise
    # (x + 0.0 would turn -0.0 into +0.0), and keeps NaN tokens out of the arithmetic.
    active = (h > tau.to(h.dtype)) & ((beta != 0) | (gamma != 0)) & ~bad
    return torch.where(active[:, None], steered, x), h


def steer(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, k: int,
          upcast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend/Repel steering, spec §2, per token of `x` `[N, d]` or `[B, T, d]`.

    `harmful` is a bool mask `[F]`; `beta`, `gamma`, `tau` are tensors on x's device, 0-d (every
    token) or one value per sample `[x.shape[0]]` (a batch row of `[B, T, d]`, a token of `[N, d]`).
    Returns `y` (x's shape and dtype) and the harm score `h` (float32, x's shape without d;
    float64 in float64 mode). Tokens with non-finite activations come back unchanged with
    h = NaN; beta = gamma = 0 returns x bitwise.
    """
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    pre = encoder_preactivations(x2, W_enc, b_enc, b_dec, upcast)
    vals, idx, _ = _topk_from_pre(x2, pre, k)
    beta, gamma, tau = (per_token(t, x) for t in (beta, gamma, tau))
    y, h = steer_from_codes(x2, vals, idx, W_dec, b_dec, harmful, beta, gamma, tau, upcast)
    return y.reshape(x.shape), h.reshape(x.shape[:-1])


def per_token(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A strength as the ops take it (0-d, or one per sample `[x.shape[0]]`) as one value per token
    of `x.reshape(-1, d)`, or left 0-d (it broadcasts)."""
    if not t.dim():
        return t
    return t.repeat_interleave(x.shape[1]) if x.dim() == 3 else t


# -- gradients --------------------------------------------------------------------------------

def _dense_rows(idx2: torch.Tensor, w2: torch.Tensor, F: int) -> torch.Tensor:
    """`[N, F]` holding the sum of `w2[n, j]` over the j with `idx2[n, j] = f` at `[n, f]`, zero elsewhere."""
    return torch.zeros(idx2.shape[0], F, dtype=w2.dtype, device=w2.device).scatter_add_(1, idx2.long(), w2)


def encoder_backward(dpre, idx, x2, W_enc, b_dec, bad, upcast: bool = True, weight_grads: bool = True):
    """Gradients through `pre = (x - b_dec) @ W_enc + b_enc` given `dpre` `[N, k]`, the gradient
    of the pre-activations at each token's selected features `idx` `[N, k]` (zero at the others).
    `bad` `[N]` marks non-finite tokens (their dpre is zero; their x is kept out of the sums,
    where 0 * NaN would spread). Returns, in the compute dtype: dx `[N, d]`, dW_enc transposed
    `[F, d]`, db_enc `[F]`, db_dec `[d]` (the last three None unless `weight_grads`)."""
    cd = _compute_dtype(x2, upcast)
    F = W_enc.shape[1]
    W = W_enc.to(cd)
    D = _dense_rows(idx, dpre.to(cd), F)
    dx = D @ W.t()
    if not weight_grads:
        return dx, None, None, None
    centred = torch.where(bad[:, None], torch.zeros((), dtype=cd, device=x2.device), x2.to(cd) - b_dec.to(cd))
    db_enc = D.sum(0)
    return dx, D.t() @ centred, db_enc, -(W @ db_enc)


def topk_encode_backward(grad_vals, x, W_enc, b_dec, vals, idx, upcast: bool = True, weight_grads: bool = True):
    """Gradient of `topk_encode`'s `vals` (`grad_vals`, vals' shape) back to its inputs, the
    selection `idx` held fixed: a code passes its gradient to its pre-activation where it is
    positive (ReLU), nothing where it is 0 or NaN (a non-finite token's codes are constants).
    Returns (dx in x's shape and dtype, dW_enc transposed `[F, d]`, db_enc `[F]`, db_dec `[d]`,
    the last three in the weights' dtype, None unless `weight_grads`)."""
    d, k = x.shape[-1], vals.shape[-1]
    x2, v = x.reshape(-1, d), vals.reshape(-1, k)
    zero = torch.zeros((), dtype=grad_vals.dtype, device=grad_vals.device)
    dpre = torch.where(v > 0, grad_vals.reshape(-1, k), zero)
    bad = torch.isnan(v).any(-1)
    dx, dW_enc_t, db_enc, db_dec = encoder_backward(dpre, idx.reshape(-1, k), x2, W_enc, b_dec, bad, upcast,
                                                    weight_grads)
    if weight_grads:
        dW_enc_t, db_enc, db_dec = dW_enc_t.to(W_enc.dtype), db_enc.to(W_enc.dtype), db_dec.to(b_dec.dtype)
    return dx.reshape(x.shape).to(x.dtype), dW_enc_t, db_enc, db_dec


def sparse_decode_backward(grad_out, vals, idx, W_dec, upcast: bool = True, weight_grads: bool = True):
    """Gradient of `sparse_decode` (linear in vals, W_dec and b_dec) given `grad_out` `[..., d]`:
    dvals `[..., k]` (vals' dtype; NaN for an index outside [0, F)), dW_dec `[F, d]` and db_dec
    `[d]` in W_dec's dtype (None unless `weight_grads`)."""
    cd = _compute_dtype(W_dec, upcast)
    F, d = W_dec.shape
    k = vals.shape[-1]
    g = grad_out.reshape(-1, d).to(cd)
    v, i = vals.reshape(-1, k), idx.reshape(-1, k).long()
    inside = (i >= 0) & (i < F)
    i = torch.where(inside, i, torch.zeros_like(i))
    Wd = W_dec.to(cd)
    dvals = torch.gather(g @ Wd.t(), 1, i)
    dvals = torch.where(inside, dvals, torch.full_like(dvals, float("nan"))).reshape(vals.shape).to(vals.dtype)
    if not weight_grads:
        return dvals, None, None
    w = torch.where(inside, v.to(cd), torch.zeros((), dtype=cd, device=v.device))
    return dvals, (_dense_rows(i, w, F).t() @ g).to(W_dec.dtype), g.sum(0).to(W_dec.dtype)


def steer_backward(grad_y, grad_h, x, W_enc, W_dec, b_dec, harmful, beta, gamma, tau, h, vals, idx,
                   upcast: bool = True, weight_grads: bool = True):
    """Gradient of `steer` given `grad_y` (x's shape) and `grad_h` (h's shape, or None), with the
    forward's harm score `h` (its gate) and codes `vals`, `idx` `[..., k]`: the top-k set and the
    gate held fixed. A token the forward left unchanged (gate shut, beta = gamma = 0, non-finite)
    passes `grad_y` through bitwise, plus what `grad_h` adds through its harmful codes (nothing
    for a non-finite token, whose h is NaN). Returns (dx in x's shape and dtype, dW_enc
    transposed `[F, d]`, db_enc `[F]`, dW_dec `[F, d]`, db_dec `[d]`; the weights' gradients in
    their dtype, None unless `weight_grads`)."""
    cd = _compute_dtype(x, upcast)
    d, k = x.shape[-1], vals.shape[-1]
    F = W_enc.shape[1]
    x2, gy = x.reshape(-1, d), grad_y.reshape(-1, d)
    N = x2.shape[0]
    gyc = gy.to(cd)
    h2 = h.reshape(-1)
    bad = torch.isnan(h2)
    zero = torch.zeros((), dtype=cd, device=x.device)
    gh = zero.expand(N) if grad_h is None else torch.where(bad, zero, grad_h.reshape(-1).to(cd))
    b, g, t = (per_token(s, x) for s in (beta, gamma, tau))
    active = (h2 > t.to(h2.dtype)) & ((b != 0) | (g != 0)) & ~bad
    b, g = (s.to(cd).expand(N) for s in (b, g))
    i = idx.reshape(-1, k).long()
    z = torch.where(bad[:, None], zero, vals.reshape(-1, k).to(cd))
    harm = harmful[i]
    coef = torch.where(active[:, None], torch.where(harm, -g[:, None], b[:, None]), zero)
    dots = torch.gather(gyc @ W_dec.to(cd).t(), 1, i)  # <grad_y, W_dec[j]> per code
    dz = coef * dots + torch.where(harm, gh[:, None], zero)
    dpre = torch.where(z > 0, dz, zero)
    dx_enc, dW_enc_t, db_enc, db_dec_enc = encoder_backward(dpre, i, x2, W_enc, b_dec, bad, upcast, weight_grads)
    blend = torch.where(active, b, zero)
    touched = active | (gh != 0)
    dx = torch.where(touched[:, None], (gyc - blend[:, None] * gyc + dx_enc).to(x.dtype), gy).reshape(x.shape)
    if not weight_grads:
        return dx, None, None, None, None
    dW_dec = _dense_rows(i, coef * z, F).t() @ gyc
    db_dec = blend @ gyc + db_dec_enc
    return (dx, dW_enc_t.to(W_enc.dtype), db_enc.to(W_enc.dtype), dW_dec.to(W_dec.dtype),
            db_dec.to(b_dec.dtype))
