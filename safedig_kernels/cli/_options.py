"""What the `safedig` commands share: argument types, the options several of them define, device
and thread selection, the check that outputs never destroy inputs, and the JSON metrics writer."""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

from .._io import atomic_write_json

FORMATTER = argparse.RawDescriptionHelpFormatter

MODEL_HELP = ("'world' (the demo world's trained tiny FLUX; 'world:PATH' for other weights), 'tiny-flux' (built-in "
              "seeded random FLUX) or a diffusers pipeline directory / model id")


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


def add_model_options(p: argparse.ArgumentParser, model_help: str = MODEL_HELP,
                      default: Optional[str] = "tiny-flux") -> None:
    """--model, --device, --model-dtype: which pipeline to load, where and in which dtype."""
    p.add_argument("--model", default=default, help=model_help)
    add_device(p)
    p.add_argument("--model-dtype", default="float32", help="pipeline dtype: float32, bfloat16, float16")


def add_pipeline_options(p: argparse.ArgumentParser, model: str = "tiny-flux") -> None:
    """The model options (`model` the default --model), then how each image is generated:
    --num-inference-steps, --height, --width, --guidance-scale, --seed (resolve them with
    `image_size` and `denoise_steps`)."""
    add_model_options(p, default=model, model_help=f"{MODEL_HELP} (default {model})")
    p.add_argument("--num-inference-steps", type=int, default=None,
                   help="denoising steps per image (default 16 for world, else 4)")
    p.add_argument("--height", type=int, default=None,
                   help="image height (default 16 for world, 32 for tiny-flux, else 1024)")
    p.add_argument("--width", type=int, default=None,
                   help="image width (default 16 for world, 32 for tiny-flux, else 1024)")
    p.add_argument("--guidance-scale", type=float, default=3.5, help="guidance scale passed to the pipeline")
    p.add_argument("--seed", type=int, default=0, help="noise seed base: prompt i uses seed + i unless it sets one")


def is_world(model: str) -> bool:
    """Whether --model names the demo world (`world` or `world:PATH`)."""
    from ..workflow.world import is_world_model

    return is_world_model(model)


def model_inputs(model: str) -> list[tuple[str, str]]:
    """The files --model reads, for `check_paths`: a pipeline directory or world weights."""
    from ..workflow.world import world_weights_in

    path = world_weights_in(model) if is_world(model) else model
    return [("--model", path)] if path and Path(path).exists() else []


def image_size(args: argparse.Namespace) -> tuple[int, int]:
    """(height, width) from `add_pipeline_options`' arguments, with the defaults its help states
    (the world's transformer draws only the 16x16 pictures it learned)."""
    default = 16 if is_world(args.model) else 32 if args.model == "tiny-flux" else 1024
    return args.height or default, args.width or default


def denoise_steps(args: argparse.Namespace) -> int:
    """--num-inference-steps, with the default its help states."""
    return args.num_inference_steps or (16 if is_world(args.model) else 4)


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
        try:
            return torch.device(name)
        except (RuntimeError, TypeError) as e:  # torch reports a bad device string as a RuntimeError
            raise ValueError(f"--device must be a torch device such as cpu, cuda or cuda:1, got {name!r} ({e})") \
                from None
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def torch_threads(threads: Optional[int], model: str, device) -> Iterator[None]:
    """Run the body with `threads` torch CPU threads; the built-in tiny models (the random tiny
    FLUX, the demo world) on a CPU get 1.

    Why: its ops take microseconds, so a thread pool only adds hand-offs, and on a shared or
    loaded machine waiting for the pool dominates (torch 2.13, 2 busy cores: 490 ms per
    tiny-FLUX step with 2 threads, 7 ms with 1). The old setting is restored afterwards.
    """
    import torch

    tiny = model == "tiny-flux" or model == "world" or model.startswith("world:")
    if threads is None and tiny and torch.device(device).type == "cpu":
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


@contextlib.contextmanager
def config_errors(name: str) -> Iterator[None]:
    """Report a bad steering config, or a model it does not fit, as one line naming it:
    `--config NAME: ...` unless the message names it already. apply_safedig raises TypeError
    for an unsupported model, which the CLI's error handler would not catch."""
    try:
        yield
    except (ValueError, TypeError) as e:
        raise ValueError(str(e) if name in str(e) else f"--config {name}: {e}") from e


def write_json(path: Optional[str], obj: Any) -> None:
    """Write `obj` to `path` atomically, creating its folder; nothing when `path` is empty."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, obj)


# -- outputs never destroy inputs -------------------------------------------------------------

PathArg = Union[str, "os.PathLike[str]", None]
Named = Iterable[tuple[str, PathArg]]


def _resolved(path: PathArg) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _same_path(a: PathArg, b: PathArg) -> bool:
    """The same file or folder: `os.path.samefile` when both exist (hard and symbolic links
    count), else equal resolved paths."""
    pa, pb = Path(os.fspath(a)).expanduser(), Path(os.fspath(b)).expanduser()
    if pa.exists() and pb.exists():
        try:
            return os.path.samefile(pa, pb)
        except OSError:
            pass
    return _resolved(pa) == _resolved(pb)


def _inside(path: Path, folder: Path) -> bool:
    """`path` (resolved) is `folder` (resolved) or below it."""
    return path == folder or folder in path.parents


def _is_activation_store(folder: Path) -> bool:
    """`folder` holds a capture: a `manifest.json` that `safedig capture` wrote (its head names
    the store format), or one next to capture shard files (a damaged manifest still counts)."""
    from ..workflow.store import FORMAT, MANIFEST, SHARD_GLOB

    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        with open(manifest, "rb") as f:
            head = f.read(4096)
    except OSError:
        head = b""
    return FORMAT.encode() in head or any(folder.glob(SHARD_GLOB))


def _store_holding(path: Path) -> Optional[Path]:
    """The activation store `path` (resolved) is, or lies inside, if any."""
    for folder in (path, *path.parents):
        if folder.is_dir() and _is_activation_store(folder):
            return folder
    return None


def check_paths(inputs: Named = (), outputs: Named = (), folders: Named = (),
                store: Optional[tuple[str, PathArg]] = None) -> None:
    """Refuse, before a command does any work, outputs that would destroy an input or land in a
    capture. Raises ValueError naming both options and the path; nothing has been written then.

    `inputs`: (option, path) of every file or folder the command reads (`None` paths are skipped).
    `outputs`: (option, path) of every file it writes, derived ones included (a report's `.txt`
    table: pass `("--report's table", path.with_suffix(".txt"))`).
    `folders`: (option, folder) of output folders it fills with files of its own naming (steer's
    `images/`, train's `--checkpoint-dir`): no input may lie inside one.
    `store`: (option, folder) of the activation store the command writes (capture's `--out`): it
    may already be one (a resume), but it must not lie inside another, and no input may be the
    folder itself or one of the files a capture writes there (manifest, shards).

    Refused: an output that exists and is not a regular file (a FIFO, /dev/null, a folder); an
    output that is the same file as an input (`os.path.samefile` when both exist, else equal
    resolved paths) or as another output; an output or output folder that is, or lies inside, a
    folder holding an activation store (a `manifest.json` written by capture), the
    `--activations` store the command reads included.
    """
    ins = [(o, p) for o, p in inputs if p is not None and os.fspath(p) != ""]
    outs = [(o, p) for o, p in outputs if p is not None and os.fspath(p) != ""]
    dirs = [(o, p) for o, p in folders if p is not None and os.fspath(p) != ""]
    for out_opt, out in outs + dirs:
        for in_opt, inp in ins:
            if _same_path(out, inp):
                raise ValueError(f"{out_opt} {out} is the same path as {in_opt} {inp}: writing {out_opt} would "
                                 f"destroy that input; choose another {out_opt} path (nothing was written)")
    for out_opt, out in outs:  # a rename over a FIFO or /dev/null would replace the special file
        p = Path(os.fspath(out)).expanduser()
        if p.exists() and not p.is_file():
            raise ValueError(f"{out_opt} {out} exists and is not a regular file (a folder, device or FIFO); "
                             f"expected a file path (nothing was written)")
    for i, (opt_a, a) in enumerate(outs + dirs):
        for opt_b, b in (outs + dirs)[i + 1:]:
            if _same_path(a, b):
                raise ValueError(f"{opt_a} {a} and {opt_b} {b} are the same path: one output would overwrite the "
                                 f"other; choose different paths (nothing was written)")
    for out_opt, out in outs + dirs:
        held = _store_holding(_resolved(out))
        if held is not None:
            read_as = [f"{o} {p}" for o, p in ins if _same_path(p, held)]
            which = f" ({', '.join(read_as)})" if read_as else ""
            raise ValueError(f"{out_opt} {out} lies inside the activation store {held}{which}, a capture "
                             f"directory (it holds manifest.json): outputs must not be written into one; choose a "
                             f"path outside it (nothing was written)")
    for dir_opt, folder in dirs:
        root = _resolved(folder)
        for in_opt, inp in ins:
            if _inside(_resolved(inp), root):
                raise ValueError(f"{in_opt} {inp} lies inside {dir_opt} {folder}, whose files this command writes "
                                 f"and replaces: move the input or choose another {dir_opt} (nothing was written)")
    if store is not None and store[1] is not None:
        st_opt, st = store
        root = _resolved(st)
        for parent in root.parents:
            if parent.is_dir() and _is_activation_store(parent):
                raise ValueError(f"{st_opt} {st} lies inside the activation store {parent}: a capture must not be "
                                 f"written into another one; choose a folder outside it (nothing was written)")
        from ..workflow.store import MANIFEST, SHARD_GLOB

        for in_opt, inp in ins:
            r = _resolved(inp)
            if r == root or (r.parent == root and (r.name.startswith(MANIFEST) or fnmatch.fnmatch(r.name, SHARD_GLOB))):
                raise ValueError(f"{in_opt} {inp} is {'' if r == root else 'a file of '}{st_opt} {st}, the "
                                 f"activation store this command writes; keep inputs apart from the capture's own "
                                 f"files (nothing was written)")


def check_writable(option: str, path: PathArg, folder: bool = False) -> None:
    """`path` (a file, or with `folder` a folder) can be written: a file path is not a folder, and
    the folder it goes in (or `path` itself with `folder`) exists and is writable, or can be
    created (its nearest existing ancestor is a writable folder). ValueError names `option`."""
    if path is None or os.fspath(path) == "":
        return
    p = Path(os.fspath(path)).expanduser()
    if folder:
        if p.exists() and not p.is_dir():
            raise ValueError(f"{option} {path} exists and is not a folder")
        target = p
    else:
        if p.is_dir():
            raise ValueError(f"{option} {path} is a folder; expected a file path")
        target = p.parent
    existing = target
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option} {path}: {existing} is not a folder, so {target} cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "the folder" if existing == target else "its nearest existing folder"
        raise ValueError(f"{option} {path}: {what} {existing} is not writable")


def report_outputs(option: str, path: PathArg) -> list[tuple[str, PathArg]]:
    """A report's two files (`write_json_and_table`): the JSON at `path`, the table next to it as `.txt`."""
    if path is None:
        return []
    return [(option, path), (f"{option}'s table", Path(os.fspath(path)).with_suffix(".txt"))]
