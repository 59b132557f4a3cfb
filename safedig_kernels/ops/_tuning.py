"""Choices that depend on the card, made on the card: which selection runs fastest.

The selection's algorithm, chunk and warps trade differently on each GPU, N, F and k, and the
heuristics in `_launch` were measured on one card. With `SAFEDIG_TUNE=1` the first call of the
two-kernel path per (rows rounded up to a power of two, F, k, buffer dtype, bias on load,
device) times every candidate below on that call's own pre-activations and keeps the fastest
for the calls after it. Every candidate selects exactly, in the spec's order, so all give the
same codes bitwise (tests/ops/test_kernels_interpreter.py): tuning changes time, never an
output.

Nothing is timed while a tracer, fake tensors or the compiler run the launcher, or while a
CUDA graph is being captured: those calls take a choice made earlier, else the heuristics.
Before capturing a CUDA graph, make one eager call per shape (as Triton's compilation at first
launch asks anyway); the graph then records the tuned kernels.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch

from .._library import env_flag
from ._launch import SELECT_ALGOS, LaunchConfig
from ._triton import next_pow2, traced

__all__ = ["SELECT_CANDIDATES", "enabled", "select_key", "chosen", "choose"]

SELECT_CANDIDATES = tuple(LaunchConfig(select_algo=algo, chunk=chunk, select_warps=warps)
                          for algo in SELECT_ALGOS for chunk in (1024, 2048, 4096) for warps in (4, 8))
REPEATS = 3

_CHOSEN: dict = {}


def enabled() -> bool:
    return env_flag("SAFEDIG_TUNE")


def select_key(rows: int, F: int, k: int, pre_dtype: torch.dtype, bias_on_load: bool, device: torch.device) -> tuple:
    return (next_pow2(rows), F, k, pre_dtype, bias_on_load, str(device))


def chosen(key: tuple) -> Optional[LaunchConfig]:
    """The choice made for `key`, if one was timed."""
    return _CHOSEN.get(key)


def can_time(device: torch.device) -> bool:
    """Plain eager work on a device whose clock we can read: no tracer, compiler or capture."""
    return not traced() and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _elapsed_ms(run: Callable[[], None], device: torch.device) -> float:
    """Median of REPEATS timed runs after one warm-up (which also compiles the kernels)."""
    run()
    times = []
    for _ in range(REPEATS):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:  # the interpreter (tests)
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def choose(key: tuple, run: Callable[[LaunchConfig], None], device: torch.device) -> LaunchConfig:
    """Time `run(candidate)` for every candidate, keep the fastest for `key`, return it."""
    times = [(_elapsed_ms(lambda c=c: run(c), device), i) for i, c in enumerate(SELECT_CANDIDATES)]
    best = SELECT_CANDIDATES[min(times)[1]]
    _CHOSEN[key] = best
    return best
