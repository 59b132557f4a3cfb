"""Generate with and without SafeDIG steering, and measure what the steering changed.

    config = load_saes(SafeDIGConfig.from_json("steer.json"))
    runs = generate(pipe, load_prompts("prompts.jsonl"), config, GenerateConfig(num_inference_steps=4))
    write_outputs(runs, "out/", gen)     # out/images/<id>.png, out/grid.png, out/report.json

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

Report file (`write_outputs`, `report.json`): `{"format": "safedig-steer-report", "version": 1,
"generate": {...GenerateConfig...}, "sites": [...], "summary": {label: {...}}, "prompts": [...]}`
with one record per prompt: `id`, `label`, `seed`, `change`, `image`, and per run (`baseline`,
`steered`) `harm_in` (telemetry's `mean_harm` averaged over calls, per site), `harm_out` (per
site), `gated_fraction` (per site) and the raw `telemetry`.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from ..integrations.diffusers import SafeDIGConfig, SafeDIGHandle, apply_safedig, remove_safedig
from ..sae import TopKSAE
from ..training._io import atomic_write_json
from ..training.capture import PromptRecord, progress_bar_disabled

REPORT_FORMAT = "safedig-steer-report"
REPORT_VERSION = 1
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
        return {site: _mean([r["mean_harm"] for r in rows]) for site, rows in self.telemetry[run].items()}

    def gated_fraction(self, run: str) -> dict[str, float]:
        return {site: _mean([r["gated_fraction"] for r in rows]) for site, rows in self.telemetry[run].items()}

    def record(self) -> dict[str, Any]:
        """The JSON record of this prompt (module docstring)."""
        rec: dict[str, Any] = {"id": self.id, "label": self.label, "seed": self.seed, "change": self.change}
        for run in RUNS:
            if run in self.telemetry:
                rec[run] = {"harm_in": self.harm_in(run), "harm_out": self.harm_out[run],
                            "gated_fraction": self.gated_fraction(run), "telemetry": self.telemetry[run]}
        return rec


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


# -- SAEs and judges ---------------------------------------------------------------------

def load_saes(config: SafeDIGConfig) -> SafeDIGConfig:
    """`config` with every SAE path replaced by the loaded `TopKSAE` (each file read once), so
    a missing or unreadable file fails here, before any model is loaded."""
    loaded: dict[str, TopKSAE] = {}
    sites = []
    for s in config.sites:
        if isinstance(s.sae, TopKSAE):
            sites.append(s)
            continue
        path = str(s.sae)
        if path not in loaded:
            if not Path(path).is_file():
                raise FileNotFoundError(f"site {s.site!r}: SAE file {path} does not exist")
            try:
                loaded[path] = TopKSAE.load(path)
            except (ValueError, OSError) as e:
                raise ValueError(f"site {s.site!r}: {path} is not a valid SAE checkpoint: {e}") from e
        sites.append(dataclasses.replace(s, sae=loaded[path]))
    return dataclasses.replace(config, sites=sites)


# One (SAE, harmful feature ids) per SiteConfig, in the config's order.
Judges = Sequence[tuple[TopKSAE, Sequence[int]]]


class _HarmMeter:
    """Forward hooks on block sites that score the stream a block passes on, after any steering
    hook inside it has run (diffusers hooks replace `forward`; torch forward hooks run after it).
    Sums stay on the device: one host sync per read."""

    def __init__(self, transformer: torch.nn.Module, sites: Mapping[str, tuple[str, str]],
                 judges: Mapping[str, tuple[TopKSAE, Sequence[int]]]) -> None:
        self.judges = judges
        self.sums: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self._placed: dict[tuple, tuple[TopKSAE, torch.Tensor]] = {}
        self._handles = []
        for label, (module_name, stream) in sites.items():
            if label not in judges:
                continue
            try:
                module = transformer.get_submodule(module_name)
            except AttributeError:
                continue  # a text-encoder site: it has no block output to score
            self._handles.append(module.register_forward_hook(self._hook(label, stream)))

    def _judge(self, label: str, x: torch.Tensor) -> tuple[TopKSAE, torch.Tensor]:
        key = (label, x.device, x.dtype)
        if key not in self._placed:
            sae, harmful = self.judges[label]
            placed = TopKSAE(*(t.detach().to(x.device, x.dtype) for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)),
                             k=sae.k)
            mask = torch.zeros(sae.num_features, dtype=torch.bool, device=x.device)
            mask[list(harmful)] = True
            self._placed[key] = (placed, mask)
        return self._placed[key]

    def _hook(self, label: str, stream: str):
        def hook(module, args, output) -> None:
            text, image = output
            x = image if stream == "image" else text if stream == "text" else torch.cat([text, image], dim=1)
            sae, mask = self._judge(label, x)
            vals, idx = sae.encode(x.reshape(-1, x.shape[-1]))
            h = torch.where(mask[idx.long()], vals, torch.zeros_like(vals)).sum(-1).mean()
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


# -- running the pipeline ----------------------------------------------------------------

def _pipeline_device(pipe) -> torch.device:
    dev = getattr(pipe, "_execution_device", None)
    return dev if isinstance(dev, torch.device) else next(pipe.transformer.parameters()).device


def prompt_seed(p: PromptRecord, gen: GenerateConfig) -> int:
    return p.seed if p.seed is not None else gen.seed + p.index


def run_pipeline(pipe, p: PromptRecord, gen: GenerateConfig) -> torch.Tensor:
    """The final latents of one prompt (`output_type="latent"`), noise from a seeded CPU
    generator so that every device starts from the same noise."""
    device = _pipeline_device(pipe)
    dtype = next(pipe.transformer.parameters()).dtype
    kwargs: dict[str, Any] = dict(num_inference_steps=gen.num_inference_steps, height=gen.height, width=gen.width,
                                  guidance_scale=gen.guidance_scale, output_type="latent",
                                  generator=torch.Generator().manual_seed(prompt_seed(p, gen)))
    kwargs.update(gen.pipeline_kwargs)
    emb = p.load_embeddings()
    if emb:
        kwargs.update({k: v.to(device, dtype) for k, v in emb.items()})
    else:
        kwargs["prompt"] = p.prompt
    with torch.inference_mode():
        out = pipe(**kwargs)
    return out.images if hasattr(out, "images") else out[0]


@torch.inference_mode()
def decode_latents(pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Images `[B, 3, H, W]` in [0, 1] (CPU, float32) from final latents, as the pipeline's own
    `output_type="pt"` would decode them (FLUX pipelines pack latents into tokens first)."""
    if hasattr(pipe, "_unpack_latents"):
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    vae = pipe.vae
    latents = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
    image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1).cpu()


def site_labels(config: SafeDIGConfig) -> list[str]:
    """The names telemetry uses for `config.sites`: the site, or `site:stream` where one block
    has a SiteConfig per stream (as `SafeDIGHandle.sites` names them)."""
    counts: dict[str, int] = {}
    for s in config.sites:
        counts[s.site] = counts.get(s.site, 0) + 1
    return [s.site if counts[s.site] == 1 else f"{s.site}:{s.stream}" for s in config.sites]


def _site_streams(handle: SafeDIGHandle) -> dict[str, tuple[str, str]]:
    # Handle labels and resolved configs are both in the order of config.sites.
    return {label: (s.site, s.stream) for label, s in zip(handle.sites, handle.config().sites)}


def _judges(handle: SafeDIGHandle, judges: Optional[Judges]) -> dict[str, tuple[TopKSAE, Sequence[int]]]:
    """Judge per handle label: the given ones, else each site's own SAE (if loaded) and harmful set."""
    resolved = handle.config().sites
    if judges is not None:
        if len(judges) != len(resolved):
            raise ValueError(f"judges must give one (SAE, harmful ids) per steered site ({len(resolved)}), "
                             f"got {len(judges)}")
        return dict(zip(handle.sites, judges))
    return {label: (s.sae, list(s.harmful or [])) for label, s in zip(handle.sites, resolved)
            if isinstance(s.sae, TopKSAE)}


def check_config(pipe, config: SafeDIGConfig) -> None:
    """Raise what `apply_safedig` would for `config` on `pipe` (unknown site, SAE width, model
    not supported), leaving the pipeline as it was."""
    apply_safedig(pipe, config)
    remove_safedig(pipe)


def generate(pipe, prompts: Sequence[PromptRecord], config: SafeDIGConfig, gen: GenerateConfig = GenerateConfig(),
             *, judges: Optional[Judges] = None, progress: bool = False) -> list[PromptRun]:
    """Run every prompt with steering off (if `gen.baseline`) and on; see the module docstring.

    `config`'s SAEs should be loaded (`load_saes`) so that the default judges are the sites'
    own SAEs; `judges` (one (SAE, harmful ids) per site of `config`) scores `harm_out` with
    other SAEs, e.g. to compare two configs by one yardstick.
    Errors in `config` (unknown site, SAE width) raise before anything runs; the hooks are
    removed on return and on error.
    """
    from tqdm.auto import tqdm

    records = list(prompts)
    if not records:
        raise ValueError("prompts is empty; expected at least one PromptRecord")
    handle = apply_safedig(pipe, config)
    meter = None
    with progress_bar_disabled(pipe):
        try:
            meter = _HarmMeter(pipe.transformer, _site_streams(handle), _judges(handle, judges))
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
                    latents[run] = run_pipeline(pipe, p, gen).detach().float().cpu()
                    telemetry[run] = handle.telemetry()
                    harm_out[run] = meter.read()
                    if gen.decode:
                        images[run] = decode_latents(pipe, latents[run].to(_pipeline_device(pipe)), gen.height,
                                                     gen.width)[0]
                runs.append(PromptRun(p.id, p.label, prompt_seed(p, gen), latents, images, telemetry, harm_out))
            return runs
        finally:
            if meter is not None:
                meter.remove()
            remove_safedig(pipe)


def time_steps(pipe, prompt: PromptRecord, config: SafeDIGConfig, gen: GenerateConfig, repeats: int = 5,
               clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Median time per transformer call (one denoising step for FLUX) without the hooks and
    with steering on, over `repeats` runs of each after one warm-up run each, alternated so a
    change in machine load hits both. Telemetry stays as configured: it is part of the cost."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    transformer = pipe.transformer
    cuda = _pipeline_device(pipe).type == "cuda"
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
                        apply_safedig(pipe, config)
                    current.clear()
                    try:
                        run_pipeline(pipe, prompt, gen)
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
            "calls_timed": len(times["off"]), "device": str(_pipeline_device(pipe)),
            "dtype": str(next(transformer.parameters()).dtype).replace("torch.", ""),
            "threads": torch.get_num_threads()}


# -- summaries and files -----------------------------------------------------------------

def summarize(runs: Sequence[PromptRun]) -> dict[str, dict[str, Any]]:
    """Per label: prompts, mean `harm_in`/`harm_out` over sites and prompts for each run, the
    steered run's gated fraction, and the mean and max relative change of the final latents."""
    out: dict[str, dict[str, Any]] = {}
    for label in sorted({r.label for r in runs}):
        group = [r for r in runs if r.label == label]
        s: dict[str, Any] = {"prompts": len(group)}
        for run in RUNS:
            if all(run in r.telemetry for r in group):
                s[f"harm_in_{run}"] = _mean([_mean(list(r.harm_in(run).values())) for r in group])
                s[f"harm_out_{run}"] = _mean([_mean(list(r.harm_out[run].values())) for r in group])
        s["gated_fraction"] = _mean([_mean(list(r.gated_fraction("steered").values())) for r in group])
        changes = [r.change for r in group]
        s["change_mean"] = _mean(changes)
        s["change_max"] = max(changes) if all(math.isfinite(c) for c in changes) else float("nan")
        out[label] = s
    return out


def summary_table(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """A fixed-width table of `summarize`'s output (runs with a baseline)."""
    w = max(24, *(len(label) for label in summary))
    lines = [f"{'label':<{w}} {'prompts':>7} {'harm out':>9} {'harm out':>9} {'change':>7} {'gated':>6} "
             f"{'latents moved':>15}",
             f"{'':<{w}} {'':>7} {'unsteered':>9} {'steered':>9} {'':>7} {'':>6} {'mean / max':>15}"]
    for label, s in summary.items():
        before, after = s.get("harm_out_baseline", float("nan")), s.get("harm_out_steered", float("nan"))
        rel = f"{(after - before) / before:+.0%}" if before and math.isfinite(before) else "n/a"
        moved = f"{s['change_mean']:.2%} / {s['change_max']:.2%}"
        lines.append(f"{label:<{w}} {s['prompts']:>7} {before:>9.3f} {after:>9.3f} {rel:>7} "
                     f"{s['gated_fraction']:>6.1%} {moved:>15}")
    lines.append("harm out: mean harm score h of the tokens the steered sites pass on; gated: share of tokens over "
                 "tau; latents moved: ||z_steered - z_unsteered|| / ||z_unsteered||")
    return "\n".join(lines)


def _to_pil(image: torch.Tensor, scale: int):
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr)
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST) if scale > 1 else pil


def image_scale(height: int, width: int, target: int = 128) -> int:
    """Integer upscaling that makes tiny images at least `target` pixels on their short side."""
    return max(1, math.ceil(target / max(1, min(height, width))))


def difference_images(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[torch.Tensor], float]:
    """`|a - b|` per pair, all divided by the largest difference over every pair (one scale for
    the whole set, so small changes look small next to large ones); returns the images and
    the gain applied."""
    diffs = [(a - b).abs() for a, b in pairs]
    top = max((float(d.max()) for d in diffs), default=0.0)
    gain = 1.0 / top if top > 0 else 1.0
    return [(d * gain).clamp(0, 1) for d in diffs], gain


def save_grid(rows: Sequence[tuple[str, Sequence[torch.Tensor]]], columns: Sequence[str], path: Union[str, Path],
              scale: int = 1) -> Path:
    """A labelled PNG grid: one row per `(row label, images)`, one column per `columns` name."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("save_grid needs at least one row")
    cells = [[_to_pil(im, scale) for im in ims] for _, ims in rows]
    cw = max(c.width for row in cells for c in row)
    ch = max(c.height for row in cells for c in row)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad, top = 4, 18
    left = int(max(measure.textlength(label) for label, _ in rows)) + 12
    width = max(left + len(columns) * (cw + pad), int(left + sum(measure.textlength(c) + pad for c in columns)))
    grid = Image.new("RGB", (width, top + len(rows) * (ch + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(columns):
        draw.text((left + j * (cw + pad), 3), name, fill="black")
    for i, ((label, _), row) in enumerate(zip(rows, cells)):
        y = top + i * (ch + pad)
        draw.text((4, y + ch // 2 - 5), label, fill="black")
        for j, cell in enumerate(row):
            grid.paste(cell, (left + j * (cw + pad), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def write_outputs(runs: Sequence[PromptRun], out_dir: Union[str, Path], gen: GenerateConfig,
                  config: Optional[SafeDIGConfig] = None, extra: Optional[Mapping[str, Any]] = None) -> dict[str, Path]:
    """Write `images/<id>.png` (without | with steering | |difference|, side by side),
    `grid.png` (every prompt, one row each) and `report.json`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    records = [r.record() for r in runs]
    have_images = all("steered" in r.images for r in runs)
    if have_images:
        scale = image_scale(gen.height, gen.width)
        with_base = all("baseline" in r.images for r in runs)
        diffs, gain = (difference_images([(r.images["steered"], r.images["baseline"]) for r in runs])
                       if with_base else ([], 1.0))
        columns = (["without", "with", f"|diff| x{gain:.0f}"] if with_base else ["with"])
        rows = []
        for i, (r, rec) in enumerate(zip(runs, records)):
            ims = [r.images["baseline"], r.images["steered"], diffs[i]] if with_base else [r.images["steered"]]
            name = f"{r.id}.png"
            save_grid([(r.label, ims)], columns, out / "images" / name, scale)
            rec["image"] = f"images/{name}"
            rows.append((f"{r.id}", ims))
        paths["grid"] = save_grid(rows, columns, out / "grid.png", scale)
        paths["images"] = out / "images"
    doc: dict[str, Any] = {"format": REPORT_FORMAT, "version": REPORT_VERSION, "generate": dataclasses.asdict(gen),
                           "summary": summarize(runs), "prompts": records}
    if config is not None:
        doc["sites"] = [{"label": label, "site": s.site, "stream": s.stream, "harmful": s.harmful, "beta": s.beta,
                         "gamma": s.gamma, "tau": s.tau, "window": list(s.window),
                         "sae": None if isinstance(s.sae, TopKSAE) else str(s.sae)}
                        for label, s in zip(site_labels(config), config.sites)]
    if extra:
        doc.update(extra)
    paths["report"] = out / "report.json"
    atomic_write_json(paths["report"], json_safe(doc))
    return paths


def json_safe(obj: Any) -> Any:
    """JSON has no NaN or Infinity: write them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
