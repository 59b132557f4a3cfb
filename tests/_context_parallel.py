"""Steered runs of tiny FLUX models, the same in one process and on each rank of diffusers'
Ulysses context parallelism: `tests/integrations/diffusers/test_context_parallel.py` runs
`runs()` in its own process for the reference and starts this file once per rank:

    python tests/_context_parallel.py RANK WORLD_SIZE PORT OUT_DIR [README_BLOCK_FILE]

Each rank joins a gloo group on 127.0.0.1:PORT, runs `runs()` in both orders of `apply_safedig`
and `enable_parallelism`, then the README's context-parallel block, and saves what it saw to
OUT_DIR/rank{RANK}.pt.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from unittest import mock

import torch
from _pipelines import HARM_B, flux_pipe, generate, sae

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


def transformer_inputs(batch: int) -> dict:
    """16 image tokens and 8 text tokens per row: both split evenly over 2 ranks."""
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(batch, 16, 4, generator=g),
                encoder_hidden_states=torch.randn(batch, 8, 16, generator=g),
                pooled_projections=torch.randn(batch, 16, generator=g), timestep=torch.full((batch,), 0.5),
                img_ids=torch.randn(16, 3, generator=g), txt_ids=torch.zeros(8, 3), return_dict=False)


def telemetry_views(handle, requests: bool = False) -> dict:
    """The whole-sequence telemetry and this rank's own (equal in one process)."""
    read = handle.request_telemetry if requests else handle.telemetry
    return {"sequence": read(), "rank": read(scope="rank")}


def runs(pipe, handle) -> dict:
    """Everything the tests compare, from a steered tiny FLUX pipeline: the transformer at several
    strengths, with per-request values, and the pipeline with two requests."""
    out = {}
    for beta, gamma in STRENGTHS:
        for site in handle.sites:
            handle.set_site(site, beta=beta, gamma=gamma)
        handle.reset_telemetry()
        with torch.no_grad():
            out[f"strengths {beta} {gamma}"] = pipe.transformer(**transformer_inputs(2))[0]
        out[f"telemetry {beta} {gamma}"] = telemetry_views(handle)
    handle.set_requests(**REQUESTS)
    handle.reset_telemetry()
    with torch.no_grad():
        out["requests"] = pipe.transformer(**transformer_inputs(3))[0]
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


def enable_ulysses(transformer, degree: int) -> None:
    from diffusers import ContextParallelConfig

    with one_device_without_accelerator():
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))


def _count_all_reduces(fn):
    """Run `fn()`; return its result and how many `torch.distributed.all_reduce` calls it made."""
    with mock.patch.object(torch.distributed, "all_reduce", wraps=torch.distributed.all_reduce) as spy:
        result = fn()
    return result, spy.call_count


def main(rank: int, world: int, port: int, out_dir: Path, readme_block: Path | None) -> None:
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.chdir(out_dir)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    seen = {}
    try:
        # apply_safedig first, then the split
        pipe = flux_pipe()
        handle = apply_safedig(pipe, config())
        enable_ulysses(pipe.transformer, world)
        seen["apply first"] = runs(pipe, handle)
        # how often a generation and a read communicate
        handle.reset_telemetry()
        _, seen["all_reduce per generation"] = _count_all_reduces(lambda: generate(pipe))
        _, seen["all_reduce per read"] = _count_all_reduces(handle.telemetry)
        seen["telemetry, group given"] = handle.telemetry(group=dist.group.WORLD)
        seen["telemetry, default group"] = handle.telemetry()
        # the split first, then apply_safedig
        pipe = flux_pipe()
        enable_ulysses(pipe.transformer, world)
        seen["split first"] = runs(pipe, apply_safedig(pipe, config()))
        if readme_block is not None:
            namespace = {"__name__": "__readme__", "pipe": readme_pipe(), **readme_inputs()}
            with one_device_without_accelerator():
                exec(compile(readme_block.read_text(), "README.md (context-parallel block)", "exec"), namespace)
            seen["readme"] = {name: namespace[name] for name in ("image", "whole", "mine")}
            if rank == 0:  # the config the block built, for the one-process reference
                seen["readme config"] = str(namespace["handle"].config().to_json(out_dir / "readme_config.json"))
        torch.save(seen, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    rank, world, port = (int(a) for a in sys.argv[1:4])
    main(rank, world, port, Path(sys.argv[4]), Path(sys.argv[5]) if len(sys.argv) > 5 else None)
