"""`safedig capture`: record a pipeline's activations over a labelled prompt set."""
from __future__ import annotations

import argparse

from ._options import (
    FORMATTER,
    add_no_progress,
    add_pipeline_options,
    check_paths,
    denoise_steps,
    image_size,
    int_list,
    model_inputs,
    select_device,
    str_list,
)


def run(args: argparse.Namespace) -> int:
    from .._io import dtype_from_name
    from ..workflow.capture import CaptureConfig, capture
    from ..workflow.pipelines import load_pipeline
    from ..workflow.prompts import load_prompts
    from ..workflow.store import rebuild_manifest

    if args.rebuild_manifest:
        path = rebuild_manifest(args.out)
        print(f"rebuilt {path} from the shards in {args.out}")
        return 0
    if not args.prompts or not args.sites:
        raise ValueError("capture needs --prompts and --sites (or --rebuild-manifest)")
    # --out is the store itself (it may be one already: a resume), never inside another one.
    check_paths(inputs=[("--prompts", args.prompts)] + model_inputs(args.model),
                store=("--out", args.out))
    height, width = image_size(args)
    config = CaptureConfig(sites=args.sites, steps=args.steps, num_inference_steps=denoise_steps(args),
                           height=height, width=width, guidance_scale=args.guidance_scale, dtype=args.dtype,
                           max_tokens=args.max_tokens, token_stride=args.token_stride, cfg=args.cfg, seed=args.seed,
                           shard_bytes=int(args.shard_mb * (1 << 20)), model=args.model)
    config.validate()
    # Check the cheap inputs before loading a model that may take minutes.
    prompts = load_prompts(args.prompts)
    model_dtype = dtype_from_name(args.model_dtype, "--model-dtype")
    pipe = load_pipeline(args.model, device=select_device(args.device), dtype=model_dtype)
    store = capture(pipe, prompts, args.out, config, resume=not args.no_resume, progress=not args.no_progress)
    n = len(store.entries())
    print(f"{args.out}: {len(store.prompts)} prompts, {n} tensors, sites {store.sites}, labels {store.labels}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "capture", formatter_class=FORMATTER, help="record activations of a pipeline over a labelled prompt set",
        description="""\
Run a diffusers pipeline over a prompt file and record activations at the chosen sites and
denoising steps into sharded safetensors files with a JSON manifest (--out).

Prompt file: JSON Lines, one {"id", "label", "embeddings" | "prompt", ...} object per line;
labels are `safe` or `unsafe/<category>` (format: safedig_kernels/workflow/prompts.py).
Sites are module paths inside the transformer, with the stream after a colon:
`single_transformer_blocks.3`, `transformer_blocks.1:text` (default stream: image).

The capture is resumable: run the same command again after an interruption and finished
prompts are skipped; nothing is duplicated or lost. Memory stays near --shard-mb.""",
        epilog="example: safedig capture --model tiny-flux --prompts prompts.jsonl "
               "--sites single_transformer_blocks.0,transformer_blocks.1 --steps 0,2 --out acts/")
    p.add_argument("--prompts", help="prompt file (JSON Lines)")
    p.add_argument("--sites", type=str_list, help="comma-separated sites, e.g. single_transformer_blocks.3")
    p.add_argument("--out", required=True, help="capture directory (created; resumed when it holds a capture)")
    p.add_argument("--steps", type=int_list, default=None, help="denoising step indices to record (default: all)")
    add_pipeline_options(p)
    p.add_argument("--dtype", default=None, help="storage dtype of activations (default: the activations' own)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="keep a seeded random subset of at most this many tokens per prompt, site and step")
    p.add_argument("--token-stride", type=int, default=1, help="keep every n-th token (before --max-tokens)")
    p.add_argument("--cfg", choices=("cond", "both"), default="cond",
                   help="cond: record only the conditional CFG branch (default); both: every batch row and call "
                        "(the words steering's cfg uses)")
    p.add_argument("--shard-mb", type=float, default=256.0, help="write a shard once this many MiB are buffered")
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an existing capture directory")
    add_no_progress(p)
    p.add_argument("--rebuild-manifest", action="store_true",
                   help="recreate --out's manifest.json from its shards (after a lost or corrupt manifest) and exit")
    p.set_defaults(fn=run)
