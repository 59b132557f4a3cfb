"""Gradients of the `safedig` ops on the CPU (docs/spec.md, Gradients): finite differences in
float64 away from ties, ReLU kinks and the gate; agreement with autograd through the reference
in every dtype; disabled and non-finite tokens passing their gradient through bitwise; opcheck
with its autograd tests; forward + backward under torch.compile. The Triton backward kernels are
tested in test_kernels_interpreter.py (CPU) and test_kernels_gpu.py (CUDA)."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from _oracle import dense_steer64, selection_margin

import safedig_kernels as sk
from safedig_kernels import ops, reference
from safedig_kernels.testing import assert_bitwise_equal

WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec")


def draw(lead, d, F, dtype=torch.float64, seed=0, strided=False):
    """x `[*lead, d]` (a strided slice of a larger buffer when `strided`) and an SAE, float64 first."""
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(d, F, generator=g, dtype=torch.float64) / d ** 0.5
    b_enc = torch.randn(F, generator=g, dtype=torch.float64) * 0.3
    W_dec = torch.nn.functional.normalize(torch.randn(F, d, generator=g, dtype=torch.float64), dim=1)
    b_dec = torch.randn(d, generator=g, dtype=torch.float64) * 0.1
    if strided:
        x = torch.randn(*lead[:-1], lead[-1] + 2, d + 3, generator=g, dtype=torch.float64)[..., 2:, 3:]
    else:
        x = torch.randn(*lead, d, generator=g, dtype=torch.float64)
    harmful = torch.rand(F, generator=g) < 0.4
    return [t.to(dtype) for t in (x, W_enc, b_enc, W_dec, b_dec)], harmful


def stable_draw(lead, d, F, k, tau=-1.0, split_gate=False, margin=2e-2, strided=False):
    """A float64 draw whose tokens all sit `margin` or more from a top-k tie, a ReLU kink and (with
    `split_gate`, tau put in the widest gap between the tokens' harm scores, so some tokens are
    steered and some not) the gate: there finite differences see one linear piece."""
    for seed in range(500):
        (x, W_enc, b_enc, W_dec, b_dec), harmful = draw(lead, d, F, seed=seed, strided=strided)
        if split_gate:
            _, h = dense_steer64(x, W_enc, b_enc, W_dec, b_dec, harmful, 0.5, 1.0, -1.0, k)
            hs = torch.sort(h).values
            gap = int(torch.argmax(hs.diff()))
            tau = float(hs[gap] + hs[gap + 1]) / 2
        if selection_margin(x, W_enc, b_enc, b_dec, k, harmful, tau) > margin:
            return (x, W_enc, b_enc, W_dec, b_dec), harmful, tau
    raise AssertionError("no draw this far from every tie")


def requiring_grad(tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def gradcheck(f, inputs) -> bool:
    """torch.autograd.gradcheck with tolerances for a piecewise-linear function in float64: on one
    linear piece central differences are exact up to rounding (~1e-10 here), so torch's default
    rtol of 1e-3 would let a gradient off by 0.1 % pass."""
    return torch.autograd.gradcheck(f, inputs, atol=1e-8, rtol=1e-6)


GRADCHECK_CASES = [  # (lead, d, F, k, strided)
    ((5,), 7, 23, 3, False),
    ((2, 3), 5, 13, 4, True),
    ((4,), 6, 9, 1, False),
    ((3,), 5, 6, 6, False),  # k = F: every feature selected, only ReLU kinks matter
]
GRADCHECK_IDS = ["N,d", "B,T,d-strided", "k=1", "k=F"]


@pytest.mark.parametrize("lead,d,F,k,strided", GRADCHECK_CASES, ids=GRADCHECK_IDS)
@pytest.mark.parametrize("beta,gamma,gate", [(0.5, 1.0, "all"), (0.0, 2.0, "all"), (1.0, -1.0, "split"),
                                             (0.3, 0.0, "split")], ids=["blend+repel", "repel", "gated", "blend"])
def test_steer_gradcheck_float64(lead, d, F, k, strided, beta, gamma, gate):
    tensors, harmful, tau = stable_draw(lead, d, F, k, split_gate=gate == "split", strided=strided)
    b, g, t = (torch.tensor(v, dtype=torch.float32) for v in (beta, gamma, tau))

    def f(*a):
        return torch.ops.safedig.steer(*a, harmful, b, g, t, k, None)

    assert gradcheck(f, requiring_grad(tensors))


def test_steer_gradcheck_per_sample_strengths():
    # one sample steered, one off (beta = gamma = 0): its tokens' y is x, its dx the identity
    tensors, harmful, tau = stable_draw((2, 3), 6, 15, 3)
    b, g, t = torch.tensor([0.5, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor(tau)
    assert gradcheck(lambda *a: torch.ops.safedig.steer(*a, harmful, b, g, t, 3, None),
                                    requiring_grad(tensors))


@pytest.mark.parametrize("lead,d,F,k,strided", GRADCHECK_CASES, ids=GRADCHECK_IDS)
def test_topk_encode_gradcheck_float64(lead, d, F, k, strided):
    (x, W_enc, b_enc, _, b_dec), _, _ = stable_draw(lead, d, F, k, strided=strided)
    assert gradcheck(lambda *a: torch.ops.safedig.topk_encode(*a, k, None)[0],
                                    requiring_grad((x, W_enc, b_enc, b_dec)))


@pytest.mark.parametrize("lead,d,F,k", [((5,), 7, 23, 3), ((2, 3), 5, 13, 4), ((4,), 6, 9, 1)],
                         ids=["N,d", "B,T,d", "k=1"])
def test_sparse_decode_gradcheck_float64(lead, d, F, k):
    (x, W_enc, b_enc, W_dec, b_dec), _ = draw(lead, d, F)
    vals, idx = ops.topk_encode(x, W_enc, b_enc, b_dec, k)
    vals = torch.randn(vals.shape, dtype=torch.float64)  # linear in vals: any values, zeros and negatives too
    vals[..., 0] = 0.0
    idx[..., -1] = idx[..., 0]  # a repeated index sums both codes' rows
    assert gradcheck(lambda v, Wd, bd: torch.ops.safedig.sparse_decode(v, idx, Wd, bd),
                                    requiring_grad((vals, W_dec, b_dec)))


# -- the op's backward against autograd through the reference ---------------------------------

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -9}


def assert_close_scaled(got, want, dtype, what):
    """|got - want| <= TOL * (1 + max |want|): gradients of one computation by two formulas,
    each rounded once to `dtype`."""
    err = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    scale = want.double().abs().max().item() if want.numel() else 0.0
    assert err <= TOL[dtype] * (1 + scale), f"{what}: off by {err:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["N,d", "B,T,d-strided"])
def test_steer_backward_equals_autograd_through_the_reference(dtype, layout):
    lead, strided = ((7,), False) if layout == "N,d" else ((2, 4), True)
    (x, *sae), harmful = draw(lead, 9, 31, dtype, strided=strided)
    # per sample: steered, repel only, off; tau in the middle of the scores gates some tokens
    n = x.shape[0]
    beta = torch.tensor([0.5, 0.0, 0.0, 1.0, 0.3, 0.5, 0.0][:n])
    gamma = torch.tensor([1.0, 2.0, 0.0, -1.0, 0.0, 1.0, 1.0][:n])
    _, h0 = reference.steer(x, *sae, harmful, beta, gamma, torch.tensor(-1.0), 5)
    tau = h0.flatten().float().median()
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
    gh = torch.randn(h0.shape, generator=g, dtype=torch.float64).to(h0.dtype)
    mine, ref = requiring_grad((x, *sae)), requiring_grad((x, *sae))
    got = torch.autograd.grad(torch.ops.safedig.steer(*mine, harmful, beta, gamma, tau, 5, None), mine, (gy, gh))
    want = torch.autograd.grad(reference.steer(*ref, harmful, beta, gamma, tau, 5), ref, (gy, gh))
    for name, a, b in zip(("x",) + WEIGHTS, got, want):
        assert a.dtype == b.dtype == dtype and a.shape == b.shape
        assert_close_scaled(a, b, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_encode_decode_backward_equals_autograd_through_the_reference(dtype):
    (x, W_enc, b_enc, W_dec, b_dec), _ = draw((2, 5), 11, 29, dtype, strided=True)
    mine, ref = requiring_grad((x, W_enc, b_enc, W_dec, b_dec)), requiring_grad((x, W_enc, b_enc, W_dec, b_dec))
    gy = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    out = torch.ops.safedig.sparse_decode(*torch.ops.safedig.topk_encode(mine[0], mine[1], mine[2], mine[4], 4, None),
                                          mine[3], mine[4])
    want_out = reference.sparse_decode(*reference.topk_encode(ref[0], ref[1], ref[2], ref[4], 4), ref[3], ref[4])
    got = torch.autograd.grad(out, mine, gy)
    want = torch.autograd.grad(want_out, ref, gy)
    for name, a, b in zip(("x",) + WEIGHTS, got, want):
        assert a.dtype == b.dtype == dtype
        assert_close_scaled(a, b, dtype, name)


# -- tokens the forward leaves unchanged ---------------------------------------------------------

@pytest.mark.parametrize("off", ["beta=gamma=0", "gate shut", "non-finite"])
def test_unchanged_tokens_pass_their_gradient_through_bitwise(off):
    (x, *sae), harmful = draw((2, 3), 8, 25, torch.float32, strided=True)
    beta, gamma, tau = torch.tensor(0.5), torch.tensor(1.0), torch.tensor(-1.0)
    if off == "beta=gamma=0":
        beta, gamma = torch.tensor(0.0), torch.tensor(0.0)
    elif off == "gate shut":
        tau = torch.tensor(1e9)
    else:
        x[...] = float("nan")
    gy = torch.randn(x.shape)
    gy[0, 0, :3] = -0.0  # x + 0.0 would turn these into +0.0
    ts = requiring_grad((x, *sae))
    y, h = torch.ops.safedig.steer(*ts, harmful, beta, gamma, tau, 4, None)
    assert_bitwise_equal(y, x)
    grads = torch.autograd.grad(y, ts, gy)
    assert_bitwise_equal(grads[0], gy)
    for name, g in zip(WEIGHTS, grads[1:]):
        assert torch.equal(g, torch.zeros_like(g)), name


def test_a_non_finite_token_adds_nothing_to_the_weights():
    # its dx is grad_y (bitwise), the weights' gradients are those of the batch without it, even
    # when the loss also reads h (its h is NaN, a constant)
    (x, *sae), harmful = draw((6,), 8, 25, torch.float32)
    x[2, 3] = float("inf")
    keep = [0, 1, 3, 4, 5]
    gy, gh = torch.randn(x.shape), torch.randn(6)
    args = (harmful, torch.tensor(0.5), torch.tensor(1.0), torch.tensor(-1.0), 4, None)
    full = requiring_grad((x, *sae))
    y, h = torch.ops.safedig.steer(*full, *args)
    assert torch.isnan(h[2]) and not torch.isnan(h[keep]).any()
    got = torch.autograd.grad((y, h.nan_to_num(0.0)), full, (gy, gh))
    part = requiring_grad((x[keep], *sae))
    want = torch.autograd.grad(torch.ops.safedig.steer(*part, *args), part, (gy[keep], gh[keep]))
    assert_bitwise_equal(got[0][2], gy[2])
    torch.testing.assert_close(got[0][keep], want[0])
    for name, a, b in zip(WEIGHTS, got[1:], want[1:]):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, msg=name)
    vals, idx = torch.ops.safedig.topk_encode(full[0], full[1], full[2], full[4], 4, None)
    gv = torch.randn(vals.shape)
    dx, dW_enc = torch.autograd.grad(vals, (full[0], full[1]), gv)
    assert torch.equal(dx[2], torch.zeros(8)) and torch.isfinite(dW_enc).all()


def test_harm_score_has_a_gradient_at_zero_strengths():
    # h does not depend on the strengths: an attack (or a loss) may read it with steering off
    (x, *sae), harmful = draw((5,), 8, 25, torch.float64)
    zero = torch.tensor(0.0)
    mine, ref = requiring_grad((x, *sae)), requiring_grad((x, *sae))
    _, h = torch.ops.safedig.steer(*mine, harmful, zero, zero, torch.tensor(-1.0), 4, None)
    _, h_ref = reference.steer(*ref, harmful, zero, zero, torch.tensor(-1.0), 4)
    got = torch.autograd.grad(h.sum(), mine)
    want = torch.autograd.grad(h_ref.sum(), ref, allow_unused=True)
    assert got[0].abs().sum() > 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a))


# -- arguments without a gradient ------------------------------------------------------------

@pytest.mark.parametrize("name", ["beta", "gamma", "tau"])
def test_a_strength_that_requires_grad_is_refused(name):
    (x, *sae), harmful = draw((4,), 8, 20, torch.float32)
    s = {n: torch.tensor(v) for n, v in (("beta", 0.5), ("gamma", 1.0), ("tau", 0.0))}
    s[name].requires_grad_()
    with pytest.raises(ValueError, match=f"{name} requires grad"):
        torch.ops.safedig.steer(x, *sae, harmful, s["beta"], s["gamma"], s["tau"], 4, None)
    with torch.no_grad():  # no graph to record: nothing to refuse
        torch.ops.safedig.steer(x, *sae, harmful, s["beta"], s["gamma"], s["tau"], 4, None)


def test_enc_bias_is_a_cache_whose_gradient_reaches_the_weights():
    (x, *sae), harmful = draw((4,), 8, 20, torch.float32)
    ts = requiring_grad((x, *sae))
    enc_bias = ops.encoder_bias(ts[1], ts[2], ts[4])  # requires grad, as an SAE's cache does while it trains
    strengths = (torch.tensor(0.5), torch.tensor(1.0), torch.tensor(-1.0))
    with_cache = torch.autograd.grad(torch.ops.safedig.steer(*ts, harmful, *strengths, 4, enc_bias)[0].sum(),
                                     ts + [enc_bias], allow_unused=True)
    without = torch.autograd.grad(torch.ops.safedig.steer(*ts, harmful, *strengths, 4, None)[0].sum(), ts)
    assert with_cache[-1] is None
    for a, b in zip(with_cache[:-1], without):
        torch.testing.assert_close(a, b)


def test_double_backward_is_refused_clearly():
    (x, *sae), harmful = draw((4,), 8, 20, torch.float64)
    ts = requiring_grad((x, *sae))
    y, _ = torch.ops.safedig.steer(*ts, harmful, torch.tensor(0.5), torch.tensor(1.0), torch.tensor(-1.0), 4, None)
    (dx,) = torch.autograd.grad(y.sum(), ts[0], create_graph=True)
    with pytest.raises(RuntimeError, match="steer_backward"):
        dx.sum().backward()


# -- dtypes and devices ------------------------------------------------------------------------

def test_float64_runs_on_the_cpu_and_is_refused_on_cuda():
    (x, W_enc, b_enc, W_dec, b_dec), harmful = draw((3,), 8, 20)
    strengths = (torch.tensor(0.5), torch.tensor(1.0), torch.tensor(-1.0))
    y, h = ops.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, *strengths, 4)
    vals, idx = ops.topk_encode(x, W_enc, b_enc, b_dec, 4)
    assert y.dtype == h.dtype == vals.dtype == ops.sparse_decode(vals, idx, W_dec, b_dec).dtype == torch.float64
    with torch._subclasses.fake_tensor.FakeTensorMode():  # CUDA tensors without a GPU
        cuda = [torch.empty(t.shape, dtype=t.dtype, device="cuda") for t in (x, W_enc, b_enc, W_dec, b_dec)]
        fake_strengths = [torch.empty((), device="cuda") for _ in range(3)]
        fake_harmful = torch.empty(20, dtype=torch.bool, device="cuda")
        with pytest.raises(TypeError, match="float64 only on the CPU"):
            torch.ops.safedig.steer(*cuda, fake_harmful, *fake_strengths, 4, None)
        with pytest.raises(TypeError, match="float64 only on the CPU"):
            torch.ops.safedig.topk_encode(cuda[0], cuda[1], cuda[2], cuda[4], 4, None)
        with pytest.raises(TypeError, match="vals must have dtype torch.float32"):
            torch.ops.safedig.sparse_decode(torch.empty(3, 4, dtype=torch.float64, device="cuda"),
                                            torch.empty(3, 4, dtype=torch.int32, device="cuda"), cuda[3], cuda[4])


def test_mixed_dtypes_keep_their_errors():
    (x, W_enc, b_enc, W_dec, b_dec), harmful = draw((3,), 8, 20)
    with pytest.raises(TypeError, match="W_enc must have the dtype of x"):
        ops.topk_encode(x, W_enc.float(), b_enc, b_dec, 4)
    vals, idx = ops.topk_encode(x, W_enc, b_enc, b_dec, 4)
    with pytest.raises(TypeError, match="vals in float64 need W_dec in float64"):
        ops.sparse_decode(vals, idx, W_dec.float(), b_dec.float())
    # float32 codes decode with a float64 decoder: the codes lose nothing on the way
    assert ops.sparse_decode(vals.float(), idx, W_dec, b_dec).dtype == torch.float64
    with pytest.raises(TypeError, match="grad_y must have the dtype of x"):
        torch.ops.safedig.steer_backward(x.float(), None, x, W_enc, W_dec, b_dec, harmful, torch.tensor(0.5),
                                         torch.tensor(1.0), torch.tensor(0.0), torch.zeros(3, dtype=torch.float64),
                                         vals, idx, True, True)
    with pytest.raises(ValueError, match=r"grad_vals must have shape \(3, 4\)"):
        torch.ops.safedig.topk_encode_backward(vals[:, :3], x, W_enc, b_dec, vals, idx, True, True)


# -- opcheck, with the autograd tests -------------------------------------------------------------

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("shape", [(6, 16), (2, 3, 16)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_with_gradients(shape, dtype):
    (x, W_enc, b_enc, W_dec, b_dec), harmful = draw(shape[:-1], 16, 40, dtype)
    ts = requiring_grad((x, W_enc, b_enc, W_dec, b_dec))
    strengths = (torch.linspace(0, 1, shape[0]), torch.tensor(1.0), torch.tensor(0.0))
    torch.library.opcheck(torch.ops.safedig.steer.default, (*ts, harmful, *strengths, 5, None),
                          test_utils=OPCHECK_TESTS)
    torch.library.opcheck(torch.ops.safedig.topk_encode.default, (ts[0], ts[1], ts[2], ts[4], 5, None),
                          test_utils=OPCHECK_TESTS)
    vals, idx = ops.topk_encode(x, W_enc, b_enc, b_dec, 5)
    torch.library.opcheck(torch.ops.safedig.sparse_decode.default, (vals.requires_grad_(), idx, ts[3], ts[4]),
                          test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("asked", [(True, True), (True, False), (False, True)], ids=["all", "input", "weights"])
def test_opcheck_backward_ops(asked):
    (x, W_enc, b_enc, W_dec, b_dec), harmful = draw((2, 3), 16, 40, torch.float32)
    strengths = (torch.tensor([0.5, 0.0]), torch.tensor(1.0), torch.tensor(-1.0))
    _, h = ops.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, *strengths, 5)
    vals, idx = ops.topk_encode(x, W_enc, b_enc, b_dec, 5)
    gy, gh = torch.randn(x.shape), torch.randn(h.shape)
    torch.library.opcheck(torch.ops.safedig.steer_backward.default,
                          (gy, gh, x, W_enc, W_dec, b_dec, harmful, *strengths, h, vals, idx, *asked))
    torch.library.opcheck(torch.ops.safedig.topk_encode_backward.default,
                          (torch.randn(vals.shape), x, W_enc, b_dec, vals, idx, *asked))
    torch.library.opcheck(torch.ops.safedig.sparse_decode_backward.default, (gy, vals, idx, W_dec, *asked))
    dx, dW_enc_t, *_ = torch.ops.safedig.steer_backward(gy, gh, x, W_enc, W_dec, b_dec, harmful, *strengths, h, vals,
                                                        idx, *asked)
    assert dx.shape == (x.shape if asked[0] else (0,)) and dW_enc_t.shape == ((40, 16) if asked[1] else (0,))


# -- forward + backward under torch.compile -----------------------------------------------------

def _loss(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau):
    y, h = torch.ops.safedig.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, 4, None)
    vals, idx = torch.ops.safedig.topk_encode(y, W_enc, b_enc, b_dec, 4, None)
    x_hat = torch.ops.safedig.sparse_decode(vals, idx, W_dec, b_dec)
    return (y * y.detach().sin()).sum() + h.sum() + (x_hat - x).square().mean()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_forward_and_backward_no_graph_break_no_recompile(backend):
    torch._dynamo.reset()
    cnt = torch._dynamo.testing.CompileCounterWithBackend(backend)
    fn = torch.compile(_loss, backend=cnt, fullgraph=True, dynamic=True)
    (_, *sae), harmful = draw((1,), 12, 30, torch.float32)
    beta, gamma, tau = torch.tensor(0.5), torch.tensor(1.0), torch.tensor(-1.0)
    for N, b in ((7, 0.5), (13, 0.0), (5, 0.9), (40, 0.5)):
        beta.fill_(b)  # strengths change in place between calls
        x = torch.randn(N, 12)
        mine, ref = requiring_grad((x, *sae)), requiring_grad((x, *sae))
        got = torch.autograd.grad(fn(*mine, harmful, beta, gamma, tau), mine)
        want = torch.autograd.grad(_loss(*ref, harmful, beta, gamma, tau), ref)
        for name, a, w in zip(("x",) + WEIGHTS, got, want):
            torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-5, msg=f"{name} at N = {N}")
    assert cnt.frame_count == 1, f"{backend}: compiled {cnt.frame_count} times"


def test_sae_steer_passes_gradients_to_x():
    # the container's weights are buffers (no gradient); a steered activation still trains
    # whatever produced it
    sae = sk.random_sae(12, 40, 4, harmful=[0, 3, 5, 7, 11])
    sae.set_strengths(beta=0.5, gamma=1.0, tau=-1.0)
    x = torch.randn(2, 5, 12, requires_grad=True)
    y, _ = sae.steer(x)
    (dx,) = torch.autograd.grad(y.square().sum(), x)
    ref = x.detach().clone().requires_grad_()
    y_ref, _ = reference.steer(ref, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.harmful_mask,
                               *sae.strengths.unbind(), 4)
    (want,) = torch.autograd.grad(y_ref.square().sum(), ref)
    torch.testing.assert_close(dx, want)
