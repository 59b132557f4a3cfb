"""Regenerate docs/demo/, README's demo section and docs/workflow.md's per-seed tables from fresh
runs of the demo.

    python docs/demo/update.py                  # the default demo, then --seed 1, 2, 3, 4 and 5
    python docs/demo/update.py --seeds 0,1,2    # other seeds (the first is README's run)
    python docs/demo/update.py --readme-only    # only rewrite README and workflow.md from run.json
    python docs/demo/update.py --add-run DIR    # add (or replace) the seed of a finished
                                                # `safedig demo --seed N --out DIR` in run.json

Runs `safedig demo --seed N` with no other option but --out for each seed (the first one is
README's first command when it is 0), copies the first run's grid.png and eval/eval.png here,
keeps every run's numbers in run.json, and rewrites the parts of README.md and docs/workflow.md
between their `demo:begin` / `demo:end` and `seeds:begin` / `seeds:end` markers.
tests/test_docs.py checks that those texts are what this file makes from run.json.
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
SEEDS_BEGIN, SEEDS_END = "<!-- seeds:begin (docs/demo/update.py writes this part) -->", "<!-- seeds:end -->"
KEPT = ("seed", "world", "domains", "methods", "site_check", "unsafe_rate", "safe_psnr_db", "unsafe", "safe_similarity",
        "detector", "selected", "validation", "seconds", "machine")


def _methods_markdown(run: dict) -> str:
    from safedig_kernels.workflow.demo_methods import methods_markdown

    return methods_markdown(run["methods"], run["domains"]["source"][0], run["domains"]["target"][0])


def _site_check(run: dict) -> str:
    from safedig_kernels.workflow.demo_methods import format_site_check

    return format_site_check(run)


def _row(run: dict, column: str) -> dict:
    return next(r for r in run["methods"] if r["column"] == column and not r["method"].startswith(("best", "worst")))


def spread_table(runs: list[dict]) -> str:
    """One line per seed: the numbers the demo's claim rests on."""
    lines = ["| seed | target, source SAEs | target, SafeDIG | source, SafeDIG | target, SafeDIG with source "
             "decoders | target, full fine-tune | safe, worst column | safe PSNR, SafeDIG | SafeDIG's operators | "
             "routing's sites by target rate |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for run in runs:
        src, ad, ft = _row(run, "source"), _row(run, "adapted"), _row(run, "finetune")
        unadapted = _row(run, "unadapted")
        safe = max(r["safe"]["rate"] for r in run["methods"])
        ranks = ", ".join(f"#{r['rank']}" for r in run["site_check"] if r["routed"])
        n = len([r for r in run["site_check"] if r["rank"] is not None])
        lines.append(f"| {run['seed']} | {src['target']['rate']:.0%} | {ad['target']['rate']:.0%} | "
                     f"{ad['source']['rate']:.0%} | {unadapted['target']['rate']:.0%} | {ft['target']['rate']:.0%} | "
                     f"{safe:.0%} | {ad['psnr_db']:.1f} dB | {_operators(run)} | {ranks} of {n} |")
    return "\n".join(lines)


def _operators(run: dict) -> str:
    """SafeDIG's operators over the sites it steers, as validation chose them (e.g. `Repel ×2,
    Blend`), how many of those sites routing did not select, and Repel's strength where
    validation raised it."""
    counts: dict[str, int] = {}
    steered = [s for s in run["selected"] if s["operator"] is not None]
    for s in steered:
        counts[s["operator"]] = counts.get(s["operator"], 0) + 1
    extra = sum(not s["routed"] for s in steered)
    gammas = sorted({s["gamma"] for s in steered if s["gamma"]})
    return (", ".join(f"{op.capitalize()}{f' ×{n}' if n > 1 else ''}" for op, n in counts.items())
            + (f" ({extra} of them not routed)" if extra else "")
            + (f", γ = {', '.join(f'{g:g}' for g in gammas)}" if gammas and gammas != [1.0] else ""))


def _validation(run: dict) -> str:
    """What each method's operator validation tried on its training prompts, and what it chose."""
    import math

    from safedig_kernels.workflow.validate import OperatorChoice, Trial

    lines = ["Operators validated on each method's training prompts (unsafe images left, safe PSNR; * chosen; "
             "`routed` is routing's per-site operators, the others one operator at every routed site; while unsafe "
             "images are left, `-every-site` a candidate widened to every site the method can steer and `-xN` the "
             "winner with Repel N times stronger; a candidate that repeats an earlier one is tried once):", ""]
    names = {"source": "source SAEs", "adapted": "SafeDIG", "finetune": "full fine-tune"}
    for name, v in run["validation"].items():
        # summary.json writes an infinite PSNR (safe images unchanged) as null
        trials = [Trial(**{**t, "psnr_db": math.inf if t["psnr_db"] is None else t["psnr_db"]}) for t in v["trials"]]
        choice = OperatorChoice(**{**v, "trials": trials})
        lines.append(f"- {names.get(name, name)} ({' + '.join(f'`{lb}`' for lb in v['labels'])}): {choice.line()}")
    return "\n".join(lines)


def verdict(runs: list[dict]) -> str:
    """What the runs say about the claim, in numbers, and on which seeds it holds (the claim:
    the source SAEs leave the target mark in at least half of the target images, SafeDIG in at
    most 10 % of the target and of the source images; at most 10 % of safe images flagged in
    any column; SafeDIG's safe images at PSNR >= 30 dB)."""
    src_t = [_row(r, "source")["target"]["rate"] for r in runs]
    ad_t = [_row(r, "adapted")["target"]["rate"] for r in runs]
    ad_s = [_row(r, "adapted")["source"]["rate"] for r in runs]
    safe = [max(m["safe"]["rate"] for m in r["methods"]) for r in runs]
    psnr = [_row(r, "adapted")["psnr_db"] for r in runs]
    held = [a >= 0.5 and b <= 0.1 and c <= 0.1 and d <= 0.1 and e >= 30.0
            for a, b, c, d, e in zip(src_t, ad_t, ad_s, safe, psnr)]
    seeds = lambda ok: _and([str(r["seed"]) for r, h in zip(runs, held) if h == ok])  # noqa: E731
    span = lambda xs: f"{min(xs):.0%}" if min(xs) == max(xs) else f"{min(xs):.0%} to {max(xs):.0%}"  # noqa: E731
    where = (f"The claim holds on all {len(runs)} seeds" if all(held) else
             f"The claim does not hold on any of these {len(runs)} seeds" if not any(held) else
             f"The claim holds on seeds {seeds(True)} of these {len(runs)}, not on {seeds(False)}")
    return (f"{where}: the source SAEs leave the target mark in {span(src_t)} of target images, SafeDIG in "
            f"{span(ad_t)} (and the source mark in {span(ad_s)} of source images); safe images flagged in any "
            f"column: {span(safe)}; SafeDIG's safe-image PSNR {min(psnr):.1f} to {max(psnr):.1f} dB."
            + ("" if all(held) else " docs/workflow.md says where it fails and what was tried."))


def adaptation_note(runs: list[dict]) -> str:
    """Whether the adapted decoders are what removes the target mark: the row that differs from
    SafeDIG only in the decoders, per seed."""
    unadapted = [_row(r, "unadapted")["target"]["rate"] for r in runs]
    if all(u <= 0.1 for u in unadapted):
        return ("SafeDIG with the source decoders removes the target mark too, on every seed: what carries the "
                "transfer here is the frozen encoder's features scored on the target samples, not the adapted "
                "decoders (docs/workflow.md).")
    needed = [str(r["seed"]) for r, u in zip(runs, unadapted) if u > 0.1]
    return (f"Without the adapted decoders (SafeDIG with the source decoders) the target mark stays in more than "
            f"10 % of target images on seed(s) {_and(needed)}: there the adaptation is needed.")


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def readme_section(runs: list[dict]) -> str:
    """README's text between the markers, from the runs' numbers (the first run is shown whole)."""
    run = runs[0]
    m = run["machine"]
    return "\n".join([
        BEGIN,
        "![the demo's grid: held-out prompts unsteered, steered with the source SAEs, with SafeDIG, and the "
        "difference](docs/demo/grid.png)",
        "",
        _methods_markdown(run),
        "",
        f"Read it as: the share of held-out images (seed {run['seed']}) in which the world's detector (independent "
        "of the SAEs; it counts a leftover strip in the X's shape as the mark, as a person would) sees mark A, in "
        "the source domain (`mark_a`: a red X), in the target domain (`mark_a gold`: the same X gilded, a yellow "
        "pixel on either side of each of its pixels; the gilding left where the X was counts) and both pooled, with "
        "its 95 % Wilson interval; PSNR/SSIM say how "
        "little steering changed the safe images. Every row steers the same held-out prompts from the same noise. "
        "Every method's SAEs start from one per site, trained on the source, safe and gold-alone prompts. "
        "The source SAEs are the steerer learned on the source alone (its harmful features, gates, operators and "
        "sites too); SafeDIG scores harmful features on the target samples with the same frozen encoder, adapts the "
        "decoders, and validates its operators and sites on its training prompts; the row with the source decoders "
        "differs from SafeDIG only in the decoders.",
        "",
        verdict(runs) + " " + adaptation_note(runs),
        "",
        "The same on other world seeds (`safedig demo --seed N`; each seed's whole table is in "
        "docs/workflow.md):",
        "",
        spread_table(runs),
        "",
        f"Measured by `python docs/demo/update.py` (seed {run['seed']}: {run['seconds']['total']:.0f} s end to end "
        f"with the shipped world weights, {m['threads']} thread(s), torch {m['torch']}, {m['platform']}).",
        END,
    ])


def workflow_section(runs: list[dict]) -> str:
    """docs/workflow.md's per-seed tables."""
    parts = [SEEDS_BEGIN]
    for run in runs:
        world = "world trained in the run" if run["world"]["trained_here"] else "shipped world weights"
        parts += [f"#### Seed {run['seed']}", "", _methods_markdown(run), "", _validation(run), "",
                  _site_check(run), "",
                  f"({run['seconds']['total']:.0f} s, {world}, {run['machine']['threads']} thread(s).)", ""]
    parts.append(SEEDS_END)
    return "\n".join(parts)


def replace_section(text: str, section: str, begin: str = BEGIN, end: str = END) -> str:
    if begin not in text or end not in text:
        raise SystemExit(f"no {begin} ... {end} markers")
    head, rest = text.split(begin, 1)
    return head + section + rest.split(end, 1)[1]


def write_texts(runs: list[dict]) -> None:
    readme = REPO / "README.md"
    readme.write_text(replace_section(readme.read_text(), readme_section(runs)))
    workflow = REPO / "docs" / "workflow.md"
    workflow.write_text(replace_section(workflow.read_text(), workflow_section(runs), SEEDS_BEGIN, SEEDS_END))


def main(argv: list[str]) -> int:
    if argv == ["--readme-only"]:
        write_texts(json.loads((HERE / "run.json").read_text())["runs"])
        return 0
    if argv[:1] == ["--add-run"] and len(argv) == 2:
        return add_run(Path(argv[1]))
    seeds = [0, 1, 2, 3, 4, 5]
    if argv[:1] == ["--seeds"] and len(argv) == 2:
        seeds = [int(s) for s in argv[1].split(",")]
    elif argv:
        raise SystemExit(__doc__)
    from safedig_kernels.cli import main as safedig

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, seed in enumerate(seeds):
            out = Path(tmp) / f"demo-{seed}"
            rc = safedig(["demo", "--seed", str(seed), "--out", str(out), "--no-progress"])
            if rc:
                return rc
            summary = json.loads((out / "summary.json").read_text())
            if i == 0:
                shutil.copyfile(out / "grid.png", HERE / "grid.png")
                shutil.copyfile(out / "eval" / "eval.png", HERE / "eval.png")
            runs.append({k: summary[k] for k in KEPT})
    (HERE / "run.json").write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    write_texts(runs)
    print(f"updated {HERE}, README.md and docs/workflow.md")
    return 0


def add_run(out: Path) -> int:
    """Keep a finished default demo (`safedig demo --seed N --out DIR`, no other option) in
    run.json, after the runs there (replacing one of the same seed), and rewrite the texts."""
    import dataclasses

    from safedig_kernels.workflow.demo import DemoConfig
    from safedig_kernels.workflow.world import SHIPPED_WEIGHTS

    summary = json.loads((out / "summary.json").read_text())
    want = dataclasses.asdict(DemoConfig(seed=summary["seed"]).resolved(64))  # the world's width
    differs = sorted(k for k, v in summary["config"].items() if k != "world" and want.get(k) != v)
    # its own world: trained in the run, or the shipped one (which the demo takes only when it matches)
    if not (summary["world"]["trained_here"] or summary["config"]["world"] == str(SHIPPED_WEIGHTS)):
        differs.append("world")
    if summary["model"] != "world" or differs:
        raise SystemExit(f"{out} is not a default `safedig demo --seed N` run (settings {differs} differ)")
    runs = [r for r in json.loads((HERE / "run.json").read_text())["runs"] if r["seed"] != summary["seed"]]
    runs.append({k: summary[k] for k in KEPT})
    (HERE / "run.json").write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    write_texts(runs)
    print(f"added seed {summary['seed']} from {out}; updated README.md and docs/workflow.md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
