"""Steered runs of tiny FLUX models, the same in one process and on each rank of diffusers'
context parallelism. `tests/integrations/diffusers/test_context_parallel.py` (gloo, Ulysses, on
the CPU) and the `context_parallel` stage of `benchmarks/device_stages.py` (NCCL, Ulysses and
Ring, on 2 GPUs) run `runs()` in their own process for the reference and start this file once
per rank (`launch`):

    python tests/_context_parallel.py RANK WORLD_SIZE PORT OUT_DIR [--backend nccl] [--mode ring]
        [--attention _native_cudnn] [--dtype bfloat16] [--readme BLOCK_FILE]

Each rank joins the group on 127.0.0.1:PORT, runs `runs()` in both orders of `apply_safedig`
and `enable_parallelism`, then (with --readme) the README's context-parallel block, and saves
what it saw to OUT_DIR/rank{RANK}.pt.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional
from unittest import mock

import torch
from _pipelines import EMB, HARM_B, STEPS, flux_pipe, sae

from safedig_kernels.integrations.diffusers import SafeDIGConfig, SiteConfig, apply_safedig

# (beta, gamma) set on every site in turn; (0, 0) is transparent.
STRENGTHS = [(0.0, 0.0), (0.3, 0.7), (1.0, -0.5), (0.5, 2.0)]
# Three requests in one batch, each unlike the sites' own values.
REQUESTS = dict(beta=[0.5, 0.0, 1.0], gamma=[1.0, 2.0, -0.5], tau=[0.1, -1.0, 0.05])
# Two images of one prompt through the pipeline, steered differently.
PIPELINE_REQUESTS = dict(beta=[0.5, 0.0], gamma=[1.0, 2.0])
README_SAE = "sb9.safetensors"


def config() -> SafeDIGConfig:
    """A text-stream site on a double block and a joint site on a single block: the split cuts
    the text tokens and the image tokens each in two."""
    return SafeDIGConfig(sites=[SiteConfig("transformer_blocks.0:text", sae(1, HARM_B), beta=0.3, gamma=0.7),
                                SiteConfig("single_transformer_blocks.0:both", sae(2), beta=0.3, gamma=0.7)])


def transformer_inputs(batch: int, like: torch.Tensor) -> dict:
    """16 image tokens and 8 text tokens per row (both split evenly over 2 ranks), on the device
    and in the dtype of `like`."""
    g = torch.Generator().manual_seed(0)
    kw = dict(device=like.device, dtype=like.dtype)
    return dict(hidden_states=torch.randn(batch, 16, 4, generator=g).to(**kw),
                encoder_hidden_states=torch.randn(batch, 8, 16, generator=g).to(**kw),
                pooled_projections=torch.randn(batch, 16, generator=g).to(**kw),
                timestep=torch.full((batch,), 0.5).to(**kw), img_ids=torch.randn(16, 3, generator=g).to(like.device),
                txt_ids=torch.zeros(8, 3, device=like.device), return_dict=False)


def generate(pipe, **kw) -> torch.Tensor:
    """`_pipelines.generate`, with the prompt embeddings in the transformer's dtype."""
    like = pipe.transformer.proj_out.weight
    emb = {name: EMB[name].to(like.device, like.dtype) for name in ("prompt_embeds", "pooled_prompt_embeds")}
    return pipe(num_inference_steps=STEPS, height=8, width=8, output_type="pt",
                generator=torch.Generator().manual_seed(0), **emb, **kw).images


def telemetry_views(handle, requests: bool = False) -> dict:
    """The whole-sequence telemetry and this rank's own (equal in one process)."""
    read = handle.request_telemetry if requests else handle.telemetry
    return {"sequence": read(), "rank": read(scope="rank")}


def runs(pipe, handle) -> dict:
    """Everything the tests compare, from a steered tiny FLUX pipeline: the transformer at several
    strengths, with per-request values, and the pipeline with two requests."""
    out = {}
    like = pipe.transformer.proj_out.weight
    for beta, gamma in STRENGTHS:
        for site in handle.sites:
            handle.set_site(site, beta=beta, gamma=gamma)
        handle.reset_telemetry()
        with torch.no_grad():
            out[f"strengths {beta} {gamma}"] = pipe.transformer(**transformer_inputs(2, like))[0]
        out[f"telemetry {beta} {gamma}"] = telemetry_views(handle)
    handle.set_requests(**REQUESTS)
    handle.reset_telemetry()
    with torch.no_grad():
        out["requests"] = pipe.transformer(**transformer_inputs(3, like))[0]
    out["requests telemetry"] = telemetry_views(handle, requests=True)
    handle.set_requests(**PIPELINE_REQUESTS)
    handle.reset_telemetry()
    out["pipeline"] = generate(pipe, num_images_per_prompt=2)
    out["pipeline telemetry"] = telemetry_views(handle)
    out["pipeline request telemetry"] = telemetry_views(handle, requests=True)
    handle.clear_requests()
    return out


def readme_pipe():
    """The pipeline the README's context-parallel block names: a tiny FLUX with the ten single
    blocks it steers, 16 image tokens by default."""
    pipe = flux_pipe(num_single_layers=10)
    pipe.default_sample_size = 8
    return pipe


def readme_inputs() -> dict:
    g = torch.Generator().manual_seed(3)
    return {"prompt_embeds": torch.randn(1, 8, 16, generator=g),
            "pooled_prompt_embeds": torch.randn(1, 16, generator=g)}


@contextlib.contextmanager
def one_device_without_accelerator():
    """diffusers places each rank on device `rank % torch.accelerator.device_count()`, which a
    machine without an accelerator cannot compute (0 devices); there, say one CPU device."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    with mock.patch.object(torch.accelerator, "device_count", return_value=1):
        yield


def enable_context_parallel(transformer, degree: int, mode: str = "ulysses") -> None:
    from diffusers import ContextParallelConfig

    with one_device_without_accelerator():
        transformer.enable_parallelism(config=ContextParallelConfig(**{f"{mode}_degree": degree}))


def steered_pipe(device: str = "cpu", dtype: torch.dtype = torch.float32, attention: str | None = None):
    """The tiny FLUX pipeline `runs()` steers, where and how it runs."""
    pipe = flux_pipe()
    if (device, dtype) != ("cpu", torch.float32):
        pipe.to(device, dtype)
    if attention:
        pipe.transformer.set_attention_backend(attention)
    return pipe


def _count_all_reduces(fn):
    """Run `fn()`; return its result and how many `torch.distributed.all_reduce` calls it made."""
    with mock.patch.object(torch.distributed, "all_reduce", wraps=torch.distributed.all_reduce) as spy:
        result = fn()
    return result, spy.call_count


def main(argv: list[str]) -> None:
    import argparse

    import torch.distributed as dist

    ap = argparse.ArgumentParser()
    for name in ("rank", "world", "port"):
        ap.add_argument(name, type=int)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--backend", default="gloo")
    ap.add_argument("--mode", default="ulysses", choices=("ulysses", "ring"))
    ap.add_argument("--attention", default=None, help="an attention backend of diffusers, e.g. _native_cudnn")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--readme", type=Path, default=None, help="the README's context-parallel block, to run")
    a = ap.parse_args(argv)
    rank, world = a.rank, a.world
    torch.set_num_threads(1)
    os.chdir(a.out_dir)
    device = "cpu"
    if a.backend == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(a.backend, init_method=f"tcp://127.0.0.1:{a.port}", rank=rank, world_size=world)
    where = dict(device=device, dtype=getattr(torch, a.dtype), attention=a.attention)
    seen = {}
    try:
        # apply_safedig first, then the split
        pipe = steered_pipe(**where)
        handle = apply_safedig(pipe, config())
        enable_context_parallel(pipe.transformer, world, a.mode)
        seen["apply first"] = runs(pipe, handle)
        # how often a generation and a read communicate
        handle.reset_telemetry()
        _, seen["all_reduce per generation"] = _count_all_reduces(lambda: generate(pipe))
        _, seen["all_reduce per read"] = _count_all_reduces(handle.telemetry)
        seen["telemetry, group given"] = handle.telemetry(group=dist.group.WORLD)
        seen["telemetry, default group"] = handle.telemetry()
        # the split first, then apply_safedig
        pipe = steered_pipe(**where)
        enable_context_parallel(pipe.transformer, world, a.mode)
        seen["split first"] = runs(pipe, apply_safedig(pipe, config()))
        if a.readme is not None:
            namespace = {"__name__": "__readme__", "pipe": readme_pipe(), **readme_inputs()}
            with one_device_without_accelerator():
                exec(compile(a.readme.read_text(), "README.md (context-parallel block)", "exec"), namespace)
            seen["readme"] = {name: namespace[name] for name in ("image", "whole", "mine")}
            if rank == 0:  # the config the block built, for the one-process reference
                seen["readme config"] = str(namespace["handle"].config().to_json(a.out_dir / "readme_config.json"))
        torch.save(_to_cpu(seen), a.out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def launch(out_dir: Path, timeout_s: float, world: int = 2, *args: str) -> tuple[list[Optional[dict]], str]:
    """Start `world` ranks of this file (extra `args` for each), wait at most `timeout_s` for all
    of them, kill what is left; returns what each rank saved (None where it saved nothing) and
    the tail of the logs of the ranks that failed ("" when none did)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests"), os.environ.get("PYTHONPATH", "")])}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logs = [open(out_dir / f"rank{r}.log", "w") for r in range(world)]
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(world), str(port), str(out_dir), *args],
                              env=env, stdout=logs[r], stderr=subprocess.STDOUT) for r in range(world)]
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    failed = "\n".join(f"--- rank {r} (exit {p.returncode}):\n" + (out_dir / f"rank{r}.log").read_text()[-4000:]
                       for r, p in enumerate(procs) if p.returncode != 0)
    saved = [out_dir / f"rank{r}.pt" for r in range(world)]
    return [torch.load(f, weights_only=False) if f.exists() else None for f in saved], failed


def differences(seen: dict, reference: dict) -> dict:
    """Largest differences between one rank's runs (both orders) and one process's: outputs,
    whole-sequence telemetry statistics; and how far steering moved the reference (so a small
    difference means something)."""
    out = {"outputs": 0.0, "telemetry": 0.0, "records_match": True}
    for order in ("apply first", "split first"):
        for key, want in reference.items():
            got = seen[order][key]
            if "telemetry" not in key:
                out["outputs"] = max(out["outputs"], float((got.float() - want.float()).abs().max()))
                continue
            for site, records in want["sequence"].items():
                mine = got["sequence"].get(site, [])
                out["records_match"] &= len(mine) == len(records)
                for g, w in zip(mine, records):
                    for name in ("gated_fraction", "mean_harm"):
                        diff = torch.tensor(g[name], dtype=torch.float64) - torch.tensor(w[name], dtype=torch.float64)
                        out["telemetry"] = max(out["telemetry"], float(diff.abs().max()))
    out["steering_moved"] = float((reference["strengths 1.0 -0.5"].float()
                                   - reference["strengths 0.0 0.0"].float()).abs().max())
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
