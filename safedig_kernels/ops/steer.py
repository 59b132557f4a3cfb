"""`safedig::steer`: SPEC §2 in one call: encode, harm score, gate, Blend/Repel.

On CUDA: `topk_encode`'s GEMM and selection produce the codes, then `_steer_fwd_kernel`
does the rest in one pass over the decoder rows. Each program owns one token and one block of
d; it recomputes the token's harm score from its k codes (a few bytes), so no program waits
on another. Per selected feature j the update weight is `beta * z_j` (safe) or `-gamma * z_j`
(harmful), and only rows with a non-zero weight are read: beta = 0 reads harmful rows alone,
an ungated token reads no rows at all. Strengths and threshold are read from device tensors,
so changing them needs no recompilation and no host sync.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from .. import reference
from .._checks import check_steer
from .._library import use_triton_for
from ._triton import cdiv, tl, triton
from .sparse_decode import _weighted_row_sum, decode_config
from .topk_encode import _topk_encode_fwd, encoder_bias


@triton.jit
def _load_codes(vals_ptr, idx_ptr, harmful_ptr, n, kb, F, K: tl.constexpr, K_BLOCK: tl.constexpr):
    """Codes kb .. kb + K_BLOCK of token n: values, feature ids, harmful flags, in-range mask."""
    ks = kb + tl.arange(0, K_BLOCK)
    kmask = ks < K
    z = tl.load(vals_ptr + n * K + ks, mask=kmask, other=0.0)
    j = tl.load(idx_ptr + n * K + ks, mask=kmask, other=0)
    harm = tl.load(harmful_ptr + j, mask=kmask & (j >= 0) & (j < F), other=0) != 0
    return z, j, harm, kmask


@triton.jit
def _steer_fwd_kernel(
    y_ptr, h_ptr,
    x_ptr, vals_ptr, idx_ptr, harmful_ptr, W_dec_ptr, b_dec_ptr, beta_ptr, gamma_ptr, tau_ptr,
    stride_xb, stride_xt, stride_xd, stride_wf, T, F, d,
    K: tl.constexpr, K_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    d_block = tl.program_id(1)
    offs_d = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < d

    h = tl.zeros([], dtype=tl.float32)
    n_nan = tl.zeros([], dtype=tl.int32)
    for kb in range(0, K, K_BLOCK):
        z, j, harm, kmask = _load_codes(vals_ptr, idx_ptr, harmful_ptr, n, kb, F, K, K_BLOCK)
        h += tl.sum(tl.where(harm, z, 0.0), axis=0)
        n_nan += tl.sum((z != z).to(tl.int32), axis=0)  # the encoder marks non-finite tokens with NaN codes
    h = tl.where(n_nan > 0, float("nan"), h)
    tl.store(h_ptr + n, h, mask=d_block == 0)

    beta = tl.load(beta_ptr).to(tl.float32)
    gamma = tl.load(gamma_ptr).to(tl.float32)
    tau = tl.load(tau_ptr).to(tl.float32)
    active = (h > tau) & ((beta != 0.0) | (gamma != 0.0))  # NaN h never passes the gate

    row = x_ptr + (n // T) * stride_xb + (n % T) * stride_xt
    x = tl.load(row + offs_d * stride_xd, mask=dmask, other=0.0)
    if active:
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for kb in range(0, K, K_BLOCK):
            # own names: reusing the first loop's would make them loop-carried (Triton 3.6-3.9)
            z2, j2, harm2, kmask2 = _load_codes(vals_ptr, idx_ptr, harmful_ptr, n, kb, F, K, K_BLOCK)
            w = tl.where(harm2, -gamma * z2, beta * z2)
            acc = _weighted_row_sum(acc, w, j2, kmask2, W_dec_ptr, stride_wf, F, offs_d, dmask)
        xf = x.to(tl.float32)
        b_dec = tl.load(b_dec_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
        y = (xf + (beta * (b_dec - xf) + acc)).to(x.dtype)
    else:
        y = x  # selected, not x + 0: bitwise, -0.0 included
    tl.store(y_ptr + n * d + offs_d, y, mask=dmask)


def _steer_fwd(x: torch.Tensor, W_enc, W_dec, b_dec, harmful, beta, gamma, tau, k: int,
               enc_bias: torch.Tensor, pre_dtype: Optional[torch.dtype] = None,
               chunk: Optional[int] = None, select_warps: Optional[int] = None,
               decode_overrides: Optional[dict] = None, select_algo: Optional[str] = None,
               select_stages: Optional[int] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher. `x` `[N, d]` or `[B, T, d]`, any strides. Returns y (contiguous, x's shape and
    dtype) and h (fp32, x's shape without d). No host sync; allocations depend on shapes only.
    The keyword overrides exist for the benchmarks' tuning sweep."""
    d = x.shape[-1]
    x3 = x if x.dim() == 3 else x.unsqueeze(1)  # [N, d] -> [N, 1, d]: T = 1
    B, T, _ = x3.shape
    N = B * T
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    h = torch.empty(x.shape[:-1], device=x.device, dtype=torch.float32)
    if N == 0:
        return y, h
    vals, idx = _topk_encode_fwd(x3.reshape(N, d), W_enc, enc_bias, k, pre_dtype, chunk, select_warps, select_algo,
                                 select_stages)
    _decode_steer(y, h, x3, vals, idx, harmful, W_dec, b_dec, beta, gamma, tau, k, decode_config(d, k, decode_overrides))
    return y, h


def _decode_steer(y, h, x3, vals, idx, harmful, W_dec, b_dec, beta, gamma, tau, k: int, cfg: Mapping) -> None:
    B, T, d = x3.shape
    W_dec = W_dec if W_dec.stride(1) == 1 else W_dec.contiguous()
    grid = (B * T, cdiv(d, cfg["BLOCK_D"]))
    _steer_fwd_kernel[grid](
        y, h, x3, vals, idx, harmful.view(torch.uint8), W_dec, b_dec.contiguous(),
        beta, gamma, tau,
        x3.stride(0), x3.stride(1), x3.stride(2), W_dec.stride(0), T, W_dec.shape[0], d,
        K=k, **cfg,
    )


@torch.library.custom_op("safedig::steer", mutates_args=())
def _steer_op(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
              b_dec: torch.Tensor, harmful: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor,
              tau: torch.Tensor, k: int, enc_bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    check_steer(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, k)
    if not use_triton_for(x):
        return reference.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, k)
    if enc_bias is None:
        enc_bias = encoder_bias(W_enc, b_enc, b_dec)
    return _steer_fwd(x, W_enc, W_dec, b_dec, harmful, beta, gamma, tau, k, enc_bias)


@_steer_op.register_fake
def _(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, k, enc_bias=None):
    check_steer(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, k)
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[:-1], dtype=torch.float32)
