"""The library behaves like one: it logs instead of printing, and loading the built-in pipelines
shows none of the third-party lines that mean nothing to a user, while every other warning
still gets through; the `safedig` command shows the library's log lines as its output."""
from __future__ import annotations

import ast
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "safedig_kernels"

# What transformers and diffusers say on a load of the built-in pipelines without the filter.
NOISE = ("requires torchvision (not installed)", "CLIPImageProcessor", "SiglipImageProcessor",
         "should be kept in float32")
LOADS = """
import torch
from safedig_kernels.workflow.pipelines import load_pipeline
for model in ("world", "tiny-flux"):
    for dtype in (torch.float32, torch.bfloat16):
        load_pipeline(model, dtype=dtype)
"""


def _run(code: str) -> subprocess.CompletedProcess:
    # A fresh interpreter: transformers says its line once per process, on the first import.
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_the_library_does_not_print():
    """Library modules log (`logging.getLogger(__name__)`); printing is the command line's job
    (`cli/`, and the benchmark suite's own command line)."""
    allowed = {PACKAGE / "bench" / "commands.py", PACKAGE / "bench" / "__main__.py"}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path in allowed or (PACKAGE / "cli") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert found == []


def test_loading_the_builtin_pipelines_is_quiet():
    pytest.importorskip("diffusers")
    proc = _run(LOADS + """
import logging, warnings
warnings.warn("an unrelated warning")
logging.getLogger("diffusers.models.modeling_utils").warning("an unrelated diffusers line")
logging.getLogger("transformers.utils.import_utils").warning("an unrelated transformers line")
""")
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert not [n for n in NOISE if n in said], said
    for line in ("an unrelated warning", "an unrelated diffusers line", "an unrelated transformers line"):
        assert line in proc.stderr, proc.stderr


def test_without_the_filter_the_libraries_do_say_it():
    """The check above is not vacuous: the same steps without `quiet_pipeline_noise` print the
    lines (if a new release stops saying them, the filter can go)."""
    pytest.importorskip("diffusers")
    proc = _run("""
import torch
from diffusers import FluxPipeline
from safedig_kernels.workflow.world import load_world
load_world().to(dtype=torch.bfloat16)
""")
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "requires torchvision (not installed)" not in proc.stderr:
        pytest.skip("this transformers release (or torchvision installed) does not warn on the import")
    assert "should be kept in float32: []" in proc.stderr


def test_the_filter_is_narrow_and_leaves_no_trace(capfd, caplog):
    pytest.importorskip("diffusers")
    import torch

    from safedig_kernels.workflow._noise import quiet_pipeline_noise
    from safedig_kernels.workflow.pipelines import load_pipeline

    names = ("diffusers.models.modeling_utils", "transformers.utils.import_utils")
    with caplog.at_level(logging.WARNING):
        load_pipeline("world")
        load_pipeline("tiny-flux", dtype=torch.bfloat16)
        before = {n: list(logging.getLogger(n).filters) for n in names}  # diffusers adds one of its own
        with quiet_pipeline_noise(), pytest.warns(UserWarning, match="unrelated"):
            warnings.warn("an unrelated warning", UserWarning)
            diffusers_log = logging.getLogger(names[0])
            diffusers_log.warning("There are modules in X that should be kept in float32: ['norm']. Casting ...")
            diffusers_log.warning("an unrelated diffusers line")
            logging.getLogger(names[1]).warning("`Foo` requires bar (not installed)")
    err = capfd.readouterr().err + caplog.text
    assert "should be kept in float32: []" not in err and "requires torchvision" not in err
    # what the filter does not match gets through, inside the block too
    assert "should be kept in float32: ['norm']" in err and "an unrelated diffusers line" in err
    assert "`Foo` requires bar (not installed)" in err
    assert {n: list(logging.getLogger(n).filters) for n in names} == before
    # and once the block is left, the same line is no longer dropped
    logging.getLogger(names[0]).warning("There are modules in Y that should be kept in float32: []. Casting ...")
    assert "There are modules in Y" in capfd.readouterr().err + caplog.text


def test_the_command_line_shows_the_library_logs(capsys):
    from safedig_kernels import cli

    lib = logging.getLogger("safedig_kernels")
    level, handlers = lib.level, list(lib.handlers)
    seen = {}

    def command(args):
        logging.getLogger("safedig_kernels.workflow.demo").info("a stage line")
        logging.getLogger("safedig_kernels.bench.report").warning("a warning line")
        seen["handlers"] = len(lib.handlers)
        return 0

    parser = cli.build_parser
    try:
        cli.build_parser = lambda: _FixedParser(command)
        assert cli.main(["anything"]) == 0
    finally:
        cli.build_parser = parser
    out, err = capsys.readouterr()
    assert out == "a stage line\n" and err == "a warning line\n"
    assert seen["handlers"] == len(handlers) + 1
    # the command's handler and level are gone once it returns: a program importing the library
    # decides itself what its logs show
    assert lib.level == level and lib.handlers == handlers


class _FixedParser:
    def __init__(self, fn):
        self.fn = fn

    def parse_args(self, argv):
        import argparse

        return argparse.Namespace(fn=self.fn, command=argv[0])
