"""One command for a lent GPU: GPU tests, device ceilings, a small tuning sweep, the kernel
benchmark over the spec §5 shapes, ending with one table of the spec §6 ratios, and the ops'
backward (Triton kernels against the torch-op alternative, checked before timed; in the JSON).

    python benchmarks/gpu_check.py --out DIR            # on a CUDA machine, a few minutes
    python benchmarks/gpu_check.py --smoke --out DIR    # CPU: tiny shapes, checks the script

Timings: CUDA events around single calls, median of `--reps` after warm-up (warm L2, as the
spec §5 anchors), every provider of a shape in the same process. Only measured numbers are
written: `DIR/gpu_check.json` and `DIR/gpu_check.md`.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import safedig_kernels as sk  # noqa: E402
from safedig_kernels import reference  # noqa: E402
from safedig_kernels.bench.device_reports import kernel_check_markdown  # noqa: E402
from safedig_kernels.bench.providers import steer_anchor  # noqa: E402
from safedig_kernels.bench.timing import single_call_times_ms  # noqa: E402

SHAPES = [  # (name, N, d, F, k): spec §5
    ("flux-4x", 4608, 3072, 12288, 32),
    ("flux-16x", 4608, 3072, 49152, 64),
    ("flux-4x-b2", 9216, 3072, 12288, 32),
    ("sd35l-4x", 4250, 2432, 9728, 32),
    ("latency-n16", 16, 3072, 12288, 32),
]
TARGET_SHAPES = ("flux-4x", "flux-16x")  # spec §6 ratios; compiled baselines only here (compile time)
SMOKE_SHAPES = [("smoke", 64, 32, 256, 8), ("smoke-n16", 16, 32, 256, 8)]


def log(*a):
    print(*a, flush=True)


def env_info(dev: str) -> dict:
    info = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
            "python": platform.python_version(), "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        info["git"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True, timeout=10).stdout.strip() or None
    except Exception:
        info["git"] = None
    return info


def timer(dev: str, reps: int, warm: int = 3):
    def bench(fn) -> dict:
        for _ in range(warm):
            fn()
        ts = sorted(single_call_times_ms(fn, reps, dev == "cuda"))
        return {"median_ms": statistics.median(ts), "p20_ms": ts[int(0.2 * (len(ts) - 1))],
                "p80_ms": ts[int(0.8 * (len(ts) - 1))]}
    return bench


def graphed(fn):
    """`fn` captured once in a CUDA graph (after warm-up calls on a side stream, which compile
    the kernels and settle the allocator); returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def per_call_and_graphed(bench, call) -> dict:
    """`call` timed per call (host launch cost included) and replayed from a CUDA graph (without)."""
    entry = dict(bench(call))
    try:
        entry["graph_ms"] = bench(graphed(call))["median_ms"]
    except Exception as e:
        entry["graph_error"] = repr(e)[:200]
    return entry


def _kernel_label(name: str) -> str:
    if name.startswith("_"):
        return name.split("(")[0]  # our Triton kernels
    low = name.lower()
    if "gemm" in low or "gemv" in low or low.startswith(("sm90", "sm80", "cutlass", "nvjet")):
        return "cuBLAS " + ("GEMV" if "gemv" in low else "GEMM")
    if "memset" in low:
        return "memset"
    return name[:48]


def kernel_breakdown(dev: str, fn, reps: int = 10) -> dict:
    """Where one call's device time goes: the profiler's kernel records over `reps` back-to-back
    calls, summed per kernel, against the span from the first kernel's start to the last one's
    end (span - sum = time the GPU sat idle between kernels: launch gaps). On the CPU (smoke
    runs) it lists CPU ops instead, which only checks the plumbing."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    if dev == "cuda":
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CUDA] if dev == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        for _ in range(reps):
            fn()
        if dev == "cuda":
            torch.cuda.synchronize()
    want = DeviceType.CUDA if dev == "cuda" else DeviceType.CPU
    events = [e for e in prof.events() if e.device_type == want and (dev == "cuda" or not e.cpu_parent)]
    if not events:
        return {"error": "the profiler recorded no kernels"}
    per: dict = {}
    for e in events:
        label = _kernel_label(e.name)
        per[label] = per.get(label, 0.0) + (e.time_range.end - e.time_range.start) / 1e3 / reps
    span = (max(e.time_range.end for e in events) - min(e.time_range.start for e in events)) / 1e3 / reps
    busy = sum(per.values())
    return {"span_ms": span, "busy_ms": busy, "launches_per_call": len(events) / reps,
            "kernels": [{"name": n, "ms": t} for n, t in sorted(per.items(), key=lambda kv: -kv[1])]}


def ceilings(dev: str, bench) -> dict:
    if dev != "cuda":
        return {}
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=dev).random_()
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))["median_ms"]
    A = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    B = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    mm_ms = bench(lambda: A @ B)["median_ms"]
    src = dst = A = B = None
    return {"copy_TBps": 2 * n / copy_ms / 1e9, "bf16_mm_TFLOPs": 2 * 8192 ** 3 / mm_ms / 1e9}


def gpu_test_targets(target: str = "tests/") -> list[str]:
    """The pytest paths of `target` (space-separated, each relative to the repository root),
    refusing loudly any that does not exist: a moved test file must not turn into a run of
    nothing. The GPU tests themselves are chosen by the `gpu` marker (tests/conftest.py), not
    by file name, so `tests/` collects every one of them wherever they live."""
    targets = target.split()
    missing = [t for t in targets if not (ROOT / t.split("::")[0]).exists()]
    if not targets or missing:
        raise FileNotFoundError(f"GPU test paths not found under {ROOT}: {missing or target!r}")
    return targets


def run_gpu_tests(out: Path, timeout: int, target: str = "tests/") -> dict:
    """Every `gpu`-marked test under `target`, junit XML to `out/gpu_tests.xml`, the log's tail to
    `out/gpu_tests.log`. At `timeout` seconds pytest gets SIGINT, so it still writes the XML of
    what finished (then SIGKILL to its process group 20 s later)."""
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", "gpu",
           "--continue-on-collection-errors", *gpu_test_targets(target), "--junitxml", str(out / "gpu_tests.xml")]
    try:  # parallel workers: most of the wall time is Triton/inductor compilation, on the CPU
        import xdist  # noqa: F401

        cmd += ["-n", str(max(1, min(12, (os.cpu_count() or 2) - 2)))]
    except ImportError:
        pass
    log("+", " ".join(cmd))
    t = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        text, _ = p.communicate(timeout=timeout)
        rc = p.returncode
    except BaseException as e:  # the time cap, or this process being stopped: let pytest write its XML
        p.send_signal(signal.SIGINT)
        try:
            text, _ = p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os_killpg(p.pid)
            text, _ = p.communicate()
        rc = "timeout"
        if not isinstance(e, subprocess.TimeoutExpired):
            (out / "gpu_tests.log").write_text((text or "")[-20000:])
            raise
    finally:
        os_killpg(p.pid)  # xdist workers left behind hold GPU memory
    text = text or ""
    (out / "gpu_tests.log").write_text(text[-20000:])
    log(text[-2500:])
    junit = summarize_junit(out / "gpu_tests.xml")
    if "tests" not in junit:  # no XML: count what the verbose log says finished
        junit.update(count_log_outcomes(text))
    return {"returncode": rc, "seconds": round(time.time() - t, 1), "command": " ".join(cmd[1:]), **junit}


def os_killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def count_log_outcomes(text: str) -> dict:
    """Per outcome, the test ids pytest -v printed as finished (when no XML was written)."""
    seen: dict = {}
    for m in re.finditer(r"(?:(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED))|(?:(PASSED|FAILED|ERROR|SKIPPED) (\S+::\S+))",
                         text):
        node, outcome = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
        seen.setdefault(node, outcome)
    counts = {o: sum(1 for v in seen.values() if v == o) for o in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    failed = sorted(n for n, v in seen.items() if v in ("FAILED", "ERROR"))
    return {"tests": len(seen), "passed": counts["PASSED"], "failed_count": counts["FAILED"],
            "errors": counts["ERROR"], "skipped": counts["SKIPPED"], "failed": failed,
            "summary": f"from the log (no XML): {len(seen)} finished, {counts['PASSED']} passed, "
                       f"{len(failed)} failed or errors, {counts['SKIPPED']} skipped"}


def summarize_junit(path: Path) -> dict:
    """Counts and failing test ids from pytest's junit XML: complete even when the process was
    stopped after writing it, unlike the tail of its log. Collection errors (a test module that
    failed to import: its GPU tests never ran) are counted apart from test errors."""
    import xml.etree.ElementTree as ET

    if not path.exists() or path.stat().st_size == 0:
        return {"summary": "no junit XML written (pytest did not finish)"}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    cases = [c for s in suites for c in s.iter("testcase")]
    collection, failed, skipped, passed = set(), [], 0, 0
    for c in cases:
        bad = c.find("failure") if c.find("failure") is not None else c.find("error")
        name = f"{c.get('classname')}::{c.get('name')}" if c.get("classname") else c.get("name")
        if bad is not None and "collection failure" in (bad.get("message") or ""):
            collection.add(c.get("name"))
        elif bad is not None:
            failed.append(name)
        elif c.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
    seconds = sum(float(s.get("time", 0) or 0) for s in suites)
    total = passed + len(failed) + skipped
    summary = (f"{total} tests: {passed} passed, {len(failed)} failed, {skipped} skipped in {seconds:.1f} s"
               + (f"; failed: {', '.join(failed)}" if failed else "")
               + (f"; COLLECTION ERRORS in {', '.join(sorted(collection))}" if collection else ""))
    return {"summary": summary, "tests": total, "passed": passed, "failed_count": len(failed), "skipped": skipped,
            "errors": len(collection), "failed": failed, "collection_errors": sorted(collection)}


def make_sae(N, d, Fdim, k, dev, dtype, harmful_frac=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    sae = sk.random_sae(d, Fdim, k,
                        harmful=torch.randperm(Fdim, generator=g)[: max(1, int(harmful_frac * Fdim))].tolist(),
                        seed=seed, dtype=dtype, device=dev)
    x = torch.randn(N, d, generator=g).to(dev, dtype)
    return sae, x


def tuning_sweep(dev, bench, shape, dtype) -> dict:
    """Stage timings: the encoder GEMM per pre-activation dtype, both selection algorithms over
    launch settings, and the decode kernel over tile shapes."""
    from safedig_kernels.ops._launch import LaunchConfig, select_config
    from safedig_kernels.ops.topk_encode import _encoder_gemm, _select, _SelectScratch

    _, N, d, Fdim, k = shape
    sae, x = make_sae(N, d, Fdim, k, dev, dtype)
    sae.set_strengths(beta=0.5, gamma=1.0, tau=-1.0)
    bias = sae.enc_bias()
    res = {"gemm": [], "select": [], "decode": []}
    res["gemv_bias"] = bench(lambda: sk.ops.encoder_bias(sae.W_enc, sae.b_enc, sae.b_dec))
    settings = [(dtype, algo, chunk, warps, 1) for algo in ("split", "row") for chunk in (1024, 2048, 4096)
                for warps in (4, 8)]
    # one or two warps per program: reductions stay in shuffles (no barriers), more programs resident
    settings += [(dtype, algo, chunk, warps, 1) for algo in ("split", "row")
                 for chunk, warps in ((512, 1), (1024, 1), (1024, 2), (2048, 2))]
    # "row" with its chunk loads software-pipelined (the next chunks in flight while one is reduced)
    settings += [(dtype, "row", chunk, warps, stages)
                 for chunk, warps, stages in ((1024, 4, 2), (1024, 4, 3), (2048, 4, 2), (1024, 2, 3), (512, 1, 3))]
    settings += [(torch.float32, "split", 2048, 4, 1), (torch.float32, "row", 2048, 4, 1)]
    pres = {}
    for pre_dtype, algo, chunk, warps, stages in settings:
        if pre_dtype not in pres:
            try:
                pres[pre_dtype] = _encoder_gemm(x, sae.W_enc, bias, pre_dtype)
                res["gemm"].append({"pre_dtype": str(pre_dtype),
                                    **bench(lambda: _encoder_gemm(x, sae.W_enc, bias, pre_dtype))})
            except Exception as e:
                res["gemm"].append({"pre_dtype": str(pre_dtype), "error": repr(e)[:200]})
                pres[pre_dtype] = None
            log("gemm", res["gemm"][-1])
        if pres[pre_dtype] is None:
            continue
        pre, bias_on_load = pres[pre_dtype]
        cfg = select_config(Fdim, k, LaunchConfig(chunk=chunk, select_warps=warps, select_stages=stages))
        vals = torch.empty(N, k, device=dev)
        idx = torch.empty(N, k, device=dev, dtype=torch.int32)
        scratch = _SelectScratch(N, cfg, x.device, algo)
        try:
            t = bench(lambda: _select(vals, idx, scratch, pre, bias_on_load, k, cfg, algo))
        except Exception as e:  # a setting the compiler rejects (registers, shared memory)
            t = {"error": repr(e)[:200]}
        res["select"].append({"pre_dtype": str(pre_dtype), "algo": algo, "chunk": chunk, "num_warps": warps,
                              "load_stages": stages, **t})
        log("select", res["select"][-1])
    del pres
    # the small-N end and the crossover: which algorithm wins with few rows to spread over the
    # GPU, timed per call (host launch cost included) and replayed from a CUDA graph (without)
    for n_small in (16, 256, 1024, 2304):
        xs = x[:n_small]
        pre_s, bias_s = _encoder_gemm(xs, sae.W_enc, bias, dtype)
        for algo in ("split", "row"):
            cfg = select_config(Fdim, k)
            scratch = _SelectScratch(n_small, cfg, x.device, algo)
            vs = torch.empty(n_small, k, device=dev)
            ids = torch.empty(n_small, k, device=dev, dtype=torch.int32)
            entry = {"N": n_small, "algo": algo,
                     **per_call_and_graphed(bench, lambda: _select(vs, ids, scratch, pre_s, bias_s, k, cfg, algo))}
            res.setdefault("select_small_n", []).append(entry)
            log("select small N", entry)
    # the whole steer at small N: one kernel (select + decode per token) against two
    from safedig_kernels.ops.steer import _steer_fwd

    sae.set_strengths(beta=0.5, gamma=1.0, tau=-1.0)
    for n_small in (16, 64, 256):
        xs = x[:n_small]
        for one in (True, False):
            entry = {"N": n_small, "one_launch": one, **per_call_and_graphed(
                bench, lambda: _steer_fwd(xs, sae.W_enc, sae.W_dec, sae.b_dec, sae.harmful_mask, sae.beta, sae.gamma,
                                          sae.tau, k, bias, LaunchConfig(select_algo="row", one_launch=one)))}
            res.setdefault("steer_small_n", []).append(entry)
            log("steer small N", entry)
    res["decode"] = decode_sweep(bench, sae, x, k, ((1024, 8, 4), (1024, 4, 4), (512, 8, 2), (512, 8, 4), (2048, 4, 4),
                                                    (1024, 16, 4)))
    return res


def decode_sweep(bench, sae, x, k, tiles) -> list:
    """The fused decode alone (every token steered) per [K_BLOCK, BLOCK_D] tile and warps."""
    from safedig_kernels.ops._launch import LaunchConfig, decode_config
    from safedig_kernels.ops.steer import _decode_steer

    N, d = x.shape
    vals, idx = sae.encode(x)
    y = torch.empty_like(x)
    h = torch.empty(N, device=x.device)
    rows = []
    for block_d, k_block, warps in tiles:
        cfg = decode_config(d, k, LaunchConfig(decode_block_d=block_d, decode_k_block=k_block, decode_warps=warps))
        try:
            t = bench(lambda: _decode_steer(y, h, x[:, None], vals, idx, sae.harmful_mask, sae.W_dec, sae.b_dec,
                                            sae.beta, sae.gamma, sae.tau, k, cfg))
        except Exception as e:
            t = {"error": repr(e)[:200]}
        rows.append({"BLOCK_D": block_d, "K_BLOCK": k_block, "num_warps": warps, **t})
        log("decode", d, k, rows[-1])
    return rows


def decode_sweep_16x(dev, bench, shape, dtype) -> list:
    """At 16x the decoder (302 MB) outgrows L2: narrower d-blocks make each pass over the
    tokens touch a slice of W_dec small enough to stay cached (the grid runs d-block-major)."""
    _, N, d, Fdim, k = shape
    sae, x = make_sae(N, d, Fdim, k, dev, dtype)
    sae.set_strengths(beta=0.5, gamma=1.0, tau=-1.0)
    return decode_sweep(bench, sae, x, k, ((1024, 8, 4), (512, 8, 4), (512, 8, 2), (256, 8, 2), (256, 16, 2)))


def best(rows):
    ok = [r for r in rows if "median_ms" in r]
    return min(ok, key=lambda r: r["median_ms"]) if ok else None


def time_tuned(dev, bench, row: dict, dtype, tuned) -> dict:
    """The fused steer at `row`'s shape with the sweep's fastest launch settings (a LaunchConfig)."""
    from safedig_kernels.ops.steer import _steer_fwd

    sae, x = make_sae(row["N"], row["d"], row["F"], row["k"], dev, dtype)
    sae.set_strengths(beta=0.5, gamma=1.0, tau=-1.0)
    try:
        return bench(lambda: _steer_fwd(x, sae.W_enc, sae.W_dec, sae.b_dec, sae.harmful_mask, sae.beta, sae.gamma,
                                        sae.tau, row["k"], sae.enc_bias(), tuned))
    except Exception as e:
        return {"error": repr(e)[:300]}


def bench_shape(dev, bench, shape, dtype, compiled: bool) -> dict:
    from safedig_kernels.ops._launch import SELECT_ALGOS, LaunchConfig
    from safedig_kernels.ops.steer import _steer_fwd

    name, N, d, Fdim, k = shape
    sae, x = make_sae(N, d, Fdim, k, dev, dtype)
    sae.set_strengths(beta=0.5, gamma=1.0, tau=-1.0)  # every token steered: the full decode
    row = {"shape": name, "N": N, "d": d, "F": Fdim, "k": k, "dtype": str(dtype).replace("torch.", "")}
    W_enc, b_enc, W_dec, b_dec, harm = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.harmful_mask
    b, g, t = sae.beta, sae.gamma, sae.tau

    def record(key, fn):
        try:
            row[key] = bench(fn)
        except Exception as e:
            row[key] = {"error": repr(e)[:300]}
        log(f"  {name:12s} {key:22s} {row[key]}")

    record("gemm", lambda: torch.mm(x, W_enc))
    record("gemm_with_bias", lambda: (x - b_dec) @ W_enc + b_enc)
    record("fused_steer", lambda: sae.steer(x))
    try:
        row["breakdown"] = kernel_breakdown(dev, lambda: sae.steer(x))
    except Exception as e:
        row["breakdown"] = {"error": repr(e)[:300]}
    log(f"  {name:12s} breakdown", row["breakdown"])
    for algo in SELECT_ALGOS:  # which selection wins here: the sweep runs at the FLUX 4x shape only
        record(f"fused_steer_{algo}",
               lambda: _steer_fwd(x, W_enc, W_dec, b_dec, harm, b, g, t, k, sae.enc_bias(),
                                  LaunchConfig(select_algo=algo)))
    record("fused_topk_encode", lambda: sae.encode(x))
    # gated pure Repel: tau at the 90th percentile of h, so about 10 % of tokens are steered
    _, h = sae.steer(x)
    tau90 = torch.nanquantile(h.float(), 0.9)
    record("fused_steer_repel_gated10", lambda: sae.steer(x, beta=0.0, gamma=1.0, tau=tau90))
    record("eager_reference", lambda: reference.steer(x, W_enc, b_enc, W_dec, b_dec, harm, b, g, t, k, upcast=False))
    record("eager_anchor", lambda: steer_anchor(x, W_enc, b_enc, W_dec, b_dec, harm, b, g, k))
    if compiled:
        ref_c = torch.compile(lambda xx: reference.steer(xx, W_enc, b_enc, W_dec, b_dec, harm, b, g, t, k,
                                                         upcast=False))
        anchor_c = torch.compile(lambda xx: steer_anchor(xx, W_enc, b_enc, W_dec, b_dec, harm, b, g, k))
        record("compiled_reference", lambda: ref_c(x))
        record("compiled_anchor", lambda: anchor_c(x))
    if dev == "cuda" and N <= 64:
        # launch overhead dominates at small N: also time a CUDA-graph replay of the op
        static = x.clone()
        record("fused_steer_cudagraph", graphed(lambda: sae.steer(static)))
    # correctness of what was timed: the fused output against the input-dtype reference
    y_f, _ = sae.steer(x)
    y_r, _ = reference.steer(x, W_enc, b_enc, W_dec, b_dec, harm, b, g, t, k)
    row["max_abs_diff_vs_fp32_reference"] = (y_f.float() - y_r.float()).abs().max().item()
    sae = x = None
    if dev == "cuda":
        torch.cuda.empty_cache()
    return row


def backward_inputs(dev, shape, dtype, hot: int = 0, seed: int = 0) -> dict:
    """What the backward benchmarks time, at `shape` (name, N, d, F, k): a random SAE (5 % harmful,
    every token steered, beta 0.5), x, the forward's h and codes, and random grad_y / grad_h.
    `hot` features get a large encoder bias, so every token chooses them: the per-feature weight
    gradients then hold a few runs of N pairs (the load imbalance of real SAEs' frequent features)."""
    _, N, d, Fdim, k = shape
    sae, x = make_sae(N, d, Fdim, k, dev, dtype, seed=seed)
    if hot:
        with torch.no_grad():
            sae.b_enc[:hot] += 4.0
    sae.set_strengths(beta=0.5, gamma=1.0, tau=-1.0)
    _, h = sae.steer(x)
    vals, idx = sae.encode(x)
    g = torch.Generator(device=dev).manual_seed(seed + 1)
    return {"sae": sae, "x": x, "h": h, "vals": vals, "idx": idx,
            "gy": torch.randn(x.shape, device=dev, generator=g).to(dtype),
            "gh": torch.randn(h.shape, device=dev, generator=g)}


def backward_check(inp: dict, grads: dict) -> dict:
    """Each backward form's steer gradients against the reference's backward in fp32 (fp64 for fp32
    inputs), by the spec's rule: error <= LOWP_FACTOR x the error of the reference's backward in the
    input dtype (the "torch" form) + EPS x the gradient's scale. Returns per form the worst
    error/bound ratio over the five gradients and whether it passed."""
    from safedig_kernels.testing import EPS, tolerance

    sae, x = inp["sae"], inp["x"]
    hi = torch.float64 if x.dtype == torch.float32 else torch.float32
    args = (sae.harmful_mask, sae.beta, sae.gamma, sae.tau)
    want = reference.steer_backward(inp["gy"].to(hi), inp["gh"].to(hi), x.to(hi), sae.W_enc.to(hi), sae.W_dec.to(hi),
                                    sae.b_dec.to(hi), *args, inp["h"].to(hi), inp["vals"].to(hi), inp["idx"])
    lowp = grads["torch"]
    out = {}
    for form, got in grads.items():
        worst = 0.0
        for a, w, lo in zip(got, want, lowp):
            w = w.double()
            scale = w.abs().max().item() if w.numel() else 0.0
            err = (a.double() - w).abs().max().item() if w.numel() else 0.0
            err_lowp = (lo.double() - w).abs().max().item() if w.numel() else 0.0
            worst = max(worst, err / tolerance(err_lowp, x.dtype, atol=EPS[x.dtype] * (1 + scale), cap=False))
        out[form] = {"worst_error_over_bound": worst, "ok": worst <= 1.0}
    return out


def bench_backward(dev, bench, shape, dtype, hot: int = 0) -> dict:
    """The ops' backward at `shape`, each form of `_launch.BACKWARDS` ("triton": the sparse kernels;
    "torch": the reference's backward in the input dtype, dense GEMMs): checked first (a form
    whose gradients break the tolerance is not timed), then timed (CUDA events, median) for x's
    gradient alone (a LoRA step through a steered model), for every gradient (the SAE's too), and
    as forward + backward through autograd (the codes recomputed included); with the forward
    steer, the code recomputation (`topk_encode`) and the encode / decode backward beside them."""
    import dataclasses as _dc

    from safedig_kernels.ops import _launch
    from safedig_kernels.ops.sparse_decode import _sparse_decode_bwd
    from safedig_kernels.ops.steer import _steer_bwd
    from safedig_kernels.ops.topk_encode import _topk_encode_bwd

    name, N, d, Fdim, k = shape
    inp = backward_inputs(dev, shape, dtype, hot)
    sae, x, h, vals, idx, gy, gh = (inp[n] for n in ("sae", "x", "h", "vals", "idx", "gy", "gh"))
    sargs = (sae.W_enc, sae.W_dec, sae.b_dec, sae.harmful_mask, sae.beta, sae.gamma, sae.tau, h, vals, idx)
    row = {"shape": name, "N": N, "d": d, "F": Fdim, "k": k, "dtype": str(dtype).replace("torch.", ""),
           "hot_features": hot, "triton_kernels": dev == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"}

    def steer_bwd(form, input_grad=True, weight_grads=True):
        if form == "triton":
            return lambda: _steer_bwd(gy, gh, x, *sargs, input_grad, weight_grads)
        return lambda: reference.steer_backward(gy, gh, x, *sargs, upcast=False, weight_grads=weight_grads)

    def encode_bwd(form):
        if form == "triton":
            return lambda: _topk_encode_bwd(vals, x, sae.W_enc, sae.b_dec, vals, idx)
        return lambda: reference.topk_encode_backward(vals, x, sae.W_enc, sae.b_dec, vals, idx, upcast=False)

    def decode_bwd(form):
        if form == "triton":
            return lambda: _sparse_decode_bwd(gy, vals, idx, sae.W_dec)
        return lambda: reference.sparse_decode_backward(gy, vals, idx, sae.W_dec, upcast=False)

    grads = {}
    for form in _launch.BACKWARDS:
        try:
            dx, dW_enc_t, db_enc, dW_dec, db_dec = steer_bwd(form)()
            grads[form] = (dx, dW_enc_t, db_enc, dW_dec, db_dec)
        except Exception as e:
            row[f"{form}_error"] = repr(e)[:300]
    if "torch" in grads:
        try:
            row["check"] = backward_check(inp, grads)
        except Exception as e:
            row["check"] = {"error": repr(e)[:300]}
    grads = None
    row["forward_steer"] = bench(lambda: sae.steer(x))
    row["recompute_codes"] = bench(lambda: sae.encode(x))
    default = _launch.DEFAULT
    x_leaf = x.detach().clone().requires_grad_()
    for form in _launch.BACKWARDS:
        if not (row.get("check") or {}).get(form, {}).get("ok"):
            row[f"{form}_refused"] = "not timed: its gradients were not checked or broke the tolerance"
            continue
        row[f"{form}_steer_bwd_input"] = bench(steer_bwd(form, weight_grads=False))
        row[f"{form}_steer_bwd_all"] = bench(steer_bwd(form))
        row[f"{form}_encode_bwd"] = bench(encode_bwd(form))
        row[f"{form}_decode_bwd"] = bench(decode_bwd(form))
        _launch.DEFAULT = _dc.replace(default, backward=form)
        try:
            def step():
                y, hh = sae.steer(x_leaf)
                return torch.autograd.grad((y, hh), x_leaf, (gy, gh))
            row[f"{form}_fwd_bwd_input"] = bench(step)
        except Exception as e:
            row[f"{form}_fwd_bwd_input"] = {"error": repr(e)[:300]}
        finally:
            _launch.DEFAULT = default
    for what in ("steer_bwd_input", "steer_bwd_all", "encode_bwd", "decode_bwd", "fwd_bwd_input"):
        a, b = (row.get(f"{f}_{what}") or {} for f in ("torch", "triton"))
        if a.get("median_ms") and b.get("median_ms"):
            row[f"torch_over_triton_{what}"] = a["median_ms"] / b["median_ms"]
    if dev == "cuda" and row.get("check", {}).get("triton", {}).get("ok"):
        try:
            row["triton_breakdown"] = kernel_breakdown(dev, steer_bwd("triton"))
        except Exception as e:
            row["triton_breakdown"] = {"error": repr(e)[:300]}
    if dev == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    from safedig_kernels.ops._launch import LaunchConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/gpu_check")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device is there")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-backward", action="store_true", help="skip the backward check and timing (bench_backward)")
    ap.add_argument("--tests-timeout", type=int, default=240)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--shapes", default="", help="comma-separated shape names (default: all)")
    ap.add_argument("--no-compiled", action="store_true", help="skip the torch.compile baselines (their compile time)")
    ap.add_argument("--compiled-shapes", default=",".join(TARGET_SHAPES),
                    help="shapes that also time the torch.compile baselines (compile time is the cost)")
    ap.add_argument("--tests", default="tests/", help="what pytest runs with -m gpu")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    bench = timer(dev, a.reps if not a.smoke else 3, warm=3 if not a.smoke else 1)
    result = {"env": env_info(dev)}
    log(result["env"])
    result["ceilings"] = ceilings(dev, bench)
    log("ceilings", result["ceilings"])
    if not a.skip_tests and dev == "cuda":
        result["gpu_tests"] = run_gpu_tests(out, a.tests_timeout, a.tests)
    shapes = SMOKE_SHAPES if a.smoke else SHAPES
    if a.shapes:
        shapes = [s for s in shapes if s[0] in a.shapes.split(",")]
    rows = result["rows"] = []

    def save() -> str:
        # after every stage, so a run cut short by its time cap still returns what it measured
        md = kernel_check_markdown(json.loads(json.dumps(result, default=str)))
        (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
        (out / "gpu_check.md").write_text(md)
        return md

    # The spec §5 shapes at default settings first: the table that matters most must not wait on
    # the sweep's many compilations.
    for shape in shapes:
        try:
            compiled = not a.no_compiled and (a.smoke or shape[0] in a.compiled_shapes.split(","))
            rows.append(bench_shape(dev, bench, shape, dtype, compiled=compiled))
        except Exception as e:
            rows.append({"shape": shape[0], "N": shape[1], "d": shape[2], "F": shape[3], "k": shape[4],
                         "error": repr(e)[:300]})
            log("shape failed", rows[-1])
        save()
    if not a.skip_backward:  # the ops' backward, Triton kernels vs torch ops, at the FLUX 4x shape (smoke: tiny)
        bshape = ("smoke-bwd", 16, 8, 32, 3) if a.smoke else SHAPES[0]
        result["backward"] = []
        for hot in (0, 4):
            if dev != "cuda" and not os.environ.get("TRITON_INTERPRET"):
                break  # the Triton backward needs a GPU or the interpreter
            try:
                result["backward"].append(bench_backward(dev, bench, bshape, dtype, hot))
            except Exception as e:
                result["backward"].append({"shape": bshape[0], "hot_features": hot, "error": repr(e)[:300]})
            log("backward", result["backward"][-1])
            save()
    if not a.skip_sweep and dev == "cuda":
        try:
            sweep = result["sweep"] = tuning_sweep(dev, bench, SHAPES[0], dtype)
            save()
            sweep["decode_16x"] = decode_sweep_16x(dev, bench, SHAPES[1], dtype)
            save()
            bs, bd = best(sweep["select"]), best(sweep["decode"])
            if bs and bd:
                tuned = LaunchConfig(pre_dtype=getattr(torch, bs["pre_dtype"].replace("torch.", "")), chunk=bs["chunk"],
                                     select_warps=bs["num_warps"], select_algo=bs["algo"],
                                     select_stages=bs.get("load_stages"), decode_block_d=bd["BLOCK_D"],
                                     decode_k_block=bd["K_BLOCK"], decode_warps=bd["num_warps"])
                result["tuned"] = {kk: str(v) for kk, v in dataclasses.asdict(tuned).items()}
                log("tuned", result["tuned"])
                for row in rows:  # the fused steer again with the sweep's fastest settings
                    if "error" not in row:
                        row["fused_steer_tuned"] = time_tuned(dev, bench, row, dtype, tuned)
                        log(f"  {row['shape']:12s} fused_steer_tuned {row['fused_steer_tuned']}")
        except Exception as e:
            result["sweep_error"] = repr(e)[:500]
            log("sweep failed", result["sweep_error"])
    md = save()
    log("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
