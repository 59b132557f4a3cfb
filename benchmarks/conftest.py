"""pytest-benchmark front end of `safedig_kernels.bench`: the same rows, checks and timing as
`safedig bench run`, recorded by pytest-benchmark.

    pytest benchmarks/ --benchmark-json out/bench.json                       # GPU: full set
    pytest benchmarks/ --safedig-set quick --benchmark-json out/bench.json   # GPU: ~2 minutes
    pytest benchmarks/ --benchmark-json out/cpu.json                         # CPU: the CPU set
    python -m safedig_kernels.bench report out/bench.json                    # CSV, table, plots

A row whose correctness check fails is a failed test: pytest-benchmark records nothing for it
and pytest exits non-zero naming it.
"""
from __future__ import annotations

import pytest
import torch

from safedig_kernels.bench.runner import DTYPES, BenchSession, build_cases, default_policy
from safedig_kernels.bench.shapes import GPU_SETS, SETS


def pytest_addoption(parser):
    g = parser.getgroup("safedig", "safedig_kernels benchmarks")
    g.addoption("--safedig-set", choices=sorted(SETS), default=None,
                help="rows to run (default: full on CUDA, cpu otherwise)")
    g.addoption("--safedig-device", choices=("cuda", "cpu"), default=None)
    g.addoption("--safedig-dtype", choices=sorted(DTYPES), default=None)
    g.addoption("--safedig-no-compile", action="store_true", help="skip the torch.compile'd baselines")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # p20/p80 are computed from the per-round data, which pytest-benchmark only writes to its
    # JSON with --benchmark-save-data. Runs before the plugin reads its options.
    if hasattr(config.option, "benchmark_save_data"):
        config.option.benchmark_save_data = True


def _settings(config) -> tuple[torch.device, str, torch.dtype]:
    dev = config.getoption("--safedig-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev)
    set_name = config.getoption("--safedig-set") or ("full" if device.type == "cuda" else "cpu")
    if set_name in GPU_SETS and device.type != "cuda":
        raise pytest.UsageError(f"--safedig-set {set_name} holds real model sizes and needs CUDA; "
                                "use --safedig-set cpu")
    name = config.getoption("--safedig-dtype")
    dtype = DTYPES[name] if name else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, set_name, dtype


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        device, set_name, dtype = _settings(metafunc.config)
        cases = build_cases(set_name, device, dtype, compile_=not metafunc.config.getoption("--safedig-no-compile"))
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


_SESSION = pytest.StashKey[BenchSession]()


def _session(config) -> BenchSession:
    if _SESSION not in config.stash:
        device, set_name, dtype = _settings(config)
        config.stash[_SESSION] = BenchSession(device, set_name, default_policy(set_name), [dtype])
    return config.stash[_SESSION]


@pytest.fixture(scope="session")
def bench_session(pytestconfig) -> BenchSession:
    s = _session(pytestconfig)
    s.ceilings  # measured once, before the first row, on an idle device
    yield s
    s.release()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["safedig"] = _session(config).machine_info()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    # Belt and braces: a failed check never reaches benchmark.pedantic, so never gets here.
    output_json["benchmarks"] = [b for b in output_json["benchmarks"]
                                 if (b.get("extra_info", {}).get("check") or {}).get("passed") is True]
