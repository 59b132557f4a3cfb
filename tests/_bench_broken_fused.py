"""pytest plugin used by tests/bench/test_bench.py: makes the fused steer provider 2 % wrong, to see
the pytest-benchmark front end refuse the row."""
from safedig_kernels.bench import providers


def _build(p):
    good = providers.BUILDERS[("steer", "eager_reference")](p)

    def fn():
        y, h = good()
        return y * 1.02, h
    return fn


providers.BUILDERS[("steer", "fused")] = _build
