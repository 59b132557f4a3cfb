"""The fused ops on a CUDA device: small odd cases and the real spec §4-5 sizes in bf16/fp16/fp32,
opcheck, the compile ladder, CUDA-graph capture. Skipped without CUDA.

Tolerance (spec §3): err(kernel, ref64) <= 2 * err(ref_lowp, ref64) + atol, where ref_lowp is the
reference computed in the input dtype (plain eager PyTorch), and each side is scored against a
float64 reference evaluated on its *own* chosen features, so a legitimate near-tie choice is
not counted as an error; the choice itself is checked to be a top-k up to the rounding of the
pre-activations.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch._dynamo.testing

import safedig_kernels as sk
from safedig_kernels import ops, reference
from safedig_kernels.ops import _launch
from safedig_kernels.ops._launch import SELECT_ALGOS, LaunchConfig
from safedig_kernels.testing import (
    BUFFER_ULP,
    EPS,
    PRE_REL_TOL,
    assert_bitwise_equal,
    assert_codes_within_tolerance,
    assert_valid_topk,
    tolerance,
)

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.fixture(params=SELECT_ALGOS, autouse=True)
def select_algo(request, monkeypatch):
    """Every test runs with each selection algorithm as the default."""
    monkeypatch.setattr(_launch, "DEFAULT", LaunchConfig(select_algo=request.param))
    return request.param

def make(d, F, dtype, N=None, lead=None, device=DEV):
    g = torch.Generator(device="cpu").manual_seed(d * 7 + F)
    W_enc = (torch.randn(d, F, generator=g) / d ** 0.5).to(device, dtype)
    b_enc = (torch.randn(F, generator=g) * 0.1).to(device, dtype)
    W_dec = torch.nn.functional.normalize(torch.randn(F, d, generator=g), dim=1).to(device, dtype)
    b_dec = (torch.randn(d, generator=g) * 0.1).to(device, dtype)
    harmful = (torch.rand(F, generator=g) < 0.1).to(device)
    x = torch.randn(*(lead or (N,)), d, generator=g).to(device, dtype)
    return x, W_enc, b_enc, W_dec, b_dec, harmful


def strengths(beta, gamma, tau):
    return tuple(torch.tensor(v, device=DEV) for v in (beta, gamma, tau))


def _codes64(pre64, idx, bad):
    vals = torch.gather(pre64, 1, idx.long()).clamp_min(0)
    return torch.where(bad[:, None], torch.full_like(vals, float("nan")), vals)


def check_steer(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, k):
    d = x.shape[-1]
    bgt = strengths(beta, gamma, tau)
    y, h = ops.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, *bgt, k)
    vals, idx = ops.topk_encode(x, W_enc, b_enc, b_dec, k)
    assert y.shape == x.shape and y.dtype == x.dtype and h.shape == x.shape[:-1]
    x2 = x.reshape(-1, d)
    t64 = [t.double() for t in (W_enc, b_enc, W_dec, b_dec)]
    pre64 = reference.encoder_preactivations(x2.double(), t64[0], t64[1], t64[3])
    bad = ~(torch.isfinite(x2).all(-1) & torch.isfinite(pre64).all(-1))
    good = ~bad
    scale = pre64[good].abs().amax(-1)
    assert_valid_topk(pre64[good], idx.reshape(-1, k)[good], k, PRE_REL_TOL[x.dtype] * scale + 1e-6)

    b64 = [v.double() for v in bgt]
    lowp_vals, lowp_idx = reference.topk_encode(x2, W_enc, b_enc, b_dec, k, upcast=False)
    y_lowp, h_lowp = reference.steer(x2, W_enc, b_enc, W_dec, b_dec, harmful, *bgt, k, upcast=False)
    y64_k, h64_k = reference.steer_from_codes(x2.double(), _codes64(pre64, idx.reshape(-1, k), bad), idx.reshape(-1, k),
                                              t64[2], t64[3], harmful, *b64)
    y64_l, h64_l = reference.steer_from_codes(x2.double(), _codes64(pre64, lowp_idx, bad), lowp_idx,
                                              t64[2], t64[3], harmful, *b64)

    def err(a, b):
        return (a.double() - b).abs().nan_to_num(0.0).max().item() if a.numel() else 0.0

    atol = 1e-5 * (1 + y64_k.abs().nan_to_num(0).max().item())
    assert err(y.reshape(-1, d), y64_k) <= tolerance(err(y_lowp, y64_l), x.dtype, atol=atol, cap=False)
    gemm64 = x2.double() @ t64[0]
    lowp_z = _codes64(pre64, lowp_idx, bad)
    assert_codes_within_tolerance(vals.reshape(-1, k), h.reshape(-1), idx.reshape(-1, k), pre64, gemm64, harmful,
                                  BUFFER_ULP[x.dtype], err(lowp_vals, lowp_z), err(h_lowp, h64_l))
    assert torch.equal(torch.isnan(h.reshape(-1)), bad)
    if bad.any():
        assert_bitwise_equal(y.reshape(-1, d)[bad], x2[bad])
    return y, h


SMALL = [(5, 17, 100, 7), (1, 9, 64, 1), (3, 33, 300, 5), (4, 8, 40, 40), (3, 12, 200, 80), (6, 1000, 48, 3),
         (7, 64, 5000, 256), (9, 40, 1023, 63)]


@pytest.mark.parametrize("N,d,F,k", [(3, 33, 300, 5), (200, 3072, 12288, 32)], ids=lambda v: str(v))
def test_bf16_bias_in_gemm_within_tolerance(monkeypatch, N, d, F, k):
    # LaunchConfig(bias_in_gemm=True): addmm rounds once after the bias (the selection then reads
    # the pre-activations alone); the same float64 tolerance must hold
    monkeypatch.setattr(_launch, "DEFAULT", dataclasses.replace(_launch.DEFAULT, bias_in_gemm=True))
    x, *sae = make(d, F, torch.bfloat16, lead=(1, N))
    for bgt in ((0.5, 1.0, 0.0), (0.0, 1.0, -1.0)):
        check_steer(x, *sae, *bgt, k)


@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("N,d,F,k", SMALL, ids=lambda v: str(v))
def test_small_cases(N, d, F, k, dtype):
    x, *sae = make(d, F, dtype, lead=(1, N))
    x = torch.randn(1, N + 2, d + 3, device=DEV, dtype=dtype)[:, 2:, :d].copy_(x)  # strided 3-D slice
    x[0, N // 2, 0] = float("nan")
    for bgt in ((0.5, 1.0, 0.0), (0.0, 1.0, -1.0), (1.0, -1.0, 0.2)):
        check_steer(x, *sae, *bgt, k)
    y, _ = ops.steer(x, *sae, 0.0, 0.0, -1.0, k)
    assert_bitwise_equal(y, x)


REAL = [  # (N, d, F, k): spec §5
    (4608, 3072, 12288, 32),
    (4608, 3072, 49152, 64),
    (4250, 2432, 9728, 32),
    (16, 3072, 12288, 32),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("N,d,F,k", REAL, ids=lambda v: str(v))
def test_real_sizes(N, d, F, k, dtype):
    x, *sae = make(d, F, dtype, N=N)
    check_steer(x, *sae, 0.5, 1.0, -1.0, k)        # every token steered: the full decode
    check_steer(x, *sae, 0.0, 2.0, 0.05, k)        # gated pure Repel


@pytest.mark.parametrize("N,d,F,k", [(64, 3072, 12288, 32), (16, 3072, 49152, 64), (33, 2432, 9728, 32)],
                         ids=lambda v: str(v))
def test_one_launch_steer_matches_two_kernels_bitwise(N, d, F, k):
    # One program selecting and then steering its token must give exactly what the select and
    # steer kernels give: same code, so any difference is a race on the codes it wrote itself.
    from safedig_kernels.ops.steer import _steer_fwd

    x, W_enc, b_enc, W_dec, b_dec, harmful = make(d, F, torch.bfloat16, lead=(1, N + 1))
    x = x[:, 1:]  # a [B, T, d] view that starts past its storage offset
    bias = ops.encoder_bias(W_enc, b_enc, b_dec)
    args = (x, W_enc, W_dec, b_dec, harmful, *strengths(0.5, 1.0, -1.0), k, bias)
    for _ in range(3):
        y1, h1 = _steer_fwd(*args, LaunchConfig(one_launch=True))
        y2, h2 = _steer_fwd(*args, LaunchConfig(one_launch=False, select_algo="row"))
        assert_bitwise_equal(y1, y2)
        assert_bitwise_equal(h1, h2)


@pytest.mark.parametrize("N,F,k", [(1024, 12288, 32), (300, 49152, 64), (500, 9728, 100)], ids=str)
def test_every_tuning_candidate_gives_the_same_codes_bitwise(monkeypatch, N, F, k):
    # SAFEDIG_TUNE picks among these by time alone, so each must give exactly the default's codes
    from safedig_kernels.ops import _tuning
    from safedig_kernels.ops.topk_encode import _topk_encode_fwd

    x, W_enc, b_enc, _, b_dec, _ = make(3072, F, torch.bfloat16, N=N)
    bias = ops.encoder_bias(W_enc, b_enc, b_dec)
    want = _topk_encode_fwd(x, W_enc, bias, k, LaunchConfig())
    for candidate in _tuning.SELECT_CANDIDATES:
        got = _topk_encode_fwd(x, W_enc, bias, k, candidate)
        assert_bitwise_equal(got[0], want[0])
        assert_bitwise_equal(got[1], want[1])
    monkeypatch.setenv("SAFEDIG_TUNE", "1")
    monkeypatch.setattr(_tuning, "_CHOSEN", {})
    tuned = _topk_encode_fwd(x, W_enc, bias, k)  # times every candidate with CUDA events, then runs the fastest
    assert len(_tuning._CHOSEN) == 1
    assert_bitwise_equal(tuned[0], want[0])
    assert_bitwise_equal(tuned[1], want[1])


@pytest.mark.parametrize("N,F,k", [(4608, 12288, 32), (1000, 49152, 64)], ids=str)
def test_one_kernel_after_the_gemm_matches_two_kernels_bitwise(N, F, k):
    # LaunchConfig(one_launch=True) / (persistent=True) at FLUX sizes: device_run.sh times them,
    # so they must give exactly what the default two-kernel path gives
    from safedig_kernels.ops.steer import _steer_fwd

    x, W_enc, b_enc, W_dec, b_dec, harmful = make(3072, F, torch.bfloat16, lead=(2, N // 2))
    bias = ops.encoder_bias(W_enc, b_enc, b_dec)
    args = (x, W_enc, W_dec, b_dec, harmful, torch.tensor([0.5, 1.0], device=DEV), *strengths(0.0, 1.0, -1.0)[1:], k,
            bias)
    want = _steer_fwd(*args, LaunchConfig(one_launch=False, select_algo="row"))
    for variant in (LaunchConfig(one_launch=True), LaunchConfig(persistent=True)):
        got = _steer_fwd(*args, variant)
        assert_bitwise_equal(got[0], want[0])
        assert_bitwise_equal(got[1], want[1])


def test_python_valued_arguments_sync_only_on_first_use():
    # floats and id lists become device tensors once; after that a call makes no host sync
    x, W_enc, b_enc, W_dec, b_dec, _ = make(64, 300, torch.bfloat16, N=40)
    args = (x, W_enc, b_enc, W_dec, b_dec, [1, 5, 7], 0.5, 1.0, 0.0, 8)
    y0, h0 = ops.steer(*args)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y1, h1 = ops.steer(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_bitwise_equal(y0, y1)


def test_flux_single_block_strided_activation():
    # FLUX single blocks hand back [B, T_img, d] slices of a [B, T_txt + T_img, d] buffer.
    buf, *sae = make(3072, 12288, torch.bfloat16, lead=(1, 512 + 4096))
    check_steer(buf[:, 512:], *sae, 0.5, 1.0, 0.0, 32)
    buf2, *_ = make(3072, 12288, torch.bfloat16, lead=(2, 40))
    check_steer(buf2[:, 8:], *sae, 0.5, 1.0, 0.0, 32)  # B = 2: not viewable as [N, d]


def test_extreme_sizes():
    x, *sae = make(64, 131072, torch.bfloat16, N=8)      # F = 2**17, k = 256: exact path, many chunks
    check_steer(x, *sae, 0.5, 1.0, 0.0, 256)
    x, *sae = make(64, 256, torch.bfloat16, N=65536)     # N at its maximum
    check_steer(x, *sae, 0.5, 1.0, 0.0, 8)
    x, *sae = make(64, 256, torch.bfloat16, N=0)
    y, h = ops.steer(x, *sae, 0.5, 1.0, 0.0, 8)
    assert y.shape == (0, 64) and h.shape == (0,)


def test_opcheck_cuda():
    x, W_enc, b_enc, W_dec, b_dec, harmful = make(40, 300, torch.bfloat16, lead=(2, 9))
    bgt = strengths(0.5, 1.0, 0.0)
    torch.library.opcheck(torch.ops.safedig.topk_encode.default, (x, W_enc, b_enc, b_dec, 5, None))
    vals, idx = ops.topk_encode(x, W_enc, b_enc, b_dec, 5)
    torch.library.opcheck(torch.ops.safedig.sparse_decode.default, (vals, idx, W_dec, b_dec))
    torch.library.opcheck(torch.ops.safedig.steer.default, (x, W_enc, b_enc, W_dec, b_dec, harmful, *bgt, 5, None))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_ladder_cuda(backend):
    torch._dynamo.reset()
    sae = sk.random_sae(64, 512, 8, harmful=range(0, 512, 5), device=DEV, dtype=torch.bfloat16)
    sae.set_strengths(beta=0.5, gamma=1.0, tau=0.0)
    cnt = torch._dynamo.testing.CompileCounterWithBackend(backend)
    fn = torch.compile(lambda x: sae.steer(x), backend=cnt, fullgraph=True, dynamic=True)
    for N, beta in ((37, 0.5), (100, 0.5), (64, 0.9), (300, 0.0)):
        sae.set_strengths(beta=beta)
        x = torch.randn(N, 64, device=DEV, dtype=torch.bfloat16)
        y, h = fn(x)
        y_ref, h_ref = sae.steer(x)
        assert torch.equal(y, y_ref) and torch.equal(h, h_ref)
    assert cnt.frame_count == 1


def test_inductor_compiles_the_triton_kernels_into_its_code():
    """The ops are `triton_op`s: inductor's generated code launches our kernels itself, with
    the encoder GEMM beside them, instead of calling back into an opaque op."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    sae = sk.random_sae(64, 512, 8, harmful=range(0, 512, 5), device=DEV, dtype=torch.bfloat16)
    sae.set_strengths(beta=0.5, gamma=1.0, tau=0.0)
    x = torch.randn(2, 150, 64, device=DEV, dtype=torch.bfloat16)  # 300 rows: the split selection
    fn = torch.compile(lambda t: sae.steer(t), backend="inductor", fullgraph=True)
    (y, h), code = run_and_get_code(fn, x)
    source = "\n".join(code)
    for kernel in ("_group_max_kernel", "_split_rank_kernel", "_steer_fwd_kernel"):
        assert kernel in source, f"{kernel} is not in inductor's code"
    assert "safedig.steer" not in source
    y_ref, h_ref = sae.steer(x)
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref)


def test_reduce_overhead_cudagraphs():
    torch._dynamo.reset()
    sae = sk.random_sae(64, 512, 8, harmful=range(0, 512, 5), device=DEV, dtype=torch.bfloat16)
    sae.set_strengths(beta=0.5, gamma=1.0, tau=0.0)
    fn = torch.compile(lambda x: sae.steer(x)[0] * 1, mode="reduce-overhead", fullgraph=True)
    for step in range(4):
        sae.set_strengths(beta=0.25 * step)
        x = torch.randn(2, 50, 64, device=DEV, dtype=torch.bfloat16)
        assert torch.equal(fn(x), sae.steer(x)[0])


def test_cuda_graph_capture_and_replay():
    sae = sk.random_sae(3072, 12288, 32, harmful=range(0, 12288, 9), device=DEV, dtype=torch.bfloat16)
    sae.set_strengths(beta=0.5, gamma=1.0, tau=0.0)
    static_x = torch.randn(1, 512, 3072, device=DEV, dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            sae.steer(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static, h_static = sae.steer(static_x)
    for beta in (0.5, 0.0, 1.0):
        x = torch.randn_like(static_x)
        static_x.copy_(x)
        sae.set_strengths(beta=beta)  # in place: the graph reads the new value
        graph.replay()
        y, h = sae.steer(x)
        assert torch.equal(y_static, y) and torch.equal(h_static, h)


# -- gradients (docs/spec.md, Gradients) -----------------------------------------------------------
# Each backward runs in both forms `_launch.BACKWARDS` offers: "triton" (the sparse kernels, the
# default) and "torch" (the reference's backward in the input dtype). Tolerance as for the
# forward: against the float64 reference's backward on the op's own codes, at most twice the
# error of that backward computed in the input dtype, plus EPS times the gradient's scale.

GRAD_NAMES = ("x", "W_enc", "b_enc", "W_dec", "b_dec")


@pytest.fixture(params=_launch.BACKWARDS)
def backward(request, monkeypatch):
    monkeypatch.setattr(_launch, "DEFAULT", dataclasses.replace(_launch.DEFAULT, backward=request.param))
    return request.param


def steer_grads(x, sae, harmful, bgt, k, gy, gh):
    ts = [t.detach().clone().requires_grad_() for t in (x, *sae)]
    y, h = ops.steer(ts[0], *ts[1:], harmful, *bgt, k)
    return torch.autograd.grad((y, h), ts, (gy, gh)), h.detach()


def check_steer_grads(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, k, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    bgt = strengths(beta, gamma, tau)
    gy = torch.randn(x.shape, generator=g).to(DEV, x.dtype)
    gh = torch.randn(x.shape[:-1], generator=g).to(DEV)
    got, h = steer_grads(x, (W_enc, b_enc, W_dec, b_dec), harmful, bgt, k, gy, gh)
    vals, idx = ops.topk_encode(x, W_enc, b_enc, b_dec, k)  # the codes the backward recomputed
    args = (harmful, *bgt, h, vals, idx)
    want = reference.steer_backward(gy.double(), gh.double(), x.double(), W_enc.double(), W_dec.double(),
                                    b_dec.double(), *args[:4], h.double(), vals.double(), idx)
    lowp = reference.steer_backward(gy, gh, x, W_enc, W_dec, b_dec, *args, upcast=False)
    for name, a, w, lo in zip(GRAD_NAMES, got, (want[0], want[1].t(), *want[2:]),
                              (lowp[0], lowp[1].t(), *lowp[2:])):
        assert a.dtype == x.dtype and a.shape == w.shape, name
        scale = w.abs().max().item() if w.numel() else 0.0
        err = (a.double() - w).abs().max().item() if w.numel() else 0.0
        err_lowp = (lo.double() - w).abs().max().item() if w.numel() else 0.0
        bound = tolerance(err_lowp, x.dtype, atol=EPS[x.dtype] * (1 + scale), cap=False)
        assert err <= bound, f"{name}: off by {err:.3g}, bound {bound:.3g} (low-precision reference {err_lowp:.3g})"
    return got


@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("N,d,F,k", SMALL[:6], ids=lambda v: str(v))
def test_backward_small_cases(N, d, F, k, dtype, backward):
    x, *sae = make(d, F, dtype, lead=(1, N))
    x = torch.randn(1, N + 2, d + 3, device=DEV, dtype=dtype)[:, 2:, :d].copy_(x)  # strided 3-D slice
    x[0, N // 2, 0] = float("nan")
    for bgt in ((0.5, 1.0, 0.0), (0.0, 1.0, -1.0), (1.0, -1.0, 0.2)):
        got = check_steer_grads(x, *sae, *bgt, k)
        assert torch.isfinite(torch.cat([g.flatten().float() for g in got[1:]])).all()


@pytest.mark.parametrize("N,d,F,k", REAL[:1] + REAL[2:], ids=lambda v: str(v))
def test_backward_real_sizes(N, d, F, k, backward):
    x, *sae = make(d, F, torch.bfloat16, N=N)
    check_steer_grads(x, *sae, 0.5, 1.0, -1.0, k)   # every token steered
    check_steer_grads(x, *sae, 0.0, 2.0, 0.05, k)   # gated pure Repel


@pytest.mark.parametrize("off", [(0.0, 0.0, -1.0), (0.5, 1.0, 1e9)], ids=["beta=gamma=0", "gate-shut"])
def test_backward_of_unchanged_tokens_is_the_identity_bitwise(off, backward):
    x, *sae, harmful = make(3072, 12288, torch.bfloat16, N=300)
    gy = torch.randn_like(x)
    gy[0, :8] = -0.0
    got, _ = steer_grads(x, sae, harmful, strengths(*off), 32, gy, torch.zeros(300, device=DEV))
    assert_bitwise_equal(got[0], gy)
    for name, g in zip(GRAD_NAMES[1:], got[1:]):
        assert torch.equal(g, torch.zeros_like(g)), name


def test_backward_is_deterministic_and_syncs_nothing():
    # no float atomics: two runs agree bitwise; after a warm-up call nothing waits on the host
    x, *sae, harmful = make(3072, 12288, torch.bfloat16, N=2000)
    bgt = strengths(0.5, 1.0, 0.0)
    gy, gh = torch.randn_like(x), torch.randn(2000, device=DEV)
    first, _ = steer_grads(x, sae, harmful, bgt, 32, gy, gh)
    ts = [t.detach().clone().requires_grad_() for t in (x, *sae)]
    y, h = ops.steer(ts[0], *ts[1:], harmful, *bgt, 32)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        second = torch.autograd.grad((y, h), ts, (gy, gh))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for name, a, b in zip(GRAD_NAMES, first, second):
        assert_bitwise_equal(a, b)


def test_backward_ops_capture_in_a_cuda_graph():
    x, W_enc, b_enc, W_dec, b_dec, harmful = make(512, 4096, torch.bfloat16, N=700)
    bgt = strengths(0.5, 1.0, 0.0)
    _, h = ops.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, *bgt, 16)
    vals, idx = ops.topk_encode(x, W_enc, b_enc, b_dec, 16)
    gy, gh = torch.randn_like(x), torch.randn_like(h)

    def backward_ops():
        return (torch.ops.safedig.steer_backward(gy, gh, x, W_enc, W_dec, b_dec, harmful, *bgt, h, vals, idx, True,
                                                 True)
                + torch.ops.safedig.topk_encode_backward(vals, x, W_enc, b_dec, vals, idx, True, True)
                + torch.ops.safedig.sparse_decode_backward(gy, vals, idx, W_dec, True, True))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            backward_ops()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = backward_ops()
    for _ in range(2):
        gy.copy_(torch.randn_like(gy))
        graph.replay()
        for a, b in zip(static, backward_ops()):
            assert_bitwise_equal(a, b)


def test_opcheck_cuda_with_gradients():
    x, W_enc, b_enc, W_dec, b_dec, harmful = make(40, 300, torch.bfloat16, lead=(2, 9))
    ts = [t.detach().clone().requires_grad_() for t in (x, W_enc, b_enc, W_dec, b_dec)]
    bgt = strengths(0.5, 1.0, 0.0)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.safedig.steer.default, (*ts, harmful, *bgt, 5, None), test_utils=tests)
    torch.library.opcheck(torch.ops.safedig.topk_encode.default, (ts[0], ts[1], ts[2], ts[4], 5, None),
                          test_utils=tests)
    vals, idx = ops.topk_encode(x, W_enc, b_enc, b_dec, 5)
    torch.library.opcheck(torch.ops.safedig.sparse_decode.default, (vals.requires_grad_(), idx, ts[3], ts[4]),
                          test_utils=tests)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_forward_and_backward_cuda(backend):
    torch._dynamo.reset()
    x0, *sae, harmful = make(64, 512, torch.bfloat16, N=8)
    bgt = strengths(0.5, 1.0, 0.0)

    def loss(x, W_enc, b_enc, W_dec, b_dec):
        y, h = ops.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, *bgt, 8)
        return y.float().square().sum() + h.sum()

    cnt = torch._dynamo.testing.CompileCounterWithBackend(backend)
    fn = torch.compile(loss, backend=cnt, fullgraph=True, dynamic=True)
    for N in (37, 100, 300):
        x = torch.randn(N, 64, device=DEV, dtype=torch.bfloat16)
        mine = [t.detach().clone().requires_grad_() for t in (x, *sae)]
        ref = [t.detach().clone().requires_grad_() for t in (x, *sae)]
        got = torch.autograd.grad(fn(*mine), mine)
        want = torch.autograd.grad(loss(*ref), ref)
        for name, a, b in zip(GRAD_NAMES, got, want):
            torch.testing.assert_close(a, b, msg=f"{name} at N = {N}")
    assert cnt.frame_count == 1
