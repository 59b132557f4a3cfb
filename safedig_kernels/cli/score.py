"""`safedig score`: rank an SAE's features by unsafe-vs-safe firing and pick the harmful set."""
from __future__ import annotations

import argparse

from ._options import (
    FORMATTER,
    add_activations,
    add_denoise_steps,
    add_rule_options,
    check_paths,
    harmful_rule,
    report_outputs,
)


def run(args: argparse.Namespace) -> int:
    from ..sae import TopKSAE
    from ..workflow.score import score_features
    from ..workflow.store import ActivationStore

    # No output may overwrite an input (the SAE above all) or land inside the capture.
    check_paths(inputs=[("--activations", args.activations), ("--sae", args.sae)],
                outputs=report_outputs("--report", args.report) + [("--out-sae", args.out_sae)])
    store = ActivationStore(args.activations)
    sae = TopKSAE.load(args.sae)
    report = score_features(store, args.site, sae, unsafe_labels=args.unsafe, safe_labels=args.safe,
                            rule=harmful_rule(args), steps=args.denoise_steps, sae_path=args.sae,
                            allow_other_site=args.allow_other_site)
    json_path, txt_path = report.write(args.report)
    print(report.table(rows=args.rows))
    print(f"report: {json_path} and {txt_path}")
    if args.out_sae:
        sae.set_harmful(report.harmful)
        sae.save(args.out_sae)
        print(f"{args.out_sae}: SAE with its {len(report.harmful)} harmful feature(s) set")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "score", formatter_class=FORMATTER, help="rank SAE features by unsafe-vs-safe firing; pick the harmful set",
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
    add_activations(p)
    p.add_argument("--site", required=True, help="site the SAE belongs to")
    p.add_argument("--sae", required=True, help="SAE file")
    p.add_argument("--unsafe", default="unsafe",
                   help="label selectors of unsafe prompts (default: unsafe, all categories)")
    p.add_argument("--safe", default="safe", help="label selectors of safe prompts (default: safe)")
    add_denoise_steps(p)
    p.add_argument("--report", required=True, help="JSON report path (the table goes next to it as .txt)")
    p.add_argument("--out-sae", default=None, help="also save the SAE with the harmful set stored in it")
    p.add_argument("--allow-other-site", action="store_true",
                   help="score with an SAE whose metadata names another site or stream (refused otherwise)")
    p.add_argument("--rows", type=int, default=20, help="table rows to print (default 20)")
    add_rule_options(p)
    p.set_defaults(fn=run)
