"""Shared test settings.

- every test is seeded;
- `gpu` tests skip without CUDA; `interpreter` tests run Triton kernels on CPU tensors and
  need TRITON_INTERPRET=1 set before triton is imported (this file sets it when no GPU is
  present, so one `pytest` command covers both);
- `poison_allocations` makes the library's fresh allocations NaN (floats) or a sentinel
  (integers), so a kernel that forgets a store fails loudly instead of passing on zeros.
"""
from __future__ import annotations

import os
import random

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

INT_SENTINEL = -7777


def pytest_collection_modifyitems(config, items):
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    try:
        import triton  # noqa: F401

        has_triton = True
    except ImportError:
        has_triton = False
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "interpreter" in item.keywords and not (interpreting and has_triton):
            item.add_marker(pytest.mark.skip(reason="needs triton and TRITON_INTERPRET=1"))


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)
    yield


def _poisoned(fn):
    def wrapper(*args, **kwargs):
        t = fn(*args, **kwargs)
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        elif t.dtype == torch.uint8:
            t.fill_(0xA5)
        elif t.dtype != torch.bool:
            t.fill_(INT_SENTINEL)
        return t

    return wrapper


@pytest.fixture
def poison_allocations(monkeypatch):
    """Fresh torch.empty / empty_like / new_empty results are filled with NaN or a sentinel."""
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _poisoned(torch.empty_like))
    orig_new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", _poisoned(orig_new_empty))
    yield
