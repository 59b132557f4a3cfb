"""The backward kernels (`_steer_bwd_codes_kernel`, `_encoder_bwd_kernel`, `_sparse_decode_bwd_kernel`,
`_feature_rows_kernel`) through their launchers, on CPU tensors under TRITON_INTERPRET=1: fp32,
tiny odd shapes, strided activations and gradients, against the reference's backward in float64.
Fresh outputs are poisoned (NaN / sentinel), so a missing store fails."""
from __future__ import annotations

import pytest
import torch

from safedig_kernels import reference
from safedig_kernels.ops._launch import LaunchConfig, backward_config
from safedig_kernels.ops.sparse_decode import _sparse_decode_bwd, pairs_by_feature
from safedig_kernels.ops.steer import _steer_bwd
from safedig_kernels.ops.topk_encode import _topk_encode_bwd
from safedig_kernels.testing import assert_bitwise_equal

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("poison_allocations")]

STEER_GRADS = ("dx", "dW_enc^T", "db_enc", "dW_dec", "db_dec")


def sae(d, F):
    W_enc = torch.randn(d, F) / d ** 0.5
    b_enc = torch.randn(F) * 0.1
    W_dec = torch.nn.functional.normalize(torch.randn(F, d), dim=1)
    b_dec = torch.randn(d) * 0.1
    return W_enc, b_enc, W_dec, b_dec


def sliced(B, T, d):
    """[B, T, d] slice of a larger [B, T + 3, d + 5] buffer (strided, offset), like FLUX block outputs."""
    return torch.randn(B, T + 3, d + 5)[:, 3:, 5:]


def assert_grads_close(got, want, names):
    for name, a, b in zip(names, got, want):
        assert a is not None and a.shape == b.shape, name
        scale = b.abs().nan_to_num(0).max().item() if b.numel() else 0.0
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * (1 + scale), equal_nan=True, msg=name)


def steer_case(B, T, d, F, k, beta, gamma, tau, nan_token=True):
    W_enc, b_enc, W_dec, b_dec = sae(d, F)
    harmful = torch.rand(F) < 0.3
    x = sliced(B, T, d)
    if nan_token:
        x[B - 1, T // 2, 1] = float("nan")
    strengths = tuple(torch.tensor(v) for v in (beta, gamma, tau))
    y, h = reference.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, *strengths, k)
    vals, idx = reference.topk_encode(x, W_enc, b_enc, b_dec, k)
    return x, (W_enc, W_dec, b_dec), harmful, strengths, h, vals, idx


def steer_reference64(gy, gh, x, weights, harmful, strengths, h, vals, idx):
    W_enc, W_dec, b_dec = weights
    return reference.steer_backward(gy.double(), None if gh is None else gh.double(), x.double(), W_enc.double(),
                                    W_dec.double(), b_dec.double(), harmful, *strengths, h.double(), vals.double(), idx)


STEER_CASES = [
    # (B, T, d, F, k): odd d and F, k not a power of two, d = 1000, k > 64
    (2, 5, 17, 100, 7),
    (1, 1, 9, 64, 1),
    (3, 4, 33, 300, 5),
    (1, 3, 1000, 40, 20),
    (2, 2, 8, 150, 70),
]
STRENGTHS = [(0.5, 1.0, 0.0), (0.0, 1.0, -1.0), (1.0, -1.0, 0.5), (0.3, 0.0, -1.0)]


@pytest.mark.parametrize("B,T,d,F,k", STEER_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("beta,gamma,tau", STRENGTHS, ids=lambda v: str(v))
def test_steer_backward_kernels(B, T, d, F, k, beta, gamma, tau):
    x, weights, harmful, strengths, h, vals, idx = steer_case(B, T, d, F, k, beta, gamma, tau)
    gy = sliced(B, T, d)  # a strided gradient, as autograd may hand over
    gh = torch.randn(B, T)
    got = _steer_bwd(gy, gh, x, *weights, harmful, *strengths, h, vals, idx)
    want = steer_reference64(gy, gh, x, weights, harmful, strengths, h, vals, idx)
    assert_grads_close(got, want, STEER_GRADS)
    bad = (B - 1, T // 2)
    assert torch.isnan(h[bad]) and torch.isfinite(torch.cat([g.flatten() for g in got])).all()
    assert_bitwise_equal(got[0][bad], gy[bad])


@pytest.mark.parametrize("shape", [(3, 4, 17), (5, 19)], ids=["B,T,d", "N,d"])
def test_steer_backward_kernels_per_sample_strengths(shape):
    d, F, k = shape[-1], 60, 6
    W_enc, b_enc, W_dec, b_dec = sae(d, F)
    harmful = torch.rand(F) < 0.3
    x = sliced(shape[0], shape[1], d) if len(shape) == 3 else torch.randn(shape[0], 2 * d)[:, ::2]
    rows = [(0.5, 1.0, -1.0), (0.0, 0.0, -1.0), (1.0, 2.0, 0.2), (0.25, -1.0, -1.0), (0.0, 1.0, 1e9)]
    table = torch.tensor([rows[i % len(rows)] for i in range(shape[0])])  # [samples, 3]: strided columns
    strengths = (table[:, 0], table[:, 1], table[:, 2])
    _, h = reference.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, *strengths, k)
    vals, idx = reference.topk_encode(x, W_enc, b_enc, b_dec, k)
    gy, gh = torch.randn(x.shape), torch.randn(h.shape)
    got = _steer_bwd(gy, gh, x, W_enc, W_dec, b_dec, harmful, *strengths, h, vals, idx)
    want = steer_reference64(gy, gh, x, (W_enc, W_dec, b_dec), harmful, strengths, h, vals, idx)
    assert_grads_close(got, want, STEER_GRADS)


@pytest.mark.parametrize("off", ["beta=gamma=0", "gate shut", "non-finite"])
def test_steer_backward_kernels_unchanged_tokens_bitwise(off):
    beta, gamma, tau = (0.0, 0.0, -1.0) if off == "beta=gamma=0" else (0.5, 1.0, 1e9 if off == "gate shut" else -1.0)
    x, weights, harmful, strengths, h, vals, idx = steer_case(2, 3, 16, 64, 8, beta, gamma, tau, nan_token=False)
    if off == "non-finite":
        x[...] = float("nan")
        _, h = reference.steer(x, weights[0], torch.zeros(64), *weights[1:], harmful, *strengths, 8)
        vals, idx = reference.topk_encode(x, weights[0], torch.zeros(64), weights[2], 8)
        gh = torch.randn(h.shape)  # h is NaN: a constant, its gradient goes nowhere
    else:
        gh = torch.zeros(h.shape)  # as autograd hands over the gradient of an unused h
    gy = sliced(2, 3, 16)
    gy[0, 1, :4] = -0.0  # x + 0.0 would turn these into +0.0
    dx, dW_enc_t, db_enc, dW_dec, db_dec = _steer_bwd(gy, gh, x, *weights, harmful, *strengths, h, vals, idx)
    assert_bitwise_equal(dx, gy.contiguous())
    for name, g in zip(STEER_GRADS[1:], (dW_enc_t, db_enc, dW_dec, db_dec)):
        assert torch.equal(g, torch.zeros_like(g)), name


def test_steer_backward_kernels_read_only_the_decoder_rows_they_need():
    # rows no forward update used, poisoned with NaN: a read would turn a gradient into NaN
    d, F, k = 12, 60, 6
    W_enc, b_enc, W_dec, b_dec = sae(d, F)
    harmful = torch.zeros(F, dtype=torch.bool)
    harmful[::3] = True
    x = torch.randn(8, d)
    vals, idx = reference.topk_encode(x, W_enc, b_enc, b_dec, k)
    gy, gh = torch.randn(8, d), torch.randn(8)
    for beta, tau, unread in ((0.0, -1.0, ~harmful), (0.5, 1e9, torch.ones(F, dtype=torch.bool))):
        strengths = (torch.tensor(beta), torch.tensor(1.0), torch.tensor(tau))
        _, h = reference.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, *strengths, k)
        poisoned = W_dec.clone()
        poisoned[unread] = float("nan")
        got = _steer_bwd(gy, gh, x, W_enc, poisoned, b_dec, harmful, *strengths, h, vals, idx)
        want = _steer_bwd(gy, gh, x, W_enc, W_dec, b_dec, harmful, *strengths, h, vals, idx)
        for name, a, b in zip(STEER_GRADS, got, want):
            assert_bitwise_equal(a, b)


@pytest.mark.parametrize("rows,block_d", [(None, None), (1, None), (2, 16), (3, 7)],
                         ids=["default", "one-pair-at-a-time", "2x16", "3x7-rounded-to-4x8"])
def test_weight_gradients_of_a_feature_every_token_chose(rows, block_d):
    """One feature in every token's top k (a long run of pairs, several blocks of PAIRS), others
    chosen by none (their rows are written as zeros), over tiles of other shapes."""
    B, T, d, F, k = 2, 13, 21, 50, 3
    W_enc, b_enc, W_dec, b_dec = sae(d, F)
    b_enc[7] = 5.0
    harmful = torch.rand(F) < 0.3
    harmful[7] = True
    x = sliced(B, T, d)
    strengths = (torch.tensor(0.5), torch.tensor(1.0), torch.tensor(-1.0))
    _, h = reference.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, *strengths, k)
    vals, idx = reference.topk_encode(x, W_enc, b_enc, b_dec, k)
    assert (idx[..., 0] == 7).all()
    launch = LaunchConfig(backward_rows=rows, backward_block_d=block_d)
    assert backward_config(d, k, launch)["PAIRS"] < B * T
    gy, gh = sliced(B, T, d), torch.randn(B, T)
    got = _steer_bwd(gy, gh, x, W_enc, W_dec, b_dec, harmful, *strengths, h, vals, idx, launch=launch)
    want = steer_reference64(gy, gh, x, (W_enc, W_dec, b_dec), harmful, strengths, h, vals, idx)
    assert_grads_close(got, want, STEER_GRADS)
    unchosen = torch.ones(F, dtype=torch.bool)
    unchosen[idx.flatten().long()] = False
    assert unchosen.any() and (got[1][unchosen] == 0).all() and (got[3][unchosen] == 0).all()


def test_steer_backward_kernels_only_what_is_asked():
    x, weights, harmful, strengths, h, vals, idx = steer_case(2, 3, 10, 40, 4, 0.5, 1.0, -1.0)
    gy, gh = sliced(2, 3, 10), torch.randn(2, 3)
    full = _steer_bwd(gy, gh, x, *weights, harmful, *strengths, h, vals, idx)
    only_x = _steer_bwd(gy, gh, x, *weights, harmful, *strengths, h, vals, idx, True, False)
    only_w = _steer_bwd(gy, gh, x, *weights, harmful, *strengths, h, vals, idx, False, True)
    assert only_x[1:] == (None,) * 4 and only_w[0] is None
    assert_bitwise_equal(only_x[0], full[0])
    for a, b in zip(only_w[1:], full[1:]):
        assert_bitwise_equal(a, b)


def test_backward_kernels_empty():
    W_enc, _, W_dec, b_dec = sae(6, 20)
    x = torch.randn(0, 6)
    vals, idx = torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.int32)
    strengths = (torch.tensor(0.5), torch.tensor(1.0), torch.tensor(0.0))
    dx, *weight_grads = _steer_bwd(torch.randn(0, 6), torch.randn(0), x, W_enc, W_dec, b_dec,
                                   torch.zeros(20, dtype=torch.bool), *strengths, torch.zeros(0), vals, idx)
    assert dx.shape == (0, 6)
    for g in weight_grads + list(_topk_encode_bwd(vals, x, W_enc, b_dec, vals, idx)[1:]) \
            + list(_sparse_decode_bwd(torch.randn(0, 6), vals, idx, W_dec)[1:]):
        assert torch.equal(g, torch.zeros_like(g))  # the gradient of nothing is zero, not an unwritten buffer


ENCODE_CASES = [(5, 17, 100, 7), (1, 9, 64, 1), (4, 8, 40, 40), (3, 12, 200, 80), (6, 1000, 48, 3)]


@pytest.mark.parametrize("N,d,F,k", ENCODE_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_topk_encode_backward_kernels(N, d, F, k, layout):
    W_enc, b_enc, _, b_dec = sae(d, F)
    x = torch.randn(N, d) if layout == "contiguous" else torch.randn(N, 2 * d + 3)[:, 3::2][:, :d]
    x[N // 2, 0] = float("nan")
    vals, idx = reference.topk_encode(x, W_enc, b_enc, b_dec, k)
    gv = torch.randn(N, k)
    got = _topk_encode_bwd(gv, x, W_enc, b_dec, vals, idx)
    want = reference.topk_encode_backward(gv.double(), x.double(), W_enc.double(), b_dec.double(), vals.double(), idx)
    assert_grads_close(got, want, ("dx", "dW_enc^T", "db_enc", "db_dec"))
    assert torch.equal(got[0][N // 2], torch.zeros(d))  # a non-finite token's codes are constants


def test_topk_encode_backward_kernel_reads_a_transposed_encoder_in_place():
    # W_enc given as the transpose of an [F, d] matrix (a checkpoint's Linear weight): its
    # columns are contiguous rows already, and the gather reads them where they are
    N, d, F, k = 4, 10, 30, 5
    W_enc_t, b_enc, _, b_dec = sae(d, F)[0].t().contiguous(), *sae(d, F)[1:]
    x = torch.randn(N, d)
    vals, idx = reference.topk_encode(x, W_enc_t.t(), b_enc, b_dec, k)
    gv = torch.randn(N, k)
    got = _topk_encode_bwd(gv, x, W_enc_t.t(), b_dec, vals, idx)
    want = _topk_encode_bwd(gv, x, W_enc_t.t().contiguous(), b_dec, vals, idx)
    for a, b in zip(got[:3], want[:3]):  # the kernels' outputs
        assert_bitwise_equal(a, b)
    torch.testing.assert_close(got[3], want[3])  # db_dec, a BLAS matvec over either layout


@pytest.mark.parametrize("N,d,F,k", [(5, 17, 100, 7), (1, 1000, 30, 1), (3, 8, 150, 70)], ids=lambda v: str(v))
@pytest.mark.parametrize("grad", ["strided", "expanded"])
def test_sparse_decode_backward_kernels(N, d, F, k, grad):
    _, _, W_dec, _ = sae(d, F)
    vals = torch.randn(N, k)
    vals[:, 0] = 0.0  # a zero code still has a gradient: the decode is linear in it
    idx = torch.stack([torch.randperm(F)[:k] for _ in range(N)]).int()
    if k > 1:
        idx[0, 1] = idx[0, 0]  # a repeated index: both codes' rows
    # the gradient of out.sum() comes as an expanded (stride 0) tensor
    g = torch.randn(N, 2 * d)[:, ::2] if grad == "strided" else torch.randn(1, d).expand(N, d)
    got = _sparse_decode_bwd(g, vals, idx, W_dec)
    want = reference.sparse_decode_backward(g.double(), vals.double(), idx, W_dec.double())
    assert_grads_close(got, want, ("dvals", "dW_dec", "db_dec"))


def test_sparse_decode_backward_kernel_flags_bad_indices():
    _, _, W_dec, _ = sae(10, 40)
    vals = torch.tensor([[1.5, 0.0, 0.5], [2.0, 1.0, 0.0]])
    idx = torch.tensor([[3, 7, 9], [1, 40, 2]], dtype=torch.int32)  # 40 is out of range
    g = torch.randn(2, 10)
    dvals, dW_dec, _ = _sparse_decode_bwd(g, vals, idx, W_dec)
    assert torch.isnan(dvals[1, 1]) and torch.isfinite(dvals[0]).all() and torch.isfinite(dvals[1, [0, 2]]).all()
    torch.testing.assert_close(dvals[0], W_dec[[3, 7, 9]] @ g[0])
    assert torch.isfinite(dW_dec).all()  # an index outside [0, F) belongs to no feature's rows


def test_pairs_by_feature_groups_tokens_in_order():
    idx = torch.tensor([[3, 1], [1, 0], [3, 5], [1, 3]], dtype=torch.int32)
    order, offsets = pairs_by_feature(idx, 6)
    assert offsets.tolist() == [0, 1, 4, 4, 7, 7, 8]
    assert order.tolist() == [3, 1, 2, 6, 0, 4, 7, 5]  # per feature, ascending pair id = ascending token
