"""The reference against the dense float64 oracle, on random and hand-made cases."""
from __future__ import annotations

import pytest
import torch
from _oracle import dense_codes64, dense_steer64

from safedig_kernels import reference
from safedig_kernels.reference import select_topk
from safedig_kernels.testing import assert_bitwise_equal


def make(d, F, N, dtype=torch.float64, harmful_frac=0.3, lead=None):
    W_enc = torch.randn(d, F, dtype=dtype) / d ** 0.5
    b_enc = torch.randn(F, dtype=dtype) * 0.1
    W_dec = torch.nn.functional.normalize(torch.randn(F, d, dtype=torch.float64), dim=1).to(dtype)
    b_dec = torch.randn(d, dtype=dtype) * 0.1
    harmful = torch.rand(F) < harmful_frac
    x = torch.randn(*(lead or (N,)), d, dtype=dtype)
    return x, W_enc, b_enc, W_dec, b_dec, harmful


def S(v, dtype=torch.float64):
    return torch.tensor(v, dtype=dtype)


def check_against_oracle(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, k):
    y, h = reference.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, S(beta, x.dtype), S(gamma, x.dtype),
                           S(tau, x.dtype), k)
    y64, h64 = dense_steer64(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, k)
    torch.testing.assert_close(y.reshape(-1, x.shape[-1]).double(), y64, rtol=1e-10, atol=1e-10, equal_nan=True)
    torch.testing.assert_close(h.reshape(-1).double(), h64, rtol=1e-10, atol=1e-10, equal_nan=True)
    return y, h


@pytest.mark.parametrize("N,d,F,k", [(1, 8, 16, 1), (7, 13, 40, 5), (5, 1000, 64, 7), (4, 9, 12, 12), (3, 6, 33, 32)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("beta,gamma,tau", [(0.5, 1.0, 0.0), (0.0, 2.0, -1.0), (1.0, -1.0, 0.3), (0.3, 0.0, -1.0)])
def test_steer_matches_dense_formula(N, d, F, k, beta, gamma, tau):
    check_against_oracle(*make(d, F, N), beta, gamma, tau, k)


def test_topk_encode_matches_dense_formula():
    x, W_enc, b_enc, _, b_dec, _ = make(11, 50, 9)
    vals, idx = reference.topk_encode(x, W_enc, b_enc, b_dec, 6)
    pre, chosen, z, _ = dense_codes64(x, W_enc, b_enc, b_dec, 6)
    assert idx.dtype == torch.int32 and idx.tolist() == chosen
    torch.testing.assert_close(vals, torch.gather(z, 1, idx.long()), rtol=0, atol=0)


def test_sparse_decode_matches_dense_formula():
    x, W_enc, b_enc, W_dec, b_dec, _ = make(10, 30, 6)
    vals, idx = reference.topk_encode(x, W_enc, b_enc, b_dec, 4)
    _, _, z, _ = dense_codes64(x, W_enc, b_enc, b_dec, 4)
    torch.testing.assert_close(reference.sparse_decode(vals, idx, W_dec, b_dec), b_dec + z @ W_dec)


def test_ties_go_to_the_lower_index_and_signed_zeros_tie():
    pre = torch.tensor([[1.0, 3.0, 3.0, -0.0, 0.0, 2.0, 3.0, -0.0]])
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        vals, idx = select_topk(pre.to(dtype), 7)
        assert idx.tolist() == [[1, 2, 6, 5, 0, 3, 4]], dtype
    # through the whole op: a zero encoder makes every pre-activation equal to b_enc
    d, F, k = 4, 10, 3
    b_enc = torch.tensor([0.0, 2.0, 1.0, 2.0, 0.0, 2.0, 2.0, 1.0, 0.0, 0.5], dtype=torch.float64)
    vals, idx = reference.topk_encode(torch.randn(2, d, dtype=torch.float64), torch.zeros(d, F, dtype=torch.float64),
                                      b_enc, torch.zeros(d, dtype=torch.float64), k)
    assert idx.tolist() == [[1, 3, 5], [1, 3, 5]]


def test_float32_key_path_agrees_with_stable_sort():
    pre = torch.randint(-3, 4, (64, 200)).float() / 2  # many exact ties
    for k in (1, 7, 64, 200):
        v32, i32 = select_topk(pre, k)
        v64, i64 = select_topk(pre.double(), k)
        assert torch.equal(i32, i64) and torch.equal(v32.double(), v64)


def test_harmful_set_extremes_and_gate():
    x, W_enc, b_enc, W_dec, b_dec, _ = make(12, 40, 6)
    none = torch.zeros(40, dtype=torch.bool)
    every = torch.ones(40, dtype=torch.bool)
    y, h = check_against_oracle(x, W_enc, b_enc, W_dec, b_dec, none, 0.5, 1.0, -1.0, 5)
    assert torch.equal(h, torch.zeros_like(h))  # no harmful feature: h = 0 > tau = -1 steers all
    assert not torch.equal(y, x)
    y, h = check_against_oracle(x, W_enc, b_enc, W_dec, b_dec, every, 0.5, 1.0, -1.0, 5)
    vals, _ = reference.topk_encode(x, W_enc, b_enc, b_dec, 5)
    torch.testing.assert_close(h, vals.sum(-1))
    # tau just below / just above each token's own h
    for n in range(x.shape[0]):
        for tau, moved in ((float(h[n]) - 1e-9, True), (float(h[n]), False)):
            yn, _ = reference.steer(x[n:n + 1], W_enc, b_enc, W_dec, b_dec, every, S(0.5), S(1.0), S(tau), 5)
            assert (not torch.equal(yn, x[n:n + 1])) == moved


def test_nan_and_inf_tokens_pass_through_and_do_not_touch_others():
    x, W_enc, b_enc, W_dec, b_dec, harmful = make(8, 24, 5)
    x[1, 3] = float("nan")
    x[3, 0] = float("inf")
    y, h = check_against_oracle(x, W_enc, b_enc, W_dec, b_dec, harmful, 0.5, 1.0, -1.0, 4)
    assert torch.isnan(h[1]) and torch.isnan(h[3]) and torch.isfinite(h[[0, 2, 4]]).all()
    assert_bitwise_equal(y[[1, 3]], x[[1, 3]])
    clean = [0, 2, 4]
    y_clean, h_clean = reference.steer(x[clean], W_enc, b_enc, W_dec, b_dec, harmful, S(0.5), S(1.0), S(-1.0), 4)
    assert_bitwise_equal(y[clean], y_clean)
    vals, idx = reference.topk_encode(x, W_enc, b_enc, b_dec, 4)
    assert torch.isnan(vals[1]).all() and idx[1].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_zero_strengths_return_x_bitwise(dtype):
    x, W_enc, b_enc, W_dec, b_dec, harmful = make(16, 48, 6, dtype=dtype)
    x[0, :4] = -0.0
    for upcast in (True, False):
        y, _ = reference.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, S(0.0), S(0.0), S(-1.0), 8, upcast=upcast)
        assert_bitwise_equal(y, x)


def test_empty_and_single_token_and_3d():
    x, W_enc, b_enc, W_dec, b_dec, harmful = make(6, 20, 0)
    y, h = reference.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, S(0.5), S(1.0), S(0.0), 3)
    assert y.shape == (0, 6) and h.shape == (0,)
    vals, idx = reference.topk_encode(x, W_enc, b_enc, b_dec, 3)
    assert vals.shape == (0, 3) and idx.shape == (0, 3)
    assert reference.sparse_decode(vals, idx, W_dec, b_dec).shape == (0, 6)
    check_against_oracle(*make(6, 20, 1), 0.5, 1.0, 0.0, 3)
    x3, *rest = make(6, 20, 0, lead=(2, 5))
    y3, h3 = check_against_oracle(x3, *rest, 0.5, 1.0, 0.0, 3)
    assert y3.shape == (2, 5, 6) and h3.shape == (2, 5)
    x3, *rest = make(6, 20, 0, lead=(2, 0))
    y3, h3 = reference.steer(x3, *rest, S(0.5), S(1.0), S(0.0), 3)
    assert y3.shape == (2, 0, 6) and h3.shape == (2, 0)


def test_k_equal_to_F_and_k_one():
    check_against_oracle(*make(5, 9, 4), 0.7, 0.5, -1.0, 9)
    check_against_oracle(*make(5, 9, 4), 0.7, 0.5, -1.0, 1)


def test_beta_gamma_special_cases():
    x, W_enc, b_enc, W_dec, b_dec, harmful = make(10, 30, 5)
    # gamma = -beta blends toward the full reconstruction
    y, _ = reference.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, S(0.4), S(-0.4), S(-1.0), 6)
    vals, idx = reference.topk_encode(x, W_enc, b_enc, b_dec, 6)
    x_hat = reference.sparse_decode(vals, idx, W_dec, b_dec)
    torch.testing.assert_close(y, x + 0.4 * (x_hat - x))
    # beta = 0 is pure Repel
    y, _ = reference.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, S(0.0), S(1.5), S(-1.0), 6)
    r = reference.sparse_decode(torch.where(harmful[idx.long()], vals, 0.0), idx, W_dec, torch.zeros_like(b_dec))
    torch.testing.assert_close(y, x - 1.5 * r)


def test_low_precision_mode_stays_in_dtype_and_close():
    x, W_enc, b_enc, W_dec, b_dec, harmful = make(32, 64, 8, dtype=torch.bfloat16)
    y_lo, h_lo = reference.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, S(0.5), S(1.0), S(-1.0), 8, upcast=False)
    y_hi, h_hi = reference.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, S(0.5), S(1.0), S(-1.0), 8)
    assert y_lo.dtype == torch.bfloat16 and h_lo.dtype == torch.float32
    # Tokens far apart must be ones where bf16 rounding of the pre-activations changed the
    # top-k set (a near-tie); every other token agrees to bf16 rounding.
    far = (y_lo.float() - y_hi.float()).abs().amax(-1) > 0.05
    _, idx_lo = reference.topk_encode(x, W_enc, b_enc, b_dec, 8, upcast=False)
    _, idx_hi = reference.topk_encode(x, W_enc, b_enc, b_dec, 8)
    set_changed = torch.tensor([set(a) != set(b) for a, b in zip(idx_lo.tolist(), idx_hi.tolist())])
    assert not (far & ~set_changed).any()
    assert far.float().mean() < 0.5


# -- gradients -------------------------------------------------------------------------------------

def _grads(fn, tensors, grads_out):
    ts = [t.detach().clone().requires_grad_() for t in tensors]
    return torch.autograd.grad(fn(*ts), ts, grads_out)


@pytest.mark.parametrize("lead", [(6,), (2, 3)], ids=["N,d", "B,T,d"])
def test_backward_functions_equal_autograd_through_the_forward(lead):
    # finite tokens: the written-out gradients and autograd through steer / topk_encode /
    # sparse_decode are one derivative (the top-k set and the gate held fixed)
    x, W_enc, b_enc, W_dec, b_dec, harmful = make(9, 30, 0, lead=lead)
    beta, gamma = torch.linspace(0.0, 1.0, lead[0]), S(1.0)
    tau = S(float(reference.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, S(-1.0), 5)[1].median()))
    y, h = reference.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, 5)
    vals, idx = reference.topk_encode(x, W_enc, b_enc, b_dec, 5)
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    want = _grads(lambda *t: reference.steer(*t, harmful, beta, gamma, tau, 5), (x, W_enc, b_enc, W_dec, b_dec),
                  (gy, gh))
    dx, dW_enc_t, db_enc, dW_dec, db_dec = reference.steer_backward(gy, gh, x, W_enc, W_dec, b_dec, harmful, beta,
                                                                    gamma, tau, h, vals, idx)
    for got, w in zip((dx, dW_enc_t.t(), db_enc, dW_dec, db_dec), want):
        torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-10)
    assert reference.steer_backward(gy, gh, x, W_enc, W_dec, b_dec, harmful, beta, gamma, tau, h, vals, idx,
                                    weight_grads=False)[1:] == (None,) * 4

    gv = torch.randn_like(vals)
    want = _grads(lambda *t: reference.topk_encode(t[0], t[1], t[2], t[3], 5)[0], (x, W_enc, b_enc, b_dec), gv)
    got = reference.topk_encode_backward(gv, x, W_enc, b_dec, vals, idx)
    for g, w in zip((got[0], got[1].t(), got[2], got[3]), want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)

    want = _grads(lambda v, Wd, bd: reference.sparse_decode(v, idx, Wd, bd), (vals, W_dec, b_dec), gy)
    for g, w in zip(reference.sparse_decode_backward(gy, vals, idx, W_dec), want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_backward_in_the_input_dtype_stays_in_it_and_close():
    # upcast=False: the torch-op alternative to the backward kernels on a GPU
    x, W_enc, b_enc, W_dec, b_dec, harmful = make(32, 64, 8, dtype=torch.bfloat16)
    s = (S(0.5, torch.float32), S(1.0, torch.float32), S(-1.0, torch.float32))
    y, h = reference.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, *s, 8)
    vals, idx = reference.topk_encode(x, W_enc, b_enc, b_dec, 8)
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    lo = reference.steer_backward(gy, gh, x, W_enc, W_dec, b_dec, harmful, *s, h, vals, idx, upcast=False)
    hi = reference.steer_backward(gy, gh, x, W_enc, W_dec, b_dec, harmful, *s, h, vals, idx)
    for a, b in zip(lo, hi):
        assert a.dtype == b.dtype == torch.bfloat16
        assert (a.float() - b.float()).abs().max() <= 2.0 ** -5 * (1 + b.float().abs().max())
