"""How many kernels one `steer` call launches, and which selection algorithm runs.

Small-N calls are bound by host launch cost (docs/spec.md §6: 0.1 ms at N = 16), so every launch must
earn its place: the scratch counters are zeroed inside the select kernels, not by a memset,
small inputs take the "row" selection, and the smallest run selection and decode as one
kernel. Kernels run under TRITON_INTERPRET with poisoned allocations, so a counter left
unzeroed shows up as a wrong or crashing selection.
"""
from __future__ import annotations

import importlib
from collections import Counter

import pytest
import torch
from _oracle import dense_steer64

from safedig_kernels.ops import _launch
from safedig_kernels.ops._launch import ONE_LAUNCH_MAX_ROWS, ROW_ALGO_MAX_ROWS, LaunchConfig, resolve_select_algo
from safedig_kernels.ops.steer import _steer_fwd
from safedig_kernels.ops.topk_encode import encoder_bias

topk_module = importlib.import_module("safedig_kernels.ops.topk_encode")
steer_module = importlib.import_module("safedig_kernels.ops.steer")


def test_auto_selection_picks_by_rows(monkeypatch):
    monkeypatch.setattr(_launch, "DEFAULT", LaunchConfig())
    assert resolve_select_algo(None, 1) == "row"
    assert resolve_select_algo(None, ROW_ALGO_MAX_ROWS) == "row"
    assert resolve_select_algo(None, ROW_ALGO_MAX_ROWS + 1) == "split"
    assert resolve_select_algo(LaunchConfig(select_algo="row"), 10 ** 6) == "row"
    assert resolve_select_algo(LaunchConfig(select_algo="split"), 1) == "split"
    with pytest.raises(ValueError, match="algo must be 'auto' or one of"):
        LaunchConfig(select_algo="radix")


class _CountingKernel:
    """Stands in for a `@triton.jit` kernel: counts launches, then launches the real one."""

    def __init__(self, name: str, kernel, counts: Counter):
        self.name, self.kernel, self.counts = name, kernel, counts

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.counts[self.name] += 1
            return launch(*args, **kwargs)
        return run


@pytest.mark.interpreter
@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize("rows,launches", [
    (5, {"_steer_row_kernel": 1}),
    (ONE_LAUNCH_MAX_ROWS, {"_steer_row_kernel": 1}),
    (ONE_LAUNCH_MAX_ROWS + 1, {"_topk_select_kernel": 1, "_steer_fwd_kernel": 1}),
    (ROW_ALGO_MAX_ROWS + 3, {"_group_max_kernel": 1, "_split_bound_kernel": 1, "_split_candidates_kernel": 1,
                             "_split_rank_kernel": 1, "_steer_fwd_kernel": 1}),
], ids=["small", "one-launch-limit", "row", "split"])
def test_steer_launches(monkeypatch, rows, launches):
    monkeypatch.setattr(_launch, "DEFAULT", LaunchConfig())
    counts: Counter = Counter()
    for module in (topk_module, steer_module):
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel"):
                monkeypatch.setattr(module, name, _CountingKernel(name, getattr(module, name), counts))
    memsets = []
    real_zero = torch.Tensor.zero_
    monkeypatch.setattr(torch.Tensor, "zero_", lambda t: memsets.append(t.shape) or real_zero(t))

    d, F, k = 6, 64, 3
    W_enc = torch.randn(d, F) / d ** 0.5
    b_enc, b_dec = torch.randn(F) * 0.1, torch.randn(d) * 0.1
    W_dec = torch.nn.functional.normalize(torch.randn(F, d), dim=1)
    harmful = torch.rand(F) < 0.3
    beta, gamma, tau = torch.tensor(0.5), torch.tensor(1.0), torch.tensor(-1.0)
    x = torch.randn(rows, d)
    y, h = _steer_fwd(x, W_enc, W_dec, b_dec, harmful, beta, gamma, tau, k, encoder_bias(W_enc, b_enc, b_dec))

    assert dict(counts) == launches
    assert memsets == []
    y64, h64 = dense_steer64(x, W_enc, b_enc, W_dec, b_dec, harmful, 0.5, 1.0, -1.0, k)
    torch.testing.assert_close(h.double(), h64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)


def test_bias_in_gemm_is_a_choice_for_bf16_only():
    """fp32 always adds the bias in the GEMM; bf16 only when asked (default off until the
    bf16-output epilogue is measured on a GPU); fp16 keeps fp32 pre-activations, bias on load."""
    bias_in_gemm = _launch.bias_in_gemm
    on = LaunchConfig(bias_in_gemm=True)
    assert bias_in_gemm(torch.float32, torch.float32) and bias_in_gemm(torch.float32, torch.float32, on)
    assert not bias_in_gemm(torch.bfloat16, torch.bfloat16) and bias_in_gemm(torch.bfloat16, torch.bfloat16, on)
    assert not bias_in_gemm(torch.float16, torch.float32, on)


def test_encoder_gemm_adds_the_bias_where_asked():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 16, generator=g).to(torch.bfloat16)
    W = torch.randn(16, 40, generator=g).to(torch.bfloat16)
    bias = torch.randn(40, generator=g)
    pre, on_load = topk_module._encoder_gemm(x, W, bias, torch.bfloat16)
    assert on_load is bias and torch.equal(pre, torch.mm(x, W))
    pre, on_load = topk_module._encoder_gemm(x, W, bias, torch.bfloat16, bias_in_gemm=True)
    assert on_load is None and pre.dtype == torch.bfloat16
    assert torch.equal(pre, torch.addmm(bias.to(torch.bfloat16), x, W))
    assert not torch.equal(pre, torch.mm(x, W))
