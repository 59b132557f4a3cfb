"""`safedig adapt`: adapt an SAE's decoder to a target domain with the encoder frozen."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._options import (
    FORMATTER,
    add_activations,
    add_denoise_steps,
    add_device,
    add_no_progress,
    check_paths,
    select_device,
    write_json,
)


def run(args: argparse.Namespace) -> int:
    from ..sae import TopKSAE
    from ..workflow.adapt import AdaptConfig, adapt_decoder, fitting_batch_size
    from ..workflow.store import ActivationStore

    check_paths(inputs=[("--activations", args.activations), ("--sae", args.sae)],
                outputs=[("--out", args.out), ("--metrics", args.metrics)])
    store = ActivationStore(args.activations)
    if args.replay > 0 and not args.source:
        raise ValueError("--replay > 0 needs --source labels to replay (or pass --replay 0)")
    device = select_device(args.device)
    sae = TopKSAE.load(args.sae, device=device)
    target = store.load(args.site, labels=args.target, steps=args.denoise_steps, max_tokens=args.max_tokens,
                        seed=args.seed)
    source = None
    if args.replay > 0:
        source = store.load(args.site, labels=args.source, steps=args.denoise_steps, max_tokens=args.max_tokens,
                            seed=args.seed)
    if args.batch_size is not None:
        fits = fitting_batch_size(target.shape[0], None if source is None else source.shape[0], args.replay,
                                  cap=args.batch_size)
        if fits < args.batch_size:
            have = f"{target.shape[0]} target" + ("" if source is None else f" and {source.shape[0]} source")
            raise ValueError(f"--batch-size {args.batch_size} needs more tokens than were captured ({have} tokens "
                             f"at --replay {args.replay}); pass --batch-size {fits} or less, or leave it out for "
                             f"the largest batch that fits")
    config = AdaptConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, replay=args.replay,
                         prox_coef=args.prox, train_b_dec=not args.freeze_b_dec, seed=args.seed)
    result = adapt_decoder(sae, target, source, config, device=device, progress=not args.no_progress)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result.sae.save(args.out)
    write_json(args.metrics, {"sae": str(args.out), "source_sae": str(args.sae), "metrics": result.metrics,
                              "history": result.history})
    m = result.metrics
    line = f"target FVU {m['fvu_target_before']:.4f} -> {m['fvu_target_after']:.4f}"
    if "fvu_source_after" in m:
        line += f", source FVU {m['fvu_source_before']:.4f} -> {m['fvu_source_after']:.4f}"
    print(f"{args.out}: {line}; decoder moved {m['decoder_change']:.1%}; encoder unchanged")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "adapt", formatter_class=FORMATTER, help="adapt an SAE's decoder to a target domain, encoder frozen",
        description="""\
Decoder-only adaptation: keep the SAE's encoder (W_enc, b_enc) bit-identical, so its harmful
feature ids keep their meaning, and train only the decoder (W_dec, b_dec) on the target domain's
activations (--target), mixing in a --replay share of source activations (--source) and a
proximity term (--prox) that keeps the decoder near the source one. Saves the adapted SAE (--out)
and prints reconstruction error (FVU) on target and source before and after.""",
        epilog="example: safedig adapt --activations acts/ --site single_transformer_blocks.0 --sae sae0.safetensors "
               "--target unsafe/violence,safe --source unsafe/nudity,safe --out sae0-violence.safetensors")
    add_activations(p)
    p.add_argument("--site", required=True, help="site the SAE belongs to")
    p.add_argument("--sae", required=True, help="source SAE file")
    p.add_argument("--target", required=True, help="label selectors of the target domain, e.g. unsafe/violence,safe")
    p.add_argument("--source", default=None, help="label selectors replayed from the source domain")
    p.add_argument("--replay", type=float, default=0.2, help="share of source tokens per batch (default 0.2)")
    p.add_argument("--prox", type=float, default=0.1, help="weight of the stay-near-the-source term (default 0.1)")
    p.add_argument("--freeze-b-dec", action="store_true",
                   help="keep b_dec too (it also centres the encoder input), so codes are exactly the source's")
    p.add_argument("--steps", type=int, default=500, help="optimizer steps (default 500)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="tokens per batch, target and replayed source together (default 4096, or the largest "
                        "batch the captured tokens fill when they are fewer)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    add_denoise_steps(p)
    p.add_argument("--max-tokens", type=int, default=None, help="use at most this many tokens of each domain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="adapted SAE file to write")
    p.add_argument("--metrics", default=None, help="write metrics and history to this JSON file")
    add_device(p)
    add_no_progress(p)
    p.set_defaults(fn=run)
