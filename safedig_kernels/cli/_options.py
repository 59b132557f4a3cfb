"""What the `safedig` commands share: argument types, the options several of them define, device
and thread selection, and the JSON metrics writer."""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any, Iterator, Optional

from .._io import atomic_write_json

FORMATTER = argparse.RawDescriptionHelpFormatter

MODEL_HELP = "'tiny-flux' (built-in seeded random FLUX, CPU) or a diffusers pipeline directory / model id"


def int_list(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,4,8, got {text!r}") from None


def str_list(text: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def window(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START,END fractions such as 0.0,0.5, got {text!r}") from None
    return lo, hi


def site_sae(text: str) -> tuple[str, str]:
    site, eq, path = text.partition("=")
    if not eq or not site or not path:
        raise argparse.ArgumentTypeError(f"expected SITE=PATH such as single_transformer_blocks.0=sae0.safetensors, "
                                         f"got {text!r}")
    return site, path


def add_activations(p: argparse.ArgumentParser, help: str = "capture directory") -> None:
    p.add_argument("--activations", required=True, help=help)


def add_denoise_steps(p: argparse.ArgumentParser) -> None:
    p.add_argument("--denoise-steps", type=int_list, default=None, help="only these captured denoising steps")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def add_no_progress(p: argparse.ArgumentParser, help: str = "no progress bar") -> None:
    p.add_argument("--no-progress", action="store_true", help=help)


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for tiny-flux on a CPU, else torch's default)")


def add_model_options(p: argparse.ArgumentParser, model_help: str = MODEL_HELP) -> None:
    """--model, --device, --model-dtype: which pipeline to load, where and in which dtype."""
    p.add_argument("--model", default="tiny-flux", help=model_help)
    add_device(p)
    p.add_argument("--model-dtype", default="float32", help="pipeline dtype: float32, bfloat16, float16")


def add_pipeline_options(p: argparse.ArgumentParser) -> None:
    """The model options, then how each image is generated: --num-inference-steps, --height,
    --width, --guidance-scale, --seed (resolve the image size with `image_size`)."""
    add_model_options(p)
    p.add_argument("--num-inference-steps", type=int, default=4, help="denoising steps per image (default 4)")
    p.add_argument("--height", type=int, default=None, help="image height (default 32 for tiny-flux, else 1024)")
    p.add_argument("--width", type=int, default=None, help="image width (default 32 for tiny-flux, else 1024)")
    p.add_argument("--guidance-scale", type=float, default=3.5, help="guidance scale passed to the pipeline")
    p.add_argument("--seed", type=int, default=0, help="noise seed base: prompt i uses seed + i unless it sets one")


def image_size(args: argparse.Namespace) -> tuple[int, int]:
    """(height, width) from `add_pipeline_options`' arguments, with the defaults its help states."""
    default = 32 if args.model == "tiny-flux" else 1024
    return args.height or default, args.width or default


def add_rule_options(p: argparse.ArgumentParser) -> None:
    """The thresholds of the harmful-feature rule; `harmful_rule(args)` builds it."""
    g = p.add_argument_group("harmful-feature rule (see safedig_kernels.workflow.score)")
    g.add_argument("--top-n", type=int, default=32, help="keep at most this many harmful features (default 32)")
    g.add_argument("--min-ratio", type=float, default=2.0,
                   help="a harmful feature fires at least this many times as often on unsafe tokens (default 2)")
    g.add_argument("--min-freq", type=float, default=0.01,
                   help="...and on at least this fraction of unsafe tokens (default 0.01)")
    g.add_argument("--min-score", type=float, default=0.0,
                   help="...and its score mean_unsafe - mean_safe exceeds this (default 0)")


def harmful_rule(args: argparse.Namespace):
    from ..workflow.score import HarmfulRule

    return HarmfulRule(top_n=args.top_n, min_ratio=args.min_ratio, min_freq=args.min_freq, min_score=args.min_score)


def select_device(name: Optional[str]):
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def torch_threads(threads: Optional[int], model: str, device) -> Iterator[None]:
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


def write_json(path: Optional[str], obj: Any) -> None:
    """Write `obj` to `path` atomically, creating its folder; nothing when `path` is empty."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, obj)
