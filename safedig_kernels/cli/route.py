"""`safedig route`: rank (site, operator) pairs by robustness to a risk-domain shift and write the
steering config."""
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
    site_sae,
    str_list,
    window,
)


def run(args: argparse.Namespace) -> int:
    from ..sae import TopKSAE
    from ..workflow.route import RouteConfig, route, write_steering_config
    from ..workflow.store import ActivationStore

    check_paths(inputs=[("--activations", args.activations)] + [(f"--sae ({site})", path) for site, path in args.sae],
                outputs=report_outputs("--report", args.report) + [("--config", args.config)])
    store = ActivationStore(args.activations)
    saes = {}
    for site, path in args.sae:
        if site in saes:
            raise ValueError(f"--sae names site {site} twice")
        saes[site] = (TopKSAE.load(path), path)
    config = RouteConfig(operators=tuple(args.operators), cost_weight=args.cost_weight, num_sites=args.num_sites,
                         rule=harmful_rule(args), beta=args.beta, gamma=args.gamma, tau=args.tau,
                         tau_quantile=args.tau_quantile, window=args.window, cfg=args.cfg, steps=args.denoise_steps)
    report = route(store, saes, args.source, args.target, args.safe, config)
    json_path, txt_path = report.write(args.report)
    cfg_path = write_steering_config(report, args.config)
    print(report.table())
    if len(report.selected) < args.num_sites:
        print(f"note: {len(report.selected)} of --num-sites {args.num_sites} sites selected: only these candidates "
              f"have harmful features")
    print(f"report: {json_path} and {txt_path}; steering config: {cfg_path}")
    return 0


def tau_quantile(text: str) -> float:
    try:
        q = float(text)
    except ValueError:
        q = float("nan")
    if not 0.0 < q < 1.0:
        raise argparse.ArgumentTypeError(f"expected a quantile in (0, 1) such as 0.99, got {text!r}")
    return q


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "route", formatter_class=FORMATTER, help="rank (site, operator) pairs by robustness to a domain shift",
        description="""\
Before adaptation, score every (site, operator) pair, operator = blend | repel | both, by how
stable the site's safety features stay from the source risk domain (--source) to the target
(--target): overlap of the harmful sets found on each, reconstruction quality (1 - FVU) on the
target, and how well the source harm score separates target-unsafe from safe prompts, weighted
per operator, minus --cost-weight times the relative steering cost. Writes the ranked report
(JSON + .txt table) and a steering config JSON (--config) for the --num-sites best sites, each
with its best operator, as read by SafeDIGConfig.from_json
(schema: safedig_kernels/integrations/diffusers/config.py).

Only sites with harmful features (on the source or the target) are selected: at a site with
none the harm score is 0 on every token and `safedig steer` refuses it, so such sites are passed
over (listed under the table). Each selected site's harmful set is the union of the source's and
the target's. Its gate threshold tau is calibrated on the captured safe tokens: the
--tau-quantile Q quantile of the site's harm score, so that about 1 - Q of safe tokens are
steered (default Q = 0.99: about 1 % of safe tokens). --tau T writes one threshold for every
site instead. The default used to be --tau 0, which steers every token where any harmful
feature fires (in one run 48 % of the safe tokens); pass --tau 0 to get it back.""",
        epilog="example: safedig route --activations acts/ --sae single_transformer_blocks.0=sae0.safetensors "
               "--sae transformer_blocks.1=sae1.safetensors --source unsafe/nudity --target unsafe/violence "
               "--report route.json --config steer.json")
    add_activations(p, help="capture directory holding source, target and safe prompts")
    p.add_argument("--sae", type=site_sae, action="append", required=True,
                   help="SITE=PATH of a candidate site and its source SAE (repeat for each site)")
    p.add_argument("--source", required=True, help="label selectors of the source unsafe domain, e.g. unsafe/nudity")
    p.add_argument("--target", required=True, help="label selectors of the target unsafe domain, e.g. unsafe/violence")
    p.add_argument("--safe", default="safe", help="label selectors of safe prompts (default: safe)")
    p.add_argument("--operators", type=str_list, default=["blend", "repel", "both"],
                   help="operators to consider (default blend,repel,both)")
    p.add_argument("--num-sites", type=int, default=4, help="sites to put in the steering config (default 4)")
    p.add_argument("--cost-weight", type=float, default=0.1, help="weight of the relative cost (default 0.1)")
    p.add_argument("--beta", type=float, default=0.5, help="Blend strength written for blend/both (default 0.5)")
    p.add_argument("--gamma", type=float, default=1.0, help="Repel strength written for repel/both (default 1.0)")
    gate = p.add_mutually_exclusive_group()
    gate.add_argument("--tau-quantile", type=tau_quantile, default=None, metavar="Q",
                      help="calibrate each site's gate threshold tau as the Q quantile of its harm score over the "
                           "captured --safe tokens, so about 1 - Q of safe tokens are steered (default 0.99)")
    gate.add_argument("--tau", type=float, default=None,
                      help="one gate threshold for every site instead of --tau-quantile (tau = 0 steers every "
                           "token where a harmful feature fires)")
    p.add_argument("--window", type=window, default=(0.0, 1.0),
                   help="START,END fraction of the schedule to steer in (default 0.0,1.0)")
    p.add_argument("--cfg", default="both", help="CFG branches to steer, written to the config (default both)")
    add_denoise_steps(p)
    p.add_argument("--report", required=True, help="JSON report path (table next to it as .txt)")
    p.add_argument("--config", required=True, help="steering config JSON to write")
    add_rule_options(p)
    p.set_defaults(fn=run)
