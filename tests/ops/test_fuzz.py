"""A seeded property fuzz of `steer` against the dense float64 oracle (tests/_oracle.py).

10 000 cases through the op's CPU path (the reference) and 250 through the Triton kernels under
the interpreter (fp32): shapes from 0 tokens up, odd widths, k from 1 to F, every layout the ops
accept (2-D, 3-D, strided, transposed, a stride-0 broadcast), any harmful set, strengths across
their whole range, NaN and Inf tokens. Each case is scored at the op's own top-k choice (a
legitimate near-tie choice costs nothing) and that choice must be a top k up to near ties.
`derandomize=True` makes the cases the same on every run, so a failure reproduces.

The runs share the hypothesis profile "safedig-fuzz" registered below; `SAFEDIG_FUZZ_SCALE=10`
runs ten times the cases (a longer sweep before a release), `0.05` a quick look.
"""
from __future__ import annotations

import os

import pytest
import torch
from _oracle import dense_codes64, dense_steer64
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safedig_kernels import ops
from safedig_kernels.testing import REFERENCE_TOL, assert_valid_topk

# Same cases every run (a failure reproduces), no example database, no time limits: each case
# is small but the CPU may be busy. The poisoning fixture is per test, not per example, by design.
settings.register_profile("safedig-fuzz", deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.function_scoped_fixture])
FUZZ = settings.get_profile("safedig-fuzz")


def _cases(n: int) -> int:
    return max(1, round(n * float(os.environ.get("SAFEDIG_FUZZ_SCALE", "1"))))


LAYOUTS = ("2d", "3d", "2d-strided", "3d-strided", "transposed", "broadcast")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors: a thread pool only adds hand-offs, and on a busy 2-core machine waiting for
    # it dominates (24 ms per steer call with 2 threads under load, about 1 ms with 1).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@st.composite
def cases(draw, dtypes=(torch.float32, torch.bfloat16, torch.float16), max_f=96, max_n=6):
    d = draw(st.integers(1, 40))
    F = draw(st.integers(1, max_f))
    k = draw(st.integers(1, min(F, 48)))
    n = draw(st.integers(0, max_n))
    strength = st.floats(-3.0, 3.0, allow_nan=False, width=32) | st.sampled_from([0.0, -0.0, 1.0])
    return dict(
        d=d, F=F, k=k, n=n, dtype=draw(st.sampled_from(dtypes)), layout=draw(st.sampled_from(LAYOUTS)),
        harmful=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),  # share of harmful features
        beta=draw(st.floats(0.0, 1.0, width=32) | st.sampled_from([0.0, 1.0])),
        gamma=draw(strength), tau=draw(strength | st.floats(-1.0, 10.0, width=32)),
        bad=draw(st.lists(st.sampled_from([float("nan"), float("inf"), -float("inf")]), max_size=2)),
        scale=draw(st.sampled_from([0.1, 1.0, 30.0])), seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


def build(c):
    g = torch.Generator().manual_seed(c["seed"])
    d, F, n, dtype = c["d"], c["F"], c["n"], c["dtype"]
    W_enc = (torch.randn(d, F, generator=g) / d ** 0.5 * c["scale"]).to(dtype)
    b_enc = (torch.randn(F, generator=g) * 0.1).to(dtype)
    W_dec = torch.nn.functional.normalize(torch.randn(F, d, generator=g), dim=1).to(dtype)
    b_dec = (torch.randn(d, generator=g) * 0.1).to(dtype)
    layout = c["layout"]
    if layout == "3d":
        x = torch.randn(2, n, d, generator=g)
    elif layout == "2d-strided":
        x = torch.randn(n, 2 * d + 1, generator=g)[:, 1::2][:, :d]
    elif layout == "3d-strided":  # like a FLUX single block's image-token slice
        x = torch.randn(2, n + 3, d + 5, generator=g)[:, 3:, 5:]
    elif layout == "transposed":
        x = torch.randn(d, n, generator=g).t()
    elif layout == "broadcast":  # one token repeated with stride 0
        x = torch.randn(1, d, generator=g).expand(n, d)
    else:
        x = torch.randn(n, d, generator=g)
    x = x.to(dtype)
    if c["bad"] and x.numel() and layout != "broadcast":
        flat = x.reshape(-1, d) if x.is_contiguous() else None
        if flat is not None:
            for i, v in enumerate(c["bad"]):
                flat[(i * 7) % flat.shape[0], (i * 3) % d] = v
    harmful = torch.rand(F, generator=g) < c["harmful"]
    return x, W_enc, b_enc, W_dec, b_dec, harmful


def check(c, x, W_enc, b_enc, W_dec, b_dec, harmful, y, h, idx):
    d, k = c["d"], c["k"]
    assert y.shape == x.shape and y.dtype == x.dtype and h.shape == x.shape[:-1] and h.dtype == torch.float32
    pre64, _, _, bad = dense_codes64(x, W_enc, b_enc, b_dec, k)
    idx = idx.reshape(-1, k)
    good = ~bad
    scale = pre64[good].abs().amax(-1) if good.any() else torch.zeros(0, dtype=torch.float64)
    # the reference selects on pre-activations computed in float32 from the input dtype's values
    assert_valid_topk(pre64[good], idx[good], k, 1e-5 * (1 + scale))
    y64, h64 = dense_steer64(x, W_enc, b_enc, W_dec, b_dec, harmful, c["beta"], c["gamma"], c["tau"], k,
                             chosen=idx.tolist())
    y2 = y.reshape(-1, d).double()
    assert torch.equal(torch.isnan(h.reshape(-1)), bad), "h must be NaN exactly for non-finite tokens"
    if bad.any():  # returned unchanged, bitwise
        assert torch.equal(_bits(y.reshape(-1, d)[bad]), _bits(x.reshape(-1, d)[bad]))
    if good.any():
        ref_scale = 1 + y64[good].abs().amax(-1, keepdim=True)
        err = ((y2[good] - y64[good]).abs() / ref_scale).max().item()
        assert err <= REFERENCE_TOL[c["dtype"]], f"y off by {err:.3g} (relative to the token's scale)"
        h_err = ((h.reshape(-1)[good].double() - h64[good]).abs() / (1 + h64[good].abs())).max().item()
        assert h_err <= 1e-4, f"h off by {h_err:.3g}"
    if c["beta"] == 0 and c["gamma"] == 0:
        assert torch.equal(_bits(y), _bits(x)), "beta = gamma = 0 must return x bitwise"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


@settings(FUZZ, max_examples=_cases(10_000))
@given(cases())
def test_fuzz_op_cpu_path_against_float64_oracle(c):
    x, W_enc, b_enc, W_dec, b_dec, harmful = build(c)
    y, h = ops.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, c["beta"], c["gamma"], c["tau"], c["k"])
    _, idx = ops.topk_encode(x, W_enc, b_enc, b_dec, c["k"])
    check(c, x, W_enc, b_enc, W_dec, b_dec, harmful, y, h, idx)


@pytest.mark.interpreter
@settings(FUZZ, max_examples=_cases(250))
@given(cases(dtypes=(torch.float32,), max_f=72, max_n=4))
def test_fuzz_kernels_in_the_interpreter_against_float64_oracle(poison_allocations, c):
    from safedig_kernels.ops.steer import _steer_fwd
    from safedig_kernels.ops.topk_encode import _topk_encode_fwd, encoder_bias

    x, W_enc, b_enc, W_dec, b_dec, harmful = build(c)
    strengths = [torch.tensor(c[n], dtype=torch.float32) for n in ("beta", "gamma", "tau")]
    bias = encoder_bias(W_enc, b_enc, b_dec)
    y, h = _steer_fwd(x, W_enc, W_dec, b_dec, harmful, *strengths, c["k"], bias)
    _, idx = _topk_encode_fwd(x.reshape(-1, c["d"]), W_enc, bias, c["k"])
    check(c, x, W_enc, b_enc, W_dec, b_dec, harmful, y, h, idx)
