"""How far steering at one site of the demo world can go: the most any edit there could do,
against the most an SAE-feature edit does in one step.

    python docs/demo/gap.py            # 16 prompts per label, the shipped world (about 3 minutes)
    python docs/demo/gap.py --quick    # 4 prompts, two sites, small SAEs (the test runs this)

Each unsafe prompt is paired with the safe prompt of the same shape, drawn from the same noise.

1. **Ceiling.** Replace one site's output stream, at every step, by the paired safe run's and
   judge the images with the world's detector. A rate of 0 % means the site carries everything
   that draws the mark: an edit that turned each unsafe activation into its safe twin would
   remove it.
2. **Gap closed by an SAE edit.** Train a TopK SAE on the paired runs' source and safe
   activations at that site. On the 15 % of tokens where the unsafe activation lies farthest
   from its safe twin, take as harmful the m features whose code rises most from safe to unsafe
   (hindsight: no scoring rule could pick better ones) and apply Blend (beta = 1) or Repel
   (gamma = 1) to every one of those tokens (no gate). Report the share of the distance to the
   safe twin the edit removes, `1 - ||edit(x_u) - x_s|| / ||x_u - x_s||`, best over m.

docs/workflow.md quotes a run of this script.
"""
from __future__ import annotations

import sys
import time

import torch

from safedig_kernels.sae import SAEMetadata
from safedig_kernels.workflow.score import feature_scores, group_stats
from safedig_kernels.workflow.train import TrainConfig, train_sae
from safedig_kernels.workflow.world import SOURCE, TARGET, is_unsafe, load_world, world_pipeline, world_prompts

STEPS = 16
GAP_SHARE = 0.15  # the share of tokens, farthest from their safe twin, the edit is measured on


def blocks(transformer) -> dict[str, torch.nn.Module]:
    return {**{f"transformer_blocks.{i}": b for i, b in enumerate(transformer.transformer_blocks)},
            **{f"single_transformer_blocks.{i}": b for i, b in enumerate(transformer.single_transformer_blocks)}}


class PairedRuns:
    """The world's pipeline with forward hooks that record each block's (text, image) outputs per
    step, or replace one site's stream by a recorded run's."""

    def __init__(self, n: int) -> None:
        self.pipe = world_pipeline(load_world())
        self.shapes = [("circle", "square")[i % 2] for i in range(n)]
        self.step, self.record, self.patch = 0, None, None
        for name, block in blocks(self.pipe.transformer).items():
            block.register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(module, args, out):
            text, image = out
            if self.record is not None:
                self.record.setdefault(name, []).append((text.detach().clone(), image.detach().clone()))
            if self.patch is not None and self.patch[0].startswith(name + ":"):
                safe_text, safe_image = self.patch[1][name][self.step]
                return (safe_text, image) if self.patch[0].endswith(":text") else (text, safe_image)
            return out
        return hook

    def _next_step(self, pipe, i, t, kwargs):
        self.step = i + 1
        return kwargs

    def run(self, label: str, record: bool = False, patch=None):
        """Images `[n, 3, 16, 16]` in [0, 1]; with `record`, also `{block: [(text, image)] per step}`."""
        self.step, self.patch = 0, patch
        self.record = {} if record else None
        p = world_prompts([label] * len(self.shapes), self.shapes)
        images = self.pipe(prompt_embeds=p.prompt_embeds, pooled_prompt_embeds=p.pooled_prompt_embeds,
                           num_inference_steps=STEPS, height=16, width=16, generator=torch.Generator().manual_seed(0),
                           output_type="pt", callback_on_step_end=self._next_step).images
        recorded, self.record, self.patch = self.record, None, None
        return images.clamp(0, 1), recorded


def stream(recorded, site: str) -> torch.Tensor:
    """A site's activations, all steps and prompts, `[tokens, d]`."""
    name, kind = site.split(":")
    return torch.cat([(text if kind == "text" else image).flatten(0, 1) for text, image in recorded[name]])


def gap_closed(x_unsafe: torch.Tensor, x_safe: torch.Tensor, sae_sizes, train_steps: int) -> dict[str, float]:
    """Best share of the distance to the safe twin that Blend / Repel removes, per SAE size."""
    far = (x_unsafe - x_safe).norm(dim=-1)
    sel = far > far.quantile(1 - GAP_SHARE)
    xu, xs = x_unsafe[sel], x_safe[sel]
    base = (xu - xs).norm()
    out = {}
    for k, features in sae_sizes:
        sae = train_sae(torch.cat([x_unsafe, x_safe]), TrainConfig(num_features=features, k=k, steps=train_steps,
                                                                   batch_size=512, lr=1e-2, seed=0, log_every=0),
                        progress=False, metadata=SAEMetadata(model="world", site="gap")).sae
        # The features whose mean code rises most from safe to unsafe (the score `safedig score` ranks by).
        rise = feature_scores(group_stats(sae, [xu]), group_stats(sae, [xs]))
        best = {"blend": -float("inf"), "repel": -float("inf")}
        for m in (4, 8, 16, 32):
            harmful = rise.topk(min(m, sae.num_features)).indices.tolist()
            for op, (beta, gamma) in (("blend", (1.0, 0.0)), ("repel", (0.0, 1.0))):
                edited, _ = sae.steer(xu, beta=beta, gamma=gamma, tau=-1.0, harmful=harmful)  # tau < 0: every token
                best[op] = max(best[op], 1 - float((edited - xs).norm() / base))
        out[f"k={k}, F={features}"] = best
    return out


def main(argv: list[str]) -> int:
    quick = argv == ["--quick"]
    if argv and not quick:
        raise SystemExit(__doc__)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    n = 4 if quick else 16
    sites = (["transformer_blocks.1:image", "single_transformer_blocks.1:image"] if quick else
             [f"{b}:image" for b in ("transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                                     "single_transformer_blocks.1")] + ["transformer_blocks.0:text",
                                                                        "transformer_blocks.1:text"])
    sae_sizes = [(4, 256)] if quick else [(4, 256), (16, 256), (32, 1024)]
    runs = PairedRuns(n)
    _, safe = runs.run("safe", record=True)
    unsafe = {}
    print(f"shipped world, {n} prompts per label paired with safe ones (same shape and noise)")
    for label in (SOURCE, TARGET):
        images, unsafe[label] = runs.run(label, record=True)
        print(f"unsteered {label}: unsafe {float(is_unsafe(images).float().mean()):.0%}")
    header = "| site | ceiling: source / target unsafe | " + " | ".join(
        f"gap closed, {size}: Blend / Repel" for size in (f"k={k}, F={f}" for k, f in sae_sizes)) + " |"
    lines = [header, "|---|---|" + "---|" * len(sae_sizes)]
    for site in sites:
        ceiling = []
        for label in (SOURCE, TARGET):
            images, _ = runs.run(label, patch=(site, safe))
            ceiling.append(f"{float(is_unsafe(images).float().mean()):.0%}")
        closed = gap_closed(stream(unsafe[SOURCE], site), stream(safe, site), sae_sizes, 150 if quick else 800)
        cells = " | ".join(f"{c['blend']:.0%} / {c['repel']:.0%}" for c in closed.values())
        lines.append(f"| `{site}` | {' / '.join(ceiling)} | {cells} |")
        print(lines[-1], flush=True)
    print("\n".join(["", *lines, "", f"({time.perf_counter() - t0:.0f} s, {torch.get_num_threads()} thread(s), "
                     f"torch {torch.__version__})"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
