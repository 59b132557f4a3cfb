"""Every Triton kernel on CPU tensors under TRITON_INTERPRET=1, fp32, tiny shapes, against the
float64 oracle. Fresh outputs are poisoned (NaN / sentinel) so a missing store fails."""
from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
from _oracle import dense_codes64, dense_steer64

from safedig_kernels.ops import _launch
from safedig_kernels.ops._launch import SELECT_ALGOS, select_config
from safedig_kernels.ops.sparse_decode import _sparse_decode_fwd
from safedig_kernels.ops.steer import _steer_fwd
from safedig_kernels.ops.topk_encode import _topk_encode_fwd, encoder_bias
from safedig_kernels.testing import assert_bitwise_equal, assert_valid_topk

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("poison_allocations")]


# the modules, not the `ops.topk_encode` / `ops.steer` functions that shadow them as package attributes
topk_encode_module = importlib.import_module("safedig_kernels.ops.topk_encode")
steer_module = importlib.import_module("safedig_kernels.ops.steer")


@pytest.fixture(params=SELECT_ALGOS, autouse=True)
def select_algo(request, monkeypatch):
    """Every test runs with each selection algorithm as the default."""
    monkeypatch.setattr(_launch, "DEFAULT", _launch.LaunchConfig(select_algo=request.param))
    return request.param


@pytest.fixture(params=["one_launch_when_small", "two_kernels"])
def steer_path(request, monkeypatch):
    """Steer tests run with small N in one launch (the default) and forced through two kernels."""
    if request.param == "two_kernels":
        monkeypatch.setattr(_launch, "ONE_LAUNCH_MAX_ROWS", 0)
    return request.param


def launch(**overrides) -> _launch.LaunchConfig:
    """The default launch settings (as the fixtures set them) with `overrides`."""
    return dataclasses.replace(_launch.DEFAULT, **overrides)


def sae(d, F, scale=1.0):
    W_enc = torch.randn(d, F) / d ** 0.5 * scale
    b_enc = torch.randn(F) * 0.1
    W_dec = torch.nn.functional.normalize(torch.randn(F, d), dim=1)
    b_dec = torch.randn(d) * 0.1
    return W_enc, b_enc, W_dec, b_dec


def strided(N, d):
    """[N, d] with a row stride of 2d + 3 and a column stride of 2."""
    return torch.randn(N, 2 * d + 3)[:, 3::2][:, :d]


ENCODE_CASES = [
    # (N, d, F, k, chunk): odd d, F not a multiple of the chunk, k not a power of two, ...
    (5, 17, 100, 7, None),
    (1, 9, 64, 1, None),
    (3, 33, 300, 5, 64),      # five chunks, the last one partial
    (4, 8, 40, 40, None),     # k = F
    (3, 12, 200, 80, None),   # k > 64: exact bisection path
    (2, 16, 130, 70, 32),     # exact path over several chunks
    (6, 1000, 48, 3, None),   # d = 1000
    (2, 5, 257, 33, 128),     # k just over a power of two, F just over one
]


@pytest.mark.parametrize("N,d,F,k,chunk", ENCODE_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_topk_encode_kernel(N, d, F, k, chunk, layout):
    W_enc, b_enc, _, b_dec = sae(d, F)
    x = torch.randn(N, d) if layout == "contiguous" else strided(N, d)
    vals, idx = _topk_encode_fwd(x, W_enc, encoder_bias(W_enc, b_enc, b_dec), k, launch(chunk=chunk))
    pre64, chosen, z, _ = dense_codes64(x, W_enc, b_enc, b_dec, k)
    assert_valid_topk(pre64, idx, k, 1e-5 * (1 + pre64.abs().amax(-1)))
    # with random data a near-tie is vanishingly rare: the sets match exactly here
    assert idx.tolist() == chosen
    torch.testing.assert_close(vals.double(), torch.gather(z, 1, idx.long()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_warps,load_stages", [(1, None), (2, None), (4, 3)])
def test_topk_encode_kernel_swept_launch_settings(num_warps, load_stages):
    # 1- and 2-warp settings rank candidates in blocks of 8 and 16 (RANK_BLOCK), not 32;
    # load_stages pipelines the row kernel's chunk loops (the interpreter runs them plainly)
    N, d, F, k = 4, 10, 500, 20
    assert select_config(F, k, launch(chunk=128, select_warps=num_warps))["RANK_BLOCK"] == min(8 * num_warps, 32)
    W_enc, b_enc, _, b_dec = sae(d, F)
    x = torch.randn(N, d)
    vals, idx = _topk_encode_fwd(x, W_enc, encoder_bias(W_enc, b_enc, b_dec), k,
                                 launch(chunk=128, select_warps=num_warps, select_stages=load_stages))
    pre64, chosen, z, _ = dense_codes64(x, W_enc, b_enc, b_dec, k)
    assert idx.tolist() == chosen
    torch.testing.assert_close(vals.double(), torch.gather(z, 1, idx.long()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 6, 9])
def test_topk_encode_kernel_exact_ties_and_signed_zeros(k):
    # A zero encoder makes every pre-activation equal b_enc: exact ties, and -0.0 beside +0.0.
    d, F = 4, 12
    b_enc = torch.tensor([0.0, 2.0, 1.0, 2.0, -0.0, 2.0, 2.0, 1.0, 0.0, 0.5, -0.0, 1.0])
    W_enc = torch.zeros(d, F)
    vals, idx = _topk_encode_fwd(torch.randn(3, d), W_enc, encoder_bias(W_enc, b_enc, torch.zeros(d)), k)
    want = sorted(range(F), key=lambda j: (-float(b_enc[j]), j))[:k]
    assert idx.tolist() == [want] * 3
    assert vals.tolist() == [[max(float(b_enc[j]), 0.0) for j in want]] * 3


def test_topk_encode_kernel_heavy_ties_use_the_exact_fallback():
    # All pre-activations equal: the candidate filter keeps the whole row, more than its
    # scratch holds, so the bisection fallback must produce indices 0..k-1.
    d, F, k = 4, 600, 5
    assert 4 * 8 < F  # more candidates than the scratch row (CAND = 4 * next_pow2(k))
    W_enc = torch.zeros(d, F)
    b_enc = torch.full((F,), 0.25)
    b_enc[[17, 400]] = 0.5
    vals, idx = _topk_encode_fwd(torch.randn(2, d), W_enc, encoder_bias(W_enc, b_enc, torch.zeros(d)), k,
                                 launch(chunk=128))
    assert idx.tolist() == [[17, 400, 0, 1, 2]] * 2
    assert vals.tolist() == [[0.5, 0.5, 0.25, 0.25, 0.25]] * 2
    assert not select_config(F, k, launch(chunk=128))["EXACT_ONLY"]  # so the fallback is what ran


def test_topk_encode_kernel_nonfinite_tokens():
    W_enc, b_enc, _, b_dec = sae(10, 50)
    x = torch.randn(4, 10)
    x[1, 2] = float("nan")
    x[2, 0] = float("-inf")
    vals, idx = _topk_encode_fwd(x, W_enc, encoder_bias(W_enc, b_enc, b_dec), 6)
    assert torch.isnan(vals[[1, 2]]).all() and idx[[1, 2]].tolist() == [list(range(6))] * 2
    assert torch.isfinite(vals[[0, 3]]).all()


def test_select_kernel_adds_the_bias_on_load():
    # The path taken when the GEMM cannot add the fp32 bias itself (bf16/fp16 pre buffers).
    from safedig_kernels.ops.topk_encode import _select, _SelectScratch

    W_enc, b_enc, _, b_dec = sae(11, 300)
    x = torch.randn(6, 11)
    k = 9
    cfg = select_config(300, k, launch(chunk=128))
    algo = _launch.resolve_select_algo(None, 6)
    vals = torch.empty(6, k)
    idx = torch.empty(6, k, dtype=torch.int32)
    _select(vals, idx, _SelectScratch(6, cfg, x.device, algo), x @ W_enc, encoder_bias(W_enc, b_enc, b_dec), k, cfg,
            algo)
    pre64, chosen, z, _ = dense_codes64(x, W_enc, b_enc, b_dec, k)
    assert idx.tolist() == chosen
    torch.testing.assert_close(vals.double(), torch.gather(z, 1, idx.long()), rtol=1e-5, atol=1e-5)


def test_topk_encode_kernel_empty():
    W_enc, b_enc, _, b_dec = sae(6, 20)
    vals, idx = _topk_encode_fwd(torch.randn(0, 6), W_enc, encoder_bias(W_enc, b_enc, b_dec), 4)
    assert vals.shape == idx.shape == (0, 4)


STEER_CASES = [
    # (B, T, d, F, k)
    (2, 5, 17, 100, 7),
    (1, 1, 9, 64, 1),
    (3, 4, 33, 300, 5),
    (1, 3, 1000, 40, 20),
    (2, 2, 8, 150, 70),
]
STRENGTHS = [(0.5, 1.0, 0.0), (0.0, 1.0, -1.0), (1.0, -1.0, 0.5), (0.3, 0.0, -1.0)]


def _flux_like(B, T, d):
    """[B, T, d] slice of a larger [B, T + 3, d + 5] buffer, like FLUX single-block outputs."""
    return torch.randn(B, T + 3, d + 5)[:, 3:, 5:]


@pytest.mark.parametrize("B,T,d,F,k", STEER_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("beta,gamma,tau", STRENGTHS, ids=lambda v: str(v))
@pytest.mark.usefixtures("steer_path")
def test_steer_kernel(B, T, d, F, k, beta, gamma, tau):
    W_enc, b_enc, W_dec, b_dec = sae(d, F)
    harmful = torch.rand(F) < 0.3
    x = _flux_like(B, T, d)
    bad = (B - 1, T // 2)
    x[bad + (1,)] = float("nan")  # a NaN token among finite ones (not the first: its h stays checked)
    y, h = _steer_fwd(x, W_enc, W_dec, b_dec, harmful, *map(torch.tensor, (beta, gamma, tau)), k,
                      encoder_bias(W_enc, b_enc, b_dec))
    assert y.shape == x.shape and h.shape == x.shape[:-1]
    _, chosen, _, _ = dense_codes64(x, W_enc, b_enc, b_dec, k)
    y64, h64 = dense_steer64(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, k, chosen=chosen)
    torch.testing.assert_close(y.reshape(-1, d).double(), y64, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(h.reshape(-1).double(), h64, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.isnan(h).sum() == 1 and torch.isnan(h[bad])
    assert_bitwise_equal(y[bad], x[bad])


@pytest.mark.parametrize("shape", [(3, 4, 17), (5, 19)], ids=["B,T,d", "N,d"])
@pytest.mark.usefixtures("steer_path")
def test_steer_kernel_per_sample_strengths(shape):
    """One value per sample (`[x.shape[0]]`, here strided columns of one table) steers each
    sample exactly as the kernel does with that sample's values given as 0-d tensors."""
    d = shape[-1]
    W_enc, b_enc, W_dec, b_dec = sae(d, 120)
    harmful = torch.rand(120) < 0.3
    x = _flux_like(shape[0], shape[1], d) if len(shape) == 3 else strided(*shape)
    bias = encoder_bias(W_enc, b_enc, b_dec)
    rows = [(0.5, 1.0, -1.0), (0.0, 0.0, -1.0), (1.0, 2.0, 0.2), (0.25, -1.0, -1.0), (0.0, 1.0, 1e9)]
    table = torch.tensor([rows[i % len(rows)] for i in range(shape[0])])  # [samples, 3]: columns stride 3
    y, h = _steer_fwd(x, W_enc, W_dec, b_dec, harmful, table[:, 0], table[:, 1], table[:, 2], 6, bias)
    steered = 0
    for i in range(shape[0]):
        y_i, h_i = _steer_fwd(x, W_enc, W_dec, b_dec, harmful, *table[i].clone().unbind(), 6, bias)
        assert_bitwise_equal(y[i], y_i[i])
        assert_bitwise_equal(h[i], h_i[i])
        steered += int(not torch.equal(y[i], x[i]))
    assert 0 < steered < shape[0]  # some samples steered, some (beta = gamma = 0, tau = 1e9) not


@pytest.mark.parametrize("B,T,d,F,k", STEER_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("block_d", [None, 16], ids=["one-d-block", "d-blocks-of-16"])
def test_one_launch_steer_equals_two_kernels_bitwise(B, T, d, F, k, block_d):
    # the same selection and the same decode code, composed in one program (which loops over
    # the d-blocks) or in two kernels (a program per d-block)
    W_enc, b_enc, W_dec, b_dec = sae(d, F)
    harmful = torch.rand(F) < 0.3
    x = _flux_like(B, T, d)
    x[0, 0, 1] = float("inf")
    args = (x, W_enc, W_dec, b_dec, harmful, torch.tensor(0.5), torch.tensor(1.0), torch.tensor(-1.0), k,
            encoder_bias(W_enc, b_enc, b_dec))
    y1, h1 = _steer_fwd(*args, launch(one_launch=True, decode_block_d=block_d))
    y2, h2 = _steer_fwd(*args, launch(one_launch=False, select_algo="row", decode_block_d=block_d))
    assert_bitwise_equal(y1, y2)
    assert_bitwise_equal(h1, h2)
    assert torch.isnan(h1[0, 0]) and torch.isfinite(h1.flatten()[1:]).all()


@pytest.mark.parametrize("passes", [1, 3], ids=["one-pass", "three-passes"])
def test_one_kernel_after_the_gemm_at_any_n_bitwise(monkeypatch, passes):
    """The select-and-steer kernel at a large N (beyond the default's one-launch limit), with a
    program per token or persistent programs looping over the tokens (3 programs for 9 tokens of
    each pass: every program takes several), and with the pre-activations in row passes: all
    give exactly what the two-kernel path gives."""
    B, T, d, F, k = 3, 9, 10, 70, 5
    W_enc, b_enc, W_dec, b_dec = sae(d, F)
    harmful = torch.rand(F) < 0.3
    x = _flux_like(B, T, d)
    x[1, 4, 2] = float("nan")
    beta = torch.tensor([0.5, 0.0, 1.0])  # per sample, so a token steered with another's values shows
    args = (x, W_enc, W_dec, b_dec, harmful, beta, torch.tensor(1.0), torch.tensor(-1.0), k,
            encoder_bias(W_enc, b_enc, b_dec))
    monkeypatch.setattr(_launch, "PRE_BUFFER_BYTES", F * 4 * (B * T // passes))  # 27 rows: 1 or 3 passes of 9
    want = _steer_fwd(*args, launch(one_launch=False))
    for variant in (launch(one_launch=True), launch(persistent=True, programs=3), launch(persistent=True)):
        got = _steer_fwd(*args, variant)
        assert_bitwise_equal(got[0], want[0])
        assert_bitwise_equal(got[1], want[1])
    assert torch.isnan(want[1][1, 4]) and torch.equal(want[0][0], x[0]) is False


@pytest.mark.parametrize("one_launch", [True, False], ids=["one-launch", "two-kernels"])
def test_steer_kernel_with_the_bias_added_on_load(monkeypatch, one_launch):
    # bf16/fp16 inputs: the GEMM writes x @ W_enc and the select kernels add the fp32 bias as
    # they load it. The interpreter runs fp32 only, so the GEMM is made to leave the bias out.
    W_enc, b_enc, W_dec, b_dec = sae(13, 90)
    harmful = torch.rand(90) < 0.3
    x = _flux_like(2, 3, 13)
    bias = encoder_bias(W_enc, b_enc, b_dec)
    monkeypatch.setattr(steer_module, "_encoder_gemm", lambda x2, W, b, pre_dtype, bias_in_gemm: (x2 @ W, b))
    monkeypatch.setattr(topk_encode_module, "_encoder_gemm", lambda x2, W, b, pre_dtype, bias_in_gemm: (x2 @ W, b))
    strengths = (0.5, 1.0, -1.0)
    y, h = _steer_fwd(x, W_enc, W_dec, b_dec, harmful, *map(torch.tensor, strengths), 5, bias,
                      launch(one_launch=one_launch))
    y64, h64 = dense_steer64(x, W_enc, b_enc, W_dec, b_dec, harmful, *strengths, 5)
    torch.testing.assert_close(y.reshape(-1, 13).double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.reshape(-1).double(), h64, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("steer_path")
def test_steer_kernel_zero_strengths_bitwise():
    W_enc, b_enc, W_dec, b_dec = sae(16, 64)
    x = _flux_like(2, 3, 16)
    x[0, 1, :5] = -0.0
    y, h = _steer_fwd(x, W_enc, W_dec, b_dec, torch.ones(64, dtype=torch.bool), torch.tensor(0.0),
                      torch.tensor(0.0), torch.tensor(-1.0), 8, encoder_bias(W_enc, b_enc, b_dec))
    assert_bitwise_equal(y, x)
    assert torch.isfinite(h).all() and (h > 0).all()


@pytest.mark.usefixtures("steer_path")
def test_steer_kernel_reads_only_the_rows_it_needs():
    # Decoder rows poisoned with NaN: any row the kernel reads would turn y into NaN.
    d, F, k = 12, 60, 6
    W_enc, b_enc, W_dec, b_dec = sae(d, F)
    harmful = torch.zeros(F, dtype=torch.bool)
    harmful[::3] = True
    x = torch.randn(8, d)
    bias = encoder_bias(W_enc, b_enc, b_dec)
    poisoned = W_dec.clone()
    poisoned[~harmful] = float("nan")
    # beta = 0 (pure Repel): only harmful rows are read
    y, _ = _steer_fwd(x, W_enc, poisoned, b_dec, harmful, torch.tensor(0.0), torch.tensor(1.0), torch.tensor(-1.0),
                      k, bias)
    y_ref, _ = _steer_fwd(x, W_enc, W_dec, b_dec, harmful, torch.tensor(0.0), torch.tensor(1.0), torch.tensor(-1.0),
                          k, bias)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    # ungated tokens (tau above every h) read no rows at all
    all_nan = torch.full_like(W_dec, float("nan"))
    y, h = _steer_fwd(x, W_enc, all_nan, b_dec, harmful, torch.tensor(0.5), torch.tensor(1.0), torch.tensor(1e9),
                      k, bias)
    assert_bitwise_equal(y, x)


def test_steer_kernel_empty():
    W_enc, b_enc, W_dec, b_dec = sae(6, 20)
    y, h = _steer_fwd(torch.randn(0, 6), W_enc, W_dec, b_dec, torch.zeros(20, dtype=torch.bool),
                      torch.tensor(0.5), torch.tensor(1.0), torch.tensor(0.0), 4, encoder_bias(W_enc, b_enc, b_dec))
    assert y.shape == (0, 6) and h.shape == (0,)


@pytest.mark.parametrize("N,d,F,k", [(5, 17, 100, 7), (1, 1000, 30, 1), (3, 8, 150, 70)], ids=lambda v: str(v))
def test_sparse_decode_kernel(N, d, F, k):
    _, _, W_dec, b_dec = sae(d, F)
    vals = torch.relu(torch.randn(N, k))
    idx = torch.stack([torch.randperm(F)[:k] for _ in range(N)]).int()
    out = _sparse_decode_fwd(vals, idx, W_dec, b_dec)
    dense = torch.zeros(N, F, dtype=torch.float64).scatter_(1, idx.long(), vals.double())
    torch.testing.assert_close(out.double(), b_dec.double() + dense @ W_dec.double(), rtol=1e-5, atol=1e-5)


def test_sparse_decode_kernel_skips_zero_codes_and_flags_bad_indices():
    _, _, W_dec, b_dec = sae(10, 40)
    vals = torch.tensor([[1.5, 0.0, 0.5], [2.0, 1.0, 0.0]])
    idx = torch.tensor([[3, 7, 9], [1, 40, 2]], dtype=torch.int32)  # 40 is out of range
    poisoned = W_dec.clone()
    poisoned[7] = float("nan")  # its code is 0: never read
    out = _sparse_decode_fwd(vals, idx, poisoned, b_dec)
    torch.testing.assert_close(out[0], b_dec + 1.5 * W_dec[3] + 0.5 * W_dec[9])
    assert torch.isnan(out[1]).all()
