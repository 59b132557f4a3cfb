"""Host-side cost of one `safedig::steer` call: the Python our launchers and the op dispatch run,
with every Triton launch replaced by a stub that only counts it and the GEMM by a preallocated
buffer, through the dispatcher and through the eager fast path. Runs on any machine (CPU).

    python benchmarks/host_overhead.py [--N 16] [--calls 3000] [--runs 5]

Small-N steering is bound by this host work plus the launches themselves (docs/spec.md §6 asks 0.1 ms
at N = 16). What it cannot see: Triton's own launcher and the CUDA driver, which need a GPU;
it counts the launches instead. Prints, per path, the best of `--runs` runs of `--calls` calls.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import safedig_kernels  # noqa: E402,F401  (registers the ops)
from safedig_kernels.ops import _launch  # noqa: E402
from safedig_kernels.ops._launch import LaunchConfig  # noqa: E402

topk_module = importlib.import_module("safedig_kernels.ops.topk_encode")
steer_module = importlib.import_module("safedig_kernels.ops.steer")


class _CountedStub:
    def __init__(self, name: str, counts: Counter):
        self.name, self.counts = name, counts

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counts[self.name] += 1
        return launch


def stub_launches() -> Counter:
    """Replace every `_*_kernel` of the op modules by a counting stub, and route CPU tensors to
    the launchers as if they were CUDA ones. For this process only."""
    counts: Counter = Counter()
    for module in (topk_module, steer_module):
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel"):
                setattr(module, name, _CountedStub(name, counts))
    steer_module.use_triton_for = lambda t: True
    return counts


PATHS = {  # label: the launch settings every call of that path runs with (ops/_launch.py)
    "default": _launch.DEFAULT,
    "row, two kernels": LaunchConfig(select_algo="row", one_launch=False),
    "split": LaunchConfig(select_algo="split", one_launch=False),
}


def measure(N: int, calls: int, runs: int, d: int = 64, F: int = 256, k: int = 8) -> list[dict]:
    counts = stub_launches()
    g = torch.Generator().manual_seed(0)
    bf = dict(dtype=torch.bfloat16)
    x = torch.randn(N, d, generator=g).to(**bf)
    W_enc, W_dec = torch.randn(d, F, generator=g).to(**bf), torch.randn(F, d, generator=g).to(**bf)
    b_enc, b_dec = torch.zeros(F, **bf), torch.zeros(d, **bf)
    strengths = [torch.tensor(v) for v in (0.5, 1.0, -1.0)]
    bias = topk_module.encoder_bias(W_enc, b_enc, b_dec)
    args = (x, W_enc, b_enc, W_dec, b_dec, torch.zeros(F, dtype=torch.bool), *strengths, k, bias)
    gemm_out = torch.empty(N, F, **bf)  # cuBLAS costs the host one launch; a CPU bf16 matmul would cost far more
    for module in (topk_module, steer_module):
        module._encoder_gemm = lambda x2, W, b, pre_dtype, bias_in_gemm=False: (gemm_out[: x2.shape[0]], b)
    rows = []
    default = _launch.DEFAULT
    calls_by = {"dispatcher": torch.ops.safedig.steer,  # what torch.compile and CUDA-graph capture see
                "eager fast path": steer_module.call_steer}  # what sk.steer and TopKSAE.steer run eagerly
    for label, launch in PATHS.items():
        _launch.DEFAULT = launch
        for via, op in calls_by.items():
            for _ in range(100):
                op(*args)
            counts.clear()
            op(*args)
            launches = dict(counts)
            best = float("inf")
            for _ in range(runs):
                t0 = time.perf_counter()
                for _ in range(calls):
                    op(*args)
                best = min(best, (time.perf_counter() - t0) / calls)
            rows.append({"path": f"{label}, {via}", "us_per_call": best * 1e6, "triton_launches": launches})
    _launch.DEFAULT = default
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--N", type=int, default=16)
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args(argv)
    print(f"safedig::steer host cost per call, N = {a.N}, Triton launches stubbed (torch {torch.__version__})")
    print("| path | µs per call | Triton launches (plus the cuBLAS GEMM) |\n|---|---:|---|")
    for r in measure(a.N, a.calls, a.runs):
        launches = ", ".join(f"{n} ×{c}" for n, c in r["triton_launches"].items())
        print(f"| {r['path']} | {r['us_per_call']:.1f} | {launches} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
