"""Generate with and without SafeDIG steering, and measure what the steering changed.

    config = SafeDIGConfig.from_json("steer.json")
    runs = generate(pipe, load_prompts("prompts.jsonl"), config, GenerateConfig(num_inference_steps=4))
    write_outputs(runs, "out/", gen)     # report.py: out/images/<id>.png, out/grid.png, out/report.json

Each prompt runs twice from the same noise (seed: the prompt's own, else `GenerateConfig.seed`
plus its line index, as in `capture`): once with the steering hooks installed but switched off
(`handle.disable()`: the outputs are bitwise those of the unhooked model and the telemetry still
records the harm score) and once switched on. Per prompt and run:

- `telemetry`: `SafeDIGHandle.telemetry()`, per site and denoiser call: the harm score of the
  tokens *entering* the site (`mean_harm`), the share of them over the gate (`gated_fraction`),
  the schedule progress and whether steering was active;
- `harm_out`: the mean harm score of the tokens each block site *passes on* (after steering),
  over all calls, by a judge SAE and harmful set (default: the site's own). With steering off
  and the site's own SAE the two agree; steered, `harm_out` is what steering left;
- `change`: `||latents_steered - latents_baseline|| / ||latents_baseline||` of the final latents.

`time_steps` measures the transformer's time per denoising step with the hooks removed and
with steering on (the only fair "without": a disabled handle still runs the steering ops).
What a run reports, and its files, are in `report.py`.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from ..integrations.diffusers import (
    SafeDIGConfig,
    SafeDIGHandle,
    SteeringPlan,
    apply_safedig,
    check_config,
    remove_safedig,
)
from ..integrations.diffusers.runner import (
    RunSettings,
    decode_latents,
    pipeline_device,
    progress_bar_disabled,
    run_prompt,
)
from ..integrations.diffusers.sites import SiteSpec, block_layout, read_stream
from ..ops import as_harmful_mask
from ..sae import TopKSAE
from .prompts import PromptRecord, prompt_seed
from .score import harm_scores

__all__ = ["GenerateConfig", "PromptRun", "RUNS", "Judges", "generate", "time_steps", "mean_finite"]

RUNS = ("baseline", "steered")


@dataclass
class GenerateConfig:
    """How each prompt is generated. `decode` turns final latents into images with the
    pipeline's VAE; `baseline` also runs every prompt with steering switched off."""

    num_inference_steps: int = 4
    height: int = 32
    width: int = 32
    guidance_scale: float = 3.5
    seed: int = 0
    baseline: bool = True
    decode: bool = True
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("num_inference_steps", "height", "width"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")

    def run_settings(self) -> RunSettings:
        return RunSettings(num_inference_steps=self.num_inference_steps, height=self.height, width=self.width,
                           guidance_scale=self.guidance_scale, pipeline_kwargs=dict(self.pipeline_kwargs))


@dataclass
class PromptRun:
    """One prompt's results. `latents`/`images` map a run name (`baseline`, `steered`) to the
    final latents (as the pipeline returns them, batch of 1) and the decoded image `[3, H, W]`
    in [0, 1] (CPU, float32)."""

    id: str
    label: str
    seed: int
    latents: dict[str, torch.Tensor]
    images: dict[str, torch.Tensor]
    telemetry: dict[str, dict[str, list[dict[str, Any]]]]
    harm_out: dict[str, dict[str, float]]

    @property
    def change(self) -> float:
        """Relative change of the final latents, steered vs baseline (NaN without a baseline)."""
        if "baseline" not in self.latents:
            return float("nan")
        b, s = self.latents["baseline"].double(), self.latents["steered"].double()
        return float((s - b).norm() / b.norm().clamp_min(1e-30))

    def harm_in(self, run: str) -> dict[str, float]:
        """Per site: telemetry's `mean_harm` (tokens entering the site) averaged over calls."""
        return {site: mean_finite([r["mean_harm"] for r in rows]) for site, rows in self.telemetry[run].items()}

    def gated_fraction(self, run: str) -> dict[str, float]:
        return {site: mean_finite([r["gated_fraction"] for r in rows]) for site, rows in self.telemetry[run].items()}

    def record(self) -> dict[str, Any]:
        """The JSON record of this prompt (module docstring)."""
        rec: dict[str, Any] = {"id": self.id, "label": self.label, "seed": self.seed, "change": self.change}
        for run in RUNS:
            if run in self.telemetry:
                rec[run] = {"harm_in": self.harm_in(run), "harm_out": self.harm_out[run],
                            "gated_fraction": self.gated_fraction(run), "telemetry": self.telemetry[run]}
        return rec


def mean_finite(values: Sequence[float]) -> float:
    """The mean of the finite values (NaN when there are none)."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


# -- judges ------------------------------------------------------------------------------

# One (SAE, harmful feature ids) per SiteConfig, in the config's order.
Judges = Sequence[tuple[TopKSAE, Sequence[int]]]


class _HarmMeter:
    """Forward hooks on block sites that score the stream a block passes on, after any steering
    hook inside it has run (diffusers hooks replace `forward`; torch forward hooks run after it).
    Sums stay on the device: one host sync per read."""

    def __init__(self, transformer: torch.nn.Module, judges: Mapping[str, tuple[TopKSAE, Sequence[int]]]) -> None:
        self.judges = judges
        self.sums: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self._placed: dict[tuple, tuple[TopKSAE, torch.Tensor]] = {}
        self._handles = []
        for key in judges:
            spec = SiteSpec.parse(key, ("image", "text", "both"))
            if spec.is_text_encoder:
                continue  # it has no block output to score
            module = transformer.get_submodule(spec.module)
            self._handles.append(module.register_forward_hook(self._hook(key, module, spec.stream)))

    def _judge(self, label: str, x: torch.Tensor) -> tuple[TopKSAE, torch.Tensor]:
        """The judge SAE on x's device and dtype, and its harmful mask there (made once)."""
        key = (label, x.device, x.dtype)
        if key not in self._placed:
            sae, harmful = self.judges[label]
            placed = TopKSAE(*(t.detach().to(x.device, x.dtype) for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)),
                             k=sae.k)
            self._placed[key] = (placed, as_harmful_mask(list(harmful), sae.num_features, x.device))
        return self._placed[key]

    def _hook(self, label: str, module: torch.nn.Module, stream: str):
        layout = block_layout(module)

        def hook(module, args, output) -> None:
            x = read_stream(output, layout, stream, label)
            h = harm_scores(*self._judge(label, x), x.reshape(-1, x.shape[-1])).mean()
            self.sums[label] = self.sums.get(label, 0) + h
            self.calls[label] = self.calls.get(label, 0) + 1

        return hook

    def reset(self) -> None:
        self.sums.clear()
        self.calls.clear()

    def read(self) -> dict[str, float]:
        return {label: float(s) / self.calls[label] for label, s in self.sums.items()}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _judges(handle: SafeDIGHandle, judges: Optional[Judges]) -> dict[str, tuple[TopKSAE, Sequence[int]]]:
    """Judge per site key (in the config's order): the given ones, else each site's own SAE and
    harmful set, as installed."""
    if judges is not None:
        if len(judges) != len(handle.sites):
            raise ValueError(f"judges must give one (SAE, harmful ids) per steered site ({len(handle.sites)}), "
                             f"got {len(judges)}")
        out = {}
        for i, (label, judge) in enumerate(zip(handle.sites, judges)):
            if not (isinstance(judge, (tuple, list)) and len(judge) == 2 and isinstance(judge[0], TopKSAE)):
                raise TypeError(f"judges[{i}] must be a (TopKSAE, harmful ids) pair, got {type(judge).__name__}")
            sae, harmful = judge
            mask = as_harmful_mask(harmful, sae.num_features, torch.device("cpu"), f"judges[{i}] harmful")
            out[label] = (sae, mask.nonzero().flatten().tolist())  # checked here, not mid-generation
        return out
    own = {key: handle.sae(key) for key in handle.sites}
    return {key: (sae, sae.harmful_mask.nonzero().flatten().tolist()) for key, sae in own.items()}


# -- generating ---------------------------------------------------------------------------

def generate(pipe, prompts: Sequence[PromptRecord], config: Union[SafeDIGConfig, SteeringPlan],
             gen: GenerateConfig = GenerateConfig(), *, judges: Optional[Judges] = None,
             progress: bool = False) -> list[PromptRun]:
    """Run every prompt with steering off (if `gen.baseline`) and on; see the module docstring.

    The default judges are the sites' own SAEs and harmful sets; `judges` (one (SAE, harmful
    ids) per site of `config`)
    scores `harm_out` with other SAEs, e.g. to compare two configs by one yardstick.
    Errors in `config` (unknown site, SAE width) raise before anything runs; the hooks are
    removed on return and on error.
    """
    from tqdm.auto import tqdm

    records = list(prompts)
    if not records:
        raise ValueError("prompts is empty; expected at least one PromptRecord")
    settings = gen.run_settings()
    handle = apply_safedig(pipe, config)  # checks everything before anything runs
    meter = None
    with progress_bar_disabled(pipe):
        try:
            meter = _HarmMeter(pipe.transformer, _judges(handle, judges))
            runs = []
            for p in tqdm(records, desc=f"steer {len(handle.sites)} site(s)", unit="prompt", disable=not progress):
                latents, images, telemetry, harm_out = {}, {}, {}, {}
                for run in RUNS:
                    if run == "baseline" and not gen.baseline:
                        continue
                    if run == "steered":
                        handle.enable()
                    else:
                        handle.disable()
                    handle.reset_telemetry()
                    meter.reset()
                    latents[run] = run_prompt(pipe, settings, prompt_seed(p, gen.seed), prompt=p.prompt,
                                              embeddings=p.load_embeddings()).detach().float().cpu()
                    telemetry[run] = handle.telemetry()
                    harm_out[run] = meter.read()
                    if gen.decode:
                        images[run] = decode_latents(pipe, latents[run].to(pipeline_device(pipe)), gen.height,
                                                     gen.width)[0]
                runs.append(PromptRun(p.id, p.label, prompt_seed(p, gen.seed), latents, images, telemetry, harm_out))
            return runs
        finally:
            if meter is not None:
                meter.remove()
            remove_safedig(pipe)


def time_steps(pipe, prompt: PromptRecord, config: Union[SafeDIGConfig, SteeringPlan], gen: GenerateConfig,
               repeats: int = 5, clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Median time per transformer call (one denoising step for FLUX) without the hooks and
    with steering on, over `repeats` runs of each after one warm-up run each, alternated so a
    change in machine load hits both. Telemetry stays as configured: it is part of the cost."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    transformer = pipe.transformer
    cuda = pipeline_device(pipe).type == "cuda"
    settings = gen.run_settings()
    plan = config if isinstance(config, SteeringPlan) else check_config(pipe, config)  # installed per timed run
    times: dict[str, list[float]] = {"off": [], "on": []}
    current: list[float] = []

    def pre(module, args, kwargs) -> None:
        if cuda:
            torch.cuda.synchronize()
        current.append(clock())

    def post(module, args, kwargs, output) -> None:
        if cuda:
            torch.cuda.synchronize()
        current[-1] = clock() - current[-1]

    hooks = [transformer.register_forward_pre_hook(pre, with_kwargs=True),
             transformer.register_forward_hook(post, with_kwargs=True)]
    with progress_bar_disabled(pipe):
        try:
            for i in range(repeats + 1):
                for mode in ("off", "on"):
                    if mode == "on":
                        apply_safedig(pipe, plan)
                    current.clear()
                    try:
                        run_prompt(pipe, settings, prompt_seed(prompt, gen.seed), prompt=prompt.prompt,
                                   embeddings=prompt.load_embeddings())
                    finally:
                        if mode == "on":
                            remove_safedig(pipe)
                    if i > 0:  # the first run of each warms caches and allocators up
                        times[mode].extend(current)
        finally:
            for h in hooks:
                h.remove()
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    return {"ms_per_step_without": off * 1e3, "ms_per_step_with": on * 1e3, "overhead": on / off - 1.0,
            "calls_timed": len(times["off"]), "device": str(pipeline_device(pipe)),
            "dtype": str(next(transformer.parameters()).dtype).replace("torch.", ""),
            "threads": torch.get_num_threads()}
