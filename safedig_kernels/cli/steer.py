"""`safedig steer`: generate with and without steering from a steering config; images and harm
telemetry."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._options import (
    FORMATTER,
    add_no_progress,
    add_pipeline_options,
    add_threads,
    check_paths,
    config_errors,
    denoise_steps,
    image_size,
    model_inputs,
    select_device,
    torch_threads,
)


def run(args: argparse.Namespace) -> int:
    from .._io import dtype_from_name
    from ..integrations.diffusers import SafeDIGConfig, check_config
    from ..sae import TopKSAE
    from ..workflow.generate import GenerateConfig, generate, time_steps
    from ..workflow.pipelines import load_pipeline
    from ..workflow.prompts import label_matches, load_prompts
    from ..workflow.report import summarize, summary_table, write_outputs

    # Every cheap input is checked before the model loads and before anything is written.
    with config_errors(args.config):
        config = SafeDIGConfig.from_json(args.config)
    out = Path(args.out)
    sae_paths = [(f"--config's site {s.site} SAE", s.sae) for s in config.sites
                 if not isinstance(s.sae, TopKSAE) and not str(s.sae).startswith("hf://")]  # Hub names are no files
    check_paths(inputs=[("--config", args.config), ("--prompts", args.prompts)] + sae_paths
                + model_inputs(args.model),
                outputs=[("--out", out / "report.json"), ("--out", out / "grid.png")],
                folders=[("--out", out / "images")])
    with config_errors(args.config):
        loaded = config.with_loaded_saes()
    prompts = load_prompts(args.prompts)
    if args.labels:
        prompts = [p for p in prompts if label_matches(p.label, args.labels)]
        if not prompts:
            raise ValueError(f"--labels {args.labels} match no prompt in {args.prompts}")
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        prompts = prompts[: args.limit]
    height, width = image_size(args)
    gen = GenerateConfig(num_inference_steps=denoise_steps(args), height=height, width=width,
                         guidance_scale=args.guidance_scale, seed=args.seed, baseline=not args.no_baseline,
                         decode=not args.no_images)
    model_dtype = dtype_from_name(args.model_dtype, "--model-dtype")
    device = select_device(args.device)
    with torch_threads(args.threads, args.model, device):
        pipe = load_pipeline(args.model, device=device, dtype=model_dtype)
        with config_errors(args.config):
            plan = check_config(pipe, loaded)
        runs = generate(pipe, prompts, plan, gen, progress=not args.no_progress)
        timing = time_steps(pipe, prompts[0], plan, gen, repeats=args.time) if args.time else None
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


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "steer", formatter_class=FORMATTER, help="generate with and without steering from a steering config",
        description="""\
Generate every prompt of a prompt file with SafeDIG steering from a steering config (the JSON
that `safedig route` writes, read by SafeDIGConfig.from_json), next to the same prompt without
steering from the same noise, and write into --out:

  images/<id>.png   without | with steering | |difference|, side by side (an id that is not a
                    safe file name gets images/prompt-<index>-<hash>.png; report.json says which)
  grid.png          every prompt, one row each
  report.json       per prompt: harm telemetry per site and step (SafeDIGHandle.telemetry():
                    harm score h of the tokens entering a site, share over the gate tau), the
                    mean harm score of the tokens each site passes on, with and without
                    steering, and how far steering moved the final latents; a summary per label

"Without" runs with the hooks installed and switched off, which is bitwise the unhooked model.
The steered run switches steering on whatever the config's "enabled" says. Prints a table per
label: harm score before and after, share of tokens steered, relative change of the latents.

Fails closed: a bad config, a missing SAE file, an unknown site, an SAE whose width is not
the site's, or an --out that would overwrite an input or lie inside an activation store stops
with a one-line error (exit code 2) before anything is generated or written.""",
        epilog="example: safedig steer --model tiny-flux --config steer.json --prompts prompts.jsonl --out steered/")
    p.add_argument("--config", required=True,
                   help="steering config JSON (from `safedig route` or SafeDIGConfig.to_json)")
    p.add_argument("--prompts", required=True, help="prompt file (JSON Lines, as for `safedig capture`)")
    p.add_argument("--out", required=True, help="output directory for images/, grid.png and report.json")
    add_pipeline_options(p)
    p.add_argument("--labels", default=None, help="only prompts with these label selectors, e.g. unsafe,safe")
    p.add_argument("--limit", type=int, default=None, help="only the first n prompts (after --labels)")
    p.add_argument("--no-baseline", action="store_true", help="skip the runs without steering")
    p.add_argument("--no-images", action="store_true", help="skip VAE decoding and PNGs (telemetry only)")
    p.add_argument("--time", type=int, default=0, metavar="REPEATS",
                   help="also time a denoising step with and without steering over REPEATS runs (default: off)")
    add_threads(p)
    add_no_progress(p)
    p.set_defaults(fn=run)
