"""What steering adds per denoising step of FLUX.1-dev at 1024² on 1, 2, 4 and 8 GPUs under
diffusers' context parallelism: COMPUTED, not measured.

    python benchmarks/scale_out_costs.py        # prints the table docs/scale-out.md holds

Inputs: the one-GPU step times measured on an H200 (benchmarks/RESULTS.md, the pipeline table:
FLUX.1-dev eager, no steering and fused steering at 4 sites, SAE 4·d wide, k = 32, every token
steered), read from that file; FLUX's shape (docs/spec.md §4: 19 double + 38 single blocks,
width 3072, 4096 image + 512 text tokens, batch 1). Model: every rank holds T / P tokens, so
its compute, steering's included, is the one-GPU time / P (ideal: small per-rank GEMMs run less
efficiently); the bytes are what diffusers' context parallelism moves (hooks/context_parallel.py
and attention_dispatch.py, diffusers 0.42.1), in bf16. Steering moves nothing per step; a
telemetry read moves one all-reduce of 4 float64 per site and call.
"""
from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
TOKENS, WIDTH, ATTENTION_LAYERS, OUT_CHANNELS = 4096 + 512, 3072, 19 + 38, 64
SITES, F, BYTES = 4, 4 * 3072, 2  # the measured configuration; bf16
DEGREES = (1, 2, 4, 8)


def measured_step_ms(results: Path = RESULTS) -> tuple[float, float]:
    """(no steering, fused steering) ms per step, FLUX.1-dev eager, from the pipeline table."""
    found = {}
    for line in results.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\|\s*FLUX\.1-dev\s*\|\s*eager\s*\|\s*(none|fused)\s*\|\s*([0-9.]+)\s*\|", line)
        if m:
            found[m.group(1)] = float(m.group(2))
    if set(found) != {"none", "fused"}:
        raise ValueError(f"{results}: no FLUX.1-dev eager rows for both 'none' and 'fused' in the pipeline table")
    return found["none"], found["fused"]


def rows(results: Path = RESULTS) -> list[dict]:
    plain, steered = measured_step_ms(results)
    out = []
    for p in DEGREES:
        local = TOKENS / p
        share = (p - 1) / p
        # Ulysses: all-to-all of q, k, v before attention and of its output after, [T/P, d] each.
        ulysses = ATTENTION_LAYERS * 4 * local * WIDTH * BYTES * share
        # Ring (rotate_method="allgather"): every rank gathers the other ranks' k and v.
        ring = ATTENTION_LAYERS * 2 * local * WIDTH * BYTES * (p - 1)
        gather = TOKENS * OUT_CHANNELS * BYTES * share  # proj_out's output, gathered once per step
        out.append({"gpus": p, "tokens": local, "steer_gflop": SITES * 2 * local * WIDTH * F / 1e9,
                    "steer_ms": (steered - plain) / p, "model_ms": plain / p,
                    "ulysses_mb": (ulysses + gather) / 1e6, "ring_mb": (ring + gather) / 1e6})
    return out


def table(results: Path = RESULTS) -> str:
    lines = ["| GPUs | tokens per GPU | steering GFLOP per GPU (4 encoder GEMMs) | steering ms per GPU | "
             "model ms per GPU | steering ÷ model | MB per GPU, Ulysses | MB per GPU, Ring | MB, steering |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows(results):
        lines.append(f"| {r['gpus']} | {r['tokens']:.0f} | {r['steer_gflop']:.0f} | {r['steer_ms']:.2f} | "
                     f"{r['model_ms']:.1f} | {100 * r['steer_ms'] / r['model_ms']:.1f} % | {r['ulysses_mb']:.0f} | "
                     f"{r['ring_mb']:.0f} | 0 |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
