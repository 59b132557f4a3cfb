"""`safedig`: the SafeDIG workflow from a terminal.

    safedig capture  record activations of a diffusers pipeline over a labelled prompt set
    safedig train    train a TopK SAE on one site's activations (DDP under torchrun)
    safedig score    rank SAE features by unsafe-vs-safe firing and pick the harmful set
    safedig route    rank (site, operator) pairs by robustness to a risk-domain shift; write a steering config
    safedig adapt    adapt an SAE's decoder to a target domain with the encoder frozen
    safedig steer    generate with and without steering from a steering config; images and harm telemetry
    safedig bench    benchmark the ops against the eager and compiled references: JSON, CSV, tables, plots
    safedig demo     the whole workflow on a built-in tiny FLUX, end to end, on a CPU in well under two minutes

Run `safedig <command> --help` for each.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

_FMT = argparse.RawDescriptionHelpFormatter


# -- argument helpers --------------------------------------------------------------------------

def _int_list(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,4,8, got {text!r}") from None


def _str_list(text: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def _window(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START,END fractions such as 0.0,0.5, got {text!r}") from None
    return lo, hi


def _site_sae(text: str) -> tuple[str, str]:
    site, eq, path = text.partition("=")
    if not eq or not site or not path:
        raise argparse.ArgumentTypeError(f"expected SITE=PATH such as single_transformer_blocks.0=sae0.safetensors, "
                                         f"got {text!r}")
    return site, path


def _device(name: Optional[str]):
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_sae(path: str, device=None):
    from .sae import TopKSAE

    if not Path(path).is_file():
        raise FileNotFoundError(f"SAE file {path} does not exist")
    return TopKSAE.load(path, device=device)


def _write_json(path: Optional[str], obj: Any) -> None:
    if path:
        from .training._io import atomic_write_json

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, obj)


@contextlib.contextmanager
def _torch_threads(threads: Optional[int], model: str, device) -> Iterator[None]:
    """Run the body with `threads` torch CPU threads; the built-in tiny model on a CPU gets 1.

    Why: its ops take microseconds, so a thread pool only adds hand-offs, and on a shared or
    loaded machine waiting for the pool dominates (torch 2.13, 2 busy cores: 490 ms per
    tiny-FLUX step with 2 threads, 7 ms with 1). The old setting is restored afterwards.
    """
    import torch

    if threads is None and model == "tiny-flux" and torch.device(device).type == "cpu":
        threads = 1
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _add_rule_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("harmful-feature rule (see safedig_kernels.steering.scoring)")
    g.add_argument("--top-n", type=int, default=32, help="keep at most this many harmful features (default 32)")
    g.add_argument("--min-ratio", type=float, default=2.0,
                   help="a harmful feature fires at least this many times as often on unsafe tokens (default 2)")
    g.add_argument("--min-freq", type=float, default=0.01,
                   help="...and on at least this fraction of unsafe tokens (default 0.01)")
    g.add_argument("--min-score", type=float, default=0.0,
                   help="...and its score mean_unsafe - mean_safe exceeds this (default 0)")


def _rule(args):
    from .steering.scoring import HarmfulRule

    return HarmfulRule(top_n=args.top_n, min_ratio=args.min_ratio, min_freq=args.min_freq, min_score=args.min_score)


# -- capture -----------------------------------------------------------------------------------

def _capture(args) -> int:
    from .training._io import dtype_from_name
    from .training.capture import CaptureConfig, capture, load_pipeline, load_prompts
    from .training.store import rebuild_manifest

    if args.rebuild_manifest:
        path = rebuild_manifest(args.out)
        print(f"rebuilt {path} from the shards in {args.out}")
        return 0
    if not args.prompts or not args.sites:
        raise ValueError("capture needs --prompts and --sites (or --rebuild-manifest)")
    tiny = args.model == "tiny-flux"
    height = args.height or (32 if tiny else 1024)
    width = args.width or (32 if tiny else 1024)
    config = CaptureConfig(sites=args.sites, steps=args.steps, num_inference_steps=args.num_inference_steps,
                           height=height, width=width, guidance_scale=args.guidance_scale, dtype=args.dtype,
                           max_tokens=args.max_tokens, token_stride=args.token_stride, cfg=args.cfg, seed=args.seed,
                           shard_bytes=int(args.shard_mb * (1 << 20)), model=args.model)
    config.validate()
    # Check the cheap inputs before loading a model that may take minutes.
    prompts = load_prompts(args.prompts)
    model_dtype = dtype_from_name(args.model_dtype, "--model-dtype")
    pipe = load_pipeline(args.model, device=_device(args.device), dtype=model_dtype)
    store = capture(pipe, prompts, args.out, config, resume=not args.no_resume, progress=not args.no_progress)
    n = len(store.entries())
    print(f"{args.out}: {len(store.prompts)} prompts, {n} tensors, sites {store.sites}, labels {store.labels}")
    return 0


def _add_capture(sub) -> None:
    p = sub.add_parser(
        "capture", formatter_class=_FMT, help="record activations of a pipeline over a labelled prompt set",
        description="""\
Run a diffusers pipeline over a prompt file and record activations at the chosen sites and
denoising steps into sharded safetensors files with a JSON manifest (--out).

Prompt file: JSON Lines, one {"id", "label", "embeddings" | "prompt", ...} object per line;
labels are `safe` or `unsafe/<category>` (format: safedig_kernels/training/capture.py).
Sites are module paths inside the transformer, with the stream after a colon:
`single_transformer_blocks.3`, `transformer_blocks.1:text` (default stream: image).

The capture is resumable: run the same command again after an interruption and finished
prompts are skipped; nothing is duplicated or lost. Memory stays near --shard-mb.""",
        epilog="example: safedig capture --model tiny-flux --prompts prompts.jsonl "
               "--sites single_transformer_blocks.0,transformer_blocks.1 --steps 0,2 --out acts/")
    p.add_argument("--model", default="tiny-flux",
                   help="'tiny-flux' (built-in seeded random FLUX, CPU) or a diffusers pipeline directory / model id")
    p.add_argument("--prompts", help="prompt file (JSON Lines)")
    p.add_argument("--sites", type=_str_list, help="comma-separated sites, e.g. single_transformer_blocks.3")
    p.add_argument("--out", required=True, help="capture directory (created; resumed when it holds a capture)")
    p.add_argument("--steps", type=_int_list, default=None, help="denoising step indices to record (default: all)")
    p.add_argument("--num-inference-steps", type=int, default=4, help="denoising steps per image (default 4)")
    p.add_argument("--height", type=int, default=None, help="image height (default 32 for tiny-flux, else 1024)")
    p.add_argument("--width", type=int, default=None, help="image width (default 32 for tiny-flux, else 1024)")
    p.add_argument("--guidance-scale", type=float, default=3.5, help="guidance scale passed to the pipeline")
    p.add_argument("--model-dtype", default="float32", help="pipeline dtype: float32, bfloat16, float16")
    p.add_argument("--dtype", default=None, help="storage dtype of activations (default: the activations' own)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="keep a seeded random subset of at most this many tokens per prompt, site and step")
    p.add_argument("--token-stride", type=int, default=1, help="keep every n-th token (before --max-tokens)")
    p.add_argument("--cfg", choices=("cond", "all"), default="cond",
                   help="record only the conditional CFG branch (default) or every batch row and call")
    p.add_argument("--seed", type=int, default=0, help="noise seed base: prompt i uses seed + i unless it sets one")
    p.add_argument("--shard-mb", type=float, default=256.0, help="write a shard once this many MiB are buffered")
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an existing capture directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--rebuild-manifest", action="store_true",
                   help="recreate --out's manifest.json from its shards (after a lost or corrupt manifest) and exit")
    p.set_defaults(fn=_capture)


# -- train -------------------------------------------------------------------------------------

def _train(args) -> int:
    import torch
    import torch.distributed as dist

    from .sae import SAEMetadata
    from .training.sae_train import TrainConfig, evaluate_sae, train_sae
    from .training.store import ActivationStore, SiteSpec

    device = _device(args.device)
    started = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        started = True
    try:
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        store = ActivationStore(args.activations)
        site = SiteSpec.parse(args.site)
        x = store.load(site, labels=args.labels, steps=args.denoise_steps, max_tokens=args.max_tokens,
                       seed=args.seed)
        config = TrainConfig(num_features=args.features, expansion=args.expansion, k=args.k, steps=args.steps,
                             batch_size=args.batch_size, lr=args.lr, aux_k=args.aux_k, aux_coef=args.aux_coef,
                             dead_after_tokens=args.dead_after_tokens, seed=args.seed, dtype=args.dtype,
                             log_every=args.log_every, checkpoint_every=args.checkpoint_every)
        meta = SAEMetadata(model=str(store.config.get("model", "")), site=site.module,
                           extra={"stream": site.stream, "activations": str(args.activations),
                                  "labels": args.labels})
        result = train_sae(x, config, checkpoint_dir=args.checkpoint_dir, resume=not args.no_resume, device=device,
                           progress=not args.no_progress, metadata=meta)
        if rank == 0:
            ev = evaluate_sae(result.sae, x)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            result.sae.save(args.out)
            summary = {"sae": str(args.out), "site": site.key, "tokens": x.shape[0], "d": x.shape[1],
                       "num_features": result.sae.num_features, "k": result.sae.k,
                       "activation_scale": result.activation_scale, "train": result.metrics, "eval": ev,
                       "history": result.history, "resumed_from": result.resumed_from, "world_size": world}
            _write_json(args.metrics, summary)
            print(f"{args.out}: d={x.shape[1]} F={result.sae.num_features} k={result.sae.k} on {x.shape[0]} tokens "
                  f"({world} process{'es' if world > 1 else ''}); "
                  f"FVU {ev['fvu']:.4f}, L0 {ev['l0']:.1f}, dead {ev['dead_fraction']:.1%}")
        if world > 1:
            # Ranks leave together: one tearing gloo down while rank 0 still saves can abort it.
            dist.barrier()
    finally:
        if started:
            dist.destroy_process_group()
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", formatter_class=_FMT, help="train a TopK SAE on one site's captured activations",
        description="""\
Train a TopK sparse autoencoder on the activations of one site (from `safedig capture`) and
save it as a TopKSAE file (--out). Decoder rows are kept at unit norm; activations are scaled
per site so that E||x s||^2 = d (the scale is folded into the saved weights); an AuxK loss
revives dead latents. Prints FVU (fraction of variance unexplained), L0 and the dead fraction.

With --checkpoint-dir, training checkpoints (safetensors + JSON) are written and an interrupted
run resumes from the newest one. Under torchrun the global --batch-size is split over the
processes (DDP; gloo on CPU, NCCL on GPU) and the result equals a single-process run.""",
        epilog="example: torchrun --nproc-per-node 2 -m safedig_kernels.cli train --activations acts/ "
               "--site single_transformer_blocks.0 --features 256 --k 16 --steps 500 --out sae0.safetensors")
    p.add_argument("--activations", required=True, help="capture directory")
    p.add_argument("--site", required=True, help="site to train on, e.g. single_transformer_blocks.0 or "
                                                 "transformer_blocks.1:text")
    p.add_argument("--out", required=True, help="SAE file to write")
    p.add_argument("--labels", default=None,
                   help="comma-separated label selectors to train on (default: all; 'unsafe' matches unsafe/*)")
    p.add_argument("--denoise-steps", type=_int_list, default=None, help="only these captured denoising steps")
    p.add_argument("--max-tokens", type=int, default=None, help="train on a seeded random subset of this many tokens")
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
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=_train)


# -- score -------------------------------------------------------------------------------------

def _score(args) -> int:
    from .steering.scoring import score_features
    from .training.store import ActivationStore

    store = ActivationStore(args.activations)
    sae = _load_sae(args.sae)
    report = score_features(store, args.site, sae, unsafe_labels=args.unsafe, safe_labels=args.safe,
                            rule=_rule(args), steps=args.denoise_steps, sae_path=args.sae)
    json_path, txt_path = report.write(args.report)
    print(report.table(rows=args.rows))
    print(f"report: {json_path} and {txt_path}")
    if args.out_sae:
        sae.set_harmful(report.harmful)
        sae.save(args.out_sae)
        print(f"{args.out_sae}: SAE with its {len(report.harmful)} harmful feature(s) set")
    return 0


def _add_score(sub) -> None:
    p = sub.add_parser(
        "score", formatter_class=_FMT, help="rank SAE features by unsafe-vs-safe firing; pick the harmful set",
        description="""\
Encode the activations of one site with its SAE and rank every feature by
score = mean activation on unsafe tokens - mean activation on safe tokens (a feature's mean
activation is its firing frequency times its size when active). Harmful features are those with
score > --min-score, unsafe frequency >= --min-freq and at least --min-ratio times their safe
frequency; the --top-n highest are kept. Writes a JSON report and a table (.txt) and prints the
table with the unsafe-vs-safe AUROC of the resulting harm score. --out-sae saves a copy of the SAE
with the harmful set stored in it.""",
        epilog="example: safedig score --activations acts/ --site single_transformer_blocks.0 --sae sae0.safetensors "
               "--unsafe unsafe/nudity --report score0.json")
    p.add_argument("--activations", required=True, help="capture directory")
    p.add_argument("--site", required=True, help="site the SAE belongs to")
    p.add_argument("--sae", required=True, help="SAE file")
    p.add_argument("--unsafe", default="unsafe", help="label selectors of unsafe prompts (default: unsafe, all categories)")
    p.add_argument("--safe", default="safe", help="label selectors of safe prompts (default: safe)")
    p.add_argument("--denoise-steps", type=_int_list, default=None, help="only these captured denoising steps")
    p.add_argument("--report", required=True, help="JSON report path (the table goes next to it as .txt)")
    p.add_argument("--out-sae", default=None, help="also save the SAE with the harmful set stored in it")
    p.add_argument("--rows", type=int, default=20, help="table rows to print (default 20)")
    _add_rule_args(p)
    p.set_defaults(fn=_score)


# -- route -------------------------------------------------------------------------------------

def _route(args) -> int:
    from .steering.routing import RouteConfig, route, write_steering_config
    from .training.store import ActivationStore

    store = ActivationStore(args.activations)
    saes = {}
    for site, path in args.sae:
        if site in saes:
            raise ValueError(f"--sae names site {site} twice")
        saes[site] = (_load_sae(path), path)
    config = RouteConfig(operators=tuple(args.operators), cost_weight=args.cost_weight, num_sites=args.num_sites,
                         rule=_rule(args), beta=args.beta, gamma=args.gamma, tau=args.tau, window=args.window,
                         cfg=args.cfg, steps=args.denoise_steps)
    report = route(store, saes, args.source, args.target, args.safe, config)
    json_path, txt_path = report.write(args.report)
    cfg_path = write_steering_config(report, args.config)
    print(report.table())
    print(f"report: {json_path} and {txt_path}; steering config: {cfg_path}")
    return 0


def _add_route(sub) -> None:
    p = sub.add_parser(
        "route", formatter_class=_FMT, help="rank (site, operator) pairs by robustness to a domain shift",
        description="""\
Before adaptation, score every (site, operator) pair, operator = blend | repel | both, by how
stable the site's safety features stay from the source risk domain (--source) to the target
(--target): overlap of the harmful sets found on each, reconstruction quality (1 - FVU) on the
target, and how well the source harm score separates target-unsafe from safe prompts, weighted
per operator, minus --cost-weight times the relative steering cost. Writes the ranked report
(JSON + .txt table) and a steering config JSON (--config) for the --num-sites best sites, each
with its best operator, as read by SafeDIGConfig.from_json (schema: safedig_kernels/steering/routing.py).""",
        epilog="example: safedig route --activations acts/ --sae single_transformer_blocks.0=sae0.safetensors "
               "--sae transformer_blocks.1=sae1.safetensors --source unsafe/nudity --target unsafe/violence "
               "--report route.json --config steer.json")
    p.add_argument("--activations", required=True, help="capture directory holding source, target and safe prompts")
    p.add_argument("--sae", type=_site_sae, action="append", required=True,
                   help="SITE=PATH of a candidate site and its source SAE (repeat for each site)")
    p.add_argument("--source", required=True, help="label selectors of the source unsafe domain, e.g. unsafe/nudity")
    p.add_argument("--target", required=True, help="label selectors of the target unsafe domain, e.g. unsafe/violence")
    p.add_argument("--safe", default="safe", help="label selectors of safe prompts (default: safe)")
    p.add_argument("--operators", type=_str_list, default=["blend", "repel", "both"],
                   help="operators to consider (default blend,repel,both)")
    p.add_argument("--num-sites", type=int, default=4, help="sites to put in the steering config (default 4)")
    p.add_argument("--cost-weight", type=float, default=0.1, help="weight of the relative cost (default 0.1)")
    p.add_argument("--beta", type=float, default=0.5, help="Blend strength written for blend/both (default 0.5)")
    p.add_argument("--gamma", type=float, default=1.0, help="Repel strength written for repel/both (default 1.0)")
    p.add_argument("--tau", type=float, default=0.0, help="gate threshold written to the config (default 0)")
    p.add_argument("--window", type=_window, default=(0.0, 1.0),
                   help="START,END fraction of the schedule to steer in (default 0.0,1.0)")
    p.add_argument("--cfg", default="both", help="CFG branches to steer, written to the config (default both)")
    p.add_argument("--denoise-steps", type=_int_list, default=None, help="only these captured denoising steps")
    p.add_argument("--report", required=True, help="JSON report path (table next to it as .txt)")
    p.add_argument("--config", required=True, help="steering config JSON to write")
    _add_rule_args(p)
    p.set_defaults(fn=_route)


# -- adapt -------------------------------------------------------------------------------------

def _adapt(args) -> int:
    from .training.adapt import AdaptConfig, adapt_decoder
    from .training.store import ActivationStore

    store = ActivationStore(args.activations)
    if args.replay > 0 and not args.source:
        raise ValueError("--replay > 0 needs --source labels to replay (or pass --replay 0)")
    device = _device(args.device)
    sae = _load_sae(args.sae, device=device)
    target = store.load(args.site, labels=args.target, steps=args.denoise_steps, max_tokens=args.max_tokens,
                        seed=args.seed)
    source = None
    if args.replay > 0:
        source = store.load(args.site, labels=args.source, steps=args.denoise_steps, max_tokens=args.max_tokens,
                            seed=args.seed)
    config = AdaptConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, replay=args.replay,
                         prox_coef=args.prox, train_b_dec=not args.freeze_b_dec, seed=args.seed)
    result = adapt_decoder(sae, target, source, config, device=device, progress=not args.no_progress)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result.sae.save(args.out)
    _write_json(args.metrics, {"sae": str(args.out), "source_sae": str(args.sae), "metrics": result.metrics,
                               "history": result.history})
    m = result.metrics
    line = f"target FVU {m['fvu_target_before']:.4f} -> {m['fvu_target_after']:.4f}"
    if "fvu_source_after" in m:
        line += f", source FVU {m['fvu_source_before']:.4f} -> {m['fvu_source_after']:.4f}"
    print(f"{args.out}: {line}; decoder moved {m['decoder_change']:.1%}; encoder unchanged")
    return 0


def _add_adapt(sub) -> None:
    p = sub.add_parser(
        "adapt", formatter_class=_FMT, help="adapt an SAE's decoder to a target domain, encoder frozen",
        description="""\
Decoder-only adaptation: keep the SAE's encoder (W_enc, b_enc) bit-identical, so its harmful
feature ids keep their meaning, and train only the decoder (W_dec, b_dec) on the target domain's
activations (--target), mixing in a --replay share of source activations (--source) and a
proximity term (--prox) that keeps the decoder near the source one. Saves the adapted SAE (--out)
and prints reconstruction error (FVU) on target and source before and after.""",
        epilog="example: safedig adapt --activations acts/ --site single_transformer_blocks.0 --sae sae0.safetensors "
               "--target unsafe/violence,safe --source unsafe/nudity,safe --out sae0-violence.safetensors")
    p.add_argument("--activations", required=True, help="capture directory")
    p.add_argument("--site", required=True, help="site the SAE belongs to")
    p.add_argument("--sae", required=True, help="source SAE file")
    p.add_argument("--target", required=True, help="label selectors of the target domain, e.g. unsafe/violence,safe")
    p.add_argument("--source", default=None, help="label selectors replayed from the source domain")
    p.add_argument("--replay", type=float, default=0.2, help="share of source tokens per batch (default 0.2)")
    p.add_argument("--prox", type=float, default=0.1, help="weight of the stay-near-the-source term (default 0.1)")
    p.add_argument("--freeze-b-dec", action="store_true",
                   help="keep b_dec too (it also centres the encoder input), so codes are exactly the source's")
    p.add_argument("--steps", type=int, default=500, help="optimizer steps (default 500)")
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per batch (default 4096)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--denoise-steps", type=_int_list, default=None, help="only these captured denoising steps")
    p.add_argument("--max-tokens", type=int, default=None, help="use at most this many tokens of each domain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="adapted SAE file to write")
    p.add_argument("--metrics", default=None, help="write metrics and history to this JSON file")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=_adapt)


# -- steer -------------------------------------------------------------------------------------

@contextlib.contextmanager
def _config_errors(path: str) -> Iterator[None]:
    """Report a bad steering config, or a model it does not fit, as one line naming the file
    (apply_safedig raises TypeError for an unsupported model, which `main` would not catch)."""
    try:
        yield
    except (ValueError, TypeError) as e:
        msg = str(e) if path in str(e) else f"--config {path}: {e}"
        raise ValueError(msg) from e


def _steer(args) -> int:
    from .integrations.diffusers import SafeDIGConfig
    from .steering.generate import (GenerateConfig, check_config, generate, load_saes, summarize, summary_table,
                                    time_steps, write_outputs)
    from .training._io import dtype_from_name
    from .training.capture import load_pipeline, load_prompts
    from .training.store import label_matches

    # Every cheap input is checked before the model loads and before anything is written.
    with _config_errors(args.config):
        config = SafeDIGConfig.from_json(args.config)
        loaded = load_saes(config)
    prompts = load_prompts(args.prompts)
    if args.labels:
        prompts = [p for p in prompts if label_matches(p.label, args.labels)]
        if not prompts:
            raise ValueError(f"--labels {args.labels} match no prompt in {args.prompts}")
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        prompts = prompts[: args.limit]
    tiny = args.model == "tiny-flux"
    gen = GenerateConfig(num_inference_steps=args.num_inference_steps, height=args.height or (32 if tiny else 1024),
                         width=args.width or (32 if tiny else 1024), guidance_scale=args.guidance_scale,
                         seed=args.seed, baseline=not args.no_baseline, decode=not args.no_images)
    model_dtype = dtype_from_name(args.model_dtype, "--model-dtype")
    device = _device(args.device)
    with _torch_threads(args.threads, args.model, device):
        pipe = load_pipeline(args.model, device=device, dtype=model_dtype)
        with _config_errors(args.config):
            check_config(pipe, loaded)
        runs = generate(pipe, prompts, loaded, gen, progress=not args.no_progress)
        timing = time_steps(pipe, prompts[0], loaded, gen, repeats=args.time) if args.time else None
    paths = write_outputs(runs, args.out, gen, config, extra={"config": str(Path(args.config).resolve()),
                                                              "model": args.model, "timing": timing})
    if gen.baseline:
        print(summary_table(summarize(runs)))
    if timing:
        print(f"time per denoising step ({timing['device']}, {timing['threads']} thread(s)): "
              f"{timing['ms_per_step_without']:.2f} ms without steering, {timing['ms_per_step_with']:.2f} ms with "
              f"({timing['overhead']:+.1%})")
    where = ", ".join(str(p) for k, p in paths.items() if k != "images")
    print(f"{len(runs)} prompt(s) -> {where}" + (f"; side-by-side images in {paths['images']}" if "images" in paths
                                                 else ""))
    return 0


def _add_steer(sub) -> None:
    p = sub.add_parser(
        "steer", formatter_class=_FMT, help="generate with and without steering from a steering config",
        description="""\
Generate every prompt of a prompt file with SafeDIG steering from a steering config (the JSON
that `safedig route` writes, read by SafeDIGConfig.from_json), next to the same prompt without
steering from the same noise, and write into --out:

  images/<id>.png   without | with steering | |difference|, side by side
  grid.png          every prompt, one row each
  report.json       per prompt: harm telemetry per site and step (SafeDIGHandle.telemetry():
                    harm score h of the tokens entering a site, share over the gate tau), the
                    mean harm score of the tokens each site passes on, with and without
                    steering, and how far steering moved the final latents; a summary per label

"Without" runs with the hooks installed and switched off, which is bitwise the unhooked model.
The steered run switches steering on whatever the config's "enabled" says. Prints a table per
label: harm score before and after, share of tokens steered, relative change of the latents.

Fails closed: a bad config, a missing SAE file, an unknown site or an SAE whose width is not
the site's stops with a one-line error (exit code 2) before anything is generated or written.""",
        epilog="example: safedig steer --model tiny-flux --config steer.json --prompts prompts.jsonl --out steered/")
    p.add_argument("--config", required=True,
                   help="steering config JSON (from `safedig route` or SafeDIGConfig.to_json)")
    p.add_argument("--prompts", required=True, help="prompt file (JSON Lines, as for `safedig capture`)")
    p.add_argument("--out", required=True, help="output directory for images/, grid.png and report.json")
    p.add_argument("--model", default="tiny-flux",
                   help="'tiny-flux' (built-in seeded random FLUX, CPU) or a diffusers pipeline directory / model id")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--model-dtype", default="float32", help="pipeline dtype: float32, bfloat16, float16")
    p.add_argument("--num-inference-steps", type=int, default=4, help="denoising steps per image (default 4)")
    p.add_argument("--height", type=int, default=None, help="image height (default 32 for tiny-flux, else 1024)")
    p.add_argument("--width", type=int, default=None, help="image width (default 32 for tiny-flux, else 1024)")
    p.add_argument("--guidance-scale", type=float, default=3.5, help="guidance scale passed to the pipeline")
    p.add_argument("--seed", type=int, default=0, help="noise seed base: prompt i uses seed + i unless it sets one")
    p.add_argument("--labels", default=None, help="only prompts with these label selectors, e.g. unsafe,safe")
    p.add_argument("--limit", type=int, default=None, help="only the first n prompts (after --labels)")
    p.add_argument("--no-baseline", action="store_true", help="skip the runs without steering")
    p.add_argument("--no-images", action="store_true", help="skip VAE decoding and PNGs (telemetry only)")
    p.add_argument("--time", type=int, default=0, metavar="REPEATS",
                   help="also time a denoising step with and without steering over REPEATS runs (default: off)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for tiny-flux on a CPU, else torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=_steer)


# -- demo --------------------------------------------------------------------------------------

def _demo_config(args):
    from .demo import DemoConfig

    fields = dict(model=args.model, device=args.device, model_dtype=args.model_dtype, prompts=args.prompts,
                  sites=args.sites, seed=args.seed)
    for name in ("source", "target", "height", "width", "num_inference_steps", "features", "k", "train_steps",
                 "num_sites", "eval_prompts", "train_prompts", "timing_repeats"):
        v = getattr(args, name)
        if v is not None:
            fields[name] = v
    return DemoConfig.quick_config(**fields) if args.quick else DemoConfig(**fields)


def _demo(args) -> int:
    from .demo import format_table, run_demo

    config = _demo_config(args)
    with _torch_threads(args.threads, config.model, _device(config.device)):
        summary = run_demo(args.out, config, progress=not args.no_progress)
    print()
    print(format_table(summary))
    f = summary["files"]
    print()
    print(f"picture grid: {f['grid']} (columns: unsteered, steered with the source SAEs, with the adapted SAEs, "
          f"|adapted - unsteered| amplified)")
    print(f"summary: {f['summary']}; steering configs: {f['steer_config']}, {f['steer_config_adapted']}; "
          f"per-prompt images and telemetry: {f['steer_source']}/, {f['steer_adapted']}/")
    if f.get("eval_prompts"):
        c = summary["config"]
        print(f"rerun the last stage: safedig steer --config {f['steer_config_adapted']} --prompts {f['eval_prompts']} "
              f"--height {c['height']} --width {c['width']} --num-inference-steps {c['num_inference_steps']} "
              f"--out {Path(args.out) / 'steer-again'}" + ("" if c["model"] == "tiny-flux" else f" --model {c['model']}"
                                                              f" --device {summary['overhead']['device']}"))
    print(f"done in {summary['seconds']['total']:.0f} s")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", formatter_class=_FMT, help="the whole workflow on a built-in tiny FLUX, end to end (CPU, < 2 min)",
        description="""\
The main job on a built-in default: with no arguments, build a tiny FLUX-architecture pipeline
with seeded random weights, define a synthetic unsafe concept (a direction added to the text
embeddings of unsafe prompts) as the source domain and a shifted one (another direction, sharing
part of the first) as the target, then run capture -> train -> score -> route -> adapt -> steer
through the same functions the other subcommands use, and print a before/after table:

  - harm score (SPEC §2) on held-out unsafe (source and target) and safe prompts, without
    steering and with it, with the source SAEs and with the decoder-adapted ones;
  - how far steering moved the final latents of each group (safe prompts should barely move:
    each site's gate tau is set at the 99th percentile of safe tokens' harm score);
  - time per denoising step with and without steering on this machine (CPU numbers on a tiny
    model, not GPU figures).

Routing ranks every candidate site; the demo steers the best --num-sites that have harmful
features at all (a site without any has nothing to steer, however well it reconstructs).

Writes into --out (default ./safedig-demo): grid.png (unsteered | source SAE | adapted SAE |
difference, four held-out prompts per label), summary.json (every number in the table), the steering
configs, SAEs, reports, and per-prompt images and telemetry (as `safedig steer` writes them).
Deterministic for a given --seed, apart from the timings. Well under two minutes on a CPU.

On a GPU with real weights: --model <FLUX.1-dev or SD3.5 pipeline dir / id> --device cuda
--model-dtype bfloat16 --prompts labelled.jsonl (text prompts labelled safe, --source and
--target); defaults then switch to 512x512, 8 steps, 256 tokens per capture, 4d-wide SAEs with
k = 32 and candidate sites spread over the blocks (--sites to choose).""",
        epilog="example: safedig demo            (or: safedig demo --out /tmp/demo --quick)")
    p.add_argument("--out", default="safedig-demo",
                   help="output directory (default ./safedig-demo; a previous demo's files there are replaced)")
    p.add_argument("--quick", action="store_true",
                   help="a smaller run (fewer prompts, steps and timing repeats) for tests and CI")
    p.add_argument("--model", default="tiny-flux",
                   help="'tiny-flux' (default: built-in, CPU) or a diffusers FLUX/SD3 pipeline directory / model id")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--model-dtype", default="float32", help="pipeline dtype: float32, bfloat16, float16")
    p.add_argument("--prompts", default=None,
                   help="labelled prompt file to use instead of the synthetic set (needed for real weights)")
    p.add_argument("--source", default=None, help="source unsafe label (default unsafe/concept_a)")
    p.add_argument("--target", default=None, help="target unsafe label (default unsafe/concept_b)")
    p.add_argument("--sites", type=_str_list, default=None, help="candidate sites (default: see above)")
    p.add_argument("--num-sites", type=int, default=None, help="sites to steer, chosen by routing (default 2)")
    p.add_argument("--train-prompts", type=int, default=None, help="synthetic prompts per label for capture (16)")
    p.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts per label to steer (8)")
    p.add_argument("--height", type=int, default=None, help="image height (16 tiny, 512 otherwise)")
    p.add_argument("--width", type=int, default=None, help="image width (16 tiny, 512 otherwise)")
    p.add_argument("--num-inference-steps", type=int, default=None, help="denoising steps (4 tiny, 8 otherwise)")
    p.add_argument("--features", type=int, default=None, help="SAE latents F (default 4 x d)")
    p.add_argument("--k", type=int, default=None, help="SAE active latents (4 tiny, 32 otherwise)")
    p.add_argument("--train-steps", type=int, default=None, help="SAE training steps (300)")
    p.add_argument("--timing-repeats", type=int, default=None, help="runs timed with and without steering (5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts, noise, training and adaptation (the tiny model's weights are fixed)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for tiny-flux on a CPU, else torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(fn=_demo)


def _add_bench(sub) -> None:
    # Listed for `safedig --help`; main() hands `safedig bench ...` to the suite's own parser.
    sub.add_parser("bench", add_help=False,
                   help="benchmark the ops (run, report, compare, results); `safedig bench --help`")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safedig", description=__doc__, formatter_class=_FMT)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_capture(sub)
    _add_train(sub)
    _add_score(sub)
    _add_route(sub)
    _add_adapt(sub)
    _add_steer(sub)
    _add_bench(sub)
    _add_demo(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # argparse will not hand an option-first remainder (`bench --help`) to a subparser: the
        # benchmark suite parses its own arguments.
        from .bench.commands import main as bench_main

        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, OSError) as e:
        # Bad input is reported as one line naming what was wrong, not a traceback.
        print(f"safedig {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
