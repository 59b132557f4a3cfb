"""`safedig::steer`: spec §2 in one call: encode, harm score, gate, Blend/Repel.

On CUDA: `topk_encode`'s GEMM and selection produce the codes, then `_steer_fwd_kernel`
does the rest in one pass over the decoder rows. Each program owns one token and one block of
d; it recomputes the token's harm score from its k codes (a few bytes), so no program waits
on another. Per selected feature j the update weight is `beta * z_j` (safe) or `-gamma * z_j`
(harmful), and only rows with a non-zero weight are read: beta = 0 reads harmful rows alone,
an ungated token reads no rows at all. Strengths and threshold are read from device tensors,
so changing them needs no recompilation and no host sync; each is one value for all tokens
(0-d) or one per sample (`[x.shape[0]]`, read at token n // T).

Small N (up to `_launch.ONE_LAUNCH_MAX_ROWS` tokens) runs as the GEMM plus one kernel,
`_steer_row_kernel`: each program selects its token's codes with the "row" selection, then
steers all of its d. `LaunchConfig(one_launch=True)` takes that path at any N, and
`persistent=True` runs it on a fixed grid of programs that loop over the tokens.

Backward (`safedig::steer_backward`, docs/spec.md "Gradients"), the top-k set and the gate held
fixed. The op keeps (y, h) as its outputs, so its autograd formula recomputes the codes with
`topk_encode` (the same GEMM and the same exact selection as the forward's, hence the same codes)
and takes the gate from the forward's h. `_steer_bwd_codes_kernel`, a program per token, reads the
selected decoder rows whose update weight is non-zero (as the forward: none for a token left
unchanged, harmful rows alone at beta = 0) and turns grad_y into the gradient of each code's
pre-activation; `_encoder_bwd_kernel` gathers dx; the weight gradients sum per feature
(`sparse_decode._feature_rows_kernel`, no atomics).
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from .. import reference
from .._checks import check_steer, check_steer_backward, check_steer_types, code_dtype, float64_allowed
from .._library import use_triton_for
from . import _launch
from ._arguments import Harmful, Strength, harmful_for_call, strength_for_call
from ._launch import LaunchConfig
from ._triton import cdiv, launchable, tl, traced, triton
from .sparse_decode import _feature_rows, _row_dots, _weighted_row_sum, as_rows, or_empty, pairs_by_feature
from .topk_encode import (
    _encoder_bwd,
    _encoder_gemm,
    _encoder_weight_grads,
    _select_row,
    _SelectScratch,
    _topk_encode_fwd,
    encoder_bias,
)


@triton.jit
def _load_codes(vals_ptr, idx_ptr, harmful_ptr, n, kb, F, K: tl.constexpr, K_BLOCK: tl.constexpr,
                CODES_CG: tl.constexpr):
    """Codes kb .. kb + K_BLOCK of token n: values, feature ids, harmful flags, in-range mask.
    CODES_CG reads the codes past L1: other threads of the same program just wrote them."""
    ks = kb + tl.arange(0, K_BLOCK)
    kmask = ks < K
    if CODES_CG:
        z = tl.load(vals_ptr + n * K + ks, mask=kmask, other=0.0, cache_modifier=".cg")
        j = tl.load(idx_ptr + n * K + ks, mask=kmask, other=0, cache_modifier=".cg")
    else:
        z = tl.load(vals_ptr + n * K + ks, mask=kmask, other=0.0)
        j = tl.load(idx_ptr + n * K + ks, mask=kmask, other=0)
    harm = tl.load(harmful_ptr + j, mask=kmask & (j >= 0) & (j < F), other=0) != 0
    return z, j, harm, kmask


@triton.jit
def _steer_token_block(
    y_ptr, h_ptr, x_ptr, vals_ptr, idx_ptr, harmful_ptr, W_dec_ptr, b_dec_ptr, beta_ptr, gamma_ptr, tau_ptr,
    n, d_block, stride_xb, stride_xt, stride_xd, stride_wf, stride_beta, stride_gamma, stride_tau, T, F, d,
    K: tl.constexpr, K_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, CODES_CG: tl.constexpr,
):
    """Token n's harm score (stored by d-block 0), gate and y over one block of d. A strength's
    stride is 0 for one value for all tokens, else it steps per sample (n // T)."""
    offs_d = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < d

    h = tl.zeros([], dtype=tl.float32)
    n_nan = tl.zeros([], dtype=tl.int32)
    for kb in range(0, K, K_BLOCK):
        z, j, harm, kmask = _load_codes(vals_ptr, idx_ptr, harmful_ptr, n, kb, F, K, K_BLOCK, CODES_CG)
        h += tl.sum(tl.where(harm, z, 0.0), axis=0)
        n_nan += tl.sum((z != z).to(tl.int32), axis=0)  # the encoder marks non-finite tokens with NaN codes
    h = tl.where(n_nan > 0, float("nan"), h)
    tl.store(h_ptr + n, h, mask=d_block == 0)

    sample = n // T
    beta = tl.load(beta_ptr + sample * stride_beta).to(tl.float32)
    gamma = tl.load(gamma_ptr + sample * stride_gamma).to(tl.float32)
    tau = tl.load(tau_ptr + sample * stride_tau).to(tl.float32)
    active = (h > tau) & ((beta != 0.0) | (gamma != 0.0))  # NaN h never passes the gate

    x_row = x_ptr + (n // T) * stride_xb + (n % T) * stride_xt
    x = tl.load(x_row + offs_d * stride_xd, mask=dmask, other=0.0)
    if active:
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for kb in range(0, K, K_BLOCK):
            # own names: reusing the first loop's would make them loop-carried (Triton 3.6-3.9)
            z2, j2, harm2, kmask2 = _load_codes(vals_ptr, idx_ptr, harmful_ptr, n, kb, F, K, K_BLOCK, CODES_CG)
            w = tl.where(harm2, -gamma * z2, beta * z2)
            acc = _weighted_row_sum(acc, w, j2, kmask2, W_dec_ptr, stride_wf, F, offs_d, dmask)
        xf = x.to(tl.float32)
        b_dec = tl.load(b_dec_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
        y = (xf + (beta * (b_dec - xf) + acc)).to(x.dtype)
    else:
        y = x  # selected, not x + 0: bitwise, -0.0 included
    tl.store(y_ptr + n * d + offs_d, y, mask=dmask)


@triton.jit
def _steer_fwd_kernel(
    y_ptr, h_ptr,
    x_ptr, vals_ptr, idx_ptr, harmful_ptr, W_dec_ptr, b_dec_ptr, beta_ptr, gamma_ptr, tau_ptr,
    stride_xb, stride_xt, stride_xd, stride_wf, stride_beta, stride_gamma, stride_tau, T, F, d,
    K: tl.constexpr, K_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (token, d-block), after the selection kernels."""
    _steer_token_block(y_ptr, h_ptr, x_ptr, vals_ptr, idx_ptr, harmful_ptr, W_dec_ptr, b_dec_ptr, beta_ptr, gamma_ptr,
                       tau_ptr, tl.program_id(0).to(tl.int64), tl.program_id(1), stride_xb, stride_xt, stride_xd,
                       stride_wf, stride_beta, stride_gamma, stride_tau, T, F, d, K, K_BLOCK, BLOCK_D, False)


@triton.jit
def _steer_row_kernel(
    y_ptr, h_ptr, vals_ptr, idx_ptr, cand_val_ptr, cand_idx_ptr, count_ptr, pre_ptr, bias_ptr,
    x_ptr, harmful_ptr, W_dec_ptr, b_dec_ptr, beta_ptr, gamma_ptr, tau_ptr,
    stride_pre, stride_xb, stride_xt, stride_xd, stride_wf, stride_beta, stride_gamma, stride_tau, T, F, d,
    row_start, rows,
    K: tl.constexpr, CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr, GROUPS: tl.constexpr, CAND: tl.constexpr,
    RANK_BLOCK: tl.constexpr, EXACT_ONLY: tl.constexpr, HAS_BIAS: tl.constexpr, LOAD_STAGES: tl.constexpr,
    K_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, NUM_D_BLOCKS: tl.constexpr, PERSISTENT: tl.constexpr,
):
    """Select and steer in one launch after the GEMM: a program selects a token's codes (the
    "row" selection) into this pass's buffers (pre, scratch, vals/idx: row r), then steers all
    of token row_start + r's d. One program per token of the pass, or PERSISTENT: a fixed grid
    whose programs each take every num_programs-th token, so one token's decode gathers overlap
    other tokens' row reads."""
    step = tl.num_programs(0) if PERSISTENT else rows  # a program per token: one trip
    for r in range(tl.program_id(0), rows, step):
        r64 = tl.zeros([], dtype=tl.int64) + r  # (r.to(): the interpreter's loop yields Python ints)
        _select_row(r64, vals_ptr, idx_ptr, cand_val_ptr, cand_idx_ptr, count_ptr, pre_ptr, bias_ptr, stride_pre, F,
                    K, CHUNK, NUM_CHUNKS, GROUPS, CAND, RANK_BLOCK, EXACT_ONLY, HAS_BIAS, LOAD_STAGES)
        tl.debug_barrier()  # the codes were written by other threads of this program
        n = row_start + r64
        codes_shift = row_start * K  # the steer reads codes at token n: point it back to pass row r
        for d_block in range(NUM_D_BLOCKS):
            _steer_token_block(y_ptr, h_ptr, x_ptr, vals_ptr - codes_shift, idx_ptr - codes_shift, harmful_ptr,
                               W_dec_ptr, b_dec_ptr, beta_ptr, gamma_ptr, tau_ptr, n, d_block, stride_xb, stride_xt,
                               stride_xd, stride_wf, stride_beta, stride_gamma, stride_tau, T, F, d, K, K_BLOCK,
                               BLOCK_D, True)


@triton.jit
def _steer_bwd_codes_kernel(
    dpre_ptr, coefz_ptr, blend_ptr, touched_ptr,
    gy_ptr, gh_ptr, h_ptr, vals_ptr, idx_ptr, harmful_ptr, W_dec_ptr, beta_ptr, gamma_ptr, tau_ptr,
    stride_gb, stride_gt, stride_gd, stride_wf, stride_beta, stride_gamma, stride_tau, T, F, d,
    K: tl.constexpr, K_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per token n, the forward's gate (from its h) held fixed. Per code j, with c_j
    the forward's update weight (beta for a safe feature, -gamma for a harmful one; 0 when the
    token was left unchanged):
      dpre[n, j]  = [z_j > 0] * (c_j * <grad_y[n], W_dec[idx_j]> + [j harmful] * grad_h[n])
      coefz[n, j] = [z_j > 0] * c_j * z_j     (the weight of grad_y[n] in dW_dec[idx_j])
    blend[n] = beta if steered else 0, and touched[n] whether dx[n] differs from grad_y[n]. A
    decoder row is read only for a positive code with c_j != 0. A non-finite token (h NaN) has
    no gradient but its pass-through."""
    n = tl.program_id(0).to(tl.int64)
    h = tl.load(h_ptr + n)
    finite = h == h
    sample = n // T
    beta = tl.load(beta_ptr + sample * stride_beta).to(tl.float32)
    gamma = tl.load(gamma_ptr + sample * stride_gamma).to(tl.float32)
    tau = tl.load(tau_ptr + sample * stride_tau).to(tl.float32)
    active = (h > tau) & ((beta != 0.0) | (gamma != 0.0))  # the forward's gate: NaN h never passes
    gh = tl.where(finite, tl.load(gh_ptr + n), 0.0)
    g_row = gy_ptr + sample * stride_gb + (n % T) * stride_gt
    for kb in range(0, K, K_BLOCK):
        z, j, harm, kmask = _load_codes(vals_ptr, idx_ptr, harmful_ptr, n, kb, F, K, K_BLOCK, False)
        coef = tl.where(active, tl.where(harm, -gamma, beta), 0.0)
        positive = kmask & (z > 0.0)  # NaN codes (non-finite token) are not
        need = positive & (coef != 0.0) & (j >= 0) & (j < F)
        dots = _row_dots(g_row, stride_gd, W_dec_ptr, stride_wf, j, need, d, K_BLOCK, BLOCK_D)
        ks = kb + tl.arange(0, K_BLOCK)
        tl.store(dpre_ptr + n * K + ks, tl.where(positive, coef * dots + tl.where(harm, gh, 0.0), 0.0), mask=kmask)
        tl.store(coefz_ptr + n * K + ks, tl.where(positive, coef * z, 0.0), mask=kmask)
    tl.store(blend_ptr + n, tl.where(active, beta, 0.0))
    tl.store(touched_ptr + n, (active | (gh != 0.0)).to(tl.uint8))


def _sample_strides(*strengths: torch.Tensor) -> tuple[int, ...]:
    """Per strength, how far the kernels step per sample: 0 for a 0-d value, else its stride."""
    return tuple(t.stride(0) if t.dim() else 0 for t in strengths)


def _steer_fwd(x: torch.Tensor, W_enc, W_dec, b_dec, harmful, beta, gamma, tau, k: int, enc_bias: torch.Tensor,
               launch: Optional[LaunchConfig] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher. `x` `[N, d]` or `[B, T, d]`, any strides. Returns y (contiguous, x's shape and
    dtype) and h (fp32, x's shape without d). No host sync; allocations depend on shapes only."""
    d = x.shape[-1]
    x3 = x if x.dim() == 3 else x.unsqueeze(1)  # [N, d] -> [N, 1, d]: T = 1
    B, T, _ = x3.shape
    N = B * T
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    h = torch.empty(x.shape[:-1], device=x.device, dtype=torch.float32)
    if N == 0:
        return y, h
    dcfg = _launch.decode_config(d, k, launch)
    if _launch.use_one_launch(launch, N):
        pre_dtype = _launch.pre_dtype_for(x.dtype, x.device, launch)
        _steer_in_one_launch(y, h, x3, W_enc, W_dec, b_dec, harmful, beta, gamma, tau, k, enc_bias, pre_dtype,
                             _launch.bias_in_gemm(x.dtype, pre_dtype, launch),
                             _launch.select_config(W_enc.shape[1], k, launch), dcfg,
                             _launch.persistent_programs(launch, x.device))
        return y, h
    vals, idx = _topk_encode_fwd(x3.reshape(N, d), W_enc, enc_bias, k, launch)
    _decode_steer(y, h, x3, vals, idx, harmful, W_dec, b_dec, beta, gamma, tau, k, dcfg)
    return y, h


def _steer_in_one_launch(y, h, x3, W_enc, W_dec, b_dec, harmful, beta, gamma, tau, k: int, enc_bias,
                         pre_dtype: torch.dtype, bias_in_gemm: bool, scfg: Mapping, dcfg: Mapping,
                         programs: Optional[int] = None) -> None:
    """The GEMM, then `_steer_row_kernel`, per pass of rows (one unless the pre-activation
    buffer would pass its size): a program per token, or `programs` persistent programs."""
    B, T, d = x3.shape
    N, F = B * T, W_enc.shape[1]
    x2 = x3.reshape(N, d)
    passes = _launch.row_passes(N, F, pre_dtype)
    pass_rows = passes[0][1]
    scratch = _SelectScratch(pass_rows, scfg, x2.device, "row")
    vals = torch.empty(pass_rows, k, device=x2.device, dtype=torch.float32)
    idx = torch.empty(pass_rows, k, device=x2.device, dtype=torch.int32)
    W_dec = W_dec if W_dec.stride(1) == 1 else W_dec.contiguous()
    enc_bias = enc_bias.contiguous()
    for start, stop in passes:
        rows = stop - start
        pre, bias_on_load = _encoder_gemm(x2.narrow(0, start, rows), W_enc, enc_bias, pre_dtype, bias_in_gemm)
        grid = (rows if programs is None else torch.sym_min(rows, programs),)
        launchable(_steer_row_kernel)[grid](
            y, h, vals, idx, scratch.vals, scratch.idx, scratch.count, pre,
            bias_on_load if bias_on_load is not None else pre,
            x3, harmful.view(torch.uint8), W_dec, b_dec.contiguous(), beta, gamma, tau,
            pre.stride(0), x3.stride(0), x3.stride(1), x3.stride(2), W_dec.stride(0),
            *_sample_strides(beta, gamma, tau), T, F, d, start, rows,
            K=k, CHUNK=scfg["CHUNK"], NUM_CHUNKS=scfg["NUM_CHUNKS"], GROUPS=scfg["GROUPS"], CAND=scfg["CAND"],
            RANK_BLOCK=scfg["RANK_BLOCK"], EXACT_ONLY=scfg["EXACT_ONLY"], HAS_BIAS=bias_on_load is not None,
            LOAD_STAGES=scfg["LOAD_STAGES"], K_BLOCK=dcfg["K_BLOCK"], BLOCK_D=dcfg["BLOCK_D"],
            NUM_D_BLOCKS=cdiv(d, dcfg["BLOCK_D"]), PERSISTENT=programs is not None, num_warps=scfg["num_warps"],
        )


def _decode_steer(y, h, x3, vals, idx, harmful, W_dec, b_dec, beta, gamma, tau, k: int, cfg: Mapping) -> None:
    B, T, d = x3.shape
    W_dec = W_dec if W_dec.stride(1) == 1 else W_dec.contiguous()
    grid = (B * T, cdiv(d, cfg["BLOCK_D"]))
    launchable(_steer_fwd_kernel)[grid](
        y, h, x3, vals, idx, harmful.view(torch.uint8), W_dec, b_dec.contiguous(),
        beta, gamma, tau,
        x3.stride(0), x3.stride(1), x3.stride(2), W_dec.stride(0), *_sample_strides(beta, gamma, tau),
        T, W_dec.shape[0], d, K=k, **cfg,
    )


def _steer_bwd(grad_y: torch.Tensor, grad_h: Optional[torch.Tensor], x: torch.Tensor, W_enc, W_dec, b_dec, harmful,
               beta, gamma, tau, h: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, input_grad: bool = True,
               weight_grads: bool = True, launch: Optional[LaunchConfig] = None) -> tuple:
    """Launcher. `grad_y` and `x` `[N, d]` or `[B, T, d]` (any strides), `grad_h` and `h` x's shape
    without d, codes `vals` fp32 / `idx` `[..., k]` (the forward's). Returns dx (x's shape and
    dtype), dW_enc^T `[F, d]`, db_enc `[F]`, dW_dec `[F, d]`, db_dec `[d]`; None for what was not
    asked. No host sync; allocations depend on shapes only."""
    x3, gy3 = as_rows(x), as_rows(grad_y)
    B, T, d = x3.shape
    N, F, k = B * T, W_enc.shape[1], vals.shape[-1]
    cfg = _launch.backward_config(d, k, launch)
    idx2 = idx.reshape(N, k).to(torch.int32).contiguous()
    dpre = torch.empty(N, k, device=x.device, dtype=torch.float32)
    coefz = torch.empty(N, k, device=x.device, dtype=torch.float32)
    blend = torch.empty(N, device=x.device, dtype=torch.float32)
    touched = torch.empty(N, device=x.device, dtype=torch.uint8)
    if N > 0:
        gh = grad_h.reshape(N).contiguous() if grad_h is not None else h.new_zeros(N)
        W_rows = W_dec if W_dec.stride(1) == 1 else W_dec.contiguous()
        launchable(_steer_bwd_codes_kernel)[(N,)](
            dpre, coefz, blend, touched,
            gy3, gh, h.reshape(N).contiguous(), vals.reshape(N, k).contiguous(), idx2, harmful.view(torch.uint8),
            W_rows, beta, gamma, tau,
            gy3.stride(0), gy3.stride(1), gy3.stride(2), W_rows.stride(0), *_sample_strides(beta, gamma, tau), T, F, d,
            K=k, K_BLOCK=cfg["K_BLOCK"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"])
    dx = dW_enc_t = db_enc = dW_dec = db_dec = None
    if input_grad:
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        if N > 0:
            _encoder_bwd(dx, x3, dpre, idx2, W_enc, cfg, gy3, blend, touched)
    if weight_grads:
        pairs = pairs_by_feature(idx2, F)  # one sort serves both weights
        dW_enc_t, db_enc, db_dec_enc = _encoder_weight_grads(x3, dpre, idx2, W_enc, b_dec, cfg, pairs)
        dW_dec = torch.empty(F, d, device=x.device, dtype=W_dec.dtype)
        _feature_rows(dW_dec, None, gy3, None, coefz, *pairs, cfg)
        db_dec = (blend @ gy3.reshape(N, d).float() + db_dec_enc).to(b_dec.dtype)
    return dx, dW_enc_t, db_enc, dW_dec, db_dec


@torch.library.triton_op("safedig::steer", mutates_args=())
def _steer_op(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
              b_dec: torch.Tensor, harmful: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor,
              tau: torch.Tensor, k: int, enc_bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    check_steer(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, k, enc_bias, float64_allowed(x))
    return _steer_body(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, k, enc_bias)


def _steer_body(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, k: int, enc_bias
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's work on checked arguments: the reference off CUDA, the kernels on it."""
    if not use_triton_for(x):
        return reference.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, k)
    if enc_bias is None:
        enc_bias = encoder_bias(W_enc, b_enc, b_dec)
    return _steer_fwd(x, W_enc, W_dec, b_dec, harmful, beta, gamma, tau, k, enc_bias)


@_steer_op.register_fake
def _(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, k, enc_bias=None):
    check_steer(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, k, enc_bias, float64_allowed(x))
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[:-1], dtype=code_dtype(x))


@torch.library.triton_op("safedig::steer_backward", mutates_args=())
def _steer_backward_op(grad_y: torch.Tensor, grad_h: Optional[torch.Tensor], x: torch.Tensor, W_enc: torch.Tensor,
                       W_dec: torch.Tensor, b_dec: torch.Tensor, harmful: torch.Tensor, beta: torch.Tensor,
                       gamma: torch.Tensor, tau: torch.Tensor, h: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor,
                       input_grad: bool, weight_grads: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx, dW_enc^T `[F, d]`, db_enc, dW_dec, db_dec given the forward's h and codes (docs/spec.md
    "Gradients"); what was not asked comes back empty `[0]`."""
    check_steer_backward(grad_y, grad_h, x, W_enc, W_dec, b_dec, harmful, beta, gamma, tau, h, vals, idx,
                         float64_allowed(x))
    args = (grad_y, grad_h, x, W_enc, W_dec, b_dec, harmful, beta, gamma, tau, h, vals, idx)
    if use_triton_for(x) and _launch.current(None).backward == "triton":
        grads = _steer_bwd(*args, input_grad, weight_grads)
    else:  # the CPU, or the torch-op alternative on CUDA (in the input dtype, as the eager reference)
        grads = reference.steer_backward(*args, upcast=not use_triton_for(x), weight_grads=weight_grads)
    return or_empty(grads, (input_grad,) + (weight_grads,) * 4, (x, W_enc, W_enc, W_dec, b_dec))


@_steer_backward_op.register_fake
def _(grad_y, grad_h, x, W_enc, W_dec, b_dec, harmful, beta, gamma, tau, h, vals, idx, input_grad, weight_grads):
    check_steer_backward(grad_y, grad_h, x, W_enc, W_dec, b_dec, harmful, beta, gamma, tau, h, vals, idx,
                         float64_allowed(x))
    d, F = W_enc.shape
    return (torch.empty_like(x, memory_format=torch.contiguous_format) if input_grad else x.new_empty(0),
            W_enc.new_empty((F, d) if weight_grads else (0,)), W_enc.new_empty((F,) if weight_grads else (0,)),
            W_dec.new_empty((F, d) if weight_grads else (0,)), b_dec.new_empty((d,) if weight_grads else (0,)))


def _steer_setup_context(ctx, inputs, output) -> None:
    x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, k, enc_bias = inputs
    for t, name in ((beta, "beta"), (gamma, "gamma"), (tau, "tau")):
        if t.requires_grad:  # a silent None would read as "this strength has no effect"
            raise ValueError(f"{name} requires grad, but steer has no gradient for its strengths and threshold "
                             f"(docs/spec.md, Gradients); pass {name}.detach()")
    ctx.save_for_backward(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, output[1], enc_bias)
    ctx.k = k


def _steer_backward(ctx, grad_y, grad_h):
    """Gradients for x, W_enc, b_enc, W_dec, b_dec. None for the harmful mask, strengths and
    threshold (held fixed; `_steer_setup_context` refuses strengths that require grad), k, and
    enc_bias (a cache of `b_enc - b_dec @ W_enc`, whose gradient reaches those three)."""
    x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, h, enc_bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    # The codes again, as the forward selected them: same GEMM (x as [N, d], as the forward reads
    # it), same exact selection, so the same set; the gate comes from the forward's own h.
    vals, idx = torch.ops.safedig.topk_encode(x.reshape(-1, x.shape[-1]), W_enc, b_enc, b_dec, ctx.k, enc_bias)
    weights = any(need[1:5])
    dx, dW_enc_t, db_enc, dW_dec, db_dec = torch.ops.safedig.steer_backward(
        grad_y, grad_h, x, W_enc, W_dec, b_dec, harmful, beta, gamma, tau, h, vals.reshape(*x.shape[:-1], ctx.k),
        idx.reshape(*x.shape[:-1], ctx.k), need[0], weights)
    return (dx if need[0] else None, dW_enc_t.t() if need[1] else None, db_enc if need[2] else None,
            dW_dec if need[3] else None, db_dec if need[4] else None) + (None,) * 6


_steer_op.register_autograd(_steer_backward, setup_context=_steer_setup_context)


def _plain_eager(tensors: tuple) -> bool:
    """Whether nothing but this call would see the op: no compiler or tracer, no dispatch or
    function mode, no functorch transform, no tensor subclass, no graph for autograd to record
    (the fast path skips autograd, which needs the dispatcher to record the op's backward)."""
    return (not traced() and not torch._C._is_torch_function_mode_enabled()
            and not torch._C._are_functorch_transforms_active()
            and all(type(t) is torch.Tensor for t in tensors)
            and not (torch.is_grad_enabled() and torch._C._any_requires_grad(*tensors)))


def call_steer(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
               harmful: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor, tau: torch.Tensor, k: int,
               enc_bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.ops.safedig.steer`, with the same checks and work; in plain eager mode the op's body
    runs without the dispatcher's layers (about 10 us per call of host time measured on a CPU,
    benchmarks/host_overhead.py), which small-N steering is bound by. Compiled, traced and
    CUDA-graph-captured calls see the registered op."""
    args = (x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau)
    if _plain_eager(args if enc_bias is None else args + (enc_bias,)):
        check_steer(*args, k, enc_bias, float64_allowed(x))
        return _steer_body(*args, k, enc_bias)
    return torch.ops.safedig.steer(*args, k, enc_bias)


def steer(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
          harmful: Harmful, beta: Strength, gamma: Strength, tau: Strength, k: int,
          *, enc_bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend/Repel steering of `x` `[N, d]` or `[B, T, d]` (any strides), spec §2.

    SAE tensors `W_enc` `[d, F]`, `b_enc` `[F]`, `W_dec` `[F, d]`, `b_dec` `[d]` in x's dtype and
    device; `harmful` a bool mask `[F]` or feature ids; `beta`, `gamma`, `tau` floats, or
    tensors on x's device: 0-d, or one value per sample `[x.shape[0]]` (per request in a batch);
    `enc_bias` optionally a cached `b_enc - b_dec @ W_enc` (fp32 `[F]`).
    Returns `y` (x's shape and dtype) and the harm score `h` (fp32, x's shape without d);
    non-finite tokens come back unchanged with h = NaN.
    Differentiable in x and the SAE weights (W_enc, b_enc, W_dec, b_dec) through y and h, the
    top-k set and the gate held fixed (docs/spec.md, Gradients); not in the strengths. On the CPU
    every tensor may be float64 (the reference computes in it; h is then float64).
    """
    F = check_steer_types(x, W_enc, b_enc, W_dec, b_dec, k)
    device = x.device
    return call_steer(x, W_enc, b_enc, W_dec, b_dec, harmful_for_call(harmful, F, device),
                      strength_for_call(beta, "beta", device), strength_for_call(gamma, "gamma", device),
                      strength_for_call(tau, "tau", device), k, enc_bias)
