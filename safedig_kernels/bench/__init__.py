"""Kernel benchmarks for the `safedig` ops (docs/benchmarks.md), shipped with the package so
that `safedig bench` works from an installed wheel.

    safedig bench --quick --out out/bench      # GPU: the quick set, ~2 minutes
    safedig bench --out out/bench              # GPU: the full set; on a CPU: the CPU set
    safedig bench compare A.json B.json        # per-row ratios of two runs

Modules: `shapes` (registry from real model configs, named sets), `providers` (inputs,
baselines, the timed calls), `check` (correctness gate), `timing` (timer, ceilings,
environment), `runner` (check, time, record), `report` (CSV, markdown, plots, comparison,
RESULTS.md), `commands` (`main`).
"""
from __future__ import annotations

from .commands import main

__all__ = ["main"]
