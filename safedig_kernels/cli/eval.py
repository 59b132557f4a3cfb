"""`safedig eval`: the unsafe rate a detector sees, per label, unsteered and steered by one or
more configs, and how far steering moved the safe images."""
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


def config_arg(text: str) -> tuple[str, str]:
    name, eq, path = text.partition("=")
    if not eq or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH such as adapted=steer-adapted.json, got {text!r}")
    return name, path


def run(args: argparse.Namespace) -> int:
    from ..integrations.diffusers import SafeDIGConfig, check_config
    from ..sae import TopKSAE
    from ..workflow.detectors import get_detector
    from ..workflow.eval import (
        check_column_names,
        check_image_folder,
        evaluate_images,
        generate_runs,
        load_images,
        run_images,
        write_images,
    )
    from ..workflow.prompts import load_prompts

    if bool(args.config) == bool(args.images):
        raise ValueError("give either --config NAME=PATH (one or more; images are generated) or --images DIR "
                         "(images generated before), not both and not neither")
    names = [name for name, _ in args.config or []]
    check_column_names(names, "--config name")
    if len(set(names)) != len(names):
        raise ValueError(f"--config names must differ, got {names}")
    if names:
        check_image_folder(Path(args.out) / "images", names)
    options = {} if args.threshold is None else {"threshold": args.threshold}
    if options and args.detector != "nudenet":
        raise ValueError(f"--threshold applies to the nudenet detector, not {args.detector!r}")
    # Every cheap input is checked before the model and the detector load and before anything is written.
    configs = {}
    for name, path in args.config or []:
        with config_errors(name):
            configs[name] = SafeDIGConfig.from_json(path)
    out = Path(args.out)
    sae_inputs = [(f"--config {name}'s SAE", s.sae) for name, c in configs.items() for s in c.sites
                  if not isinstance(s.sae, TopKSAE)]
    check_paths(inputs=[("--prompts", args.prompts), ("--images", args.images)]
                + [(f"--config {name}", path) for name, path in args.config or []] + sae_inputs
                + (model_inputs(args.model) if configs else []),
                outputs=[("--out", out / f"eval.{ext}") for ext in ("json", "md", "png")],
                folders=[("--out", out / "images")] if configs else [])
    if args.images and (out.resolve() == Path(args.images).resolve() or Path(args.images).resolve() in
                        out.resolve().parents):
        # every sub-folder of --images is read as a column, so --out there would become one
        raise ValueError(f"--out {out} lies inside --images {args.images}; choose an --out outside it")
    prompts = load_prompts(args.prompts)
    loaded = {}
    for name, c in configs.items():
        with config_errors(name):
            loaded[name] = c.with_loaded_saes()
    try:
        detector = get_detector(args.detector, **options)
    except ImportError as e:  # nudenet without the [eval] extra: one line, not a traceback
        raise ValueError(str(e)) from e
    if args.images:
        images = load_images(args.images, prompts)
    else:
        from .._io import dtype_from_name
        from ..workflow.generate import GenerateConfig
        from ..workflow.pipelines import load_pipeline

        height, width = image_size(args)
        gen = GenerateConfig(num_inference_steps=denoise_steps(args), height=height, width=width,
                             guidance_scale=args.guidance_scale, seed=args.seed)
        device = select_device(args.device)
        with torch_threads(args.threads, args.model, device):
            pipe = load_pipeline(args.model, device=device, dtype=dtype_from_name(args.model_dtype, "--model-dtype"))
            for name, c in loaded.items():
                with config_errors(name):
                    check_config(pipe, c)
            images = run_images(generate_runs(pipe, prompts, loaded, gen, progress=not args.no_progress))
        write_images(images, prompts, out / "images")
    labels = {p.id: p.label for p in prompts}
    order = list(dict.fromkeys(p.label for p in prompts))
    report = evaluate_images(images, labels, detector, label_order=order)
    paths = report.write(out)
    print(report.markdown())
    print()
    print(f"{len(prompts)} prompt(s) x {len(report.columns)} column(s) -> "
          + ", ".join(str(p) for p in paths.values()) + (f"; images in {out / 'images'}" if configs else ""))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", formatter_class=FORMATTER,
        help="unsafe rate judged by a detector, unsteered and steered, and how much safe images moved",
        description="""\
Judge images with a detector that knows nothing of the SAEs, per prompt label and column:

  --config NAME=PATH (repeatable): generate every prompt of --prompts without steering (column
      `unsteered`) and steered by each steering config (column NAME), from the same noise per
      prompt, and save them as --out/images/<column>/<prompt>.png;
  --images DIR: judge images generated before, DIR/<column>/<prompt>.png as the first way
      writes them (DIR/unsteered/ is the reference; every other sub-folder is a column).

Detectors (--detector): `world`, the demo world's judge (unsafe when mark A's X, recoloured or
not, or a leftover strip in its shape is there, as a person would say; 16x16 pictures or square
multiples); `nudenet`, the NudeNet detector (pip install 'safedig-kernels[eval]'): unsafe when a
detection of an exposed class scores at least --threshold (default 0.6).

Reports, per label and column, the unsafe rate with its 95 % Wilson interval and, for prompts
labelled safe, PSNR and SSIM of each steered column against the unsteered images (steering
should leave them nearly unchanged). Writes --out/eval.json, eval.md (the table, also printed)
and eval.png (rates with their intervals; needs matplotlib, the [plots] extra).""",
        epilog="example: safedig eval --model world --prompts eval.jsonl --config adapted=steer-adapted.json "
               "--detector world --out eval/")
    p.add_argument("--prompts", required=True, help="labelled prompt file (JSON Lines, as for `safedig capture`)")
    p.add_argument("--config", type=config_arg, action="append", default=None, metavar="NAME=PATH",
                   help="a steering config to generate with, named for its column (repeatable)")
    p.add_argument("--images", default=None, help="judge the images in this folder instead of generating")
    p.add_argument("--detector", default="world", help="world (default) or nudenet")
    p.add_argument("--threshold", type=float, default=None, help="nudenet's detection score threshold (0.6)")
    p.add_argument("--out", required=True, help="output directory for eval.json, eval.md, eval.png and images/")
    add_pipeline_options(p, model="world")
    add_threads(p)
    add_no_progress(p)
    p.set_defaults(fn=run)
