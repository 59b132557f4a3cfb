"""`safedig bench` (also `python -m safedig_kernels.bench`): run, report, compare, results.

Exit status: 0 success; 1 a row was refused (its correctness check failed or it could not run;
named on stderr, left out of every output) or a results file cannot be reported; 2 bad usage;
3 the run was interrupted (what it measured is written).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from .report import ReportError, compare, load, render_results, write_reports
from .runner import DTYPES, BenchSession, build_cases, default_policy, run
from .shapes import DEFAULT_TIME_BUDGET_S, GPU_SETS, SETS

SUBCOMMANDS = ("run", "report", "compare", "results")


def _csv_list(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="safedig bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="check and time the kernels, write JSON, CSV, markdown and plots (default)")
    r.add_argument("--set", choices=sorted(SETS), default=None,
                   help="rows to run (default: full on CUDA, cpu otherwise)")
    r.add_argument("--quick", action="store_true", help="the quick GPU set, about 2 minutes (same as --set quick)")
    r.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    r.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    r.add_argument("--ops", type=_csv_list, default=None, help="comma-separated ops (steer, topk_encode, "
                   "sparse_decode, encoder_gemm)")
    r.add_argument("--shapes", type=_csv_list, default=None, help="comma-separated substrings of shape ids")
    r.add_argument("--providers", type=_csv_list, default=None, help="comma-separated provider names")
    r.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd baselines")
    r.add_argument("--out", type=Path, default=Path("out/bench"), help="output directory (default: out/bench)")
    r.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no new row after this long; what was measured is written (default: "
                        + ", ".join(f"{k} {v:.0f} s" for k, v in DEFAULT_TIME_BUDGET_S.items() if v)
                        + "; 0: no limit)")
    r.add_argument("--no-plots", action="store_true")
    r.add_argument("--list", action="store_true", help="print the rows that would run, run nothing")
    r.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("report", help="render CSV, markdown and plots from a results JSON")
    p.add_argument("json", type=Path)
    p.add_argument("--out", type=Path, default=None, help="output directory (default: next to the JSON)")
    p.add_argument("--no-plots", action="store_true")

    c = sub.add_parser("compare", help="per-row ratios of two results JSONs (new / base)")
    c.add_argument("base", type=Path)
    c.add_argument("new", type=Path)

    s = sub.add_parser("results", help="render benchmarks/RESULTS.md from the recorded JSONs")
    s.add_argument("jsons", type=Path, nargs="*", help="default: every *.json in --results-dir")
    s.add_argument("--results-dir", type=Path, default=Path("benchmarks/results"))
    s.add_argument("--output", type=Path, default=Path("benchmarks/RESULTS.md"))
    s.add_argument("--check", action="store_true", help="exit 1 if --output differs from what would be rendered")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of `safedig bench ARGS`; `argv` excludes the program and subcommand
    names of the outer CLI. Without a subcommand, `run` is meant."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "run")
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse printed the message; return its status instead of exiting
        return int(e.code or 0)
    try:
        return {"run": _run, "report": _report, "compare": _compare, "results": _results}[args.command](args)
    except (ReportError, ValueError, RuntimeError) as e:
        print(f"safedig bench {args.command}: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, ReportError) else 2


def _run(args) -> int:
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
    set_name = "quick" if args.quick else args.set or ("full" if device.type == "cuda" else "cpu")
    if args.quick and args.set not in (None, "quick"):
        raise ValueError(f"--quick and --set {args.set} disagree")
    if set_name in GPU_SETS and device.type != "cuda":
        raise ValueError(f"set {set_name!r} holds real model sizes and needs a CUDA device; on a CPU use --set cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cases = build_cases(set_name, device, dtype, ops=args.ops, shapes=args.shapes, providers=args.providers,
                        compile_=not args.no_compile)
    if args.list:
        for c in cases:
            print(c.id)
        print(f"{len(cases)} rows, set {set_name}, {device.type}")
        return 0
    session = BenchSession(device, set_name, default_policy(set_name), [dtype], seed=args.seed)
    t0 = time.monotonic()
    out_json = args.out / "results.json"
    budget = DEFAULT_TIME_BUDGET_S[set_name] if args.time_budget is None else (args.time_budget or None)
    outcome = run(cases, session, out_json=out_json, time_budget_s=budget,
                  log=lambda s: print(s, flush=True))
    written = [out_json] + write_reports(load(outcome.doc), args.out, plots=not args.no_plots)
    print("\n" + (args.out / "results.md").read_text())
    for path in written:
        print(f"wrote {path}")
    print(f"{len(outcome.doc['benchmarks'])} rows in {time.monotonic() - t0:.0f} s on {session.env['device']}")
    if outcome.refused:
        print(f"\n{len(outcome.refused)} rows REFUSED (failed their correctness check or could not run; "
              "left out of every output):", file=sys.stderr)
        for r in outcome.refused:
            print(f"  {r}", file=sys.stderr)
        return 1
    return 3 if outcome.interrupted else 0


def _report(args) -> int:
    res = load(args.json)
    for path in write_reports(res, args.out or args.json.parent, plots=not args.no_plots):
        print(f"wrote {path}")
    return 0


def _compare(args) -> int:
    text, _ = compare(load(args.base), load(args.new))
    print(text, end="")
    return 0


def _results(args) -> int:
    paths = list(args.jsons) or sorted(args.results_dir.glob("*.json"))
    text = render_results(paths)
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is not what the generator renders from {len(paths)} results; rerun without --check",
                  file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output} from {len(paths)} results")
    return 0
