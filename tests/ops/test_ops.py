"""The `safedig` ops on CPU: opcheck, compile ladder, property tests, bad arguments."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from _oracle import dense_codes64, dense_steer64
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import safedig_kernels as sk
from safedig_kernels import ops
from safedig_kernels.ops import _arguments
from safedig_kernels.testing import REFERENCE_TOL, assert_bitwise_equal, assert_valid_topk


def sae_tensors(d, F, dtype=torch.float32, device="cpu"):
    W_enc = (torch.randn(d, F) / d ** 0.5).to(device, dtype)
    b_enc = (torch.randn(F) * 0.1).to(device, dtype)
    W_dec = torch.nn.functional.normalize(torch.randn(F, d), dim=1).to(device, dtype)
    b_dec = (torch.randn(d) * 0.1).to(device, dtype)
    return W_enc, b_enc, W_dec, b_dec


def strengths(beta=0.5, gamma=1.0, tau=0.0, device="cpu"):
    return tuple(torch.tensor(v, device=device) for v in (beta, gamma, tau))


# -- opcheck -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(6, 16), (2, 3, 16), (0, 16)], ids=str)
def test_opcheck(shape):
    W_enc, b_enc, W_dec, b_dec = sae_tensors(16, 40)
    x = torch.randn(*shape)
    harmful = torch.rand(40) < 0.3
    torch.library.opcheck(torch.ops.safedig.topk_encode.default, (x, W_enc, b_enc, b_dec, 5, None))
    vals, idx = ops.topk_encode(x, W_enc, b_enc, b_dec, 5)
    torch.library.opcheck(torch.ops.safedig.sparse_decode.default, (vals, idx, W_dec, b_dec))
    torch.library.opcheck(torch.ops.safedig.steer.default,
                          (x, W_enc, b_enc, W_dec, b_dec, harmful, *strengths(), 5, None))
    per_sample = torch.linspace(0, 1, shape[0])  # one beta per sample, the rest 0-d
    torch.library.opcheck(torch.ops.safedig.steer.default,
                          (x, W_enc, b_enc, W_dec, b_dec, harmful, per_sample, *strengths()[1:], 5, None))


# -- compile ladder ------------------------------------------------------------------------

def _steer_fn(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau):
    y, h = torch.ops.safedig.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, 4, None)
    vals, idx = torch.ops.safedig.topk_encode(y, W_enc, b_enc, b_dec, 4, None)
    return y * 2, h, torch.ops.safedig.sparse_decode(vals, idx, W_dec, b_dec)


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compile_ladder_fullgraph_no_recompile(backend):
    torch._dynamo.reset()
    cnt = torch._dynamo.testing.CompileCounterWithBackend(backend)
    fn = torch.compile(_steer_fn, backend=cnt, fullgraph=True, dynamic=True)
    W_enc, b_enc, W_dec, b_dec = sae_tensors(12, 30)
    harmful = torch.rand(30) < 0.3
    beta, gamma, tau = strengths(tau=-1.0)
    # (dynamo always specialises sizes 0 and 1, so those are left out on purpose)
    for N, b in ((7, 0.5), (13, 0.5), (5, 0.9), (64, 0.0)):
        beta.fill_(b)  # strengths change in place between calls
        x = torch.randn(N, 12)
        got = fn(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau)
        want = _steer_fn(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, equal_nan=True)
    assert cnt.frame_count == 1, f"{backend}: compiled {cnt.frame_count} times"


def test_compiled_per_sample_strengths_change_in_place_without_recompile():
    """Per-request strengths in a served batch: `[B]` tensors changed in place between calls,
    and batches of other sizes, run one compiled graph; each sample is steered as a call with
    its own values would steer it."""
    torch._dynamo.reset()
    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    fn = torch.compile(_steer_fn, backend=cnt, fullgraph=True, dynamic=True)
    W_enc, b_enc, W_dec, b_dec = sae_tensors(12, 30)
    harmful = torch.rand(30) < 0.3
    for B in (3, 5):
        beta, gamma, tau = torch.zeros(B), torch.ones(B), torch.full((B,), -1.0)
        for on in (torch.arange(B) % 2 == 0, torch.arange(B) % 2 == 1):
            beta.copy_(on * 0.5)  # a request that is off: beta = gamma = 0
            gamma.copy_(on * 1.0)
            x = torch.randn(B, 7, 12)
            y2, h, _ = fn(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau)
            y = y2 / 2  # _steer_fn doubles y (an op after the custom op in the graph)
            for i in range(B):
                want = torch.ops.safedig.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, beta[i], gamma[i], tau[i], 4,
                                               None)[0]
                torch.testing.assert_close(y[i], want[i])
                assert torch.equal(y[i], x[i]) == (not bool(on[i]))
    assert cnt.frame_count == 1


def test_compiled_sae_steer_changes_strengths_without_recompile():
    torch._dynamo.reset()
    sae = sk.random_sae(12, 30, 4, harmful=[0, 3, 5, 7, 11])
    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    fn = torch.compile(lambda x: sae.steer(x), backend=cnt, fullgraph=True)
    x = torch.randn(2, 9, 12)
    outs = []
    for beta, gamma in ((0.5, 1.0), (0.0, 0.0), (1.0, 2.0)):
        sae.set_strengths(beta=beta, gamma=gamma, tau=-1.0)
        y, _ = fn(x)
        torch.testing.assert_close(y, sae.steer(x)[0])
        outs.append(y)
    assert torch.equal(outs[1], x) and not torch.equal(outs[0], outs[2])
    assert cnt.frame_count == 1


# -- the eager fast path ----------------------------------------------------------------------

def _dispatched_steer_calls(fn) -> int:
    """How many times `fn` went through the dispatcher's `safedig::steer` (profiler events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name == "safedig::steer" for e in prof.events())


def test_plain_eager_calls_skip_the_dispatcher_with_the_same_result():
    sae = sk.random_sae(12, 30, 4, harmful=[0, 3, 5, 7, 11])
    sae.set_strengths(beta=0.5, gamma=1.0, tau=-1.0)
    x = torch.randn(2, 9, 12)
    args = (x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.harmful_mask, *sae.strengths.unbind(), 4, None)
    assert _dispatched_steer_calls(lambda: torch.ops.safedig.steer(*args)) == 1  # the probe sees the op
    assert _dispatched_steer_calls(lambda: ops.call_steer(*args)) == 0
    assert _dispatched_steer_calls(lambda: sae.steer(x)) == 0
    assert _dispatched_steer_calls(lambda: sk.steer(x, sae)) == 0
    for got, want in zip(ops.call_steer(*args), torch.ops.safedig.steer(*args)):
        assert_bitwise_equal(got, want)
    with pytest.raises(ValueError, match="beta per sample"):  # the fast path checks as the op does
        ops.call_steer(x, *args[1:6], torch.zeros(3), *args[7:])


def test_calls_something_else_must_see_go_through_the_op():
    """Autograd (the dispatcher records the op's backward), a dispatch mode (a tracer, fake
    tensors) and a tensor subclass each get the registered op, exactly as before the fast path."""
    sae = sk.random_sae(12, 30, 4, harmful=[0, 3, 5, 7, 11])
    x = torch.randn(5, 12)
    assert _dispatched_steer_calls(lambda: sae.steer(x.clone().requires_grad_())) == 1
    with torch.no_grad():
        assert _dispatched_steer_calls(lambda: sae.steer(x.clone().requires_grad_())) == 0

    seen = []

    class Recorder(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Recorder():
        sae.steer(x)
    assert "safedig.steer.default" in seen

    class Tagged(torch.Tensor):
        pass

    assert _dispatched_steer_calls(lambda: sae.steer(x.as_subclass(Tagged))) == 1


# -- property tests against the dense float64 oracle -----------------------------------------


@st.composite
def steer_cases(draw):
    d = draw(st.integers(1, 24))
    F = draw(st.integers(1, 48))
    k = draw(st.integers(1, min(F, 12)))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    layout = draw(st.sampled_from(["2d", "3d", "2d-strided", "3d-strided", "transposed"]))
    N = draw(st.integers(0, 6))
    harmful = torch.tensor(draw(st.lists(st.booleans(), min_size=F, max_size=F)), dtype=torch.bool)
    beta = draw(st.sampled_from([0.0, 0.5, 1.0]))
    gamma = draw(st.sampled_from([0.0, 1.0, -0.5]))
    tau = draw(st.sampled_from([-1.0, 0.0, 0.5]))
    seed = draw(st.integers(0, 2 ** 16))
    return d, F, k, dtype, layout, N, harmful, beta, gamma, tau, seed


def make_x(N, d, dtype, layout):
    if layout == "2d":
        return torch.randn(N, d).to(dtype)
    if layout == "3d":
        return torch.randn(2, N, d).to(dtype)
    if layout == "2d-strided":
        return torch.randn(N, 2 * d + 1).to(dtype)[:, 1::2][:, :d]
    if layout == "3d-strided":  # like a FLUX single block's image-token slice
        return torch.randn(2, N + 3, d + 5).to(dtype)[:, 3:, 5:]
    return torch.randn(d, N).to(dtype).t()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steer_cases())
def test_property_ops_match_dense_oracle(case):
    d, F, k, dtype, layout, N, harmful, beta, gamma, tau, seed = case
    torch.manual_seed(seed)
    W_enc, b_enc, W_dec, b_dec = sae_tensors(d, F, dtype)
    x = make_x(N, d, dtype, layout)
    y, h = ops.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, k)
    vals, idx = ops.topk_encode(x, W_enc, b_enc, b_dec, k)
    assert y.shape == x.shape and y.dtype == dtype and h.shape == x.shape[:-1] and h.dtype == torch.float32
    assert vals.shape == idx.shape == (*x.shape[:-1], k) and idx.dtype == torch.int32
    pre64, _, _, _ = dense_codes64(x, W_enc, b_enc, b_dec, k)
    scale = pre64.abs().amax(-1) if pre64.numel() else torch.zeros(0)
    assert_valid_topk(pre64, idx, k, 1e-5 * (1 + scale))
    y64, h64 = dense_steer64(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, k,
                             chosen=idx.reshape(-1, k).tolist())
    tol = REFERENCE_TOL[dtype]
    torch.testing.assert_close(y.reshape(-1, d).double(), y64, rtol=tol, atol=tol)
    torch.testing.assert_close(h.reshape(-1).double(), h64, rtol=1e-4, atol=1e-4, equal_nan=True)
    x_hat = ops.sparse_decode(vals, idx, W_dec, b_dec)
    _, _, z, _ = dense_codes64(x, W_enc, b_enc, b_dec, k)
    assert x_hat.dtype == dtype and x_hat.shape == x.shape
    if N:
        dense = b_dec.double() + torch.zeros(y64.shape[0], F, dtype=torch.float64).scatter_(
            1, idx.reshape(-1, k).long(), vals.reshape(-1, k).double()) @ W_dec.double()
        torch.testing.assert_close(x_hat.reshape(-1, d).double(), dense, rtol=tol, atol=tol)


# -- per-call arguments given as Python values ----------------------------------------------

def test_per_call_strengths_and_ids_are_made_once_per_value():
    # a fresh device tensor per call would copy host to device with a stream sync every call
    dev = torch.device("cpu")
    beta = ops.strength_for_call(0.5, "beta", dev)
    assert ops.strength_for_call(0.5, "beta", dev) is beta and beta.item() == 0.5 and beta.dtype == torch.float32
    zero, neg_zero = ops.strength_for_call(0.0, "tau", dev), ops.strength_for_call(-0.0, "tau", dev)
    assert zero is not neg_zero and torch.signbit(neg_zero) and not torch.signbit(zero)
    given = torch.tensor(0.3)
    assert ops.strength_for_call(given, "beta", dev) is given
    with pytest.raises(TypeError, match="beta must be a float"):
        ops.strength_for_call("0.5", "beta", dev)
    mask = ops.harmful_for_call([1, 3], 8, dev)
    assert ops.harmful_for_call([1, 3], 8, dev) is mask and mask.nonzero().flatten().tolist() == [1, 3]
    assert ops.harmful_for_call((1, 4), 8, dev).nonzero().flatten().tolist() == [1, 4]
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        ops.harmful_for_call([9], 8, dev)
    for i in range(3 * _arguments._CALL_CONSTANTS_MAX):
        ops.strength_for_call(float(i), "gamma", dev)
    assert len(_arguments._CALL_CONSTANTS) <= _arguments._CALL_CONSTANTS_MAX


def test_per_call_values_never_alias_sae_state():
    sae = sk.random_sae(16, 40, 4, harmful=[1, 2], seed=0)
    x = torch.randn(5, 16)
    y_half, _ = sae.steer(x, beta=0.5, harmful=[3])
    sae.set_strengths(beta=0.5)
    sae.set_harmful([3])
    assert sae.beta is not ops.strength_for_call(0.5, "beta", sae.device)
    assert sae.harmful_mask is not ops.harmful_for_call([3], 40, sae.device)
    sae.set_strengths(beta=0.9)  # in place on the SAE's own buffer
    assert ops.strength_for_call(0.5, "beta", sae.device).item() == 0.5
    torch.testing.assert_close(sk.steer(x, sae, beta=0.5)[0], y_half)


def test_per_call_values_under_compile_are_graph_constants():
    # traced, a number becomes a constant of the graph; the eager-side cache is not consulted
    sae = sk.random_sae(16, 40, 4, harmful=[1, 2], seed=0)
    x = torch.randn(5, 16)
    _arguments._CALL_CONSTANTS.clear()
    f = torch.compile(lambda t: sk.steer(t, sae, beta=0.25, gamma=2.0), fullgraph=True, backend="aot_eager")
    y, h = f(x)
    assert _arguments._CALL_CONSTANTS == {}
    y_eager, h_eager = sk.steer(x, sae, beta=0.25, gamma=2.0)
    assert len(_arguments._CALL_CONSTANTS) == 2
    torch.testing.assert_close((y, h), (y_eager, h_eager))


# -- bad arguments -------------------------------------------------------------------------

def _good(d=8, F=20, dtype=torch.float32):
    W_enc, b_enc, W_dec, b_dec = sae_tensors(d, F, dtype)
    return dict(x=torch.randn(4, d, dtype=dtype), W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec,
                harmful=torch.zeros(F, dtype=torch.bool), beta=0.5, gamma=1.0, tau=0.0, k=3)


BAD_STEER = [
    ("x", lambda a: a.update(x=a["x"].to(torch.bfloat16)), TypeError, "W_enc"),
    ("x", lambda a: a.update(x=torch.randint(0, 3, (4, 8))), TypeError, "x"),
    ("x", lambda a: a.update(x=torch.randn(8)), ValueError, "x"),
    ("x", lambda a: a.update(x=torch.randn(1, 2, 3, 8)), ValueError, "x"),
    ("x", lambda a: a.update(x=[[1.0] * 8]), TypeError, "x"),
    ("W_enc", lambda a: a.update(W_enc=torch.randn(9, 20)), ValueError, "W_enc"),
    ("W_enc", lambda a: a.update(W_enc=torch.randn(8, 20, device="meta")), ValueError, "W_enc"),
    ("b_enc", lambda a: a.update(b_enc=torch.randn(21)), ValueError, "b_enc"),
    ("b_dec", lambda a: a.update(b_dec=torch.randn(8, dtype=torch.float64)), TypeError, "b_dec"),
    ("W_dec", lambda a: a.update(W_dec=torch.randn(20, 9)), ValueError, "W_dec"),
    ("W_dec", lambda a: a.update(W_dec=torch.randn(8, 20)), ValueError, "W_dec"),
    ("k", lambda a: a.update(k=0), ValueError, "k"),
    ("k", lambda a: a.update(k=21), ValueError, "k"),
    ("k", lambda a: a.update(k=2.0), TypeError, "k"),
    ("harmful", lambda a: a.update(harmful=torch.zeros(19, dtype=torch.bool)), ValueError, "harmful"),
    ("harmful", lambda a: a.update(harmful=[0, 25]), ValueError, "harmful"),
    ("harmful", lambda a: a.update(harmful=[[0, 1]]), ValueError, "harmful"),
    ("beta", lambda a: a.update(beta="0.5"), TypeError, "beta"),
    ("gamma", lambda a: a.update(gamma=torch.ones(3)), ValueError, r"gamma per sample .*\[4\]"),
    ("gamma", lambda a: a.update(gamma=torch.ones(4, 1)), TypeError, "gamma"),
    ("beta", lambda a: a.update(beta=torch.tensor([0.5, 0.5, 1.5, 0.0])), ValueError, r"beta\[2\]"),
    ("tau", lambda a: a.update(tau=torch.tensor([0.0, float("inf"), 0.0, 0.0])), ValueError, r"tau\[1\]"),
    ("tau", lambda a: a.update(tau=torch.tensor(0.0, device="meta")), ValueError, "tau"),
]


@pytest.mark.parametrize("arg,mutate,exc,name", BAD_STEER, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_STEER)])
def test_steer_bad_arguments(arg, mutate, exc, name):
    a = _good()
    mutate(a)
    with pytest.raises(exc, match=name):
        ops.steer(**a)


@pytest.mark.parametrize("call", ["ops.steer", "TopKSAE.steer", "torch.ops.safedig.steer"])
def test_each_call_checks_its_arguments_once(monkeypatch, call):
    # The op checks its contract (eager body and fake kernel share the check); the wrappers only
    # convert Python values, and the reference the op falls back to trusts its arguments.
    import importlib

    from safedig_kernels import _checks

    steer_module = importlib.import_module("safedig_kernels.ops.steer")
    calls = []
    real = _checks.check_steer
    monkeypatch.setattr(steer_module, "check_steer", lambda *a, **k: calls.append(1) or real(*a, **k))
    sae = sk.random_sae(8, 20, 3, harmful=[1, 2])
    x = torch.randn(4, 8)
    if call == "ops.steer":
        ops.steer(x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, [1, 2], 0.5, 1.0, -1.0, 3)
    elif call == "TopKSAE.steer":
        sae.steer(x, beta=0.5, gamma=1.0, tau=-1.0)
    else:
        torch.ops.safedig.steer(x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.harmful_mask, sae.beta,
                                sae.gamma, sae.tau, 3)
    assert len(calls) == 1


def test_raw_op_rejects_bad_arguments_by_name():
    # No wrapper in front: the op's own check names the argument (eager and under the fake kernel).
    sae = sk.random_sae(8, 20, 3)
    args = [torch.randn(4, 8), sae.W_enc, sae.b_enc, sae.W_dec[:, :5], sae.b_dec, sae.harmful_mask, sae.beta,
            sae.gamma, sae.tau, 3]
    with pytest.raises(ValueError, match="W_dec"):
        torch.ops.safedig.steer(*args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(ValueError, match="W_dec"):
            torch.ops.safedig.steer(*fake)


def test_steer_k_over_256_rejected():
    a = _good(F=300)
    a["k"] = 257
    with pytest.raises(ValueError, match="k must satisfy"):
        ops.steer(**a)


def test_topk_encode_and_decode_bad_arguments():
    a = _good()
    with pytest.raises(ValueError, match="W_enc"):
        ops.topk_encode(a["x"], a["W_enc"][:5], a["b_enc"], a["b_dec"], 3)
    with pytest.raises(TypeError, match="x"):
        ops.topk_encode(a["x"].long(), a["W_enc"], a["b_enc"], a["b_dec"], 3)
    with pytest.raises(ValueError, match="k"):
        ops.topk_encode(a["x"], a["W_enc"], a["b_enc"], a["b_dec"], 0)
    vals, idx = ops.topk_encode(a["x"], a["W_enc"], a["b_enc"], a["b_dec"], 3)
    with pytest.raises(TypeError, match="vals"):
        ops.sparse_decode(vals.double(), idx, a["W_dec"], a["b_dec"])
    with pytest.raises(TypeError, match="idx"):
        ops.sparse_decode(vals, idx.float(), a["W_dec"], a["b_dec"])
    with pytest.raises(ValueError, match="idx"):
        ops.sparse_decode(vals, idx[:, :2], a["W_dec"], a["b_dec"])
    with pytest.raises(ValueError, match="b_dec"):
        ops.sparse_decode(vals, idx, a["W_dec"], a["b_dec"][:3])
    with pytest.raises(TypeError, match="b_dec"):
        ops.sparse_decode(vals, idx, a["W_dec"], a["b_dec"].half())
    with pytest.raises(ValueError, match="vals"):
        ops.sparse_decode(vals[0], idx[0], a["W_dec"], a["b_dec"])


def test_container_api_and_bad_arguments():
    sae = sk.random_sae(8, 20, 3, harmful=[1, 2])
    x = torch.randn(2, 5, 8)
    y, h = sk.steer(x, sae, beta=0.5, gamma=1.0, tau=-1.0)
    y2, h2 = ops.steer(x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, [1, 2], 0.5, 1.0, -1.0, 3)
    assert torch.equal(y, y2) and torch.equal(h, h2)
    vals, idx = sk.encode(x, sae)
    torch.testing.assert_close(sk.decode(vals, idx, sae), sae(x))
    with pytest.raises(ValueError, match="x"):
        sk.steer(torch.randn(8), sae)
    with pytest.raises(TypeError, match="W_enc"):
        sk.steer(x.half(), sae)
    with pytest.raises(ValueError, match="harmful"):
        sae.set_harmful([20])
    with pytest.raises(ValueError, match="k must satisfy"):
        sk.TopKSAE(sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, k=21)
    with pytest.raises(ValueError, match="W_dec"):
        sk.TopKSAE(sae.W_enc, sae.b_enc, sae.W_dec[:, :4], sae.b_dec, k=3)
    with pytest.raises(TypeError, match="b_enc"):
        sk.TopKSAE(sae.W_enc, sae.b_enc.half(), sae.W_dec, sae.b_dec, k=3)
    with pytest.raises(ValueError, match="activation_scale"):
        sk.TopKSAE(sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, k=3, activation_scale=0.0)


def test_activation_scale_folding_computes_the_scaled_sae():
    torch.manual_seed(1)
    W_enc, b_enc, W_dec, b_dec = sae_tensors(8, 20, torch.float32)
    s = 4.0  # a power of two: folding it changes no rounding, so indices must match exactly
    sae = sk.TopKSAE(W_enc, b_enc, W_dec, b_dec, k=4, activation_scale=s)
    x = torch.randn(5, 8)
    vals, idx = sae.encode(x)
    want_vals, want_idx = sk.reference.topk_encode(x * s, W_enc, b_enc, b_dec, 4)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(vals, want_vals)
    torch.testing.assert_close(sae.decode(vals, idx), sk.reference.sparse_decode(vals, idx, W_dec, b_dec) / s)
