"""The stages of `benchmarks/device_run.sh`, one stage per process, each adding
its part to one JSON file as it goes, so a stage cut short by its time cap (or a CUDA error that
poisons its process) still leaves what finished, and the stages after it still run.

    python benchmarks/device_stages.py --out DIR --stage NAME [--budget-s S] [--smoke]
    python benchmarks/device_stages.py --out DIR --finish NAME --rc RC   # after the process ended
    python benchmarks/device_stages.py --out DIR --summary               # the markdown, printed

Stages (STAGES, in run order):

- gpu_tests: every `gpu`-marked test under tests/ (pytest -m gpu; junit XML and counts);
- context_parallel: with 2 GPUs or more, a steered tiny FLUX under diffusers' context parallelism
  on 2 ranks over NCCL, Ulysses (fp32, native attention) and Ring (bf16, cuDNN attention, which
  returns the log-sum-exp Ring needs), against one GPU (`tests/_context_parallel.py`): largest
  output and telemetry differences, SafeDIG's all-reduces per generation and per read. Skipped
  with fewer GPUs (in a few seconds); `--smoke` runs Ulysses on gloo on the CPU;
- mm_addmm: the encoder GEMM `x @ W_enc` as torch.mm and as torch.addmm with the bias in the
  output dtype (the cuBLASLt bias epilogue) at every spec §5 shape, bf16 and fp16 (fp16 with fp32
  output where torch has `out_dtype`), median ms and addmm / mm;
- select_bias: the selection alone (`_topk_encode_fwd` with the GEMM replaced by a precomputed
  buffer) reading an fp32 bias per element on load (HAS_BIAS) against pre-activations that
  already hold it;
- decode: `_decode_steer` alone on precomputed codes, every token steered (beta 0.5 and beta 0)
  and beta 0 with ~10 % of tokens gated;
- fused: the op (`TopKSAE.steer`) with beta 0.5 and every token steered, and with beta 0 and tau
  at the 90th percentile of h (~10 % gated), against the cuBLAS GEMM at the same shape;
- backward: the ops' backward in both forms (`_launch.BACKWARDS`: the Triton kernels and the
  torch-op alternative, the reference's backward in the input dtype), each checked against the
  fp32 reference by the spec's rule before it is timed: x's gradient alone, every gradient, the
  encode and decode backward, forward + backward through autograd; the forward and the code
  recomputation beside them; also with a few features every token chooses (`gpu_check.bench_backward`);
- eager_n16: N = 16, host µs per call (back-to-back calls without a sync), wall ms per call,
  CUDA events per call, CUDA-graph replay, and the profiler's launches per call;
- spec_table: gpu_check.py's rows (fused steer, baselines, compiled baselines) at FLUX 4x and 16x
  and its spec §6 table, also written as `kernel_check.json` in gpu_check's layout (what
  benchmarks/results/ records);
- pipeline: benchmarks/pipeline_step.py (whole transformer step with and without steering).

`--smoke` runs every stage on the CPU: tiny shapes, fp32, the Triton kernels under
TRITON_INTERPRET=1, the GPU tests collected and skipped, the pipeline on tiny models. It checks
the script, not the speed.

Written to DIR: device_run.json (every stage), device_run.md (the summary), gpu_tests.xml and
gpu_tests.log, kernel_check.json, pipeline_step.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("gpu_tests", "context_parallel", "mm_addmm", "select_bias", "decode", "fused", "backward", "eager_n16",
          "spec_table", "pipeline")
JSON_NAME, MD_NAME = "device_run.json", "device_run.md"
# the spec §6 targets (docs/spec.md): (what, shape, must)
TARGETS = (
    ("fused steer ÷ GEMM, every token, β 0.5", "flux-4x", 1.4),
    ("fused steer ÷ GEMM, every token, β 0.5", "flux-16x", 1.25),
    ("fused steer ÷ GEMM, β 0, 10 % gated", "flux-4x", 1.1),
    ("fused steer ÷ GEMM, β 0, 10 % gated", "flux-16x", 1.1),
    ("fastest compiled baseline ÷ fused steer", "flux-4x", 4.0),
    ("fastest compiled baseline ÷ fused steer", "flux-16x", 4.0),
    ("eager fused steer at N = 16, ms per call", "latency-n16", 0.1),
)


def log(*a) -> None:
    print(*a, flush=True)


def short_error(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:240]}"


# -- the JSON file ---------------------------------------------------------------------------

def load(out: Path) -> dict:
    try:
        return json.loads((out / JSON_NAME).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"stages": {}}


def write(out: Path, doc: dict) -> None:
    """Atomically (a killed stage never leaves half a file), then the markdown beside it."""
    tmp = out / (JSON_NAME + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, out / JSON_NAME)
    (out / MD_NAME).write_text(render(doc))


def put_stage(out: Path, name: str, rec: dict, env: Optional[dict] = None) -> None:
    doc = load(out)
    doc.setdefault("stages", {})[name] = rec
    if env and not doc.get("env"):
        doc["env"] = env
    write(out, doc)


# -- measurement context -----------------------------------------------------------------------

class Ctx:
    def __init__(self, out: Path, smoke: bool, reps: int, budget_s: float):
        import torch

        gpu_check = _gpu_check()
        self.torch = torch
        self.gc = gpu_check
        self.out = out
        self.smoke = smoke
        self.dev = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
        self.cuda = self.dev == "cuda"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.reps = reps if not smoke else 3
        self.bench = gpu_check.timer(self.dev, self.reps, warm=3 if not smoke else 1)
        self.deadline = time.time() + budget_s

    def left(self) -> float:
        return self.deadline - time.time()

    def shapes(self, names: Optional[tuple] = None) -> list:
        if self.smoke:
            smoke = list(self.gc.SMOKE_SHAPES)
            return [s for s in smoke if not s[0].endswith("n16")] if names and "latency-n16" not in names else smoke
        return [s for s in self.gc.SHAPES if names is None or s[0] in names]

    def shape(self, name: str) -> tuple:
        if self.smoke:
            return self.gc.SMOKE_SHAPES[1] if name == "latency-n16" else self.gc.SMOKE_SHAPES[0]
        return next(s for s in self.gc.SHAPES if s[0] == name)

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def time(self, fn: Callable[[], object]) -> dict:
        try:
            return self.bench(fn)
        except Exception as e:  # a variant this torch / card cannot run: recorded, not fatal
            return {"error": short_error(e)}

    def sae(self, N: int, d: int, F: int, k: int, dtype=None, seed: int = 0):
        """A random SAE (5 % of features harmful) and x, generated on the device: seconds faster
        than the CPU generator at the 16x shape, and every stage builds its own."""
        import safedig_kernels as sk

        torch, dev = self.torch, self.dev
        dtype = dtype or self.dtype
        g = torch.Generator(device=dev).manual_seed(seed)
        W_enc = torch.randn(d, F, device=dev, generator=g) / d ** 0.5
        b_enc = torch.randn(F, device=dev, generator=g) * 0.01
        W_dec = torch.nn.functional.normalize(torch.randn(F, d, device=dev, generator=g), dim=1)
        b_dec = torch.randn(d, device=dev, generator=g) * 0.01
        harmful = torch.randperm(F, device=dev, generator=g)[: max(1, F // 20)].cpu().tolist()
        sae = sk.TopKSAE(*(t.to(dtype) for t in (W_enc, b_enc, W_dec, b_dec)), k=k,
                         metadata=sk.SAEMetadata(harmful_features=harmful))
        x = torch.randn(N, d, device=dev, generator=g).to(dtype)
        return sae, x

    def tau_quantile(self, sae, x, q: float = 0.9) -> float:
        sae.set_strengths(beta=0.5, gamma=1.0, tau=-1.0)
        _, h = sae.steer(x)
        return float(self.torch.nanquantile(h.float().flatten(), q))


def _gpu_check():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    import gpu_check

    return gpu_check


def dtype_name(t) -> str:
    return str(t).replace("torch.", "")


def ratio(a: dict, b: dict) -> Optional[float]:
    x, y = a.get("median_ms"), b.get("median_ms")
    return x / y if x and y else None


# -- stages --------------------------------------------------------------------------------------

def stage_gpu_tests(ctx: Ctx, rec: dict, save) -> None:
    if ctx.smoke:
        rec["note"] = "smoke: collected and run on the CPU, where every gpu test skips"
    rec.update(ctx.gc.run_gpu_tests(ctx.out, max(10, int(ctx.left()) - 25), "tests/"))
    if not rec.get("tests"):
        raise RuntimeError(f"no GPU test ran or was collected: {rec.get('summary')}")
    if rec.get("collection_errors"):
        rec["status"] = "failed"
    if rec.get("failed"):
        rec["status"] = "failed"


def stage_mm_addmm(ctx: Ctx, rec: dict, save) -> None:
    torch = ctx.torch
    from safedig_kernels._library import mm_has_out_dtype

    out_dtype = ctx.cuda and mm_has_out_dtype()
    variants = [("fp32", torch.float32, None)]  # (label, input dtype, output dtype; None: the input's)
    if ctx.cuda:
        variants = [("bf16", torch.bfloat16, None)]
        variants += ([("bf16->fp32", torch.bfloat16, torch.float32), ("fp16->fp32", torch.float16, torch.float32)]
                     if out_dtype else [("fp16", torch.float16, None)])
    rec["out_dtype_supported"] = bool(out_dtype)
    rows = rec["rows"] = []
    for name, N, d, F, k in ctx.shapes():
        g = torch.Generator(device=ctx.dev).manual_seed(0)
        x32 = torch.randn(N, d, device=ctx.dev, generator=g)
        W32 = torch.randn(d, F, device=ctx.dev, generator=g) / d ** 0.5
        b32 = torch.randn(F, device=ctx.dev, generator=g) * 0.01
        for label, dt, odt in variants:
            x, W = x32.to(dt), W32.to(dt)
            bias = b32.to(odt or dt)
            if odt is None:
                mm, addmm = (lambda: torch.mm(x, W)), (lambda: torch.addmm(bias, x, W))
            else:
                mm = lambda: torch.mm(x, W, out_dtype=odt)  # noqa: E731
                addmm = lambda: torch.addmm(bias, x, W, out_dtype=odt)  # noqa: E731
            row = {"shape": name, "N": N, "d": d, "F": F, "variant": label, "in": dtype_name(dt),
                   "out": dtype_name(odt or dt), "mm": ctx.time(mm), "addmm": ctx.time(addmm)}
            row["addmm_over_mm"] = ratio(row["addmm"], row["mm"])
            if "error" not in row["addmm"] and "error" not in row["mm"]:
                # the epilogue adds the same bias: check it did, against mm + bias
                ref = mm().float() + bias.float()
                row["addmm_max_abs_diff"] = float((addmm().float() - ref).abs().max())
            rows.append(row)
            log("mm/addmm", row)
        save()


def stage_select_bias(ctx: Ctx, rec: dict, save) -> None:
    torch = ctx.torch
    from safedig_kernels.ops import _launch

    te = importlib.import_module("safedig_kernels.ops.topk_encode")  # the module (ops exports a function so named)

    # the default launch, then each selection algorithm forced (smoke: the default alone)
    algos = [None] + ([] if ctx.smoke else list(getattr(_launch, "SELECT_ALGOS", ())))
    rows = rec["rows"] = []
    shapes = ctx.shapes(("flux-4x", "flux-16x", "latency-n16"))
    for name, N, d, F, k in shapes[:1] if ctx.smoke else shapes:  # smoke: one shape (the interpreter is slow)
        if ctx.left() < 10:
            rows.append({"shape": name, "skipped": "stage budget spent"})
            continue
        sae, x = ctx.sae(N, d, F, k)
        bias = sae.enc_bias().contiguous()
        pre_dtype = _launch.pre_dtype_for(x.dtype, x.device)
        real_pre, real_bias = te._encoder_gemm(x, sae.W_enc, bias, pre_dtype)
        acc = torch.mm(x.float(), sae.W_enc.float())
        # the same products in the buffer's dtype, without the bias (added per element on load)
        # and with it (added before the one rounding, as an addmm epilogue would)
        variants = {"bias_on_load": (acc.to(pre_dtype), bias), "bias_in_pre": ((acc + bias).to(pre_dtype), None)}
        del acc
        base = {"shape": name, "N": N, "d": d, "F": F, "k": k, "pre_dtype": dtype_name(pre_dtype),
                "pre_MB": N * F * torch.finfo(pre_dtype).bits / 8 / 2 ** 20,
                "real_gemm_adds_bias_on_load": real_bias is not None,
                "gemm": ctx.time(lambda: te._encoder_gemm(x, sae.W_enc, bias, pre_dtype))}
        del real_pre
        row = dict(base)
        codes = {}
        for algo in algos:
            launch = None if algo is None else _launch.LaunchConfig(select_algo=algo)
            label = algo or "default"
            for vname, (pre, b) in variants.items():
                calls = [0]

                def fake_gemm(x2, *args, pre=pre, b=b, **kwargs):
                    calls[0] += 1
                    start = (x2.data_ptr() - x.data_ptr()) // (x.stride(0) * x.element_size())
                    return pre[start:start + x2.shape[0]], b

                original = te._encoder_gemm
                te._encoder_gemm = fake_gemm
                try:
                    call = lambda: te._topk_encode_fwd(x, sae.W_enc, bias, k, launch)  # noqa: E731
                    out = call()
                    if calls[0] == 0:
                        raise RuntimeError("_topk_encode_fwd no longer calls _encoder_gemm: the selection cannot be "
                                           "timed alone this way")
                    codes[(label, vname)] = out
                    row[f"{label}_{vname}"] = ctx.time(call)
                except Exception as e:
                    row[f"{label}_{vname}"] = {"error": short_error(e)}
                finally:
                    te._encoder_gemm = original
            row[f"{label}_on_load_over_in_pre"] = ratio(row[f"{label}_bias_on_load"], row[f"{label}_bias_in_pre"])
            pair = [codes.get((label, v)) for v in variants]
            if all(p is not None for p in pair):  # same choices, up to the bias's rounding
                row[f"{label}_idx_agreement"] = float((pair[0][1] == pair[1][1]).float().mean())
        rows.append(row)
        log("select", row)
        save()


def stage_decode(ctx: Ctx, rec: dict, save) -> None:
    torch = ctx.torch
    from safedig_kernels.ops import _launch

    st = importlib.import_module("safedig_kernels.ops.steer")  # the module (ops exports a function so named)

    rows = rec["rows"] = []
    for name, N, d, F, k in ctx.shapes()[:1] if ctx.smoke else ctx.shapes():  # smoke: the interpreter is slow
        if ctx.left() < 10:
            rows.append({"shape": name, "skipped": "stage budget spent"})
            continue
        sae, x = ctx.sae(N, d, F, k)
        vals, idx = sae.encode(x)
        vals, idx = vals.float().contiguous(), idx.to(torch.int32).contiguous()
        h0 = (vals * sae.harmful_mask[idx.long()]).sum(-1)
        tau90 = float(torch.quantile(h0.float(), 0.9))
        y, h = torch.empty_like(x), torch.empty(N, device=x.device)
        cfg = _launch.decode_config(d, k)
        row = {"shape": name, "N": N, "d": d, "F": F, "k": k, "config": dict(cfg)}
        for label, beta, gamma, tau in (("beta0.5_all", 0.5, 1.0, -1.0), ("beta0_all", 0.0, 1.0, -1.0),
                                        ("beta0_gated10", 0.0, 1.0, tau90)):
            b, g, t = (torch.tensor(v, device=x.device, dtype=torch.float32) for v in (beta, gamma, tau))

            def call(b=b, g=g, t=t):
                st._decode_steer(y, h, x[:, None], vals, idx, sae.harmful_mask, sae.W_dec, sae.b_dec, b, g, t, k, cfg)

            row[label] = ctx.time(call)
            if "error" not in row[label]:
                row[label]["gated_fraction"] = float((h > t).float().mean())
        rows.append(row)
        log("decode", row)
        save()


def stage_fused(ctx: Ctx, rec: dict, save) -> None:
    torch = ctx.torch
    from safedig_kernels._library import use_triton_for
    from safedig_kernels.ops import _launch

    rows = rec["rows"] = []
    for name, N, d, F, k in ctx.shapes():
        if ctx.left() < 10:
            rows.append({"shape": name, "skipped": "stage budget spent"})
            continue
        sae, x = ctx.sae(N, d, F, k)
        row = {"shape": name, "N": N, "d": d, "F": F, "k": k, "dtype": dtype_name(x.dtype),
               "impl": "triton" if use_triton_for(x) else "reference (no CUDA)"}
        row["gemm"] = ctx.time(lambda: torch.mm(x, sae.W_enc))
        tau90 = ctx.tau_quantile(sae, x)
        default = _launch.DEFAULT
        # the last: bf16's bias added by the GEMM (addmm epilogue) instead of on load, the choice
        # `_launch.bias_in_gemm` leaves off until measured
        for label, beta, tau, launch in (
                ("steer_all_beta0.5", 0.5, -1.0, default), ("repel_gated10_beta0", 0.0, tau90, default),
                ("steer_all_beta0.5_bias_in_gemm", 0.5, -1.0, dataclasses.replace(default, bias_in_gemm=True)),
                ("steer_all_beta0.5_tuned", 0.5, -1.0, "tune"),
                ("steer_all_beta0.5_one_kernel", 0.5, -1.0, dataclasses.replace(default, one_launch=True)),
                ("steer_all_beta0.5_persistent", 0.5, -1.0, dataclasses.replace(default, persistent=True))):
            sae.set_strengths(beta=beta, gamma=1.0, tau=tau)
            if launch == "tune":  # SAFEDIG_TUNE: the warm-up call times the selection variants (ops/_tuning.py)
                os.environ["SAFEDIG_TUNE"], launch = "1", default
            _launch.DEFAULT = launch
            try:
                row[label] = ctx.time(lambda: sae.steer(x))
                if "error" not in row[label]:
                    _, h = sae.steer(x)
                    row[label]["gated_fraction"] = float((h > tau).float().mean())
                    row[label]["over_gemm"] = ratio(row[label], row["gemm"])
            finally:
                _launch.DEFAULT = default
                os.environ.pop("SAFEDIG_TUNE", None)
        rows.append(row)
        log("fused", row)
        ctx.sync()
        save()


# (shape name, hot features): the FLUX 4x shape first, then with 4 features every token chooses
BACKWARD_CASES = (("flux-4x", 0), ("flux-4x", 4), ("sd35l-4x", 0), ("flux-16x", 0), ("latency-n16", 0))
SMOKE_BACKWARD_SHAPE = ("smoke-bwd", 16, 8, 32, 3)  # the interpreter runs every program of the grid in turn


def stage_backward(ctx: Ctx, rec: dict, save) -> None:
    rows = rec["rows"] = []
    cases = [(SMOKE_BACKWARD_SHAPE, 2)] if ctx.smoke else [(ctx.shape(name), hot) for name, hot in BACKWARD_CASES]
    for shape, hot in cases:
        if ctx.left() < 15:
            rows.append({"shape": shape[0], "hot_features": hot, "skipped": "stage budget spent"})
            continue
        try:
            row = ctx.gc.bench_backward(ctx.dev, ctx.bench, shape, ctx.dtype, hot)
        except Exception as e:
            row = {"shape": shape[0], "hot_features": hot, "error": short_error(e)}
        rows.append(row)
        log("backward", row)
        ctx.sync()
        save()
    if any("error" in (r.get("check") or {}) or r.get("error") for r in rows):
        rec["status"] = "failed"
    if any(not c.get("ok", True) for r in rows for c in (r.get("check") or {}).values() if isinstance(c, dict)):
        rec["status"] = "failed"  # a form broke the tolerance: its numbers were not taken


def stage_eager_n16(ctx: Ctx, rec: dict, save) -> None:
    torch = ctx.torch
    name, N, d, F, k = ctx.shape("latency-n16")
    sae, x = ctx.sae(N, d, F, k)
    sae.set_strengths(beta=0.5, gamma=1.0, tau=-1.0)
    rec.update({"shape": name, "N": N, "d": d, "F": F, "k": k})
    op_args = (x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.harmful_mask, sae.beta, sae.gamma, sae.tau, sae.k,
               sae.enc_bias())
    calls = 20 if ctx.smoke else 2000
    for label, call in (("sae_steer", lambda: sae.steer(x)), ("op", lambda: torch.ops.safedig.steer(*op_args))):
        entry = rec[label] = {}
        try:
            for _ in range(20 if not ctx.smoke else 2):
                call()
            ctx.sync()
            host, wall = [], []
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(calls):
                    call()
                t1 = time.perf_counter()
                ctx.sync()
                t2 = time.perf_counter()
                host.append((t1 - t0) / calls * 1e6)
                wall.append((t2 - t0) / calls * 1e3)
            entry.update(host_us_per_call=min(host), wall_ms_per_call=min(wall), calls=calls)
        except Exception as e:
            entry["error"] = short_error(e)
            continue
        entry["events"] = ctx.time(call)  # one call between two events: launch gaps included
        if ctx.cuda:
            try:
                entry["graph_replay"] = ctx.bench(ctx.gc.graphed(call))
            except Exception as e:
                entry["graph_replay"] = {"error": short_error(e)}
        else:
            entry["graph_replay"] = {"skipped": "no CUDA device"}
        log("eager N=16", label, entry)
        save()
    try:
        rec["breakdown"] = ctx.gc.kernel_breakdown(ctx.dev, lambda: sae.steer(x))
    except Exception as e:
        rec["breakdown"] = {"error": short_error(e)}


def stage_spec_table(ctx: Ctx, rec: dict, save) -> None:
    gc = ctx.gc
    doc = {"env": gc.env_info(ctx.dev)}
    doc["ceilings"] = gc.ceilings(ctx.dev, ctx.bench)
    rows = doc["rows"] = []
    names = ("flux-4x", "flux-16x")
    shapes = gc.SMOKE_SHAPES[:1] if ctx.smoke else [s for s in gc.SHAPES if s[0] in names]
    for shape in shapes:
        if ctx.left() < 20:
            rows.append({"shape": shape[0], "N": shape[1], "d": shape[2], "F": shape[3], "k": shape[4],
                         "error": "not measured: stage budget spent"})
            continue
        try:
            rows.append(gc.bench_shape(ctx.dev, ctx.bench, shape, ctx.dtype, compiled=True))
        except Exception as e:
            rows.append({"shape": shape[0], "N": shape[1], "d": shape[2], "F": shape[3], "k": shape[4],
                         "error": short_error(e)})
        tests = load(ctx.out)["stages"].get("gpu_tests")
        if tests:
            doc["gpu_tests"] = {k: tests.get(k) for k in ("returncode", "summary", "failed")}
        (ctx.out / "kernel_check.json").write_text(json.dumps(doc, indent=1, default=str))
        rec["rows"], rec["ceilings"] = rows, doc["ceilings"]
        rec["table_md"] = _kernel_check_table(rows)
        save()


def _kernel_check_table(rows: list) -> str:
    from safedig_kernels.bench.device_reports import kernel_check_table

    return kernel_check_table(json.loads(json.dumps(rows, default=str)))


def stage_pipeline(ctx: Ctx, rec: dict, save) -> None:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        rec["status"] = "skipped"
        rec["reason"] = "diffusers is not installed: carry its wheels (WHEELS=.whl, see the script's header)"
        return
    with tempfile.TemporaryDirectory() as tmp:
        budget = max(10, int(ctx.left()) - 35)
        cmd = [sys.executable, str(ROOT / "benchmarks" / "pipeline_step.py"), "--out", tmp, "--budget-s", str(budget)]
        if ctx.smoke:
            cmd += ["--tiny", "--no-compile", "--reps", "2", "--warmup", "0"]
        rec["command"] = " ".join(cmd[1:])
        log("+", rec["command"])
        p = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
        stopped = None
        try:
            rec["returncode"] = p.wait(timeout=max(10, ctx.left() - 5))
        except subprocess.TimeoutExpired:
            rec["returncode"] = "timeout"
        except _Stopped as e:
            stopped = e
        finally:
            ctx.gc.os_killpg(p.pid)
            p.wait()
        src = Path(tmp) / "pipeline_step.json"
        if src.exists():  # written after every row: what finished
            shutil.copy(src, ctx.out / "pipeline_step.json")
            doc = json.loads(src.read_text())
        if stopped is not None:
            if src.exists():
                rec.update(rows=doc.get("rows", []), overhead=pipeline_overhead(doc.get("rows", [])))
            raise stopped
        if not src.exists():
            raise RuntimeError(f"pipeline_step.py wrote no JSON (exit {rec['returncode']})")
    rec.update(env=doc.get("env"), rows=doc.get("rows", []), table_md=doc.get("table_md"),
               overhead=pipeline_overhead(doc.get("rows", [])))
    if any("error" in r for r in rec["rows"]):
        rec["status"] = "failed"


# (split, group backend, attention backend, dtype, largest output difference allowed against one GPU)
CONTEXT_PARALLEL_RUNS = (("ulysses", "nccl", None, "float32", 1e-4),
                         ("ring", "nccl", "_native_cudnn", "bfloat16", 5e-2))


def stage_context_parallel(ctx: Ctx, rec: dict, save) -> None:
    torch = ctx.torch
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not ctx.smoke and gpus < 2:
        rec.update(status="skipped", reason=f"needs 2 GPUs or more, found {gpus}")
        return
    try:
        import diffusers  # noqa: F401
    except ImportError:
        rec.update(status="skipped", reason="diffusers is not installed: carry its wheels (WHEELS=.whl)")
        return
    sys.path.insert(0, str(ROOT / "tests"))
    import _context_parallel as cp

    from safedig_kernels.integrations.diffusers import apply_safedig

    runs = (("ulysses", "gloo", None, "float32", 1e-5),) if ctx.smoke else CONTEXT_PARALLEL_RUNS
    rec["rows"] = []
    for mode, backend, attention, dtype, allowed in runs:
        row = {"mode": mode, "backend": backend, "attention": attention or "native", "dtype": dtype}
        rec["rows"].append(row)
        if ctx.left() < 30:
            row["skipped"] = "stage budget spent"
            continue
        try:
            device = "cuda:0" if backend == "nccl" else "cpu"
            pipe = cp.steered_pipe(device, getattr(torch, dtype), attention)
            reference = cp._to_cpu(cp.runs(pipe, apply_safedig(pipe, cp.config())))
            with tempfile.TemporaryDirectory() as tmp:
                args = ["--backend", backend, "--mode", mode, "--dtype", dtype]
                args += ["--attention", attention] if attention else []
                seen, failed = cp.launch(Path(tmp), max(10.0, ctx.left() - 10), 2, *args)
            if failed or any(s is None for s in seen):
                raise RuntimeError(f"a rank failed: {failed[-600:]}")
            for rank, s in enumerate(seen):
                row[f"rank{rank}"] = dict(cp.differences(s, reference),
                                          all_reduce_per_generation=s["all_reduce per generation"],
                                          all_reduce_per_read=s["all_reduce per read"])
            ok = all(row[f"rank{r}"]["outputs"] <= allowed and row[f"rank{r}"]["records_match"]
                     and row[f"rank{r}"]["all_reduce_per_generation"] == 0
                     and row[f"rank{r}"]["all_reduce_per_read"] == 1 for r in range(2))
            row["allowed_output_difference"] = allowed
            row["ok"] = ok
            if not ok:
                rec["status"] = "failed"
        except Exception as e:  # recorded; the next run still goes
            row["error"] = short_error(e)
        save()


def pipeline_overhead(rows: list) -> list:
    """Per (model, compile): steered step ÷ unsteered step - 1, for each steering mode."""
    base = {(r["model"], r["compile"]): r.get("ms_p50") for r in rows if r.get("steering") == "none"}
    out = []
    for r in rows:
        b = base.get((r["model"], r["compile"]))
        if r.get("steering") != "none" and b and r.get("ms_p50"):
            out.append({"model": r["model"], "compile": r["compile"], "steering": r["steering"],
                        "overhead_pct": 100 * (r["ms_p50"] / b - 1)})
    return out


RUNNERS = {"gpu_tests": stage_gpu_tests, "context_parallel": stage_context_parallel, "mm_addmm": stage_mm_addmm,
           "select_bias": stage_select_bias,
           "decode": stage_decode, "fused": stage_fused, "backward": stage_backward, "eager_n16": stage_eager_n16,
           "spec_table": stage_spec_table, "pipeline": stage_pipeline}
assert tuple(RUNNERS) == STAGES


def env_record(ctx: Ctx) -> dict:
    env = ctx.gc.env_info(ctx.dev)
    torch = ctx.torch
    env.update(smoke=ctx.smoke, cuda=torch.version.cuda)
    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(card=props.name, sm_count=props.multi_processor_count,
                   memory_GiB=round(props.total_memory / 2 ** 30), capability=f"{props.major}.{props.minor}")
        try:
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=15).stdout.strip()
        except Exception as e:
            env["nvidia_smi"] = short_error(e)
    else:
        env["card"] = "cpu (smoke)" if ctx.smoke else "cpu"
    return env


def count_leaves(rec) -> tuple[int, int]:
    """(numbers, "error" entries) anywhere in a stage's record."""
    if isinstance(rec, dict):
        pairs = [count_leaves(v) for k, v in rec.items() if k not in ("numbers", "errors_inside", "seconds",
                                                                         "budget_s", "returncode")]
        n, e = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
        return n, e + (1 if "error" in rec else 0)
    if isinstance(rec, list):
        pairs = [count_leaves(v) for v in rec]
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    return (1 if isinstance(rec, (int, float)) and not isinstance(rec, bool) else 0), 0


class _Stopped(BaseException):  # not an Exception: the stages' per-measurement handlers let it through
    pass


def _on_term(signum, frame):
    raise _Stopped(f"stopped by signal {signum} (the stage's time cap)")


def run_stage(name: str, out: Path, smoke: bool, reps: int, budget_s: float) -> int:
    signal.signal(signal.SIGTERM, _on_term)
    t0 = time.time()
    rec: dict = {"status": "running", "started": _dt.datetime.now(_dt.timezone.utc).strftime("%H:%M:%S UTC"),
                 "budget_s": round(budget_s)}
    put_stage(out, name, rec)
    env: dict = {}

    def save() -> None:
        rec["seconds"] = round(time.time() - t0, 1)
        put_stage(out, name, rec, env)

    try:
        ctx = Ctx(out, smoke, reps, budget_s)
        env.update(env_record(ctx))
        RUNNERS[name](ctx, rec, save)
        rec["numbers"], rec["errors_inside"] = count_leaves(rec)
        if rec["status"] == "running":
            rec["status"] = "ok" if not rec["errors_inside"] else "partial"
        if rec["status"] in ("ok", "partial") and not rec["numbers"]:
            raise RuntimeError("the stage measured nothing")
    except _Stopped as e:
        rec.update(status="timeout", reason=str(e))
    except BaseException as e:
        rec.update(status="error", error=short_error(e), traceback=traceback.format_exc()[-3000:])
        traceback.print_exc()
    save()
    log(f"stage {name}: {rec['status']} in {rec['seconds']} s")
    return 0 if rec["status"] in ("ok", "skipped") else 1


def finish(out: Path, name: str, rc: int, seconds: Optional[float]) -> None:
    """After the stage's process ended: a stage still "running" was killed (its cap, or a crash)."""
    doc = load(out)
    rec = doc.setdefault("stages", {}).get(name)
    if rec is None:
        rec = doc["stages"][name] = {"status": "skipped" if rc == -1 else "error"}
        if rc == -1:
            rec["reason"] = "not started: the run's time budget was spent"
    elif rec.get("status") == "running":
        rec["status"] = "timeout" if rc in (124, 137, 143) else "error"
        rec["reason"] = f"the process ended with exit status {rc} before the stage finished"
    if rc != -1:
        rec["exit_status"] = rc
    if seconds is not None:
        rec["wall_s"] = seconds
    write(out, doc)


# -- the summary --------------------------------------------------------------------------------

def _f(v, spec: str = ".3f") -> str:
    return "—" if v is None else format(v, spec)


def _ms(d) -> Optional[float]:
    return d.get("median_ms") if isinstance(d, dict) else None


def targets(doc: dict) -> list:
    """The spec §6 targets (docs/spec.md) as rows: (what, shape, measured, must, met)."""
    st = doc.get("stages", {})
    smoke = doc.get("env", {}).get("smoke")
    fused = {r["shape"]: r for r in st.get("fused", {}).get("rows", []) if "shape" in r}
    spec = {r["shape"]: r for r in st.get("spec_table", {}).get("rows", []) if "shape" in r}
    rows = []
    for what, shape, must in TARGETS:
        src = shape if not smoke else ("smoke-n16" if shape == "latency-n16" else "smoke")
        v = None
        if "every token" in what:
            v = (fused.get(src, {}).get("steer_all_beta0.5") or {}).get("over_gemm")
        elif "gated" in what:
            v = (fused.get(src, {}).get("repel_gated10_beta0") or {}).get("over_gemm")
        elif "compiled" in what:
            r = spec.get(src, {})
            comp = [m for m in (_ms(r.get("compiled_reference")), _ms(r.get("compiled_anchor"))) if m]
            f = _ms(r.get("fused_steer"))
            v = min(comp) / f if comp and f else None
        else:
            v = (st.get("eager_n16", {}).get("sae_steer") or {}).get("wall_ms_per_call")
        met = None if v is None else (v >= must if "compiled" in what else v <= must)
        rows.append((what, src, v, must, met))
    return rows


def render(doc: dict) -> str:
    env, st = doc.get("env", {}), doc.get("stages", {})
    L = [f"## device_run: {env.get('card', '?')}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
         f"CUDA {env.get('cuda')}, {env.get('date', '?')}" + (" (SMOKE: CPU, tiny shapes)" if env.get("smoke") else ""),
         "", "| stage | status | s | note |", "|---|---|---:|---|"]
    for name in STAGES:
        r = st.get(name, {})
        note = r.get("error") or r.get("reason") or r.get("summary") or ""
        L.append(f"| {name} | {r.get('status', 'not run')} | {_f(r.get('seconds'), '.0f')} | {note[:300]} |")
    mm = st.get("mm_addmm", {}).get("rows", [])
    if mm:
        L += ["", "GEMM x @ W_enc, ms (addmm: bias in the output dtype, cuBLASLt epilogue):", "",
              "| shape | in→out | mm | addmm | addmm/mm |", "|---|---|---:|---:|---:|"]
        L += [f"| {r['shape']} | {r['in']}→{r['out']} | {_f(_ms(r['mm']))} | {_f(_ms(r['addmm']))} | "
              f"{_f(r.get('addmm_over_mm'), '.3f')} |" for r in mm]
    sel = [r for r in st.get("select_bias", {}).get("rows", []) if "gemm" in r]
    if sel:
        L += ["", "Selection alone (GEMM precomputed), ms: bias added per element on load vs already in the buffer:",
              "", "| shape | pre | GEMM | algo | on load | in pre | ratio | idx agree |",
              "|---|---|---:|---|---:|---:|---:|---:|"]
        for r in sel:
            for algo in ("default", "split", "row"):
                if f"{algo}_bias_on_load" in r:
                    L.append(f"| {r['shape']} | {r['pre_dtype']} | {_f(_ms(r['gemm']))} | {algo} | "
                             f"{_f(_ms(r[f'{algo}_bias_on_load']))} | {_f(_ms(r[f'{algo}_bias_in_pre']))} | "
                             f"{_f(r.get(f'{algo}_on_load_over_in_pre'), '.2f')} | "
                             f"{_f(r.get(f'{algo}_idx_agreement'), '.4f')} |")
    dec = [r for r in st.get("decode", {}).get("rows", []) if "N" in r]
    if dec:
        L += ["", "Decode alone (`_decode_steer` on precomputed codes), ms:", "",
              "| shape | β 0.5 all | β 0 all | β 0, gated (fraction) |", "|---|---:|---:|---:|"]
        L += [f"| {r['shape']} | {_f(_ms(r.get('beta0.5_all')))} | {_f(_ms(r.get('beta0_all')))} | "
              f"{_f(_ms(r.get('beta0_gated10')))} ({_f((r.get('beta0_gated10') or {}).get('gated_fraction'), '.2f')}) |"
              for r in dec]
    fu = [r for r in st.get("fused", {}).get("rows", []) if "gemm" in r]
    if fu:
        L += ["", "Fused op (`TopKSAE.steer`) against the GEMM, ms:", "",
              "| shape | GEMM | β 0.5 all | ÷ GEMM | β 0 gated | gated | ÷ GEMM |",
              "|---|---:|---:|---:|---:|---:|---:|"]
        for r in fu:
            a, b = r.get("steer_all_beta0.5") or {}, r.get("repel_gated10_beta0") or {}
            L.append(f"| {r['shape']} | {_f(_ms(r['gemm']))} | {_f(_ms(a))} | {_f(a.get('over_gemm'), '.2f')} | "
                     f"{_f(_ms(b))} | {_f(b.get('gated_fraction'), '.2f')} | {_f(b.get('over_gemm'), '.2f')} |")
        variants = ("bias_in_gemm", "tuned", "one_kernel", "persistent")
        L += ["", "Variants waiting for these numbers (β 0.5, every token steered), ms (÷ GEMM): "
              "`LaunchConfig(bias_in_gemm=True)`, `SAFEDIG_TUNE=1`, `LaunchConfig(one_launch=True)`, "
              "`LaunchConfig(persistent=True)`:",
              "", "| shape | default | " + " | ".join(variants) + " |", "|---|---:|" + "---:|" * len(variants)]
        for r in fu:
            cells = [r.get("steer_all_beta0.5")] + [r.get(f"steer_all_beta0.5_{v}") for v in variants]
            L.append(f"| {r['shape']} | " + " | ".join(
                f"{_f(_ms(c or {}))} ({_f((c or {}).get('over_gemm'), '.2f')})" for c in cells) + " |")
    bw = [r for r in st.get("backward", {}).get("rows", []) if "forward_steer" in r]
    if bw:
        L += ["", "Backward (steer), ms: triton kernels / torch ops (reference in the input dtype), torch ÷ triton; "
              "check = worst error ÷ bound:", "",
              "| shape | hot | fwd | recompute | dx only | all grads | fwd+bwd (dx) | encode bwd | decode bwd "
              "| check |",
              "|---|---:|---:|---:|---|---|---|---|---|---|"]
        for r in bw:
            def pair(what, r=r):
                a, b = _ms(r.get(f"triton_{what}")), _ms(r.get(f"torch_{what}"))
                return f"{_f(a)} / {_f(b)} ({_f(r.get(f'torch_over_triton_{what}'), '.2f')})"
            chk = r.get("check") or {}
            verdict = ", ".join(f"{f} {_f(c.get('worst_error_over_bound'), '.2f')}" for f, c in chk.items()
                                if isinstance(c, dict) and "ok" in c) or chk.get("error", "—")
            L.append(f"| {r['shape']} | {r.get('hot_features', 0)} | {_f(_ms(r['forward_steer']))} | "
                     f"{_f(_ms(r.get('recompute_codes')))} | {pair('steer_bwd_input')} | {pair('steer_bwd_all')} | "
                     f"{pair('fwd_bwd_input')} | {pair('encode_bwd')} | {pair('decode_bwd')} | {verdict} |")
    e = st.get("eager_n16", {})
    if e.get("sae_steer") or e.get("op"):
        L += ["", f"Eager steer at N = {e.get('N')}: host µs per call (no sync), wall ms per call, CUDA events "
              "per call, CUDA-graph replay (ms):", "", "| call | host µs | wall ms | events ms | graph ms |",
              "|---|---:|---:|---:|---:|"]
        for label in ("sae_steer", "op"):
            r = e.get(label) or {}
            L.append(f"| {label} | {_f(r.get('host_us_per_call'), '.1f')} | {_f(r.get('wall_ms_per_call'))} | "
                     f"{_f(_ms(r.get('events')))} | {_f(_ms(r.get('graph_replay')))} |" + (
                         f" {r['error']}" if "error" in r else ""))
        b = e.get("breakdown") or {}
        if "launches_per_call" in b:
            L.append(f"\nLaunches per call {b['launches_per_call']:.0f}: "
                     + ", ".join(f"{k['name']} {k['ms']:.3f}" for k in b.get("kernels", [])[:6]))
    sp = st.get("spec_table", {})
    if sp.get("table_md"):
        L += ["", "gpu_check rows (kernel_check.json):", "", sp["table_md"]]
    pl = st.get("pipeline", {})
    if pl.get("overhead"):
        L += ["", "Whole step, steered ÷ unsteered - 1 (4 sites; target ≤ 2 %): " + "; ".join(
            f"{o['model']} {o['compile']} {o['steering']} {o['overhead_pct']:+.1f} %" for o in pl["overhead"])]
    cpr = [r for r in st.get("context_parallel", {}).get("rows", []) if "rank0" in r]
    if cpr:
        L += ["", "Context parallel, 2 ranks against one device (largest differences; SafeDIG all-reduces):", "",
              "| split | group | attention | dtype | output | telemetry | steering moved | per generation | per read |",
              "|---|---|---|---|---:|---:|---:|---:|---:|"]
        for r in cpr:
            worst = max((r[f"rank{i}"] for i in range(2)), key=lambda d: d["outputs"])
            L.append(f"| {r['mode']} | {r['backend']} | {r['attention']} | {r['dtype']} | {worst['outputs']:.2e} | "
                     f"{worst['telemetry']:.2e} | {worst['steering_moved']:.3f} | "
                     f"{worst['all_reduce_per_generation']} | {worst['all_reduce_per_read']} |")
    L += ["", "Spec §6 targets (docs/spec.md):", "", "| target | shape | measured | must | met |",
          "|---|---|---:|---:|---|"]
    for what, shape, v, must, met in targets(doc):
        verdict = "—" if met is None else ("yes" if met else "**no**")
        L.append(f"| {what} | {shape} | {_f(v, '.3f')} | {must} | {verdict} |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--stage", choices=STAGES)
    ap.add_argument("--finish", choices=STAGES, help="record how the stage's process ended (--rc)")
    ap.add_argument("--rc", type=int, default=0, help="with --finish: exit status; -1: never started")
    ap.add_argument("--wall-s", type=float, default=None)
    ap.add_argument("--summary", action="store_true", help="print the markdown summary of DIR/device_run.json")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, fp32, Triton interpreted")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=120.0, help="the stage's own time budget")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.finish:
        finish(out, a.finish, a.rc, a.wall_s)
        return 0
    if a.summary:
        doc = load(out)
        write(out, doc)
        print(render(doc), flush=True)
        return 0
    if not a.stage:
        ap.error("one of --stage, --finish, --summary")
    if a.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    return run_stage(a.stage, out, a.smoke, a.reps, a.budget_s)


if __name__ == "__main__":
    sys.exit(main())
