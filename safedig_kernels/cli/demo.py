"""`safedig demo`: the whole workflow on a built-in tiny FLUX, end to end."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._options import FORMATTER, add_model_options, add_no_progress, add_threads, select_device, str_list, torch_threads


def _demo_config(args: argparse.Namespace):
    """The DemoConfig the arguments ask for; options left unset keep DemoConfig's defaults."""
    from ..workflow.demo import DemoConfig

    fields = dict(model=args.model, device=args.device, model_dtype=args.model_dtype, prompts=args.prompts,
                  sites=args.sites, seed=args.seed)
    for name in ("source", "target", "height", "width", "num_inference_steps", "features", "k", "train_steps",
                 "num_sites", "eval_prompts", "train_prompts", "timing_repeats"):
        v = getattr(args, name)
        if v is not None:
            fields[name] = v
    return DemoConfig.quick_config(**fields) if args.quick else DemoConfig(**fields)


def run(args: argparse.Namespace) -> int:
    from ..workflow.demo import format_table, run_demo

    config = _demo_config(args)
    with torch_threads(args.threads, config.model, select_device(config.device)):
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


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", formatter_class=FORMATTER,
        help="the whole workflow on a built-in tiny FLUX, end to end (CPU, < 2 min)",
        description="""\
The main job on a built-in default: with no arguments, build a tiny FLUX-architecture pipeline
with seeded random weights, define a synthetic unsafe concept (a direction added to the text
embeddings of unsafe prompts) as the source domain and a shifted one (another direction, sharing
part of the first) as the target, then run capture -> train -> score -> route -> adapt -> steer
through the same functions the other subcommands use, and print a before/after table:

  - harm score (spec §2) on held-out unsafe (source and target) and safe prompts, without
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
    add_model_options(p, model_help="'tiny-flux' (default: built-in, CPU) or a diffusers FLUX/SD3 pipeline directory "
                                    "/ model id")
    p.add_argument("--prompts", default=None,
                   help="labelled prompt file to use instead of the synthetic set (needed for real weights)")
    p.add_argument("--source", default=None, help="source unsafe label (default unsafe/concept_a)")
    p.add_argument("--target", default=None, help="target unsafe label (default unsafe/concept_b)")
    p.add_argument("--sites", type=str_list, default=None, help="candidate sites (default: see above)")
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
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the prompts, noise, training and adaptation (the tiny model's weights are fixed)")
    add_threads(p)
    add_no_progress(p, help="no progress bars")
    p.set_defaults(fn=run)
