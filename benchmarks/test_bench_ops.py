"""One pytest-benchmark row per case of the selected set (see conftest.py for the options)."""
from __future__ import annotations

import pytest

from safedig_kernels.bench.check import Refused
from safedig_kernels.bench.timing import synced_timer

# The timer drains the CUDA queue before each clock read; a round is `iterations` calls.
pytestmark = pytest.mark.benchmark(timer=synced_timer, disable_gc=True)


def test_kernel(case, bench_session, benchmark):
    try:
        fn, check = bench_session.build_and_check(case)
    except Refused as r:
        pytest.fail(f"REFUSED {r}", pytrace=False)
    plan = bench_session.plan(fn)
    benchmark.group = case.group
    benchmark.extra_info.update(bench_session.extra_info(case, check))
    benchmark.pedantic(fn, rounds=plan.rounds, iterations=plan.iterations, warmup_rounds=plan.warmup_rounds)
