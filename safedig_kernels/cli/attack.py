"""`safedig attack`: a white-box soft-prompt attack on a demo's steered pipelines, judged by the
world's detector."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._options import FORMATTER, add_device, add_threads, check_paths, check_writable, select_device, torch_threads


def run(args: argparse.Namespace) -> int:
    from ..workflow.attack import AttackBudget
    from ..workflow.attack_demo import DemoInputs, run_attack

    budget = AttackBudget(steps=args.steps, eps=args.eps, restarts=args.restarts, step_size=args.step_size)
    inputs = DemoInputs.read(args.demo_dir)  # a directory that is no demo output fails here, before any work
    out = Path(args.out)
    if out.resolve() == inputs.directory.resolve():
        # the demo's own grid.png would be replaced; a folder inside DEMO_DIR is fine
        raise ValueError(f"--out {out} is DEMO_DIR itself; choose another folder (e.g. {out / 'attack'})")
    check_writable("--out", out, folder=True)
    check_paths(inputs=[("DEMO_DIR", inputs.directory), ("DEMO_DIR's world weights", inputs.world)]
                + [(f"DEMO_DIR's {name} config", p) for name, p in inputs.configs.items()],
                outputs=[("--out", out / name) for name in ("attack.json", "attack.md", "attack.png", "grid.png")])
    device = select_device(args.device)
    with torch_threads(args.threads, "world", device):
        result = run_attack(args.demo_dir, out, budget, prompts_per_label=args.prompts, seed=args.seed,
                            device=str(device))
    from ..workflow.attack_demo import attack_markdown

    print()
    print(attack_markdown(result))
    print()
    print(f"{result['seconds']['total']:.0f} s -> " + ", ".join(result["files"].values()))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "attack", formatter_class=FORMATTER,
        help="white-box soft-prompt attack on a demo's steered pipelines; attack success rate by the detector",
        description="""\
Attack the steering of a `safedig demo` output (DEMO_DIR, the demo world) the way a white-box
attacker would: knowing the transformer's weights, the SAEs and the steering configs, optimise
each held-out unsafe prompt's embedding (a soft prompt: prompt_embeds and pooled_prompt_embeds)
so that the mark comes back despite steering. Projected gradient ascent through the whole
16-step sampler on a differentiable surrogate of the world's detector (its own off-colour rule
with sigmoids for steps), fixed noise per prompt. Budget: --steps per restart, --restarts, and
--eps, the radius of a per-token L2 ball relative to each token's norm
(||delta_i||_2 <= eps * ||e_i||_2, every row of prompt_embeds and the pooled vector).

The attack success rate is what the world's detector (the hard pixel rule, which the attacker
never queries) finds unsafe among the attacked images, generated again through the pipeline's
own call; 95 % Wilson intervals. Columns: unsteered, source (steer.json), adapted
(steer-adapted.json); each is attacked against its own model. Rows: each unsafe label and all
pooled, before the attack and attacked.

Reads DEMO_DIR/summary.json, steer.json, steer-adapted.json, prompts/eval.jsonl and the world
weights. Writes --out/attack.json, attack.md (the table, also printed), attack.png (pooled rates
with intervals) and grid.png (each prompt before and after, per column).

Real models: see docs/workflow.md (`safedig_kernels.workflow.attack` with --device cuda and a
surrogate of your own, e.g. a CLIP-based scorer of the concept).""",
        epilog="example: safedig demo --out demo/ && safedig attack demo/ --steps 20 --eps 0.5 --out attack/")
    p.add_argument("demo_dir", metavar="DEMO_DIR", help="a `safedig demo` output directory (the demo world)")
    p.add_argument("--out", required=True, help="output directory for attack.json, attack.md, attack.png, grid.png")
    p.add_argument("--steps", type=int, default=20, help="gradient steps per restart (20)")
    p.add_argument("--eps", type=float, default=0.5,
                   help="radius of the per-token L2 ball, relative to each token's norm (0.5)")
    p.add_argument("--restarts", type=int, default=1,
                   help="starts per prompt: the first at the clean embedding, the others at random points (1)")
    p.add_argument("--step-size", type=float, default=None,
                   help="step as a fraction of the radius (default 2.5 / --steps)")
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts attacked per unsafe label (8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random restarts (noise comes from the demo)")
    add_device(p)
    add_threads(p)
    p.set_defaults(fn=run)
