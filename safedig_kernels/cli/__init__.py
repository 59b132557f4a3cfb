"""`safedig`: the SafeDIG workflow from a terminal.

    safedig capture  record activations of a diffusers pipeline over a labelled prompt set
    safedig train    train a TopK SAE on one site's activations (DDP under torchrun)
    safedig score    rank SAE features by unsafe-vs-safe firing and pick the harmful set
    safedig route    rank (site, operator) pairs by robustness to a risk-domain shift; write a steering config
    safedig adapt    adapt an SAE's decoder to a target domain with the encoder frozen
    safedig steer    generate with and without steering from a steering config; images and harm telemetry
    safedig bench    benchmark the ops against the eager and compiled references: JSON, CSV, tables, plots
    safedig eval     unsafe rate judged by a detector, unsteered and steered; PSNR/SSIM of the safe images
    safedig demo     the whole workflow on the demo world, end to end and judged, on a CPU in a few minutes
    safedig attack   white-box soft-prompt attack on a demo's steered pipelines: attack success rate by the detector

Run `safedig <command> --help` for each.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Iterator, Optional, Sequence

from . import adapt, attack, capture, demo, eval, route, score, steer, train
from ._options import FORMATTER


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safedig", description=__doc__, formatter_class=FORMATTER)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (capture, train, score, route, adapt, steer, eval):
        command.add_parser(sub)
    # Listed for `safedig --help`; main() hands `safedig bench ...` to the suite's own parser.
    sub.add_parser("bench", add_help=False,
                   help="benchmark the ops (run, report, compare, results); `safedig bench --help`")
    demo.add_parser(sub)
    attack.add_parser(sub)
    return parser


class _ConsoleHandler(logging.Handler):
    """The library's log lines as the command's own output, the message alone: INFO to stdout,
    warnings and errors to stderr. The stream is looked up per line, so a redirected
    sys.stdout (a test's capture) gets them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # logging's own rule: a failing handler reports, never raises
            self.handleError(record)


@contextlib.contextmanager
def _library_logs_shown() -> Iterator[None]:
    """While a command runs, what the library logs at INFO and above is shown (the library
    itself only logs; printing is the command line's job). Restores the logger on exit."""
    lib = logging.getLogger("safedig_kernels")
    handler = _ConsoleHandler(logging.INFO)
    old_level = lib.level
    lib.addHandler(handler)
    if old_level == logging.NOTSET or old_level > logging.INFO:
        lib.setLevel(logging.INFO)
    try:
        yield
    finally:
        lib.removeHandler(handler)
        lib.setLevel(old_level)


def main(argv: Optional[Sequence[str]] = None) -> int:
    with _library_logs_shown():
        return _main(argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # argparse will not hand an option-first remainder (`bench --help`) to a subparser: the
        # benchmark suite parses its own arguments.
        from ..bench.commands import main as bench_main

        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except ModuleNotFoundError as e:
        if e.name not in _WORKFLOW_MODULES:
            raise
        # The kernel library installs light; the workflow's pipeline libraries are an extra.
        print(f"safedig {args.command}: error: this command needs {e.name!r}, which comes with the workflow "
              f"extra: pip install 'safedig-kernels[workflow]'", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        # Bad input is reported as one line naming what was wrong, not a traceback.
        print(f"safedig {args.command}: error: {e}", file=sys.stderr)
        return 2


# Top-level modules the [workflow] extra installs (pyproject.toml).
_WORKFLOW_MODULES = ("diffusers", "transformers", "PIL", "tqdm")
