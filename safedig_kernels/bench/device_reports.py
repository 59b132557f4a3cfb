"""Markdown for the two device scripts' JSON results, shared by the scripts themselves and by
the `benchmarks/RESULTS.md` generator, so a recorded run renders the same table wherever it
is shown:

- `benchmarks/gpu_check.py` ("kernel check"): GPU tests, the launch-setting sweep and the kernel
  timings per spec §5 shape, CUDA events around single calls;
- `benchmarks/pipeline_step.py` ("pipeline step"): ms per denoising step of the real FLUX.1-dev
  and SD3.5 Large architectures with and without steering.
"""
from __future__ import annotations

import json
from typing import Optional


def kind_of(doc: dict) -> str:
    """'kernel_check', 'pipeline_step' or 'bench' (the suite's pytest-benchmark layout)."""
    if "benchmarks" in doc:
        return "bench"
    if "ceilings" in doc and "rows" in doc:
        return "kernel_check"
    if "rows" in doc and "args" in doc:
        return "pipeline_step"
    raise ValueError("unknown results JSON: expected a bench suite, gpu_check or pipeline_step result")


def _ms(row: dict, key: str) -> Optional[float]:
    v = row.get(key)
    return v.get("median_ms") if isinstance(v, dict) else None


def _fmt(v: Optional[float], spec: str = ".3f") -> str:
    return "n/m" if v is None else format(v, spec)


def kernel_check_table(rows: list[dict]) -> str:
    """Per shape: GEMM alone, fused steer (best of default and swept settings), the baselines,
    and the spec §6 ratios; n/m where a provider was not measured."""
    head = ("| shape (N, d, F, k) | cuBLAS GEMM | fused steer (default) | fused steer (swept) | fused / GEMM "
            "| gated Repel 10% | eager ref | compiled ref | eager anchor | compiled anchor "
            "| compiled anchor / fused | CUDA graph |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} ({r['N']}, {r['d']}, {r['F']}, {r['k']}) | failed: {r['error'][:80]} |")
            continue
        default, swept = _ms(r, "fused_steer"), _ms(r, "fused_steer_tuned")
        fused = min(v for v in (default, swept) if v is not None) if (default or swept) else None
        gemm, ca = _ms(r, "gemm"), _ms(r, "compiled_anchor")
        lines.append(
            f"| {r['shape']} ({r['N']}, {r['d']}, {r['F']}, {r['k']}) | {_fmt(gemm)} | {_fmt(default)} | "
            f"{_fmt(swept)} | {_fmt(fused / gemm if fused and gemm else None, '.2f')} | "
            f"{_fmt(_ms(r, 'fused_steer_repel_gated10'))} | {_fmt(_ms(r, 'eager_reference'))} | "
            f"{_fmt(_ms(r, 'compiled_reference'))} | {_fmt(_ms(r, 'eager_anchor'))} | {_fmt(ca)} | "
            f"{_fmt(ca / fused if ca and fused else None, '.2f')} | {_fmt(_ms(r, 'fused_steer_cudagraph'))} |")
    return "\n".join(lines)


def _sweep_lines(sweep: dict) -> list[str]:
    out = []
    if sweep.get("gemm"):
        out.append("Encoder GEMM by pre-activation dtype (ms): " + ", ".join(
            f"{g['pre_dtype'].replace('torch.', '')} {_fmt(g.get('median_ms'))}" for g in sweep["gemm"]) + ".")
    sel = sorted((s for s in sweep.get("select", []) if "median_ms" in s), key=lambda s: s["median_ms"])
    if sel:
        out.append("Selection alone, fastest settings (ms): " + "; ".join(
            f"{s['algo']} chunk {s['chunk']} warps {s['num_warps']}"
            + (f" stages {s['load_stages']}" if s.get("load_stages", 1) > 1 else "")
            + f" {s['pre_dtype'].replace('torch.', '')}: "
            f"{s['median_ms']:.3f}" for s in sel[:4]) + f"; slowest swept {sel[-1]['median_ms']:.3f}.")
    small = sweep.get("select_small_n", [])
    if small:
        graphs = any("graph_ms" in s for s in small)
        out.append(f"Selection alone at small N (ms{', per call / CUDA-graph replay' if graphs else ''}): " + "; ".join(
            f"N={s['N']} {s['algo']} {_fmt(s.get('median_ms'))}"
            + (f" / {_fmt(s['graph_ms'])}" if "graph_ms" in s else "") for s in small) + ".")
    steer_small = sweep.get("steer_small_n", [])
    if steer_small:
        out.append("Fused steer at small N, \"row\" selection, one kernel or two (ms, per call / CUDA-graph replay): "
                   + "; ".join(f"N={s['N']} {'one' if s['one_launch'] else 'two'} {_fmt(s.get('median_ms'))}"
                               + (f" / {_fmt(s['graph_ms'])}" if "graph_ms" in s else "") for s in steer_small) + ".")
    for key, where in (("decode", ""), ("decode_16x", " at the FLUX 16x shape")):
        dec = sorted((s for s in sweep.get(key, []) if "median_ms" in s), key=lambda s: s["median_ms"])
        if dec:
            out.append(f"Fused decode alone{where}, every token steered (ms): " + "; ".join(
                f"[{s['K_BLOCK']}, {s['BLOCK_D']}] tile, {s['num_warps']} warps: {s['median_ms']:.3f}" for s in dec[:3])
                + (f"; slowest swept {dec[-1]['median_ms']:.3f}" if key == "decode_16x" else "") + ".")
    return out


def _algo_lines(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        algos = {k[len("fused_steer_"):]: _ms(r, k) for k in ("fused_steer_split", "fused_steer_row") if _ms(r, k)}
        if algos:
            out.append(f"{r['shape']}: " + ", ".join(f"{a} {v:.3f}" for a, v in algos.items()) + ".")
    return out


def _breakdown_lines(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        b = r.get("breakdown")
        if not isinstance(b, dict) or "kernels" not in b:
            continue
        parts = ", ".join(f"{k['name']} {k['ms']:.3f}" for k in b["kernels"])
        out.append(f"{r['shape']}: span {b['span_ms']:.3f} ms per call, {b['launches_per_call']:.0f} launches; "
                   f"{parts}; GPU idle between kernels {b['span_ms'] - b['busy_ms']:.3f}.")
    return out


def kernel_check_markdown(doc: dict, level: int = 2) -> str:
    env = doc["env"]
    h = "#" * level
    ceil = {k: round(v, 2) for k, v in doc.get("ceilings", {}).items()}
    lines = [f"{h} Kernel check: {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}",
             "",
             f"`benchmarks/gpu_check.py`. Ceilings measured in the same run: {json.dumps(ceil)}. Times in ms, CUDA "
             "events around single calls, median of the run's repetitions (warm L2), bf16. Fused steer and the "
             "baselines steer every token (beta 0.5, gamma 1, tau -1); \"gated Repel 10%\" is beta 0, gamma 1 with "
             "tau at the 90th percentile of h. \"swept\" uses the fastest launch settings of the sweep below. "
             "Event timing of one call includes host launch gaps when the GPU runs out of queued work "
             "(small N); the CUDA graph column replays the op without them.",
             "", kernel_check_table(doc["rows"]), ""]
    algos = _algo_lines(doc["rows"])
    if algos:
        lines += (["Fused steer by selection algorithm, default launch settings (ms):", ""]
                  + [f"- {s}" for s in algos] + [""])
    breakdown = _breakdown_lines(doc["rows"])
    if breakdown:
        lines += ["Where the default fused steer's time goes (profiler kernel records over 10 back-to-back "
                  "calls, ms per call):", ""] + [f"- {s}" for s in breakdown] + [""]
    if doc.get("sweep"):
        lines += ["Sweep at the FLUX 4x shape:", ""] + [f"- {s}" for s in _sweep_lines(doc["sweep"])] + [""]
    if doc.get("gpu_tests"):
        t = doc["gpu_tests"]
        lines.append(f"GPU tests in the same run: {t.get('summary', '')} (exit {t.get('returncode')}).")
    return "\n".join(lines) + "\n"


def pipeline_table(rows: list[dict]) -> str:
    lines = ["| model | compile | steering | ms/step p50 | p20-p80 | overhead vs none | gated | first call s |",
             "|---|---|---|---|---|---|---|---|"]
    base = {(r["model"], r["compile"]): r.get("ms_p50") for r in rows if r["steering"] == "none"}
    for r in rows:
        if "ms_p50" not in r:
            lines.append(f"| {r['model']} | {r['compile']} | {r['steering']} | {r.get('error') or r.get('skipped')} "
                         f"| | | | |")
            continue
        b = base.get((r["model"], r["compile"]))
        over = f"{(r['ms_p50'] / b - 1) * 100:+.1f} %" if b and r["steering"] != "none" else ""
        gated = f"{r['gated_fraction']:.2f}" if "gated_fraction" in r else ""
        lines.append(f"| {r['model']} | {r['compile']} | {r['steering']} | {r['ms_p50']:.2f} | "
                     f"{r['ms_p20']:.2f}-{r['ms_p80']:.2f} | {over} | {gated} | {r['first_call_s']:.1f} |")
    return "\n".join(lines)


def pipeline_markdown(doc: dict, level: int = 2) -> str:
    env = doc["env"]
    h = "#" * level
    sae = doc.get("sae", {})
    return "\n".join([
        f"{h} Pipeline step: {env['device']}, torch {env['torch']}, triton {env.get('triton')}, "
        f"diffusers {env.get('diffusers')}",
        "",
        "`benchmarks/pipeline_step.py`. One transformer call per denoising step at 1024², real FLUX.1-dev "
        "(batch 1, 4096 + 512 tokens) and SD3.5 Large (CFG batch 2, 4096 + 333 tokens) architectures with "
        f"random bf16 weights; 4 steered sites, SAE {sae.get('width', '?')} wide, k = {sae.get('k', '?')}, "
        "tau = -1 (every token steered). CUDA events, p50 of the run's repetitions. \"regional\" compiles every "
        "transformer block with torch.compile(fullgraph=True). Rows not started within the run's time budget "
        "say so.",
        "", pipeline_table(doc["rows"]), ""])
