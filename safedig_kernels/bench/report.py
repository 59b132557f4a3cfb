"""Everything shown to a reader, derived from a results JSON alone: CSV, markdown, plots, the
comparison of two runs and `benchmarks/RESULTS.md`. No figure is produced any other way.

Per row: median, p20 and p80 over rounds; TFLOP/s = useful FLOPs / median; floor =
max(GEMM FLOPs / the run's measured GEMM peak, bytes / the run's measured copy bandwidth);
% of floor = floor / median (100 % = at the floor); speedups = the fastest eager (or
torch.compile'd) baseline's median at the same shape / this row's median; ÷ GEMM = median /
the `x @ W_enc` median at the same shape (spec §6).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional, Union

from .device_reports import kernel_check_markdown, kind_of, pipeline_markdown
from .shapes import GEMM_OP, LATENCY_N, OPS, Shape, model_shape, n_shape
from .timing import percentile

logger = logging.getLogger(__name__)


class ReportError(ValueError):
    """A results file that cannot be reported as it is (the message says why)."""


@dataclass
class Row:
    op: str
    shape: str
    family: str
    model: str
    context: str
    N: int
    d: int
    F: int
    k: int
    dtype: str
    provider: str
    kind: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    rounds: int
    iterations: int
    tflops: float
    floor_ms: float
    pct_of_floor: float
    speedup_vs_eager: Optional[float]
    eager_baseline: Optional[str]
    speedup_vs_compiled: Optional[float]
    compiled_baseline: Optional[str]
    vs_gemm: Optional[float]
    check_err: float  # the primary output's worst per-token error in the correctness check
    check_bound: float

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.op, self.shape, self.dtype, self.provider)


@dataclass
class Results:
    meta: dict  # machine_info["safedig"]: device, versions, git, date, ceilings, set
    rows: list[Row]
    source: str = ""

    @property
    def is_cpu(self) -> bool:
        return self.meta.get("device_type") != "cuda"


def _data_ms(bench: dict) -> list[float]:
    data = bench.get("stats", {}).get("data")
    if not data:
        raise ReportError(f"{bench.get('name')}: stats.data is missing; p20/p80 need the per-round data "
                          f"(pytest: --benchmark-save-data, which benchmarks/conftest.py turns on)")
    return [v * 1e3 for v in data]


def _floor_ms(info: dict, ceilings: dict) -> float:
    peak = ceilings["gemm_TFLOPs"].get(info["dtype"])
    if peak is None:
        raise ReportError(f"no GEMM ceiling for dtype {info['dtype']} in this run "
                          f"(have {sorted(ceilings['gemm_TFLOPs'])})")
    compute_s = info["gemm_flops"] / (peak * 1e12)
    memory_s = info["bytes"] / (ceilings["copy_GBps"] * 1e9)
    return max(compute_s, memory_s) * 1e3


def load(source: Union[str, Path, dict]) -> Results:
    """Read a results JSON (from `safedig bench run` or the pytest-benchmark suite) and derive
    every reported quantity. Raises `ReportError` for a row without a passed correctness check."""
    if isinstance(source, dict):
        doc, name = source, "<dict>"
    else:
        name = str(source)
        try:
            doc = json.loads(Path(source).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ReportError(f"cannot read results JSON {name}: {e}") from e
    meta = doc.get("machine_info", {}).get("safedig")
    if not isinstance(meta, dict) or "ceilings" not in meta:
        raise ReportError(f"{name} is not a safedig benchmark result: machine_info.safedig.ceilings is missing")
    ceilings = meta["ceilings"]
    base = []
    for b in doc.get("benchmarks", []):
        info = b.get("extra_info", {})
        check = info.get("check") or {}
        if check.get("passed") is not True:
            raise ReportError(f"{b.get('name')}: no passed correctness check; refusing to report it")
        data = _data_ms(b)
        median = percentile(data, 50)
        first = next(iter(check.get("outputs", {}).values()), {})
        base.append(dict(
            op=info["op"], shape=info["shape"], family=info["family"], model=info["model"], context=info["context"],
            N=info["N"], d=info["d"], F=info["F"], k=info["k"], dtype=info["dtype"], provider=info["provider"],
            kind=info["kind"], median_ms=median, p20_ms=percentile(data, 20), p80_ms=percentile(data, 80),
            rounds=len(data), iterations=b["stats"].get("iterations", 1),
            tflops=info["flops"] / (median * 1e-3) / 1e12, floor_ms=_floor_ms(info, ceilings),
            check_err=first.get("max_token_err", math.nan), check_bound=first.get("bound", math.nan)))
    for r in base:
        r["pct_of_floor"] = 100 * r["floor_ms"] / r["median_ms"]
        same = [o for o in base if (o["op"], o["shape"], o["dtype"]) == (r["op"], r["shape"], r["dtype"])]
        for kind in ("eager", "compiled"):
            cands = [o for o in same if o["kind"] == kind]
            best = min(cands, key=lambda o: o["median_ms"]) if cands else None
            r[f"speedup_vs_{kind}"] = best["median_ms"] / r["median_ms"] if best else None
            r[f"{kind}_baseline"] = best["provider"] if best else None
        gemm = [o for o in base if o["op"] == GEMM_OP and (o["shape"], o["dtype"]) == (r["shape"], r["dtype"])]
        r["vs_gemm"] = r["median_ms"] / gemm[0]["median_ms"] if gemm and r["op"] in ("steer", "topk_encode") else None
    return Results(meta, [Row(**r) for r in base], name)


# -- CSV -------------------------------------------------------------------------------------

ENV_COLUMNS = ("date", "git", "device", "device_type", "torch", "triton", "cuda")


def to_csv(res: Results) -> str:
    """One line per row; device, versions, git revision and date repeated on every line."""
    cols = list(ENV_COLUMNS) + [f.name for f in fields(Row)]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    env = {c: res.meta.get(c) for c in ENV_COLUMNS}
    for r in res.rows:
        w.writerow({**env, **asdict(r)})
    return buf.getvalue()


# -- markdown --------------------------------------------------------------------------------

def fmt(v: Optional[float], digits: int = 4) -> str:
    """`digits` significant figures; '—' for a quantity that was not measured."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.{digits}g}"


def title(res: Results) -> str:
    m = res.meta
    if res.is_cpu:
        return f"CPU numbers (no GPU): {m['device']}"
    return f"GPU numbers: {m['device']}"


def header_lines(res: Results) -> list[str]:
    m, c = res.meta, res.meta["ceilings"]
    gemm = ", ".join(f"{dt} {v:.4g} TFLOP/s" for dt, v in c["gemm_TFLOPs"].items())
    lines = [
        f"torch {m['torch']}, triton {m.get('triton') or 'not installed'}"
        + (f", CUDA {m['cuda']}" if m.get("cuda") else "")
        + f"; git {m.get('git') or 'unknown'}; {m['date']}; set `{m['set']}`.",
        "",
        f"Ceilings measured in this run: copy {c['copy_GBps']:.4g} GB/s (bytes read + written, "
        f"{c['copy_bytes'] >> 20} MiB buffers); torch.mm {c['gemm_size']}³: {gemm}.",
        "",
        "Times in ms: median over rounds of back-to-back calls, each round between two synchronised clock "
        "reads (warm L2); p20/p80 across rounds. Floor = max(GEMM FLOPs / measured GEMM peak, "
        "bytes / measured copy bandwidth), bytes = x, W_enc, the W_dec rows the codes select, outputs. "
        "Speedups are against the fastest eager and the fastest torch.compile'd baseline at the same shape; "
        "÷ GEMM is the median over `x @ W_enc` alone. Every row passed its correctness check against "
        "the fp32 (fp64 for fp32 inputs) reference before it was timed.",
    ]
    if m.get("inputs"):
        i = m["inputs"]
        lines += ["", f"Inputs (seed {i['seed']}): activations {i['activations']}, W_enc {i['W_enc']}, W_dec "
                  f"{i['W_dec']}, {100 * i['harmful_fraction']:g} % of features harmful; beta {i['beta']:g}, "
                  f"gamma {i['gamma']:g}, tau {i['tau']:g} (every token steered)."]
    if m.get("fused_runs_reference"):
        lines += ["", "**The fused ops ran the PyTorch reference on this device (no Triton kernels were timed).**"]
    if m.get("not_measured"):
        lines += ["", f"Not measured (run stopped early): {len(m['not_measured'])} rows: "
                  + ", ".join(f"`{n}`" for n in m["not_measured"])]
    return lines


def op_table(rows: list[Row]) -> list[str]:
    out = ["| shape | N | dtype | provider | median ms | p20 ms | p80 ms | TFLOP/s | floor ms | % of floor "
           "| × vs eager | × vs compiled | ÷ GEMM |",
           "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r.shape} | {r.N} | {r.dtype} | {r.provider} | {fmt(r.median_ms)} | {fmt(r.p20_ms)} "
                   f"| {fmt(r.p80_ms)} | {fmt(r.tflops, 3)} | {fmt(r.floor_ms)} | {fmt(r.pct_of_floor, 3)} "
                   f"| {fmt(r.speedup_vs_eager, 3)} | {fmt(r.speedup_vs_compiled, 3)} | {fmt(r.vs_gemm, 3)} |")
    return out


@dataclass(frozen=True)
class Target:
    """A spec §6 row (bf16, one GPU, a ratio within one run)."""

    what: str
    shape: Shape
    metric: str  # a Row attribute
    must: float
    goal: float
    lower_is_better: bool


TARGETS = (
    # spec §6: must 1.4 / goal 1.25 at 4x, must 1.25 / goal 1.1 at 16x
    Target("fused steer ÷ encoder GEMM", model_shape("flux1-dev", 1024, 4, 32), "vs_gemm", 1.4, 1.25, True),
    Target("fused steer ÷ encoder GEMM", model_shape("flux1-dev", 1024, 16, 64), "vs_gemm", 1.25, 1.1, True),
    Target("fastest torch.compile'd baseline ÷ fused steer", model_shape("flux1-dev", 1024, 4, 32),
           "speedup_vs_compiled", 4, 5, False),
    Target("fastest torch.compile'd baseline ÷ fused steer", model_shape("flux1-dev", 1024, 16, 64),
           "speedup_vs_compiled", 4, 5, False),
    Target("fused steer, ms", n_shape("flux1-dev", LATENCY_N, 4, 32, "latency"), "median_ms", 0.1, 0.06, True),
)


def target_lines(res: Results) -> list[str]:
    if res.is_cpu:
        return ["spec §6 targets apply to bf16 on a GPU; they are not evaluated for CPU numbers."]
    out = ["| spec §6 target | shape | measured | must | goal | status |", "|---|---|---:|---:|---:|---|"]
    for t in TARGETS:
        row = next((r for r in res.rows if r.op == "steer" and r.provider == "fused" and r.dtype == "bfloat16"
                    and r.shape == t.shape.id), None)
        v = getattr(row, t.metric) if row else None
        if v is None:
            status = "not measured"
        else:
            better = (lambda a, b: a <= b) if t.lower_is_better else (lambda a, b: a >= b)
            status = "meets goal" if better(v, t.goal) else "meets must" if better(v, t.must) else "**misses must**"
        sign = "≤" if t.lower_is_better else "≥"
        out.append(f"| {t.what} | {t.shape.id} | {fmt(v, 3)} | {sign} {t.must:g} | {sign} {t.goal:g} | {status} |")
    out += ["", "The whole-step overhead target (4 sites, ≤ 2 %) is a pipeline benchmark; it is not part of "
            "this kernel suite."]
    return out


def to_markdown(res: Results, level: int = 2) -> str:
    h = "#" * level
    lines = [f"{h} {title(res)}", ""] + header_lines(res) + ["", f"{h}# spec §6 targets", ""] + target_lines(res)
    for op in (*OPS, GEMM_OP):
        rows = [r for r in res.rows if r.op == op]
        if rows:
            lines += ["", f"{h}# {op}" + (" (CPU)" if res.is_cpu else ""), ""] + op_table(rows)
    lines += ["", f"{h}# Shapes", "", "| shape | model | d | F | k | N | where N comes from |",
              "|---|---|---:|---:|---:|---:|---|"]
    for r in {r.shape: r for r in res.rows}.values():
        lines.append(f"| {r.shape} | {r.model} | {r.d} | {r.F} | {r.k} | {r.N} | {r.context} |")
    return "\n".join(lines) + "\n"


# -- plots -----------------------------------------------------------------------------------

def plot(res: Results, out_dir: Path) -> list[Path]:
    """One PNG per op and shape family with at least two N: time and % of floor against N."""
    # Figure without pyplot renders with Agg and leaves the caller's backend alone.
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for r in res.rows:
        groups.setdefault((r.op, r.family, r.dtype), []).append(r)
    for (op, family, dtype), rows in groups.items():
        if len({r.N for r in rows}) < 2:
            continue
        fig = Figure(figsize=(12, 4.5))
        ax_t, ax_f = fig.subplots(1, 2)
        for provider in dict.fromkeys(r.provider for r in rows):
            pts = sorted((r.N, r.median_ms, r.pct_of_floor) for r in rows if r.provider == provider)
            ns = [p[0] for p in pts]
            ax_t.plot(ns, [p[1] for p in pts], marker="o", label=provider)
            ax_f.plot(ns, [p[2] for p in pts], marker="o", label=provider)
        floor = sorted({(r.N, r.floor_ms) for r in rows})
        ax_t.plot([p[0] for p in floor], [p[1] for p in floor], "k--", label="floor")
        ax_t.set(xscale="log", yscale="log", xlabel="N (tokens)", ylabel="median time (ms)")
        ax_f.set(xscale="log", xlabel="N (tokens)", ylabel="% of floor (100 = at the floor)")
        all_n = sorted({r.N for r in rows})
        for ax in (ax_t, ax_f):
            ax.set_xticks(all_n, [str(n) for n in all_n])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
        label = "CPU numbers (no GPU)" if res.is_cpu else "GPU"
        fig.suptitle(f"{op}, {family}, {dtype}: {label}: {res.meta['device']}\n"
                     f"torch {res.meta['torch']}, git {res.meta.get('git') or 'unknown'}, {res.meta['date']}",
                     fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{op}_{family}_{dtype}.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


def write_reports(res: Results, out_dir: Path, plots: bool = True) -> list[Path]:
    """results.csv, results.md and plots/*.png under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.csv").write_text(to_csv(res))
    (out_dir / "results.md").write_text(to_markdown(res))
    written = [out_dir / "results.csv", out_dir / "results.md"]
    if plots:
        try:
            written += plot(res, out_dir / "plots")
        except ModuleNotFoundError as e:
            if e.name != "matplotlib":
                raise
            logger.warning("plots skipped: matplotlib is not installed (pip install 'safedig-kernels[plots]')")
    return written


# -- comparison ------------------------------------------------------------------------------

def _describe(res: Results) -> str:
    m = res.meta
    return f"{m['device']}, torch {m['torch']}, git {m.get('git') or 'unknown'}, {m['date']}"


def compare(base: Results, new: Results) -> tuple[str, list[tuple[tuple, float, float, float]]]:
    """Per-row ratio new median / base median for rows present in both (matched by op, shape,
    dtype, provider). Returns the printable markdown and the (key, base ms, new ms, ratio) list."""
    new_by_key = {r.key: r for r in new.rows}
    pairs = [(r.key, r.median_ms, new_by_key[r.key].median_ms, new_by_key[r.key].median_ms / r.median_ms)
             for r in base.rows if r.key in new_by_key]
    lines = [f"base: {base.source} ({_describe(base)})", f"new:  {new.source} ({_describe(new)})"]
    if base.meta["device"] != new.meta["device"]:
        lines.append("WARNING: different devices; ratios compare machines, not code.")
    lines += ["", "| op | shape | dtype | provider | base ms | new ms | new / base |",
              "|---|---|---|---|---:|---:|---:|"]
    for (op, shape, dtype, provider), b, n, ratio in pairs:
        lines.append(f"| {op} | {shape} | {dtype} | {provider} | {fmt(b)} | {fmt(n)} | {fmt(ratio, 3)} |")
    only_base = [r.key for r in base.rows if r.key not in new_by_key]
    base_keys = {r.key for r in base.rows}
    only_new = [r.key for r in new.rows if r.key not in base_keys]
    for what, keys in (("only in base", only_base), ("only in new", only_new)):
        if keys:
            lines += ["", f"{what}: " + ", ".join("/".join(k) for k in keys)]
    if not pairs:
        lines += ["", "no rows in common"]
    return "\n".join(lines) + "\n", pairs


# -- benchmarks/RESULTS.md -------------------------------------------------------------------

RESULTS_HEADER = """# Benchmark results

Generated file: every figure below is rendered by `python -m safedig_kernels.bench results`
from the results JSONs in `benchmarks/results/`; none is typed by hand. Edit the generator
(`safedig_kernels/bench/report.py`), never this file.

How to reproduce on a CUDA machine, from the repository root:

```bash
python -m safedig_kernels.bench run --quick --out out/bench   # or the full set: drop --quick
cp out/bench/results.json benchmarks/results/<device>-<date>.json
python -m safedig_kernels.bench results                       # rewrites this file
```

The same rows as a pytest-benchmark suite: `pytest benchmarks/ --benchmark-json out/bench.json`
(`--safedig-set quick|full|cpu`). Compare two runs: `python -m safedig_kernels.bench compare A.json B.json`.
"""


def render_results(paths: list[Path]) -> str:
    """benchmarks/RESULTS.md from recorded result JSONs (sorted by path); a placeholder when
    there are none."""
    paths = sorted(paths)
    names = [p.as_posix() for p in paths]
    out = [RESULTS_HEADER, f"<!-- rendered from: {', '.join(names) if names else 'no results'} -->", ""]
    if not paths:
        out.append("No GPU results are recorded yet.")
        return "\n".join(out) + "\n"
    for p in paths:
        doc = json.loads(Path(p).read_text())
        kind = kind_of(doc)
        if kind == "kernel_check":
            out.append(kernel_check_markdown(doc).replace("\n", f" (`{p.name}`)\n", 1))
        elif kind == "pipeline_step":
            out.append(pipeline_markdown(doc).replace("\n", f" (`{p.name}`)\n", 1))
        else:
            res = load(p)
            out.append(to_markdown(res, level=2).replace(f"## {title(res)}", f"## {title(res)} (`{p.name}`)", 1))
    return "\n".join(out)
