"""Runs cases: prepare a shape once, check each provider, time it, record it.

`BenchSession` holds what the standalone runner (`run`) and the pytest-benchmark suite
(`benchmarks/test_bench_ops.py`) share, so both produce the same JSON (pytest-benchmark's
schema: `machine_info`, `commit_info`, `benchmarks[].stats.data`, `benchmarks[].extra_info`).
"""
from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from .._io import atomic_write_json, dtype_from_name, dtype_name
from .check import Refused, check_outputs
from .providers import BUILDERS, KINDS, Prepared, as_outputs, flops_bytes, gemm_flops, input_settings, providers_for
from .shapes import GEMM_OP, OPS, Shape, entries
from .timing import POLICIES, Plan, Policy, environment, measure, measure_ceilings, percentile, plan

TIMER_NAME = "safedig_kernels.bench.timing.synced_timer"
# What --dtype accepts: the names `_io.dtype_from_name` reads, for the dtypes the ops support.
DTYPES = {name: dtype_from_name(name) for name in ("bf16", "bfloat16", "fp16", "float16", "fp32", "float32")}


@dataclass(frozen=True)
class Case:
    """One row: an op, a provider, a shape, a dtype."""

    op: str
    provider: str
    shape: Shape
    dtype: torch.dtype

    @property
    def id(self) -> str:
        return f"{self.op}-{self.shape.id}-{dtype_name(self.dtype)}-{self.provider}"

    @property
    def group(self) -> str:
        return f"{self.op} {self.shape.id} {dtype_name(self.dtype)}"


def build_cases(set_name: str, device: torch.device, dtype: torch.dtype, *, ops: Optional[Iterable[str]] = None,
                shapes: Optional[Iterable[str]] = None, providers: Optional[Iterable[str]] = None,
                compile_: bool = True) -> list[Case]:
    """The rows of a named set, grouped by shape (inputs are made once per shape). `ops`,
    `providers` select by name, `shapes` by substring of the shape id; each must match."""
    ops = list(ops) if ops else None
    providers = list(providers) if providers else None
    for name in ops or ():
        if name not in OPS and name != GEMM_OP:
            raise ValueError(f"unknown op {name!r}; known: {list(OPS) + [GEMM_OP]}")
    known_providers = {p for _, p in BUILDERS}
    for name in providers or ():
        if name not in known_providers:
            raise ValueError(f"unknown provider {name!r}; known: {sorted(known_providers)}")
    shape_filters = list(shapes or ())
    cases = []
    for e in entries(set_name):
        if shape_filters and not any(f in e.shape.id for f in shape_filters):
            continue
        entry_ops = list(e.ops)
        if any(op in ("steer", "topk_encode") for op in entry_ops):
            entry_ops.insert(0, GEMM_OP)
        for op in entry_ops:
            if ops is not None and op not in ops:
                continue
            compiled = e.compile if compile_ and op in e.compiled_ops else ()
            for p in providers_for(op, e.shape, device, compiled):
                if providers is None or p in providers:
                    cases.append(Case(op, p, e.shape, dtype))
    if not cases:
        raise ValueError(f"no benchmark rows in set {set_name!r} match ops={ops} shapes={shape_filters} "
                         f"providers={providers}")
    return cases


def stats_dict(data: list[float], iterations: int) -> dict:
    """pytest-benchmark's `stats` block (seconds), raw per-round data included."""
    q1, q3 = percentile(data, 25), percentile(data, 75)
    mean = statistics.fmean(data)
    return {"min": min(data), "max": max(data), "mean": mean,
            "stddev": statistics.stdev(data) if len(data) > 1 else 0.0, "rounds": len(data),
            "median": percentile(data, 50), "iqr": q3 - q1, "q1": q1, "q3": q3, "ops": 1 / mean,
            "total": sum(data) * iterations, "data": list(data), "iterations": iterations}


class BenchSession:
    """Device, timing policy, ceilings and the current shape's prepared inputs."""

    def __init__(self, device: torch.device, set_name: str, policy: Policy, dtypes: list[torch.dtype], seed: int = 0):
        if device.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
            raise RuntimeError("TRITON_INTERPRET=1 would run the Triton kernels in the interpreter: unset it to "
                               "benchmark on CUDA")
        self.device, self.set_name, self.policy, self.dtypes, self.seed = device, set_name, policy, dtypes, seed
        self.env = environment(device)
        self._ceilings: Optional[dict] = None
        self._prep: Optional[Prepared] = None

    @property
    def ceilings(self) -> dict:
        if self._ceilings is None:
            self._ceilings = measure_ceilings(self.device, self.dtypes)
        return self._ceilings

    def machine_info(self) -> dict:
        """What `machine_info["safedig"]` holds: environment, ceilings, set, timing method."""
        return {**self.env, "ceilings": self.ceilings, "set": self.set_name, "policy": self.policy.to_dict(),
                "timer": TIMER_NAME, "inputs": input_settings(self.seed)}

    def prepared(self, case: Case) -> Prepared:
        p = self._prep
        if p is None or p.shape != case.shape or p.dtype != case.dtype:
            self._prep = p = None
            self.release()
            self._prep = p = Prepared(case.shape, case.dtype, self.device, self.seed)
        return p

    def release(self) -> None:
        """Drop the current shape's tensors and compiled graphs before the next shape's."""
        self._prep = None
        torch._dynamo.reset()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def build_and_check(self, case: Case) -> tuple[Callable[[], object], dict]:
        """The timed call of `case`, after its output passed the check; raises `Refused`."""
        try:
            prep = self.prepared(case)
            fn = BUILDERS[(case.op, case.provider)](prep)
            outputs = as_outputs(case.op, fn())
            result = check_outputs(case.op, outputs, prep)
        except Refused:
            raise
        except Exception as e:  # a provider that cannot run is refused like a wrong one
            raise Refused(case.id, f"{type(e).__name__}: {e}") from e
        if not result.passed:
            raise Refused(case.id, result.reason)
        return fn, result.to_dict()

    def plan(self, fn: Callable[[], object]) -> Plan:
        return plan(fn, self.policy)

    def extra_info(self, case: Case, check: dict) -> dict:
        flops, nbytes = flops_bytes(case.op, case.shape, case.dtype)
        s = case.shape
        return {"op": case.op, "provider": case.provider, "kind": KINDS[case.provider], "shape": s.id,
                "family": s.family, "model": s.model, "context": s.context, "N": s.N, "d": s.d, "F": s.F, "k": s.k,
                "dtype": dtype_name(case.dtype), "flops": flops, "gemm_flops": gemm_flops(case.op, s),
                "bytes": nbytes, "device": self.env["device"], "check": check}

    def bench_entry(self, case: Case, data: list[float], p: Plan, check: dict) -> dict:
        return {"group": case.group, "name": case.id, "fullname": f"safedig_kernels.bench::{case.id}",
                "params": {"case": case.id}, "param": case.id, "extra_info": self.extra_info(case, check),
                "options": {"timer": TIMER_NAME, "rounds": p.rounds, "iterations": p.iterations,
                            "warmup_rounds": p.warmup_rounds, "disable_gc": True},
                "stats": stats_dict(data, p.iterations)}


def new_document(session: BenchSession) -> dict:
    """An empty result in pytest-benchmark's JSON layout."""
    from .. import __version__

    git = session.env["git"]
    return {
        "machine_info": {"machine": platform.machine(), "system": platform.system(),
                         "python_version": platform.python_version(), "safedig": session.machine_info()},
        "commit_info": {"id": git.removesuffix("+dirty") if git else None,
                        "dirty": bool(git and git.endswith("+dirty"))},
        "benchmarks": [],
        "datetime": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "version": f"safedig_kernels.bench {__version__}",
    }


def write_json(doc: dict, path: Path) -> None:
    """Atomic write (`_io.atomic_write_json`): a run killed mid-write leaves the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, doc)


@dataclass
class Outcome:
    doc: dict
    refused: list[Refused] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    interrupted: bool = False


class _Stop(Exception):
    pass


def run(cases: list[Case], session: BenchSession, *, out_json: Optional[Path] = None,
        time_budget_s: Optional[float] = None, log: Callable[[str], None] = print) -> Outcome:
    """Check and time every case in order. The JSON is rewritten after each row, so a run cut
    short (time budget, SIGTERM from `timeout`, Ctrl-C) keeps what it measured."""
    start = time.monotonic()
    doc = new_document(session)
    ceil = doc["machine_info"]["safedig"]["ceilings"]
    log(f"device: {session.env['device']}; ceilings: copy {ceil['copy_GBps']:.4g} GB/s, GEMM "
        + ", ".join(f"{k} {v:.4g} TFLOP/s" for k, v in ceil["gemm_TFLOPs"].items()))
    out = Outcome(doc)
    restore = _stop_on_sigterm()
    try:
        for i, case in enumerate(cases):
            if time_budget_s is not None and time.monotonic() - start > time_budget_s:
                out.skipped = [c.id for c in cases[i:]]
                log(f"time budget of {time_budget_s:.0f} s spent: {len(out.skipped)} rows not measured")
                break
            try:
                fn, check = session.build_and_check(case)
                p = session.plan(fn)
                data = measure(fn, p)
            except Refused as r:
                out.refused.append(r)
                log(f"REFUSED {r}")
                continue
            fn = None  # the call's closure holds this shape's tensors (a CUDA graph's pool too)
            doc["benchmarks"].append(session.bench_entry(case, data, p, check))
            log(f"{case.id:60s} {percentile(data, 50) * 1e3:9.4f} ms  ({p.rounds} x {p.iterations})")
            if out_json is not None:
                write_json(doc, out_json)
    except (KeyboardInterrupt, _Stop):
        out.interrupted = True
        out.skipped = [c.id for c in cases if c.id not in {b["name"] for b in doc["benchmarks"]}
                       and c.id not in {r.case_id for r in out.refused}]
        log(f"interrupted: {len(out.skipped)} rows not measured")
    finally:
        restore()
        session.release()
    info = doc["machine_info"]["safedig"]
    info["not_measured"] = out.skipped
    info["wall_s"] = round(time.monotonic() - start, 1)
    if out_json is not None:
        write_json(doc, out_json)
    return out


def _stop_on_sigterm() -> Callable[[], None]:
    """SIGTERM (what `timeout` sends) stops the run like Ctrl-C; returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise _Stop()

    old = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, old)


def default_policy(set_name: str) -> Policy:
    return POLICIES[set_name]
