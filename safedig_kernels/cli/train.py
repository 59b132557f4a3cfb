"""`safedig train`: train a TopK SAE on one site's activations, in one process or under torchrun."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ._options import (
    FORMATTER,
    add_activations,
    add_denoise_steps,
    add_device,
    add_no_progress,
    check_paths,
    check_writable,
    select_device,
    write_json,
)

# TrainConfig field -> the option that sets it, so a bad value is reported under its option's name.
OPTION_NAMES = {"num_features": "--features", "expansion": "--expansion", "k": "--k", "steps": "--steps",
                "batch_size": "--batch-size", "lr": "--lr", "aux_k": "--aux-k", "aux_coef": "--aux-coef",
                "dead_after_tokens": "--dead-after-tokens", "seed": "--seed", "dtype": "--dtype",
                "log_every": "--log-every", "checkpoint_every": "--checkpoint-every",
                "memory_budget_mb": "--memory-mb"}


def check_arguments(args: argparse.Namespace):
    """Every check that needs no data, run before the store is opened or training starts:
    the training settings (`TrainConfig.check`), --site, --max-tokens, the batch split over the
    processes, and the outputs (writable, never an input, never inside a capture). Returns the
    TrainConfig."""
    from ..workflow.store import SiteSpec
    from ..workflow.train import TrainConfig

    config = TrainConfig(num_features=args.features, expansion=args.expansion, k=args.k, steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, aux_k=args.aux_k, aux_coef=args.aux_coef,
                         dead_after_tokens=args.dead_after_tokens, seed=args.seed, dtype=args.dtype,
                         log_every=args.log_every, checkpoint_every=args.checkpoint_every,
                         memory_budget_mb=args.memory_mb)
    config.check(OPTION_NAMES)
    SiteSpec.parse(args.site)
    if args.max_tokens is not None:
        if args.max_tokens < 1:
            raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
        if args.batch_size > args.max_tokens:
            raise ValueError(f"--batch-size {args.batch_size} exceeds --max-tokens {args.max_tokens}: a batch cannot "
                             f"hold more tokens than training uses")
    num_ranks = os.environ.get("WORLD_SIZE", "1")  # what torchrun sets
    if num_ranks.isdigit() and int(num_ranks) > 1 and args.batch_size % int(num_ranks):
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the number of processes {num_ranks}")
    check_writable("--out", args.out)
    check_writable("--metrics", args.metrics)
    check_writable("--checkpoint-dir", args.checkpoint_dir, folder=True)
    check_paths(inputs=[("--activations", args.activations)],
                outputs=[("--out", args.out), ("--metrics", args.metrics)],
                folders=[("--checkpoint-dir", args.checkpoint_dir)])
    return config


def run(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from ..sae import SAEMetadata
    from ..workflow.store import ActivationStore, SiteSpec
    from ..workflow.train import evaluate_sae, train_sae, training_data

    # Bad arguments fail here, in well under a second, not after loading data and training.
    config = check_arguments(args)
    device = select_device(args.device)
    started = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        started = True
    try:
        rank = dist.get_rank() if dist.is_initialized() else 0
        num_ranks = dist.get_world_size() if dist.is_initialized() else 1
        store = ActivationStore(args.activations)
        site = SiteSpec.parse(args.site)
        # A tensor when there is no --memory-mb or the selection fits in it (every process loads it all,
        # as before); otherwise this process's share of a stream, trained through a shuffle buffer.
        data = training_data(store, site, config, labels=args.labels, steps=args.denoise_steps,
                             max_tokens=args.max_tokens)
        streamed = not isinstance(data, torch.Tensor)
        if streamed and rank == 0:
            share = "each process reads its own share" if num_ranks > 1 else "one tensor at a time"
            print(f"{site.key}: {data.total_tokens} tokens x d={data.d} do not fit in --memory-mb {args.memory_mb}: "
                  f"streaming them from the shards ({share})")
        meta = SAEMetadata(model=str(store.config.get("model", "")), site=site.module,
                           extra={"stream": site.stream, "activations": str(args.activations),
                                  "labels": args.labels})
        result = train_sae(data, config, checkpoint_dir=args.checkpoint_dir, resume=not args.no_resume,
                           device=device, progress=not args.no_progress, metadata=meta)
        # A stream is evaluated by every process over its share (all-reduced); a tensor by rank 0.
        ev = evaluate_sae(result.sae, data) if streamed or rank == 0 else None
        if rank == 0:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            result.sae.save(args.out)
            tokens, d = result.data["num_tokens"], result.data["d"]
            summary = {"sae": str(args.out), "site": site.key, "tokens": tokens, "d": d,
                       "num_features": result.sae.num_features, "k": result.sae.k,
                       "activation_scale": result.activation_scale, "train": result.metrics, "eval": ev,
                       "history": result.history, "resumed_from": result.resumed_from, "num_ranks": num_ranks,
                       "streamed": result.data.get("stream")}
            write_json(args.metrics, summary)
            how = (f", streamed through a buffer of {result.data['stream']['buffer_tokens']} tokens per process"
                   if streamed else "")
            print(f"{args.out}: d={d} F={result.sae.num_features} k={result.sae.k} on {tokens} tokens "
                  f"({num_ranks} process{'es' if num_ranks > 1 else ''}{how}); "
                  f"FVU {ev['fvu']:.4f}, L0 {ev['l0']:.1f}, dead {ev['dead_fraction']:.1%}")
        if num_ranks > 1:
            # Ranks leave together: one tearing gloo down while rank 0 still saves can abort it.
            dist.barrier()
    finally:
        if started:
            dist.destroy_process_group()
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", formatter_class=FORMATTER, help="train a TopK SAE on one site's captured activations",
        description="""\
Train a TopK sparse autoencoder on the activations of one site (from `safedig capture`) and
save it as a TopKSAE file (--out). Decoder rows are kept at unit norm; activations are scaled
per site so that E||x s||^2 = d (the scale is folded into the saved weights); an AuxK loss
revives dead latents. Prints FVU (fraction of variance unexplained), L0 and the dead fraction.

With --checkpoint-dir, training checkpoints (safetensors + JSON) are written and an interrupted
run resumes from the newest one. Under torchrun the global --batch-size is split over the
processes (DDP; gloo on CPU, NCCL on GPU) and the result equals a single-process run.

--memory-mb bounds the memory each process spends on training (MiB: activations plus an
estimate of the SAE's weights, Adam state and one step's work). A selection that fits trains
exactly as without it; a larger one is streamed from the shards through a shuffle buffer
within it (each process reads only its own share under torchrun): deterministic for a seed,
budget and number of processes, but not the same weights as an in-memory or single-process
run.""",
        epilog="example: torchrun --nproc-per-node 2 -m safedig_kernels.cli train --activations acts/ "
               "--site single_transformer_blocks.0 --features 256 --k 16 --steps 500 --out sae0.safetensors")
    add_activations(p)
    p.add_argument("--site", required=True, help="site to train on, e.g. single_transformer_blocks.0 or "
                                                 "transformer_blocks.1:text")
    p.add_argument("--out", required=True, help="SAE file to write")
    p.add_argument("--labels", default=None,
                   help="comma-separated label selectors to train on (default: all; 'unsafe' matches unsafe/*)")
    add_denoise_steps(p)
    p.add_argument("--max-tokens", type=int, default=None, help="train on a seeded random subset of this many tokens")
    p.add_argument("--memory-mb", type=int, default=None,
                   help="memory per process for training, in MiB; a selection larger than it is streamed from "
                        "the shards through a shuffle buffer (default: load it all)")
    p.add_argument("--features", type=int, default=None, help="number of latents F (default: --expansion x d)")
    p.add_argument("--expansion", type=int, default=4, help="F = expansion x d when --features is not given")
    p.add_argument("--k", type=int, default=32, help="active latents per token (default 32)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=4096, help="global batch in tokens (default 4096)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 2e-4 / sqrt(F / 16384))")
    p.add_argument("--aux-k", type=int, default=None, help="dead latents used by the AuxK loss (default d/2)")
    p.add_argument("--aux-coef", type=float, default=1 / 32, help="AuxK loss weight (default 1/32)")
    p.add_argument("--dead-after-tokens", type=int, default=10_000_000,
                   help="a latent is dead after this many tokens without firing (default 1e7)")
    p.add_argument("--dtype", default="float32", help="training dtype: float32 or float64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50, help="record metrics every n steps")
    p.add_argument("--checkpoint-dir", default=None, help="write training checkpoints here and resume from them")
    p.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every n steps (0: only at the end)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if --checkpoint-dir has checkpoints")
    p.add_argument("--metrics", default=None, help="write final metrics and history to this JSON file")
    add_device(p)
    add_no_progress(p)
    p.set_defaults(fn=run)
