"""The choice made on the card (`ops/_tuning.py`): every selection the tuner may pick gives the
same codes bitwise, so timing can never change an output; the first call per key times each
candidate on its own pre-activations and later calls reuse the choice; nothing is timed where
it cannot be (a tracer or dispatch mode running the launcher). Interpreter, fp32, tiny shapes."""
from __future__ import annotations

import importlib

import pytest
import torch
from _oracle import dense_codes64

from safedig_kernels.ops import _launch, _tuning
from safedig_kernels.ops._tuning import SELECT_CANDIDATES
from safedig_kernels.ops.steer import _steer_fwd
from safedig_kernels.ops.topk_encode import _topk_encode_fwd, encoder_bias
from safedig_kernels.testing import assert_bitwise_equal

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("poison_allocations")]
topk_encode_module = importlib.import_module("safedig_kernels.ops.topk_encode")


def _sae(d, F, seed=0):
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(d, F, generator=g) / d ** 0.5
    b_enc, b_dec = torch.randn(F, generator=g) * 0.1, torch.randn(d, generator=g) * 0.1
    W_dec = torch.nn.functional.normalize(torch.randn(F, d, generator=g), dim=1)
    return W_enc, b_enc, W_dec, b_dec


def _tied(d, F):
    """Every pre-activation 0.25 but two at 0.5: the candidate filter overflows, the exact
    fallback ranks, ties broken by index."""
    W_enc, b_enc = torch.zeros(d, F), torch.full((F,), 0.25)
    b_enc[[17, F - 3]] = 0.5
    return W_enc, b_enc, torch.zeros(F, d), torch.zeros(d)


CASES = {  # name: (N, d, F, k, weights)
    "random": (5, 9, 300, 7, None),
    "k=1": (3, 6, 64, 1, None),
    "k>64, exact only": (2, 5, 200, 70, None),
    "k=F": (2, 4, 40, 40, None),
    "heavy ties": (3, 4, 600, 5, "tied"),
}


@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_every_candidate_selects_the_same_codes_bitwise(case):
    N, d, F, k, kind = CASES[case]
    W_enc, b_enc, _, b_dec = _tied(d, F) if kind == "tied" else _sae(d, F)
    x = torch.randn(N, d)
    x[N - 1, 0] = float("nan")  # a non-finite token: NaN codes over ids 0..k-1, whatever the kernels
    bias = encoder_bias(W_enc, b_enc, b_dec)
    first_vals, first_idx = _topk_encode_fwd(x, W_enc, bias, k, SELECT_CANDIDATES[0])
    for candidate in SELECT_CANDIDATES[1:]:
        vals, idx = _topk_encode_fwd(x, W_enc, bias, k, candidate)
        assert_bitwise_equal(vals, first_vals)
        assert_bitwise_equal(idx, first_idx)
    assert {c.select_algo for c in SELECT_CANDIDATES} == set(_launch.SELECT_ALGOS)
    if kind is None:
        _, chosen, _, _ = dense_codes64(x[:-1], W_enc, b_enc, b_dec, k)
        assert first_idx[:-1].tolist() == chosen


@pytest.fixture
def tuning(monkeypatch):
    """Tuning on, nothing chosen yet, and a timer that reports a time favouring one known
    candidate (without running them: the test above runs every candidate)."""
    monkeypatch.setenv("SAFEDIG_TUNE", "1")
    monkeypatch.setattr(_tuning, "_CHOSEN", {})
    favourite = SELECT_CANDIDATES[1]  # "split": not what the heuristics pick at these row counts
    assert favourite.select_algo == "split" and favourite.chunk == 1024
    timed = []

    def timer(run, device):
        timed.append(run)
        return 1.0 if len(timed) - 1 == SELECT_CANDIDATES.index(favourite) else 2.0

    monkeypatch.setattr(_tuning, "_elapsed_ms", timer)
    return favourite, timed


def test_first_call_times_every_candidate_and_later_calls_reuse_the_choice(tuning, monkeypatch):
    favourite, timed = tuning
    ran = []  # (algorithm, chunk) of every selection launched
    real_select = topk_encode_module._select

    def spy(vals, idx, scratch, pre, bias, k, cfg, algo):
        ran.append((algo, cfg["CHUNK"]))
        return real_select(vals, idx, scratch, pre, bias, k, cfg, algo)

    monkeypatch.setattr(topk_encode_module, "_select", spy)
    N, d, F, k = 70, 8, 150, 6  # more rows than the one-launch path takes
    W_enc, b_enc, W_dec, b_dec = _sae(d, F)
    bias = encoder_bias(W_enc, b_enc, b_dec)
    x = torch.randn(N, d)
    untuned = _topk_encode_fwd(x, W_enc, bias, k, _launch.DEFAULT)  # a launch given: never tuned
    assert timed == [] and ran == [("row", 256)]
    ran.clear()
    vals, idx = _topk_encode_fwd(x, W_enc, bias, k)
    assert len(timed) == len(SELECT_CANDIDATES)
    assert ran[-1] == ("split", 1024)  # after timing, the call itself ran the chosen selection
    key = _tuning.select_key(N, F, k, torch.float32, False, x.device)
    assert _tuning.chosen(key) == favourite
    assert_bitwise_equal(vals, untuned[0])
    assert_bitwise_equal(idx, untuned[1])
    ran.clear()
    _topk_encode_fwd(torch.randn(N - 3, d), W_enc, bias, k)  # same power-of-two bucket: no new timing
    assert len(timed) == len(SELECT_CANDIDATES) and ran == [("split", 1024)]
    harmful = torch.rand(F) < 0.3
    y, h = _steer_fwd(x, W_enc, W_dec, b_dec, harmful, torch.tensor(0.5), torch.tensor(1.0), torch.tensor(-1.0),
                      k, bias)  # steer's two-kernel path selects through the same choice
    assert len(timed) == len(SELECT_CANDIDATES)
    y0, h0 = _steer_fwd(x, W_enc, W_dec, b_dec, harmful, torch.tensor(0.5), torch.tensor(1.0), torch.tensor(-1.0),
                        k, bias, _launch.DEFAULT)
    assert_bitwise_equal(y, y0)
    assert_bitwise_equal(h, h0)


def test_nothing_is_timed_under_a_dispatch_mode_or_with_tuning_off(tuning, monkeypatch):
    _, timed = tuning
    W_enc, b_enc, _, b_dec = _sae(8, 100)
    bias = encoder_bias(W_enc, b_enc, b_dec)
    x = torch.randn(80, 8)

    class Passthrough(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        _topk_encode_fwd(x, W_enc, bias, 4)
    assert timed == []
    monkeypatch.setenv("SAFEDIG_TUNE", "0")
    _topk_encode_fwd(x, W_enc, bias, 4)
    assert timed == [] and _tuning._CHOSEN == {}


def test_the_real_timer_runs_on_the_cpu(monkeypatch):
    monkeypatch.setenv("SAFEDIG_TUNE", "1")
    monkeypatch.setattr(_tuning, "_CHOSEN", {})
    W_enc, b_enc, _, b_dec = _sae(6, 90)
    x = torch.randn(3, 6)
    vals, idx = _topk_encode_fwd(x, W_enc, encoder_bias(W_enc, b_enc, b_dec), 5)
    assert list(_tuning._CHOSEN.values())[0] in SELECT_CANDIDATES
    _, chosen, _, _ = dense_codes64(x, W_enc, b_enc, b_dec, 5)
    assert idx.tolist() == chosen
