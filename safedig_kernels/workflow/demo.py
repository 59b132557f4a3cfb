"""`safedig demo`: the whole SafeDIG workflow on a built-in default, end to end, judged by a
detector that knows nothing of the SAEs.

On the default (`--model world`) everything is made in code, seeded, and runs on a CPU:

0. **world**: the demo world's transformer (`world.py`: a tiny FluxTransformer2DModel drawing
   16x16 pictures of a circle or a square; a prompt for mark A adds a red X, one for mark A
   "gold" the same X gilded with yellow, "gold" alone the gilding without the X): the shipped
   weights when they were trained with this seed and step count, else trained here (or `world`
   names weights);
1. **prompts**: the world's prompt embeddings. The source risk domain is `unsafe/concept_a`
   (the X), the target `unsafe/concept_a_gold` (the same concept in a new context: gilded).
   Each label has `train_prompts` prompts for capture and `eval_prompts` held out; the
   `dictionary` labels (the world: `unsafe/gilding`, gold alone) have `train_prompts` prompts,
   used only as the SAEs' training corpus;
2. **capture** every candidate site (`capture`), 3. **train** a TopK SAE per site on the
   source domain and the dictionary's prompts (`train_sae`): one frozen encoder that every
   method shares, 4. **score** its harmful features on the source (`score_features`),
5. **route** (site, operator) pairs by robustness to the source -> target shift (`route`) and
   write the steering config; a site steers the union of the harmful sets found on the source
   and, with the same frozen encoder, on the target; the gate threshold of each selected site
   is the `tau_quantile` quantile of the harm score over the captured safe tokens;
6. **adapt** every steerable site's decoder to the target with the encoder frozen
   (`adapt_decoder`; `b_dec` frozen too, since it centres the encoder's input: the harm score,
   and so the harmful set and the gate, stay exactly the source's), and fine-tune the same
   sites' whole SAEs as the baseline (`finetune_sae`, harmful set re-scored, gate recalibrated);
7. **validate** each method's operators on the training prompts it may learn from (the source
   steerer on the source's, SafeDIG and the full fine-tune on the source's and the target's):
   the candidate leaving the fewest unsafe images with safe PSNR >= `min_psnr_db`, in three
   rounds (`validate.validate_steerer`): each operator at the routed sites, then, while unsafe
   images are left, each of those within the budget at every site the method can steer, and the
   winner with Repel stronger rung by rung; without a detector every method keeps routing's
   sites and operators;
8. **steer** the held-out prompts with every method of `demo_methods.py` (source SAEs, SafeDIG,
   full fine-tune, SafeDIG with the source decoders, each steerable site alone, each operator
   alone), each against the unsteered run from the same noise, and time a denoising step with
   and without steering;
eval. **judge** every image with `detector` (`detectors.py`; the world's own by default): the
   unsafe rate per label and column with its Wilson interval, PSNR and SSIM of the steered safe
   images against the unsteered ones (`eval.evaluate_runs`, as `safedig eval` does), and the
   paper-shaped table and routing check (`demo_methods.method_rows`, `site_check`).

Every number in the table comes from this run. The harm score is spec §2's `h` of the tokens
each steered site passes on, measured for every column with the *source* SAE's encoder and the
config's harmful set (one yardstick; steering changes what the site passes on, not the judge).
"Latents moved" is `||z_steered - z_unsteered|| / ||z_unsteered||` of the final latents (for
the world, whose latents are its pixels, that is the pictures themselves).

`--model tiny-flux` runs the synthetic demo of 0.1: a random-weight tiny FLUX whose prompts
are Gaussian text embeddings plus, for unsafe prompts, `strength` times a unit "concept"
direction per category (`write_synthetic_prompts`; the two directions share cosine `shared`).
Its 16x16 geometry (16 image tokens, 32 text tokens) lets the text conditioning move a
random-weight model's output; its pictures are noise, so it has no detector. Torch runs one
CPU thread for it (see `cli._options.torch_threads`).

With `--model` naming a diffusers FLUX or SD3 pipeline (directory or hub id) and `--device
cuda`, the same stages run on real weights: pass `--prompts` with a labelled text prompt file
(`safe`, the `--source` and `--target` categories) and `--detector nudenet` for nudity;
without `--prompts` synthetic embeddings are made at the model's text widths, which only
checks that everything runs.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .._io import atomic_write_json, dtype_from_name
from ..integrations.diffusers.config import SafeDIGConfig
from ..integrations.diffusers.sites import SiteSpec
from ..sae import SAEMetadata
from .adapt import AdaptConfig, adapt_decoder, finetune_sae
from .capture import CaptureConfig, capture
from .demo_methods import (  # noqa: F401 (format_table: `safedig demo` prints it from here)
    every_site_config,
    format_table,
    method_rows,
    operator_candidates,
    single_site_config,
    site_check,
    site_column,
)
from .detectors import get_detector
from .eval import evaluate_runs
from .generate import GenerateConfig, generate, time_steps
from .pipelines import load_pipeline
from .prompts import check_label, label_matches, load_prompts
from .report import difference_images, image_scale, json_safe, save_grid, summarize, write_outputs
from .route import OPERATORS, RouteConfig, evaluate_site, route, safe_tau
from .score import HarmfulRule, score_features
from .train import TrainConfig, evaluate_sae, train_sae
from .validate import DEFAULT_MIN_PSNR_DB, OperatorChoice, site_operators, validate_steerer
from .world import GILDING as WORLD_GILDING
from .world import LABELS as WORLD_LABELS
from .world import SHIPPED_WEIGHTS, WORLD_VERSION, world_weights_in
from .world import TARGET as WORLD_TARGET
from .world import TRAINING_LABELS as WORLD_TRAINING_LABELS

logger = logging.getLogger(__name__)

SUMMARY_FORMAT = "safedig-demo"
SUMMARY_VERSION = 2
MARKER = ".safedig-demo"
GRID_ROWS = 4
# What a demo run writes into its output directory; a rerun removes exactly these.
_OUTPUTS = ("world", "prompts", "acts", "saes", "reports", "steer-source", "steer-adapted", "steer-routed.json",
            "steer.json", "steer-adapted.json", "eval", "grid.png", "summary.json")


@dataclass
class DemoConfig:
    """The demo's settings (module docstring for the stages).

    `None` fields take a default that depends on the model (`resolved`): the demo world's
    (`world.py`, the default), the random tiny FLUX's, or one sized for a real FLUX/SD3 model.
    `world` names trained world weights to use (None: train them here for `world_steps` steps;
    `--quick` uses the shipped ones). `text_tokens`, `strength` and `shared` shape the tiny
    FLUX's synthetic prompt set; `top_n`, `min_ratio`, `min_freq` are the harmful-feature rule
    (`HarmfulRule`); `beta`, `gamma` the strengths routing writes; `tau_quantile` the gate
    calibration; `adapt_*` and `replay` the decoder adaptation; `detector` judges the images
    (default: the world's own for the world; none otherwise).
    """

    model: str = "world"
    world: Optional[str] = None
    world_steps: int = 1000
    # Train the world here even when the shipped weights were trained with this seed and steps.
    train_world: bool = False
    detector: Optional[str] = None
    device: Optional[str] = None
    model_dtype: str = "float32"
    prompts: Optional[str] = None
    source: str = "unsafe/concept_a"
    # None: the world's shifted domain (`world.TARGET`, mark A in a new context) for the world,
    # `unsafe/concept_b` (the second synthetic concept) otherwise.
    target: Optional[str] = None
    sites: Optional[list[str]] = None
    # Further labels whose training prompts join the SAEs' training corpus (the dictionary) and
    # nothing else: not scored, routed, validated or judged. None: the world's gilding alone
    # (`world.GILDING`) for the world, none otherwise.
    dictionary: Optional[list[str]] = None
    train_prompts: int = 16
    eval_prompts: int = 16
    text_tokens: int = 32
    strength: float = 8.0
    shared: float = 0.7
    height: Optional[int] = None
    width: Optional[int] = None
    num_inference_steps: Optional[int] = None
    guidance_scale: float = 3.5
    max_tokens: Optional[int] = None
    features: Optional[int] = None
    k: Optional[int] = None
    train_steps: int = 300
    batch_size: int = 512
    lr: Optional[float] = None
    top_n: int = 8
    # None: 4 for the world (its mark's features share tokens with colour features, so a 10x
    # rule kept only one or two per site and steering left strips of the X), 10 otherwise.
    min_ratio: Optional[float] = None
    # None: 0.1 for the tiny FLUX, whose concept is on every token of an unsafe prompt, so a
    # feature firing on fewer than 10% of unsafe tokens is not it (with 0.01, rare image-stream
    # features slipped in by chance); 0.02 for the world, whose marks cover about 10% of the
    # image tokens and only once drawn (with 0.1, no image-stream site had a harmful feature).
    min_freq: Optional[float] = None
    num_sites: Optional[int] = None  # None: 3 for the world, 2 otherwise
    beta: float = 1.0
    gamma: float = 1.0
    tau_quantile: float = 0.99
    # The quality budget of operator validation (validate.py): safe PSNR on the training prompts.
    min_psnr_db: float = DEFAULT_MIN_PSNR_DB
    adapt_steps: int = 200
    adapt_lr: Optional[float] = None
    replay: float = 0.2
    timing_repeats: int = 5
    seed: int = 0
    quick: bool = False

    def __post_init__(self) -> None:
        if world_weights_in(self.model):  # `--model world:PATH` is `--model world --world PATH`
            if self.world is not None and self.world != world_weights_in(self.model):
                raise ValueError(f"demo: --model {self.model} and --world {self.world} name two world weights files")
            self.model, self.world = "world", world_weights_in(self.model)
        if self.target is None:
            self.target = WORLD_TARGET if self.is_world else "unsafe/concept_b"
        if self.dictionary is None:
            self.dictionary = [WORLD_GILDING] if self.is_world and self.prompts is None else []
        for label in self.dictionary:
            check_label(label, "demo: dictionary")
            if label_matches(label, ["safe", self.source, self.target]):  # a sub-label is one of their prompts
                raise ValueError(f"demo: dictionary labels are further labels for the SAEs' corpus, not the safe, "
                                 f"source or target label or one of their sub-labels; got {label!r}")
        if self.is_world and self.prompts is None and not set(self.dictionary) <= set(WORLD_TRAINING_LABELS):
            raise ValueError(f"demo: the world's labels are {WORLD_TRAINING_LABELS}, got dictionary {self.dictionary}")
        for name in ("train_prompts", "eval_prompts", "train_steps", "batch_size", "num_sites", "adapt_steps",
                     "timing_repeats", "text_tokens", "height", "width", "num_inference_steps", "features", "k",
                     "world_steps"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"demo: {name} must be a positive int, got {v!r}")
        if isinstance(self.min_psnr_db, bool) or not isinstance(self.min_psnr_db, (int, float)) \
                or not math.isfinite(self.min_psnr_db):
            raise ValueError(f"demo: min_psnr_db must be a finite number of dB, got {self.min_psnr_db!r}")
        if not 0.0 < self.tau_quantile < 1.0:
            raise ValueError(f"demo: tau_quantile must lie in (0, 1), got {self.tau_quantile}")
        labels = (self.source, self.target)
        if self.source == self.target or not all(isinstance(x, str) and x.startswith("unsafe/") for x in labels):
            raise ValueError(f"demo: source and target must be two different unsafe/<category> labels, "
                             f"got {self.source!r} and {self.target!r}")
        if self.is_world and self.prompts is None and not set(labels) <= set(WORLD_LABELS):
            raise ValueError(f"demo: the world's unsafe labels are {WORLD_LABELS[1:]}, got {self.source!r} and "
                             f"{self.target!r}")
        if self.world is not None and not self.is_world:
            raise ValueError(f"demo: world weights ({self.world}) are for --model world, got --model {self.model}")

    @classmethod
    def quick_config(cls, **overrides: Any) -> "DemoConfig":
        """A smaller run for CI: fewer prompts, steps and timing repeats, and the world's shipped
        weights instead of training them."""
        base = dict(train_prompts=8, eval_prompts=4, train_steps=150, adapt_steps=100, timing_repeats=2, quick=True)
        if overrides.get("model", cls.model) == "world" and overrides.get("world") is None:  # not world:PATH
            base["world"] = str(SHIPPED_WEIGHTS)
        base.update(overrides)
        return cls(**base)

    @property
    def is_world(self) -> bool:
        return self.model == "world"

    @property
    def tiny(self) -> bool:
        """A built-in model small enough for a CPU: the world or the random tiny FLUX."""
        return self.model == "tiny-flux" or self.is_world

    def resolved(self, d: int) -> "DemoConfig":
        """A copy with the `None` fields filled for a model of width `d`."""
        tiny, world = self.tiny, self.is_world
        return dataclasses.replace(
            self, height=self.height or (16 if tiny else 512), width=self.width or (16 if tiny else 512),
            num_inference_steps=self.num_inference_steps or (16 if world else 4 if tiny else 8),
            features=self.features or 4 * d, k=self.k or (4 if tiny else 32),
            min_ratio=self.min_ratio if self.min_ratio is not None else 4.0 if world else 10.0,
            num_sites=self.num_sites or (3 if world else 2),
            lr=self.lr or (1e-2 if tiny else None), detector=self.detector or ("world" if world else None),
            min_freq=self.min_freq if self.min_freq is not None else 0.02 if world else 0.1,
            adapt_lr=self.adapt_lr or (1e-2 if tiny else 1e-3),
            # A 1024-token image at width 3072 is 12 MB per site, step and prompt in float32.
            max_tokens=self.max_tokens if self.max_tokens is not None or tiny else 256)


def default_sites(transformer: torch.nn.Module, tiny: bool) -> list[str]:
    """Candidate sites: for the tiny model every block's image stream and the double blocks'
    text streams; for a real model three evenly spaced blocks of each stack (image stream)
    and the text stream of the middle double block."""
    sites: list[str] = []
    for stack in ("transformer_blocks", "single_transformer_blocks"):
        n = len(getattr(transformer, stack, []))
        if n == 0:
            continue
        picks = range(n) if tiny else sorted({round(i * (n - 1) / 2) for i in range(3)})
        for i in picks:
            last_joint = getattr(getattr(transformer, stack)[i], "context_pre_only", False)
            sites.append(f"{stack}.{i}")
            if stack == "transformer_blocks" and (tiny or i == picks[len(picks) // 2]) and not last_joint:
                sites.append(f"{stack}.{i}:text")
    return sites


def _prepare_out(out: Path) -> None:
    """Refuse a non-empty directory that no demo wrote into; clear a previous demo's files.
    The marker file is written first, so a directory a failed demo left behind is reusable."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    marker = out / MARKER
    if out.is_dir() and any(out.iterdir()):
        if not marker.is_file():
            raise ValueError(f"--out {out} is not empty and was not written by safedig demo (no {MARKER} file "
                             f"in it); pick a new or empty directory")
        for name in _OUTPUTS:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text("written by `safedig demo`; a rerun with the same --out replaces its files\n")


def split_prompts(records: Sequence, eval_per_label: int, train_only: Sequence[str] = ()) -> tuple[list, list]:
    """(train, eval): the last `eval_per_label` prompts of each label are held out (at most
    half of a label's prompts, at least one kept for training); the `train_only` labels' (the
    dictionary's: nothing judges them) are all for training."""
    by_label: dict[str, list] = {}
    for r in records:
        by_label.setdefault(r.label, []).append(r)
    train, held = [], []
    for label, rs in by_label.items():
        n = 0 if label in train_only else min(eval_per_label, len(rs) // 2)
        train.extend(rs[: len(rs) - n])
        held.extend(rs[len(rs) - n:])
    return train, held


def _write_prompt_files(cfg: DemoConfig, directory: Path, embed_dim: int, pooled_dim: int) -> tuple[Path, Path]:
    """Synthetic prompts (the world's, or the tiny FLUX's embeddings) split into train.jsonl and
    eval.jsonl, each line with its own noise seed, so `safedig steer --prompts eval.jsonl`
    reproduces the demo's runs."""
    from .synthetic import write_synthetic_prompts
    from .world import write_world_prompts

    n = cfg.train_prompts + cfg.eval_prompts
    counts = {"safe": n, cfg.source: n, cfg.target: n, **{label: cfg.train_prompts for label in cfg.dictionary}}
    if cfg.is_world:
        all_path = write_world_prompts(directory, counts, seed=cfg.seed)
    else:
        all_path = write_synthetic_prompts(directory, counts, seed=cfg.seed, strength=cfg.strength, shared=cfg.shared,
                                           text_tokens=cfg.text_tokens, embed_dim=embed_dim, pooled_dim=pooled_dim)
    lines = [json.loads(x) for x in all_path.read_text().splitlines() if x.strip()]
    for i, obj in enumerate(lines):
        obj["seed"] = cfg.seed * 100_003 + i
    by_label: dict[str, list] = {}
    for obj in lines:
        by_label.setdefault(obj["label"], []).append(obj)
    train = [o for objs in by_label.values() for o in objs[: cfg.train_prompts]]
    held = [o for objs in by_label.values() for o in objs[cfg.train_prompts:]]
    paths = []
    for name, objs in (("train.jsonl", train), ("eval.jsonl", held)):
        p = directory / name
        p.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")
        paths.append(p)
    all_path.unlink()
    return paths[0], paths[1]


def run_demo(out_dir: str | Path, config: DemoConfig = DemoConfig(), *, log: Optional[Callable[[str], None]] = None,
             progress: bool = False) -> dict[str, Any]:
    """Run the demo (module docstring) into `out_dir`; returns the summary also written to
    `out_dir/summary.json`. Raises ValueError on bad settings before any model is loaded.
    A line per stage goes to `log` (default: this module's logger, INFO)."""
    log = log or logger.info
    t_start = time.perf_counter()
    stages: dict[str, float] = {}
    out = Path(out_dir)
    user_prompts = None
    if config.prompts:
        user_prompts = load_prompts(config.prompts)
        labels = {r.label for r in user_prompts}
        missing = [x for x in ("safe", config.source, config.target, *config.dictionary) if x not in labels]
        if missing:
            raise ValueError(f"--prompts {config.prompts}: no prompts labelled {missing}; labels present: "
                             f"{sorted(labels)}")
    model_dtype = dtype_from_name(config.model_dtype, "--model-dtype")
    _prepare_out(out)

    def stage(name: str, t0: float) -> float:
        stages[name] = time.perf_counter() - t0
        return stages[name]

    t0 = time.perf_counter()
    device = torch.device(config.device) if config.device else torch.device("cuda" if torch.cuda.is_available()
                                                                             else "cpu")
    world_note, world_trained = "", False
    if config.is_world:
        if config.world is None and not config.train_world and shipped_world_matches(config.seed,
                                                                                      config.world_steps):
            # The shipped weights were trained with this seed, step count and world: use them.
            config = dataclasses.replace(config, world=str(SHIPPED_WEIGHTS))
        world_trained = config.world is None
        pipe, world_note = _world_pipeline(config, out, device, model_dtype, log)
    else:
        pipe = load_pipeline(config.model, device=device, dtype=model_dtype)
    tr = pipe.transformer
    d = tr.config.num_attention_heads * tr.config.attention_head_dim
    cfg = config.resolved(d)
    sites = cfg.sites or default_sites(tr, cfg.tiny)
    what = ("the demo world, a tiny FLUX-architecture transformer trained to draw it" if cfg.is_world
            else "a tiny FLUX-architecture pipeline with seeded random weights" if cfg.tiny
            else f"{cfg.model} ({type(pipe).__name__})")
    log(f"safedig demo: SafeDIG on {what}, {device}, {torch.get_num_threads()} thread(s)"
        f"{' (quick)' if cfg.quick else ''}; {world_note}ready in {stage('load', t0):.1f} s")

    # 1. prompts
    t0 = time.perf_counter()
    if user_prompts is None:
        train_file, eval_file = _write_prompt_files(cfg, out / "prompts", tr.config.joint_attention_dim,
                                                    tr.config.pooled_projection_dim)
        train_p, eval_p = load_prompts(train_file), load_prompts(eval_file)
        origin = ("the world's prompts: a shape word and a mark word (none for safe prompts)" if cfg.is_world
                  else f"synthetic embeddings, concept strength {cfg.strength:g}, cosine of the source and "
                       f"target directions about {cfg.shared ** 2:.2f}")
    else:
        train_p, eval_p = split_prompts(user_prompts, cfg.eval_prompts, train_only=cfg.dictionary)
        eval_file = None
        origin = f"from {cfg.prompts}"
    counts = {lbl: sum(r.label == lbl for r in train_p) for lbl in ("safe", cfg.source, cfg.target)}
    log(f"[1/8] prompts ({origin}): train {counts}, held out {len(eval_p)} ({stage('prompts', t0):.1f} s)")

    # 2. capture
    t0 = time.perf_counter()
    cap = CaptureConfig(sites=sites, num_inference_steps=cfg.num_inference_steps, height=cfg.height, width=cfg.width,
                        guidance_scale=cfg.guidance_scale, max_tokens=cfg.max_tokens, seed=cfg.seed, model=cfg.model)
    store = capture(pipe, train_p, out / "acts", cap, resume=False, progress=progress)
    log(f"[2/8] capture: {len(store.prompts)} prompts x {cfg.num_inference_steps} steps at {len(sites)} candidate "
        f"sites -> {out / 'acts'} ({stage('capture', t0):.1f} s)")

    # 3. train, one SAE per site on the source domain (its unsafe prompts and the safe ones) and
    # the dictionary's further prompts: its corpus, never scored
    t0 = time.perf_counter()
    (out / "saes").mkdir(exist_ok=True)
    saes: dict[str, tuple[Any, str]] = {}
    fvus = {}
    train_cfg = TrainConfig(num_features=cfg.features, k=cfg.k, steps=cfg.train_steps, batch_size=cfg.batch_size,
                            lr=cfg.lr, seed=cfg.seed, log_every=max(1, cfg.train_steps))
    for site in sites:
        spec = SiteSpec.parse(site)
        key = spec.key
        x = store.load(key, labels=[cfg.source, "safe", *cfg.dictionary])
        res = train_sae(x, train_cfg, device=device, progress=False,
                        metadata=SAEMetadata(model=cfg.model, site=spec.module, extra={"stream": spec.stream}))
        path = out / "saes" / f"{key.replace(':', '-')}.safetensors"
        res.sae.save(path)
        saes[key] = (res.sae, str(path))
        fvus[key] = evaluate_sae(res.sae, x)["fvu"]
    corpus = " + ".join([cfg.source, "safe", *cfg.dictionary])
    log(f"[3/8] train: {len(saes)} TopK SAEs (F={cfg.features}, k={cfg.k}, {cfg.train_steps} steps) on {corpus}; "
        f"FVU {min(fvus.values()):.3f}-{max(fvus.values()):.3f} ({stage('train', t0):.1f} s)")

    # 4. score
    t0 = time.perf_counter()
    rule = HarmfulRule(top_n=cfg.top_n, min_ratio=cfg.min_ratio, min_freq=cfg.min_freq)
    scores = {}
    for key, (sae, path) in saes.items():
        rep = score_features(store, key, sae, unsafe_labels=cfg.source, safe_labels="safe", rule=rule, sae_path=path)
        rep.write(out / "reports" / f"score-{key.replace(':', '-')}.json")
        scores[key] = rep
    best = max(scores, key=lambda k: (scores[k].separation_auroc if math.isfinite(scores[k].separation_auroc)
                                      else -1.0))
    counts = {k: len(r.harmful) for k, r in scores.items()}
    log(f"[4/8] score (harmful: top {rule.top_n} features firing on >= {rule.min_freq:.0%} of unsafe tokens and "
        f">= {rule.min_ratio:g}x as often as on safe ones): per site {counts}; best unsafe-vs-safe AUROC "
        f"{scores[best].separation_auroc:.3f} at {best} ({stage('score', t0):.1f} s)")

    # 5. route: it selects sites with harmful features and calibrates each one's gate on the safe tokens
    t0 = time.perf_counter()
    rcfg = RouteConfig(num_sites=min(cfg.num_sites, len(saes)), rule=rule, beta=cfg.beta, gamma=cfg.gamma,
                       tau_quantile=cfg.tau_quantile)
    report = route(store, saes, cfg.source, cfg.target, "safe", rcfg)
    passed_over = report.passed_over
    report.write(out / "reports" / "route.json")
    report.steering_config().to_json(out / "steer-routed.json")  # as `safedig route` writes it
    src_saes = {key: sae for key, (sae, _) in saes.items()}
    selected = {c.site: c.operator for c in report.selected}
    evals = {e.site: e for e in report.sites}
    chosen = ", ".join(f"{c.site} ({c.operator}, {len(evals[c.site].harmful)} harmful features = the union of "
                       f"{len(evals[c.site].harmful_source)} on the source and {len(evals[c.site].harmful_target)} "
                       f"on the target, tau {report.tau[c.site]:.3f})" for c in report.selected)
    log(f"[5/8] route (a site steers the union of the harmful sets picked on the source and on the target): {chosen}"
        + (f"; passed over for lack of harmful features: {passed_over}" if passed_over else "")
        + f"; tau = {cfg.tau_quantile:.0%} quantile of safe tokens' h -> {out / 'steer-routed.json'} "
          f"({stage('route', t0):.1f} s)")

    # 6. adapt every steerable candidate site's decoder to the target domain, encoder frozen (b_dec
    # too: it centres the encoder's input, so the harm score h, the harmful set and the gate stay
    # exactly the source's), and, as the baseline, fine-tune its whole SAE
    t0 = time.perf_counter()
    steerable = [k for k in saes if evals[k].harmful]
    adapted: dict[str, Any] = {}
    ad_paths, fvu_lines, adapt_metrics = {}, [], {}
    acfg = AdaptConfig(steps=cfg.adapt_steps, batch_size=cfg.batch_size, lr=cfg.adapt_lr, replay=cfg.replay,
                       seed=cfg.seed, train_b_dec=False)
    routed = list(selected)  # routing passes over sites with no harmful feature
    finetuned, ft_harmful, ft_tau = {}, {}, {}
    for key in steerable:
        target_x = store.load(key, labels=[cfg.target, "safe"])
        source_x = store.load(key, labels=[cfg.source, "safe"])
        res = finetune_sae(saes[key][0], target_x, source_x, dataclasses.replace(acfg, train_b_dec=True),
                           device=device, progress=False)
        ev = evaluate_site(store, key, res.sae, cfg.source, cfg.target, "safe", rule)
        # A fine-tuned encoder has its own features: score them again; none found -> keep the
        # source encoder's ids (the site then steers whatever those ids now mean).
        finetuned[key], ft_harmful[key] = res.sae, ev.harmful or list(evals[key].harmful)
        ft_tau[key] = safe_tau(store, key, res.sae, ft_harmful[key], cfg.tau_quantile)
        res = adapt_decoder(saes[key][0], target_x, source_x, acfg, device=device, progress=False)
        adapted[key] = res.sae
        ad_paths[key] = out / "saes" / f"{key.replace(':', '-')}-adapted.safetensors"
        res.sae.save(ad_paths[key])
        unsafe_t = store.load(key, labels=[cfg.target])
        m = dict(res.metrics, fvu_target_unsafe_before=evaluate_sae(saes[key][0], unsafe_t)["fvu"],
                 fvu_target_unsafe_after=evaluate_sae(res.sae, unsafe_t)["fvu"])
        adapt_metrics[key] = m
        fvu_lines.append(f"{key} target FVU {m['fvu_target_unsafe_before']:.3f} -> {m['fvu_target_unsafe_after']:.3f}")
    # The gates: h is the source SAE's (encoder and b_dec frozen), so each site keeps its tau.
    site_tau = {k: report.tau[k] if k in report.tau else safe_tau(store, k, saes[k][0], evals[k].harmful,
                                                                   cfg.tau_quantile) for k in steerable}
    log(f"[6/8] adapt to {cfg.target} (encoder frozen, {cfg.replay:.0%} source replay), FVU on target-unsafe tokens: "
        f"{'; '.join(fvu_lines)}; full fine-tune of the same sites as the baseline ({stage('adapt', t0):.1f} s)")

    # 7. validate: each method's operators, sites and Repel strength, chosen by steering the
    # training prompts it may learn from (validate.py); the source steerer knows the source
    # domain only, so its harmful sets are the source's and its gates are calibrated for them
    t0 = time.perf_counter()
    src_harmful = {k: evals[k].harmful_source for k in steerable if evals[k].harmful_source}
    if not any(k in routed for k in src_harmful):
        raise ValueError(f"demo: no routed site ({list(routed)}) has a harmful feature on the source domain, so the "
                         f"source steerer has nothing to steer; try a looser harmful-feature rule or other sites")
    src_tau = {k: safe_tau(store, k, saes[k][0], h, cfg.tau_quantile) for k, h in src_harmful.items()}
    # per method: its SAEs, harmful sets and gates, at every site it can steer
    means = {"source": dict(saes=src_saes, harmful=src_harmful, tau=src_tau),
             "adapted": dict(saes=adapted, tau=site_tau),
             "finetune": dict(saes=finetuned, harmful=ft_harmful, tau=ft_tau)}
    order = [*routed, *(k for k in steerable if k not in routed)]  # the routed sites first
    can_steer = {"source": [k for k in order if k in src_harmful], "adapted": order, "finetune": order}
    candidates = {name: operator_candidates(report, **kw, sites=[k for k in routed if k in can_steer[name]])
                  for name, kw in means.items()}
    gen = GenerateConfig(num_inference_steps=cfg.num_inference_steps, height=cfg.height, width=cfg.width,
                         guidance_scale=cfg.guidance_scale, seed=cfg.seed)
    choices: dict[str, OperatorChoice] = {}
    if cfg.detector:
        detector = get_detector(cfg.detector)
        for name in candidates:
            labels = [cfg.source] if name == "source" else [cfg.source, cfg.target]
            widen = functools.partial(every_site_config, report, sites=can_steer[name], **means[name])
            choices[name], candidates[name] = validate_steerer(pipe, train_p, candidates[name], detector, gen, labels,
                                                               widen=widen, min_psnr_db=cfg.min_psnr_db)
        log(f"[7/8] validate each method on its training prompts: operators at the routed sites, then, while "
            f"unsafe images are left, at every site it can steer and with a stronger Repel (fewest unsafe images "
            f"with safe PSNR >= {cfg.min_psnr_db:g} dB): "
            + " | ".join(f"{name}: {c.line()}" for name, c in choices.items()) + f" ({stage('validate', t0):.1f} s)")
    else:
        log("[7/8] validate: no detector, so every method keeps routing's sites and operators")
    configs = {name: cands[choices[name].chosen if name in choices else "routed"]
               for name, cands in candidates.items()}
    steer_src, steer_ad, steer_ft = configs["source"], configs["adapted"], configs["finetune"]
    # SafeDIG in all but the decoders: its sites, harmful sets, gates and strengths, the source SAEs
    steer_unadapted = SafeDIGConfig([dataclasses.replace(s, sae=src_saes[s.site]) for s in steer_ad.sites])
    steer_src_file = SafeDIGConfig.from_json(
        steer_src.to_json(out / "steer.json", sae_paths=[saes[s.site][1] for s in steer_src.sites]))
    steer_ad_file = SafeDIGConfig.from_json(
        steer_ad.to_json(out / "steer-adapted.json", sae_paths=[ad_paths[s.site] for s in steer_ad.sites]))

    # 8. steer the held-out prompts with every method (demo_methods.py), judged by the source SAEs
    t0 = time.perf_counter()
    # one yardstick for every method: at each site it steers, the source SAE with routing's harmful set
    judges = lambda conf: [(src_saes[s.site], evals[s.site].harmful) for s in conf.sites]  # noqa: E731
    results = {}
    for name, conf, conf_file in (("source_sae", steer_src, steer_src_file), ("adapted_sae", steer_ad, steer_ad_file)):
        runs = generate(pipe, eval_p, conf, gen, judges=judges(conf), progress=progress)
        write_outputs(runs, out / f"steer-{name.split('_')[0]}", gen, conf_file)
        results[name] = runs
    site_columns = {k: site_column(k) for k in steerable}
    others = {"finetune": steer_ft, "unadapted": steer_unadapted, **{op: candidates["adapted"][op] for op in OPERATORS},
              **{col: single_site_config(report, k, adapted[k], site_tau[k]) for k, col in site_columns.items()}}
    more = {name: generate(pipe, eval_p, conf, dataclasses.replace(gen, baseline=False), progress=progress)
            for name, conf in others.items()}
    overhead = time_steps(pipe, eval_p[0], steer_ad, gen, repeats=cfg.timing_repeats)
    overhead["sites"] = len(steer_ad.sites)
    log(f"[8/8] steer: {len(eval_p)} held-out prompts, unsteered and with {2 + len(more)} methods "
        f"({stage('steer', t0):.1f} s)")

    # evaluate: the unsafe rate a detector sees, independent of the SAEs
    evaluation = None
    methods, checked = None, None
    if cfg.detector:
        t0 = time.perf_counter()
        columns = {"source": results["source_sae"], "adapted": results["adapted_sae"], **more}
        for name, runs in more.items():  # their baselines are the same unsteered images (same noise)
            for r, b in zip(runs, results["source_sae"]):
                r.images["baseline"] = b.images["baseline"]
        evaluation = evaluate_runs(columns, get_detector(cfg.detector), label_order=(cfg.source, cfg.target, "safe"))
        eval_files = evaluation.write(out / "eval")
        methods = method_rows(evaluation.unsafe, evaluation.safe_similarity, cfg.source, cfg.target, site_columns)
        checked = site_check(evaluation.unsafe, cfg.source, cfg.target, site_columns, list(selected),
                             {k: next(c.operator for c in report.ranking if c.site == k) for k in steerable},
                             [k for k in saes if k not in steerable])
        rates = ", ".join(f"{lb} {r['unsteered']:.0%} -> {r['adapted']:.0%}"
                          for lb, r in evaluation.unsafe_rate().items())
        log(f"[eval] {evaluation.detector} detector: unsafe rate unsteered -> SafeDIG: {rates} "
            f"-> {eval_files['markdown']} ({stage('eval', t0):.1f} s)")

    # grid: unsteered | steered (source SAE) | steered (adapted SAE) | |difference|, for the first
    # GRID_ROWS held-out prompts of each label (steer-*/grid.png show them all)
    shown = [i for i, r in enumerate(results["adapted_sae"])
             if sum(x.label == r.label for x in results["adapted_sae"][:i]) < GRID_ROWS]
    src_runs = [results["source_sae"][i] for i in shown]
    ad_runs = [results["adapted_sae"][i] for i in shown]
    diffs, gain = difference_images([(a.images["steered"], a.images["baseline"]) for a in ad_runs])
    rows = [(a.id, [a.images["baseline"], s.images["steered"], a.images["steered"], dif])
            for s, a, dif in zip(src_runs, ad_runs, diffs)]
    grid = save_grid(rows, ["unsteered", "source SAE", "SafeDIG", f"|diff| x{gain:.0f}"], out / "grid.png",
                     image_scale(cfg.height, cfg.width))

    sums = {name: summarize(runs) for name, runs in results.items()}
    table = []
    for label in (cfg.source, cfg.target, "safe"):
        base = sums["source_sae"][label]
        row = {"label": label, "prompts": base["prompts"], "harm_unsteered": base["harm_out_baseline"]}
        for name in results:
            s = sums[name][label]
            row[name] = {"harm": s["harm_out_steered"], "gated_fraction": s["gated_fraction"],
                         "latents_moved": s["change_mean"], "latents_moved_max": s["change_max"],
                         "harm_in_steered": s["harm_in_steered"]}
        table.append(row)
    stages["total"] = time.perf_counter() - t_start
    ops = {name: site_operators(conf) for name, conf in configs.items()}
    ad_sites = {s.site: s for s in steer_ad.sites}
    summary = {
        "format": SUMMARY_FORMAT, "version": SUMMARY_VERSION, "model": cfg.model, "seed": cfg.seed,
        "world": {"trained_here": world_trained, "weights": world_note and str(cfg.world or out / "world" /
                                                                                 "world.safetensors")},
        "domains": {"source": [cfg.source], "target": [cfg.target]},
        "config": dataclasses.asdict(cfg), "candidate_sites": sites,
        # Per site a method steers (the routed ones first): each method's operator (None where
        # it does not steer the site), harmful set and gate (the source steerer's are absent where
        # it has no harmful feature), SafeDIG's strengths.
        "selected": [{"site": k, "routed": k in routed, "operator": ops["adapted"].get(k),
                      "operator_routed": selected.get(k), "operator_source": ops["source"].get(k),
                      "operator_finetuned": ops["finetune"].get(k), "harmful": evals[k].harmful,
                      "beta": ad_sites[k].beta if k in ad_sites else None,
                      "gamma": ad_sites[k].gamma if k in ad_sites else None,
                      "tau_source": site_tau[k], "tau_adapted": site_tau[k],
                      "harmful_source_only": src_harmful.get(k), "tau_source_only": src_tau.get(k),
                      "tau_finetuned": ft_tau[k], "harmful_finetuned": ft_harmful[k]}
                     for k in order if k in routed or any(k in o for o in ops.values())],
        "validation": {name: c.to_dict() for name, c in choices.items()},
        "adapt": adapt_metrics,
        "train_fvu": fvus, "table": table, "summaries": sums, "overhead": overhead, "seconds": stages,
        **({"detector": {"name": evaluation.detector, "description": evaluation.detector_description},
            "unsafe_rate": evaluation.unsafe_rate(),
            "unsafe": evaluation.unsafe,
            "safe_psnr_db": {"unsteered": None, **evaluation.safe_psnr_db()},  # None: the reference
            "safe_similarity": evaluation.safe_similarity,
            "methods": methods, "site_check": checked} if evaluation is not None else {}),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
                    "threads": torch.get_num_threads()},
        "files": {"grid": str(grid), "steer_config": str(out / "steer.json"),
                  "steer_config_adapted": str(out / "steer-adapted.json"),
                  "steer_source": str(out / "steer-source"), "steer_adapted": str(out / "steer-adapted"),
                  "eval_prompts": str(eval_file) if eval_file else None, "reports": str(out / "reports"),
                  "eval": str(out / "eval") if evaluation is not None else None,
                  "world": world_note and str(cfg.world or out / "world" / "world.safetensors")},
    }
    summary["files"]["summary"] = str(out / "summary.json")
    atomic_write_json(out / "summary.json", json_safe(summary))
    return summary


def shipped_world_matches(seed: int, steps: int) -> bool:
    """Whether the shipped world weights were trained with `seed` and `steps` (their metadata)."""
    from safetensors import safe_open

    if not SHIPPED_WEIGHTS.is_file():
        return False
    with safe_open(str(SHIPPED_WEIGHTS), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("safedig_world", "{}"))
    return meta.get("seed") == seed and meta.get("steps") == steps and meta.get("world") == WORLD_VERSION


def _world_pipeline(cfg: DemoConfig, out: Path, device: torch.device, dtype: torch.dtype,
                    log: Callable[[str], None]) -> tuple[Any, str]:
    """The world's pipeline: from `cfg.world`'s weights, or trained here (saved in `out/world/`)."""
    from .world import save_world, train_world, world_pipeline

    if cfg.world is not None:
        return load_pipeline(f"world:{cfg.world}", device=device, dtype=dtype), f"world weights from {cfg.world}; "
    t0 = time.perf_counter()
    log(f"[0/8] world: training the world's transformer, {cfg.world_steps} steps of rectified flow "
        f"(about 3.5 minutes for 1000 steps on a 2-core CPU with another demo beside it)")
    model = train_world(steps=cfg.world_steps, seed=cfg.seed)
    path = save_world(model, out / "world" / "world.safetensors", cfg.world_steps, cfg.seed)
    note = f"world trained in {time.perf_counter() - t0:.0f} s -> {path}; "
    return world_pipeline(model, device=device, dtype=dtype), note

