"""The bad-input catalogue: one case per class of bad input a careless or hostile user tried,
each refused where the value enters, with the exception type and a message naming the argument.

Classes (README's "Fail closed"): strengths, harmful sets, SAE weights in memory, the SAE's site,
handles, threads. Files, checkpoints, stores and CLI outputs are pinned next to their readers
(tests/test_io.py, tests/checkpoints, tests/workflow, tests/cli); the classes that were
already handled keep their own tests (tests/ops/test_ops.py `BAD_STEER`, the integration's
`test_fail_closed`), and a few of them are repeated here so the catalogue reads whole.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _race import race

import safedig_kernels as sk
from safedig_kernels import ops

D, F, K = 8, 20, 3


def _sae(**meta) -> sk.TopKSAE:
    s = sk.random_sae(D, F, K, harmful=[1, 2], seed=0)
    for name, value in meta.items():
        setattr(s.metadata, name, value)
    return s


def _x() -> torch.Tensor:
    return torch.randn(4, D)


def _steer(**kw):
    return lambda: _sae().steer(_x(), **{"tau": -1.0, **kw})


def _op(**kw):
    s = _sae()
    args = dict(harmful=[1, 2], beta=0.5, gamma=1.0, tau=-1.0)
    args.update(kw)
    return lambda: ops.steer(_x(), s.W_enc, s.b_enc, s.W_dec, s.b_dec, k=K, **args)


def _set_strengths(**kw):
    return lambda: _sae().set_strengths(**kw)


def _with_weight(name: str, value: float):
    def make():
        s = _sae()
        w = {n: getattr(s, n).clone() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
        w[name].view(-1)[3] = value
        return sk.TopKSAE(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], k=K)
    return make


def _load_state(name: str):
    def make():
        s = _sae()
        state = s.state_dict()
        state[name] = state[name].clone()
        state[name].view(-1)[0] = float("nan")
        s.load_state_dict(state)
    return make


def _load_strengths(values):
    def make():
        s = _sae()
        state = s.state_dict()
        state["strengths"] = torch.tensor(values)
        s.load_state_dict(state)
    return make


CASES = [
    # 1. strengths: finite as float32, beta in [0, 1], at every entrance
    ("strength/steer-beta-nan", _steer(beta=float("nan")), ValueError, "beta"),
    ("strength/steer-tau-nan", _steer(tau=float("nan")), ValueError, "tau"),
    ("strength/steer-tau-1e39", _steer(tau=1e39), ValueError, "tau must be finite"),
    ("strength/steer-gamma-inf", _steer(gamma=float("inf")), ValueError, "gamma"),
    ("strength/steer-beta-5", _steer(beta=5.0), ValueError, r"beta must lie in \[0, 1\]"),
    ("strength/steer-beta-negative", _steer(beta=-1.0), ValueError, r"beta must lie in \[0, 1\]"),
    ("strength/steer-huge-int", _steer(gamma=10 ** 400), ValueError, "gamma"),
    ("strength/steer-string", _steer(gamma="1"), TypeError, "gamma"),
    ("strength/steer-cpu-tensor-nan", _steer(tau=torch.tensor(float("nan"))), ValueError, "tau"),
    ("strength/op-beta-2", _op(beta=2.0), ValueError, "beta"),
    ("strength/op-tau-1e39", _op(tau=1e39), ValueError, "tau"),
    ("strength/set_strengths-tau-nan", _set_strengths(tau=float("nan")), ValueError, "tau"),
    ("strength/set_strengths-beta-1.5", _set_strengths(beta=1.5), ValueError, "beta"),
    ("strength/metadata-tau-inf", lambda: sk.TopKSAE(*_weights(), k=K, metadata=_meta(tau=float("inf"))),
     ValueError, "metadata.tau"),
    ("strength/metadata-beta-3", lambda: sk.TopKSAE(*_weights(), k=K, metadata=_meta(beta=3.0)),
     ValueError, "metadata.beta"),
    # 2. harmful sets: integer ids or a bool mask, read as what they are
    ("harmful/float-ids", _steer(harmful=[1.9, 3.99]), TypeError, "harmful"),
    ("harmful/uint8-mask", _steer(harmful=torch.ones(F, dtype=torch.uint8)), TypeError, "harmful"),
    ("harmful/bool-list-wrong-length", _steer(harmful=[True] * (F - 1)), ValueError, "harmful"),
    ("harmful/string", _steer(harmful="1,2"), TypeError, "harmful"),
    ("harmful/set", _steer(harmful={1, 2}), TypeError, "harmful"),
    ("harmful/overflowing-int", _steer(harmful=[2 ** 70]), ValueError, "harmful"),
    ("harmful/out-of-range", _steer(harmful=[F]), ValueError, r"\[0, 20\)"),
    ("harmful/negative", _steer(harmful=[-1]), ValueError, "harmful"),
    ("harmful/float-tensor", _steer(harmful=torch.tensor([1.0, 2.0])), TypeError, "harmful"),
    ("harmful/set_harmful-float", lambda: _sae().set_harmful([0.5]), TypeError, "harmful"),
    # 3. SAE weights in memory: refused when built or loaded into
    ("weights/nan-W_enc", _with_weight("W_enc", float("nan")), ValueError, "W_enc"),
    ("weights/inf-b_dec", _with_weight("b_dec", float("inf")), ValueError, "b_dec"),
    ("weights/load_state_dict-nan-W_dec", _load_state("W_dec"), ValueError, "W_dec"),
    ("weights/fp16-overflow", lambda: sk.TopKSAE(_weights()[0] * 1e5, *_weights()[1:], k=K).to(torch.float16),
     ValueError, "W_enc"),
    ("strength/load_state_dict-tau-nan", _load_strengths([0.5, 1.0, float("nan")]), ValueError, r"strengths \(tau\)"),
    ("strength/load_state_dict-beta-5", _load_strengths([5.0, 1.0, 0.0]), ValueError, r"strengths \(beta\)"),
    # refused before this catalogue existed and tested where they are refused; repeated so it reads whole
    ("handled/k-too-large", lambda: sk.TopKSAE(*_weights(), k=F + 1), ValueError, "k must satisfy"),
    ("handled/x-wrong-width", lambda: _sae().steer(torch.randn(4, D + 1)), ValueError, "W_enc"),
    ("handled/x-not-a-tensor", lambda: _sae().steer([[0.0] * D]), TypeError, "x"),
    ("handled/x-wrong-dtype", lambda: _sae().steer(_x().half()), TypeError, "W_enc"),
]


def _weights():
    s = sk.random_sae(D, F, K, seed=0)
    return s.W_enc, s.b_enc, s.W_dec, s.b_dec


def _meta(**kw) -> sk.SAEMetadata:
    return sk.SAEMetadata(harmful_features=[1], **kw)


@pytest.mark.parametrize("make,exc,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_by_name(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


# -- what the refusals must leave behind ---------------------------------------------------

def test_set_strengths_is_all_or_nothing():
    s = _sae()
    s.set_strengths(beta=0.25, gamma=0.5, tau=0.125)
    before = s.strengths.clone()
    for bad in (dict(beta=0.75, tau=float("nan")), dict(gamma=2.0, beta=1.5), dict(beta=0.5, tau=1e39)):
        with pytest.raises(ValueError):
            s.set_strengths(**bad)
        assert torch.equal(s.strengths, before) and (s.metadata.beta, s.metadata.tau) == (0.25, 0.125)


def test_a_refused_load_or_cast_leaves_the_sae_as_it_was():
    s = _sae()
    s.set_strengths(beta=0.5, gamma=1.0, tau=-1.0)
    x = _x()
    before = {k: v.clone() for k, v in s.state_dict().items()}
    y_before = s.steer(x)[0]
    for name, value in (("b_enc", float("inf")), ("W_dec", float("nan")), ("strengths", float("nan"))):
        state = {k: v.clone() for k, v in before.items()}
        state[name].view(-1)[0] = value
        with pytest.raises(ValueError, match=name):
            s.load_state_dict(state)
    huge = {k: v.double() if k == "W_enc" else v.clone() for k, v in before.items()}
    huge["W_enc"].view(-1)[0] = 1e39  # finite as float64, inf as the float32 buffer holds it
    with pytest.raises(ValueError, match="W_enc"):
        s.load_state_dict(huge)
    s.W_enc.view(-1)[5] = 1e5  # fits float32, overflows float16
    with pytest.raises(ValueError, match="left as it was"):
        s.to(torch.float16)
    s.W_enc.view(-1)[5] = before["W_enc"].view(-1)[5]
    assert all(torch.equal(v, before[k]) for k, v in s.state_dict().items())
    assert s.W_enc.dtype == torch.float32 and torch.equal(s.steer(x)[0], y_before)


def test_load_state_dict_with_assign_refuses_a_wrong_shape_before_anything_changes():
    s = _sae()
    before = {k: v.clone() for k, v in s.state_dict().items()}
    state = {k: v.clone() for k, v in before.items()}
    state["W_enc"] = torch.randn(D, F + 12)
    state["b_dec"] += 1.0
    state["strengths"] = torch.tensor([0.5, 1.0, 0.0])
    with pytest.raises(RuntimeError, match="shapes differ"):
        s.load_state_dict(state, assign=True)
    assert all(torch.equal(v, before[k]) for k, v in s.state_dict().items())


def test_set_strengths_keeps_the_held_values_not_edited_metadata():
    # metadata is a plain dataclass: a NaN written into it must not reach the buffer
    s = _sae()
    s.set_strengths(beta=0.5, gamma=1.0, tau=-1.0)
    s.metadata.tau = float("nan")
    s.set_strengths(gamma=2.0)
    assert s.strengths.tolist() == [0.5, 2.0, -1.0]


def test_load_state_dict_brings_metadata_along():
    s, other = _sae(), sk.random_sae(D, F, K, harmful=[4, 7], seed=3)
    other.set_strengths(beta=0.25, gamma=0.5, tau=0.125)
    s.load_state_dict(other.state_dict())
    assert (s.metadata.beta, s.metadata.gamma, s.metadata.tau) == (0.25, 0.5, 0.125)
    assert s.metadata.harmful_features == [4, 7]


def test_strengths_stay_float32_whatever_the_weights_dtype():
    s = _sae()
    s.set_strengths(beta=0.1, tau=1e5)
    half = s.to(torch.float16)
    assert half.W_enc.dtype == torch.float16 and half.strengths.dtype == torch.float32
    assert float(half.tau) == 1e5 and float(half.beta) == float(torch.tensor(0.1, dtype=torch.float32))
    assert math.isfinite(float(half.tau)) and float(half.beta) != 0.10009765625  # what fp16 would have stored
    y, h = half.steer(_x().half(), gamma=1.0, tau=-1.0)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()


@pytest.mark.parametrize("mask", [[True] * F, np.ones(F, dtype=bool), torch.ones(F, dtype=torch.bool)],
                         ids=["bool-list", "numpy-bool", "torch-bool"])
def test_a_mask_is_read_as_the_mask_it_is(mask):
    s = _sae()
    s.set_harmful(mask)
    assert s.harmful_mask.all() and s.metadata.harmful_features == list(range(F))
    x = _x()
    assert torch.equal(s.steer(x, beta=0.5, gamma=1.0, tau=-1.0, harmful=mask)[1],
                       s.steer(x, beta=0.5, gamma=1.0, tau=-1.0, harmful=list(range(F)))[1])


def test_numpy_integer_ids_are_ids():
    s = _sae()
    s.set_harmful(np.array([3, 5], dtype=np.int64))
    assert s.metadata.harmful_features == [3, 5]


# -- threads -------------------------------------------------------------------------------

def test_strength_updates_are_atomic_for_steering_threads():
    """4 threads steer while a fifth flips the strengths between two states: every output
    equals the output of one state, never a mix (the old buffers gave 2616 mixed of 4000)."""
    s = _sae()
    x = torch.randn(6, D)
    states = [dict(beta=0.2, gamma=0.5, tau=-1.0), dict(beta=0.9, gamma=2.0, tau=-0.5)]
    expected, outputs = race(lambda: s.steer(x)[0], states, lambda st: s.set_strengths(**st), 250)
    mixed = sum(not (torch.equal(y, expected[0]) or torch.equal(y, expected[1])) for y in outputs)
    assert mixed == 0
    assert any(torch.equal(y, expected[0]) for y in outputs) or any(torch.equal(y, expected[1]) for y in outputs)


def test_harmful_set_updates_are_atomic_for_steering_threads():
    """The widest mask makes a copy long enough to be read half written: with the updates and
    reads not sharing one lock (safedig_kernels/_settings.py), this test failed in each of 4 runs."""
    F_wide = 131_072  # the largest F: the longest copy
    s = sk.random_sae(16, F_wide, 64, harmful=[1], seed=0)
    s.set_strengths(beta=0.5, gamma=1.0, tau=-1.0)
    x = torch.randn(6, 16)
    masks = [torch.arange(F_wide) % 2 == r for r in (0, 1)]
    expected, outputs = race(lambda: s.steer(x)[0], masks, s.set_harmful, 200)
    assert sum(not any(torch.equal(y, e) for e in expected) for y in outputs) == 0
