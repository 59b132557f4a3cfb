"""Whole-step cost of SafeDIG steering: ms per denoising step (one transformer call) at 1024².

FLUX.1-dev (batch 1, 4096 image + 512 text tokens) and SD3.5 Large (CFG batch 2, 4096 image +
333 text tokens) at their real architectures with random bf16 weights, as in
benchmarks/anchors/eager_baseline*.py. Steering: 4 sites, SAE width 4 d, k = 32, 64 harmful
features, tau = -1 so every token is gated (the worst case for the fused decode), telemetry on.
`--tiny` runs the same code on tiny models with 2 sites each, in fp32 on the CPU.

    steering:  none | reference (SafeDIGConfig(use_fused_ops=False)) | fused (torch.ops.safedig.steer)
    compile:   eager | regional torch.compile(fullgraph=True) of every transformer block
               (FLUX: compile_repeated_blocks; SD3 has no _repeated_blocks, so each block's .compile())

Timed with CUDA events around single calls after warm-up; p50 with p20/p80. Timed calls of
compiled models run under error_on_recompile, so a recompile fails the row instead of being
timed. Eager rows of all models run first, then compiled rows; with `--budget-s` exceeded,
remaining rows are skipped and say so. Results are written after every row:

    python benchmarks/pipeline_step.py --out results/          # GPU, about 3 minutes on an H200
    python benchmarks/pipeline_step.py --tiny --out /tmp/x      # CPU, tiny models, seconds
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import safedig_kernels as sk  # noqa: E402
from safedig_kernels.bench.device_reports import pipeline_table  # noqa: E402
from safedig_kernels.bench.timing import single_call_times_ms  # noqa: E402
from safedig_kernels.integrations.diffusers import SafeDIGConfig, SiteConfig, apply_safedig, remove_safedig  # noqa: E402

STEERING = ("none", "fused", "reference")


@dataclass
class ModelCase:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.nn.Module], dict]
    sites: list[tuple[str, str]]   # (site, stream)
    tokens: str


def _flux_case(tiny: bool, device: str, dtype: torch.dtype) -> ModelCase:
    from diffusers import FluxTransformer2DModel

    if tiny:
        cfg = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=4, attention_head_dim=8,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[2, 2, 4])
        n_img, n_txt, sites = 64, 16, [1, 3]
    else:  # FLUX.1-dev
        cfg = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                   axes_dims_rope=[16, 56, 56])
        n_img, n_txt, sites = 4096, 512, [5, 15, 25, 35]

    def build():
        return _random_model(FluxTransformer2DModel, dict(guidance_embeds=True, **cfg), device, dtype)

    def inputs(tr):
        c = tr.config
        side = math.isqrt(n_img)
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3)
        return dict(hidden_states=torch.randn(1, n_img, c.in_channels, device=device, dtype=dtype),
                    encoder_hidden_states=torch.randn(1, n_txt, c.joint_attention_dim, device=device, dtype=dtype),
                    pooled_projections=torch.randn(1, c.pooled_projection_dim, device=device, dtype=dtype),
                    timestep=torch.tensor([0.5], device=device, dtype=dtype),  # sigma, as FluxPipeline passes it
                    img_ids=img_ids.to(device, dtype), txt_ids=torch.zeros(n_txt, 3, device=device, dtype=dtype),
                    guidance=torch.tensor([3.5], device=device, dtype=dtype), return_dict=False)

    # Single-stream blocks, both streams: the whole joint sequence (spec §5's N = 4608 shape).
    return ModelCase("FLUX.1-dev", build, inputs, [(f"single_transformer_blocks.{i}", "both") for i in sites],
                     f"1 x ({n_img} + {n_txt})")


def _sd35_case(tiny: bool, device: str, dtype: torch.dtype) -> ModelCase:
    from diffusers import SD3Transformer2DModel

    if tiny:
        cfg = dict(sample_size=8, patch_size=1, in_channels=4, num_layers=4, attention_head_dim=8,
                   num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                   pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16, qk_norm="rms_norm")
        side, n_txt, sites = 8, 16, [1, 3]  # 3: the last block, which has no text stream
    else:  # SD3.5 Large
        cfg = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                   num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
        side, n_txt, sites = 128, 333, [9, 19, 28, 37]

    def build():
        return _random_model(SD3Transformer2DModel, cfg, device, dtype)

    def inputs(tr):
        c = tr.config
        return dict(hidden_states=torch.randn(2, c.in_channels, side, side, device=device, dtype=dtype),
                    encoder_hidden_states=torch.randn(2, n_txt, c.joint_attention_dim, device=device, dtype=dtype),
                    pooled_projections=torch.randn(2, c.pooled_projection_dim, device=device, dtype=dtype),
                    timestep=torch.tensor([500.0, 500.0], device=device, dtype=dtype), return_dict=False)

    n_img = (side // cfg["patch_size"]) ** 2
    # Joint blocks, image stream (the last block, 37, has no text stream).
    return ModelCase("SD3.5-Large", build, inputs, [(f"transformer_blocks.{i}", "image") for i in sites],
                     f"2 x ({n_img} + {n_txt})")


def _random_model(cls, cfg: dict, device: str, dtype: torch.dtype) -> torch.nn.Module:
    # Initialising on the device in the target dtype: seconds for 12B parameters, not minutes.
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return cls(**cfg).eval()
    finally:
        torch.set_default_dtype(previous)


def _random_sae(d: int, k: int, seed: int, device: str, dtype: torch.dtype) -> sk.TopKSAE:
    """SAE of width 4 d with 64 harmful features, generated on the device."""
    F = 4 * d
    g = torch.Generator(device=device).manual_seed(seed)
    W_enc = torch.randn(d, F, device=device, generator=g, dtype=torch.float32) / math.sqrt(d)
    W_dec = torch.nn.functional.normalize(torch.randn(F, d, device=device, generator=g, dtype=torch.float32), dim=1)
    b_enc = torch.randn(F, device=device, generator=g, dtype=torch.float32) * 0.01
    b_dec = torch.randn(d, device=device, generator=g, dtype=torch.float32) * 0.01
    harmful = torch.randperm(F, device=device, generator=g)[: min(64, F // 4)].tolist()
    meta = sk.SAEMetadata(harmful_features=harmful)
    return sk.TopKSAE(*(t.to(dtype) for t in (W_enc, b_enc, W_dec, b_dec)), k=k, metadata=meta)


class Timer:
    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, fn: Callable[[], object], reps: int) -> list[float]:
        return single_call_times_ms(fn, reps, self.cuda)


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _compile_blocks(tr: torch.nn.Module, backend: str) -> None:
    if getattr(tr, "_repeated_blocks", None):
        tr.compile_repeated_blocks(fullgraph=True, backend=backend)
    else:
        for block in tr.transformer_blocks:
            block.compile(fullgraph=True, backend=backend)


def _run_row(case: ModelCase, tr, inputs: dict, steering: str, compiled: bool, args, timer: Timer,
             saes: list, k: int) -> dict:
    row = {"model": case.name, "compile": "regional" if compiled else "eager", "steering": steering,
           "sites": [s for s, _ in case.sites] if steering != "none" else [], "tokens": case.tokens}
    handle = None
    if steering != "none":
        sites = [SiteConfig(f"{site}:{stream}", sae, beta=0.5, gamma=1.0, tau=-1.0)
                 for (site, stream), sae in zip(case.sites, saes)]
        handle = apply_safedig(tr, SafeDIGConfig(sites, use_fused_ops=steering == "fused"))

    def step():
        with torch.no_grad():
            return tr(**inputs)

    try:
        timer.sync()
        t0 = time.perf_counter()
        step()
        timer.sync()
        row["first_call_s"] = time.perf_counter() - t0
        timer.time_ms(step, max(0, args.warmup - 1))
        if handle is not None:
            handle.reset_telemetry()
        if compiled:
            with torch._dynamo.config.patch(error_on_recompile=True):
                ms = timer.time_ms(step, args.reps)
        else:
            ms = timer.time_ms(step, args.reps)
        row.update(ms_p50=statistics.median(ms), ms_p20=_quantile(ms, 0.2), ms_p80=_quantile(ms, 0.8), reps=len(ms))
        if handle is not None:
            tele = handle.telemetry()
            recs = [r for rows in tele.values() for r in rows]
            row["gated_fraction"] = sum(r["gated_fraction"] for r in recs) / max(1, len(recs))
            row["steering_active"] = all(r["active"] for r in recs) and len(recs) == len(tele) * len(ms)
    except Exception as e:  # a failing row is reported, not fatal: the other rows still mean something
        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        traceback.print_exc()
    finally:
        if handle is not None:
            remove_safedig(tr)
    return row


def _env(device: str) -> dict:
    import diffusers

    env = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for pipeline_step.json and pipeline_step.md")
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU, fp32: checks the code path")
    p.add_argument("--models", default="flux,sd35", help="comma-separated subset of flux,sd35")
    p.add_argument("--steering", default=",".join(STEERING), help=f"comma-separated subset of {','.join(STEERING)}")
    p.add_argument("--no-compile", action="store_true", help="eager rows only")
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor; aot_eager with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls after the first (default 3; 1 with --tiny)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per row (default 10; 3 with --tiny)")
    p.add_argument("--budget-s", type=float, default=150.0, help="skip rows not started within this many seconds")
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.tiny:
        print("no CUDA device: running the --tiny configuration", flush=True)
        args.tiny = True
    dtype = torch.float32 if args.tiny else torch.bfloat16
    args.backend = args.backend or ("aot_eager" if args.tiny else "inductor")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.reps = args.reps if args.reps is not None else (3 if args.tiny else 10)
    # Each hooked block is its own graph (its forward is a distinct hook chain); keep them all compiled.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)

    makers = {"flux": _flux_case, "sd35": _sd35_case}
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    steerings = [s.strip() for s in args.steering.split(",") if s.strip()]
    for m in models:
        if m not in makers:
            p.error(f"--models: unknown model {m!r}; choose from {sorted(makers)}")
    for s in steerings:
        if s not in STEERING:
            p.error(f"--steering: unknown mode {s!r}; choose from {STEERING}")
    os.makedirs(args.out, exist_ok=True)
    result = {"env": _env(device), "args": vars(args), "sae": {"width": "4 d", "k": 32 if not args.tiny else 4,
              "harmful": 64, "beta": 0.5, "gamma": 1.0, "tau": -1.0}, "rows": []}
    print(json.dumps(result["env"]), flush=True)

    def save() -> None:
        result["elapsed_s"] = time.perf_counter() - t_start
        result["table_md"] = pipeline_table(result["rows"])
        with open(os.path.join(args.out, "pipeline_step.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(args.out, "pipeline_step.md"), "w") as f:
            f.write(f"{result['env']}\n\n{result['table_md']}\n")

    timer = Timer(device)
    phases = [False] if args.no_compile else [False, True]
    for compiled in phases:  # all eager rows first: they are cheap and anchor the compiled ones
        for m in models:
            if compiled:
                torch._dynamo.reset()
            case = makers[m](args.tiny, device, dtype)
            tr = case.build()
            inputs = case.inputs(tr)
            d = tr.config.num_attention_heads * tr.config.attention_head_dim
            k = 4 if args.tiny else 32
            saes = [_random_sae(d, k, seed=i, device=device, dtype=dtype) for i in range(len(case.sites))]
            if compiled:
                _compile_blocks(tr, args.backend)
            for steering in steerings:
                if time.perf_counter() - t_start > args.budget_s:
                    row = {"model": case.name, "compile": "regional" if compiled else "eager", "steering": steering,
                           "skipped": f"budget of {args.budget_s:.0f} s spent"}
                else:
                    row = _run_row(case, tr, inputs, steering, compiled, args, timer, saes, k)
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
                save()
            del tr, saes, inputs
            if device == "cuda":
                torch.cuda.empty_cache()
    save()
    print(result["table_md"])
    return 1 if any("error" in r for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
