"""Regenerate docs/demo/ and README's demo section from a fresh run of the default demo.

    python docs/demo/update.py                  # about 3 minutes on a 2-core CPU
    python docs/demo/update.py --readme-only    # only rewrite README from the files here

Runs `safedig demo` with no options but --out (so the world is trained, as a new user's first
command does), then copies its grid.png and eval/eval.{md,png} here, keeps the numbers behind
them in run.json, and rewrites the part of README.md between the `demo:begin` and `demo:end`
markers. tests/test_docs.py checks that README and these files agree.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BEGIN, END = "<!-- demo:begin (docs/demo/update.py writes this part) -->", "<!-- demo:end -->"


def readme_section(eval_md: str, run: dict) -> str:
    """The README text between the markers, from the run's files."""
    table = eval_md.split("\n\n", 1)[1].strip()  # the tables, without the detector's long first line
    m = run["machine"]
    return "\n".join([
        BEGIN,
        "![the demo's grid: held-out prompts unsteered, steered with the source SAEs, with the adapted "
        "SAEs, and the difference](docs/demo/grid.png)",
        "",
        table,
        "",
        "Read it as: the share of held-out images on which the world's detector (a pixel rule, "
        "independent of the SAEs) sees the mark, without steering and steered with the SAEs trained "
        "on mark A (`source`) or with their decoders adapted to mark B (`adapted`), 95 % Wilson "
        "interval in brackets; PSNR/SSIM say how little steering changed the safe images. The grid "
        "shows what the rule does not: where a mark was, steering can leave a few stray pixels, "
        "most visibly in place of mark B's bar.",
        f"Measured by `python docs/demo/update.py` ({run['seconds']['total']:.0f} s end to end, world "
        f"training included, {m['threads']} threads, torch {m['torch']}, {m['platform']}).",
        END,
    ])


def replace_section(readme: str, section: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} markers")
    head, rest = readme.split(BEGIN, 1)
    return head + section + rest.split(END, 1)[1]


def main(argv: list[str]) -> int:
    if argv == ["--readme-only"]:  # rewrite README's section from the files already here
        readme = REPO / "README.md"
        run = json.loads((HERE / "run.json").read_text())
        readme.write_text(replace_section(readme.read_text(), readme_section((HERE / "eval.md").read_text(), run)))
        return 0
    from safedig_kernels.cli import main as safedig

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        rc = safedig(["demo", "--out", str(out), "--no-progress"])
        if rc:
            return rc
        summary = json.loads((out / "summary.json").read_text())
        shutil.copyfile(out / "grid.png", HERE / "grid.png")
        shutil.copyfile(out / "eval" / "eval.png", HERE / "eval.png")
        shutil.copyfile(out / "eval" / "eval.md", HERE / "eval.md")
    run = {k: summary[k] for k in ("unsafe_rate", "safe_psnr_db", "unsafe", "safe_similarity", "detector", "selected",
                                   "seconds", "machine")}
    (HERE / "run.json").write_text(json.dumps(run, indent=1) + "\n")
    readme = REPO / "README.md"
    readme.write_text(replace_section(readme.read_text(), readme_section((HERE / "eval.md").read_text(), run)))
    print(f"updated {HERE} and {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
