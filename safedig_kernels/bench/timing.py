"""How rows are timed, the device's own ceilings, and what the run was measured on.

A round runs the provider `iterations` times back to back between two synchronised clock
reads and records the mean per call; rows report the median and the 20th/80th percentiles
across rounds. Back-to-back calls amortise the ~10 µs synchronisation that a per-call clock
would add, which matters at N = 16; L2 stays warm as in the spec §5 anchors. pytest-benchmark's
`pedantic(rounds, iterations)` with `synced_timer` measures exactly the same thing.
"""
from __future__ import annotations

import datetime as _dt
import gc
import math
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .._io import dtype_name
from .._library import env_flag, triton_interpreting

PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def single_call_times_ms(fn: Callable[[], object], reps: int, cuda: bool) -> list[float]:
    """`reps` single calls of `fn`, each timed on its own: CUDA events around the call on a GPU
    (the queue drained after each), `perf_counter` on the CPU. What the device scripts report
    (benchmarks/gpu_check.py, pipeline_step.py); a call's host launch gaps count when the GPU
    runs out of queued work, unlike the back-to-back rounds of `measure`."""
    out = []
    if cuda:
        torch.cuda.synchronize()
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    return out


def synced_timer() -> float:
    """`time.perf_counter()` after the CUDA queue drained (a plain clock when CUDA is unused)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


@dataclass(frozen=True)
class Policy:
    """How long to time a row: rounds of about `round_s`, at least `min_rounds`, at most
    `max_rounds`, stopping once `budget_s` is spent (low-variance GPU rows need few rounds)."""

    round_s: float
    min_rounds: int
    max_rounds: int
    budget_s: float
    warmup_s: float

    def to_dict(self) -> dict:
        return asdict(self)


POLICIES = {
    "full": Policy(round_s=1e-3, min_rounds=10, max_rounds=50, budget_s=0.25, warmup_s=0.02),
    "quick": Policy(round_s=1e-3, min_rounds=7, max_rounds=25, budget_s=0.1, warmup_s=0.01),
    "cpu": Policy(round_s=2e-3, min_rounds=5, max_rounds=25, budget_s=0.08, warmup_s=0.0),
}


@dataclass(frozen=True)
class Plan:
    rounds: int
    iterations: int
    warmup_rounds: int


def plan(fn: Callable[[], object], policy: Policy) -> Plan:
    """Rounds and calls per round for `fn`, from the fastest of three single synchronised calls."""
    once = math.inf
    for _ in range(3):
        t0 = synced_timer()
        fn()
        once = min(once, synced_timer() - t0)
    once = max(once, 1e-7)
    iterations = max(1, round(policy.round_s / once))
    per_round = once * iterations
    rounds = min(policy.max_rounds, max(policy.min_rounds, int(policy.budget_s / per_round)))
    warmup_rounds = max(1, math.ceil(policy.warmup_s / per_round)) if policy.warmup_s > 0 else 0
    return Plan(rounds, iterations, warmup_rounds)


def measure(fn: Callable[[], object], p: Plan) -> list[float]:
    """Seconds per call, one value per round (Python's GC paused, as pytest-benchmark can)."""
    for _ in range(p.warmup_rounds * p.iterations):
        fn()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        data = []
        for _ in range(p.rounds):
            t0 = synced_timer()
            for _ in range(p.iterations):
                fn()
            data.append((synced_timer() - t0) / p.iterations)
    finally:
        if gc_was_enabled:
            gc.enable()
    return data


def percentile(data: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks."""
    if not data:
        raise ValueError("percentile of no data")
    s = sorted(data)
    pos = q / 100 * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# -- ceilings ------------------------------------------------------------------------------

# Rounds of a few ms, so the synchronisation around a round is noise next to a 1 GiB copy.
CEILING_POLICY = Policy(round_s=5e-3, min_rounds=5, max_rounds=5, budget_s=0.0, warmup_s=0.0)


def measure_ceilings(device: torch.device, dtypes: list[torch.dtype]) -> dict:
    """Copy bandwidth (bytes read + written per second) and square-GEMM throughput per dtype,
    measured now on `device` with the same timer as the rows. Sizes are far above the caches
    (a GPU's L2, a CPU's LLC) so they measure memory and the tensor cores, not cache."""
    cuda = device.type == "cuda"
    n_bytes = (1 << 30) if cuda else (1 << 26)
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    copy_s = _best_median(lambda: dst.copy_(src))
    src = dst = None
    size = 8192 if cuda else 1024
    gemm: dict[str, float] = {}
    for dt in dtypes:
        if not cuda and dt != torch.float32:
            # CPU bf16/fp16 matmul runs far below fp32 on most CPUs: a slower ceiling would
            # make the floor look easy. The fp32 GEMM is the CPU's best.
            dt_m = torch.float32
        else:
            dt_m = dt
        a = torch.randn(size, size, device=device, dtype=dt_m)
        b = torch.randn(size, size, device=device, dtype=dt_m)
        gemm[dtype_name(dt)] = 2 * size ** 3 / _best_median(lambda: torch.mm(a, b)) / 1e12
        a = b = None
    if cuda:
        torch.cuda.empty_cache()
    return {"copy_GBps": 2 * n_bytes / copy_s / 1e9, "gemm_TFLOPs": gemm,
            "copy_bytes": n_bytes, "gemm_size": size}


def _best_median(fn: Callable[[], object]) -> float:
    fn()
    p = plan(fn, CEILING_POLICY)
    data = measure(fn, p)
    return percentile(data, 50)


# -- environment ---------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def git_revision(root: Path = PACKAGE_ROOT) -> Optional[str]:
    """Short commit of the checkout the package runs from, '+dirty' when it has local
    changes; None for an installed wheel (no .git)."""
    if not (root / ".git").exists():
        return None
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + ("+dirty" if dirty else "")) or None


def environment(device: torch.device) -> dict:
    """Device name, versions, git revision and date: stamped on every CSV row."""
    try:
        import triton

        triton_version: Optional[str] = triton.__version__
    except ImportError:
        triton_version = None
    from .. import __version__

    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({cpu_name()}, {torch.get_num_threads()} threads)"
    return {
        "device": name,
        "device_type": device.type,
        "cuda": torch.version.cuda if cuda else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "safedig_kernels": __version__,
        "git": git_revision(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        # the fused ops run the PyTorch reference on CPU tensors or when Triton is disabled
        "fused_runs_reference": (not cuda) or env_flag("SAFEDIG_DISABLE_TRITON"),
        "triton_interpret": triton_interpreting(),
    }
