"""`safedig demo`: the whole workflow on the demo world (or a model you name), end to end."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._options import (
    FORMATTER,
    add_model_options,
    add_no_progress,
    add_threads,
    check_paths,
    model_inputs,
    select_device,
    str_list,
    torch_threads,
)


def _demo_config(args: argparse.Namespace):
    """The DemoConfig the arguments ask for; options left unset keep DemoConfig's defaults."""
    from ..workflow.demo import DemoConfig

    fields = dict(device=args.device, model_dtype=args.model_dtype, prompts=args.prompts, sites=args.sites,
                  dictionary=args.dictionary, seed=args.seed, train_world=args.train_world)
    for name in ("model", "world", "world_steps", "detector", "source", "target", "height", "width",
                 "num_inference_steps", "features", "k", "train_steps", "num_sites", "eval_prompts", "train_prompts",
                 "timing_repeats", "min_psnr_db"):
        v = getattr(args, name)
        if v is not None:
            fields[name] = v
    return DemoConfig.quick_config(**fields) if args.quick else DemoConfig(**fields)


def run(args: argparse.Namespace) -> int:
    from ..workflow.demo import format_table, run_demo

    config = _demo_config(args)
    # The demo clears its previous outputs in --out first: nothing it reads may lie there.
    check_paths(inputs=[("--prompts", config.prompts), ("--world", config.world)] + model_inputs(config.model),
                folders=[("--out", args.out)])
    with torch_threads(args.threads, config.model, select_device(config.device)):
        summary = run_demo(args.out, config, progress=not args.no_progress)
    print()
    print(format_table(summary))
    f = summary["files"]
    print()
    print(f"picture grid: {f['grid']} (columns: unsteered, steered with the source SAEs, with SafeDIG, "
          f"|adapted - unsteered| amplified)")
    print(f"summary: {f['summary']}; steering configs: {f['steer_config']}, {f['steer_config_adapted']}; "
          f"per-prompt images and telemetry: {f['steer_source']}/, {f['steer_adapted']}/")
    if f.get("eval"):
        print(f"evaluation: {f['eval']}/eval.md, eval.json, eval.png")
    if f.get("eval_prompts"):
        c = summary["config"]
        model = f"world:{f['world']}" if f.get("world") else c["model"]
        pipeline = (f"--model {model} --height {c['height']} --width {c['width']} --num-inference-steps "
                    f"{c['num_inference_steps']}" + ("" if c["model"] in ("tiny-flux", "world")
                                                     else f" --device {summary['overhead']['device']}"))
        print(f"rerun the last stage: safedig steer --config {f['steer_config_adapted']} --prompts {f['eval_prompts']} "
              f"{pipeline} --out {Path(args.out) / 'steer-again'}")
        if c.get("detector"):
            print(f"evaluate again: safedig eval --prompts {f['eval_prompts']} --config source={f['steer_config']} "
                  f"--config adapted={f['steer_config_adapted']} {pipeline} --detector {c['detector']} "
                  f"--out {Path(args.out) / 'eval-again'}")
    print(f"done in {summary['seconds']['total']:.0f} s")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", formatter_class=FORMATTER,
        help="the whole workflow on the demo world, end to end, judged by a detector (CPU, a few minutes)",
        description="""\
The main job on a built-in default. With no arguments:

  0. load the demo world's transformer (a tiny FLUX architecture, 0.46 M parameters, shipped
     weights for --seed 0; other seeds, or --train-world, train it here by rectified flow): it
     draws 16x16 pictures of a circle or a square on a plain background; a prompt asking for
     mark A adds a red X reaching into the corners (the source "unsafe" domain), one asking for mark A
     "gold" adds the same X gilded with yellow (the target domain: the same concept in a new
     context), and "gold" alone draws the gilding without the X (a drawing the world learns, so
     the gilding has a pathway of its own; its prompts only train the SAEs, --dictionary);
  1-8. run capture -> train -> score -> route -> adapt -> validate -> steer on its prompts through
     the same functions the other subcommands use: one SAE per candidate site trained on the
     source, safe and gold-alone prompts (the frozen encoder every method shares), its harmful
     features scored (on the source, and with the frozen encoder on the target), the best sites
     routed and gated (tau at the 99th percentile of safe tokens' harm score), every steerable
     site's decoder adapted to the target (encoder frozen), and each method's operators
     (Blend, Repel, both, or routing's per-site choice) validated by steering its own training
     prompts: the fewest unsafe images with safe PSNR >= --min-psnr,
     at the routed sites and then at every site the method can steer;
  eval. judge every held-out image with the world's detector (independent of every SAE: it
     counts the X, recoloured or not, and a leftover strip in its shape, as a person would).

It ends with the paper-shaped table: one row per method (no steering; source SAEs, the steerer
learned on the source alone; SafeDIG = frozen encoder + adapted decoder + validated sites; full
fine-tune of the SAE; SafeDIG with the source decoders; the best and the
worst single fixed site without routing; Blend only; Repel only; both), columns the source,
target and overall unsafe rate with 95 % Wilson intervals, the safe prompts' rate and safe-image
PSNR/SSIM; before it, the routing check (each candidate site alone, adapted: the target rate it
leaves and its rank), the harm score leaving the steered sites, how far steering moved the
final latents, and the time per denoising step with and without steering (CPU numbers).

Writes into --out (default ./safedig-demo): grid.png (unsteered | source SAE | SafeDIG |
difference, four held-out prompts per label), summary.json (every number printed; the unsafe
rates as unsafe_rate[label][column], safe PSNR as safe_psnr_db[column], the table as methods,
the seed and the domains), eval/ (eval.md, eval.json, eval.png), the steering configs, SAEs,
reports, and per-prompt images and telemetry (as `safedig steer` writes them). Deterministic for
a given --seed on one machine, apart from the timings. --quick uses fewer prompts and steps.

--model tiny-flux runs the older synthetic demo: a random-weight tiny FLUX whose unsafe concept
is a direction added to the text embeddings (no detector; its pictures are noise).

On a GPU with real weights: --model <FLUX.1-dev or SD3.5 pipeline dir / id> --device cuda
--model-dtype bfloat16 --prompts labelled.jsonl (text prompts labelled safe, --source and
--target) [--detector nudenet]; defaults then switch to 512x512, 8 steps, 256 tokens per
capture, 4d-wide SAEs with k = 32 and candidate sites spread over the blocks (--sites).""",
        epilog="example: safedig demo            (or: safedig demo --out /tmp/demo --quick)")
    p.add_argument("--out", default="safedig-demo",
                   help="output directory (default ./safedig-demo; a previous demo's files there are replaced)")
    p.add_argument("--quick", action="store_true",
                   help="a smaller run on the shipped world weights (fewer prompts and steps) for tests and CI")
    add_model_options(p, default=None, model_help="'world' (default: the demo world, CPU), 'tiny-flux' (random "
                                                  "weights) or a diffusers FLUX/SD3 pipeline directory / model id")
    p.add_argument("--world", default=None,
                   help="world weights to use instead of training them (a previous demo's world/world.safetensors)")
    p.add_argument("--world-steps", type=int, default=None, help="training steps of the world's transformer (1000)")
    p.add_argument("--train-world", action="store_true",
                   help="train the world's transformer even where the shipped weights match --seed and --world-steps")
    p.add_argument("--detector", default=None,
                   help="detector judging the images: world (default for the world), nudenet (the [eval] extra); "
                        "none by default for other models")
    p.add_argument("--prompts", default=None,
                   help="labelled prompt file to use instead of the synthetic set (needed for real weights)")
    p.add_argument("--source", default=None, help="source unsafe label (default unsafe/concept_a)")
    p.add_argument("--target", default=None,
                   help="target unsafe label (default: unsafe/concept_a_gold for the world, else unsafe/concept_b)")
    p.add_argument("--sites", type=str_list, default=None, help="candidate sites (default: see above)")
    p.add_argument("--dictionary", type=str_list, default=None,
                   help="further labels whose training prompts the SAEs also train on, and nothing else (default: "
                        "unsafe/gilding for the world, none otherwise)")
    p.add_argument("--num-sites", type=int, default=None,
                   help="sites to steer, chosen by routing (default 3 for the world, 2 otherwise)")
    p.add_argument("--train-prompts", type=int, default=None, help="synthetic prompts per label for capture (16)")
    p.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts per label to steer (16)")
    p.add_argument("--height", type=int, default=None, help="image height (16 world/tiny-flux, 512 otherwise)")
    p.add_argument("--width", type=int, default=None, help="image width (16 world/tiny-flux, 512 otherwise)")
    p.add_argument("--num-inference-steps", type=int, default=None,
                   help="denoising steps (16 world, 4 tiny-flux, 8 otherwise)")
    p.add_argument("--features", type=int, default=None, help="SAE latents F (default 4 x d)")
    p.add_argument("--k", type=int, default=None, help="SAE active latents (4 world and tiny-flux, 32 otherwise)")
    p.add_argument("--train-steps", type=int, default=None, help="SAE training steps (300)")
    p.add_argument("--min-psnr", dest="min_psnr_db", type=float, default=None,
                   help="quality budget when each method's operators are validated on its training prompts: the "
                        "safe images' PSNR against the unsteered ones, in dB (30)")
    p.add_argument("--timing-repeats", type=int, default=None, help="runs timed with and without steering (5)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the world's training, the prompts, noise, SAE training and adaptation")
    add_threads(p)
    add_no_progress(p, help="no progress bars")
    p.set_defaults(fn=run)
