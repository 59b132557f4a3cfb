"""Record transformer activations of a diffusers pipeline over a labelled prompt set.

Prompts come from a prompt file (`prompts.py`).

Each prompt runs through the pipeline once (`runner.run_prompt`, no VAE decode). Plain forward
hooks copy the chosen stream of each site's output (`sites.read_stream`, where diffusers' block
metadata says it is) at the chosen denoising
steps into an `ActivationWriter` (see `store.py` for the directory format). Steps are counted from the
`timestep` the transformer receives: a call with a new timestep starts a new step, a repeated one
is another call in the same step (FLUX true-CFG calls the transformer twice per step). `cfg`
names the CFG halves as a steering site's `cfg` does (integrations/diffusers/config.py):
`"cond"` keeps only the conditional branch, the first call of a step and the conditional half of
a guided batch (SD3 concatenates [negative, positive]; the rule of `requests.py`); `"both"`
keeps every row of every call.
"""
from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from .._io import dtype_from_name
from ..integrations.diffusers.config import CFG_MODES
from ..integrations.diffusers.families import family_of
from ..integrations.diffusers.requests import pipeline_guides, row_layout
from ..integrations.diffusers.runner import RunSettings, progress_bar_disabled, run_prompt
from ..integrations.diffusers.sites import (
    BlockLayout,
    SiteSpec,
    call_timestep,
    read_stream,
    resolve_site,
    split_target,
)
from .prompts import PromptRecord, load_prompts, prompt_seed
from .store import ActivationStore, ActivationWriter, PathLike

__all__ = ["CaptureConfig", "capture"]


@dataclass
class CaptureConfig:
    """What to record and how to run the pipeline.

    `steps`: denoising step indices to record (None: all). `dtype`: storage dtype name (None:
    the activations' own). `token_stride` keeps every n-th token, then `max_tokens` a seeded
    random subset of at most that many tokens per (prompt, site, step). `cfg`: `"cond"` (the
    conditional branch only) or `"both"` (every row and call). `shard_bytes` bounds the memory
    held before a shard is written; it may differ between a run and its resume.
    """

    sites: list[str]
    steps: Optional[list[int]] = None
    num_inference_steps: int = 4
    height: int = 64
    width: int = 64
    guidance_scale: float = 3.5
    dtype: Optional[str] = None
    max_tokens: Optional[int] = None
    token_stride: int = 1
    cfg: str = "cond"
    seed: int = 0
    shard_bytes: int = 256 << 20
    model: str = ""
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> list[SiteSpec]:
        if not self.sites:
            raise ValueError("sites must name at least one site, e.g. 'single_transformer_blocks.0'")
        sites = [SiteSpec.parse(s) for s in self.sites]
        dup = sorted({s.key for s in sites if sum(t.key == s.key for t in sites) > 1})
        if dup:
            raise ValueError(f"sites lists {dup} more than once")
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {self.num_inference_steps!r}")
        if self.steps is not None:
            bad = [s for s in self.steps if not isinstance(s, int) or not 0 <= s < self.num_inference_steps]
            if bad or not self.steps:
                raise ValueError(f"steps must be a non-empty list of step indices in [0, num_inference_steps) = "
                                 f"[0, {self.num_inference_steps}), got {self.steps}")
        if self.dtype is not None:
            dtype_from_name(self.dtype, "dtype")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive int or None, got {self.max_tokens!r}")
        if not isinstance(self.token_stride, int) or self.token_stride < 1:
            raise ValueError(f"token_stride must be a positive int, got {self.token_stride!r}")
        if self.cfg not in CFG_MODES:  # steering's words, with steering's meaning
            raise ValueError(f"cfg must be 'cond' (the conditional branch only) or 'both' (every row and call), "
                             f"got {self.cfg!r}")
        return sites

    def run_settings(self) -> RunSettings:
        return RunSettings(num_inference_steps=self.num_inference_steps, height=self.height, width=self.width,
                           guidance_scale=self.guidance_scale, pipeline_kwargs=dict(self.pipeline_kwargs))

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed capture must share (everything except `shard_bytes`)."""
        d = dataclasses.asdict(self)
        del d["shard_bytes"]
        d["sites"] = [SiteSpec.parse(s).key for s in self.sites]
        d["steps"] = None if self.steps is None else sorted(set(self.steps))
        return d


class _Recorder:
    """Hook state: which prompt and step the pipeline is at, and where to put activations."""

    def __init__(self, writer: ActivationWriter, config: CaptureConfig, pipe):
        self.writer = writer
        self.config = config
        self.pipe = pipe
        self.family = family_of(split_target(pipe)[0])
        self.steps = None if config.steps is None else set(config.steps)
        self.dtype = None if config.dtype is None else dtype_from_name(config.dtype)
        self.prompt: Optional[PromptRecord] = None
        self.step = -1
        self.call = 0
        self.guided: Optional[bool] = None
        self.last_t: Optional[float] = None
        self.steps_recorded: set[int] = set()

    def begin(self, prompt: PromptRecord) -> None:
        self.prompt, self.step, self.call, self.last_t = prompt, -1, 0, None
        self.steps_recorded = set()

    def transformer_pre_hook(self, module, args, kwargs) -> None:
        t = call_timestep(module, args, kwargs)
        value = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else None
        if value is None or value != self.last_t:
            self.step, self.call = self.step + 1, 0
        else:
            self.call += 1
        self.last_t = value
        family = self.family
        self.guided = (False if family.cfg == "separate" else pipeline_guides(self.pipe, kwargs)
                       if family.cfg.startswith("batched") and family.reads_guidance else None)

    def site_hook(self, site: SiteSpec, layout: BlockLayout):
        def hook(module, args, output) -> None:
            p = self.prompt
            if p is None or (self.steps is not None and self.step not in self.steps):
                return
            if self.config.cfg == "cond" and self.call != 0:
                return
            x = read_stream(output, layout, site.stream, site.key)
            if x.dim() != 3:
                raise ValueError(f"site {site.key}: expected a [B, T, d] activation, got shape {tuple(x.shape)}")
            if self.config.cfg == "cond":
                x = x[row_layout(x.shape[0], None, self.guided, site.key, self.family.cfg).cond]
                if x.shape[0] != 1:
                    raise ValueError(f"site {site.key}: one prompt per pipeline call should give one conditional "
                                     f"row, got {x.shape[0]}")
            x = x.reshape(-1, x.shape[-1])
            tokens_total = x.shape[0]
            x = x[:: self.config.token_stride]
            if self.config.max_tokens is not None and x.shape[0] > self.config.max_tokens:
                # Seeded by what the tokens are, not by run order, so a resumed run picks the same ones.
                key = f"{self.config.seed}/{p.id}/{site.key}/{self.step}/{self.call}"
                g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
                keep = torch.randperm(x.shape[0], generator=g)[: self.config.max_tokens].sort().values
                x = x[keep.to(x.device)]
            if self.dtype is not None:
                x = x.to(self.dtype)
            self.writer.add(x, site=site, step=self.step, prompt_id=p.id, label=p.label, timestep=self.last_t,
                            call=self.call, tokens_total=tokens_total)
            self.steps_recorded.add(self.step)

        return hook


def _site_modules(transformer: torch.nn.Module, sites: Sequence[SiteSpec]
                  ) -> dict[SiteSpec, tuple[torch.nn.Module, BlockLayout]]:
    """The block each site names and its output layout, checked as steering checks it
    (`sites.resolve_site`)."""
    modules = {}
    for s in sites:
        if s.is_text_encoder:
            raise ValueError(f"site {s.key!r}: capture records transformer blocks; "
                             "text-encoder outputs are not captured")
        r = resolve_site(s, transformer)
        modules[s] = (r.module, r.layout)
    return modules


def capture(pipe, prompts: Union[PathLike, Sequence[PromptRecord]], out_dir: PathLike, config: CaptureConfig,
            *, resume: bool = True, progress: bool = True) -> ActivationStore:
    """Run `pipe` over `prompts` and record `config.sites` into `out_dir`; returns the store.

    Prompts already completed in `out_dir` are skipped (`resume=True`). Nothing is started
    before the arguments check out; hooks are removed and finished prompts kept on any error.
    """
    from tqdm.auto import tqdm

    sites = config.validate()
    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise TypeError(f"pipe must be a diffusers pipeline with a .transformer module, got {type(pipe).__name__}")
    modules = _site_modules(transformer, sites)
    records = load_prompts(prompts) if isinstance(prompts, (str, Path)) else list(prompts)
    if not records:
        raise ValueError("prompts is empty; expected at least one PromptRecord")
    if len({r.id for r in records}) != len(records):
        raise ValueError("prompts have duplicate ids; every prompt needs its own id")
    no_text_encoder = all(getattr(pipe, n, None) is None for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))
    for r in records:
        if r.embeddings is None and no_text_encoder:
            raise ValueError(f"prompt {r.id!r} has text but no embeddings, and the pipeline has no text encoder")

    writer = ActivationWriter(out_dir, config.fingerprint(), shard_bytes=config.shard_bytes, resume=resume)
    done = writer.completed
    for r in records:
        if r.id in done and done[r.id] != r.label:
            raise ValueError(f"prompt {r.id!r} is labelled {r.label!r} in the prompt file but was captured as "
                             f"{done[r.id]!r} in {out_dir}; give it a new id (nothing was changed)")
    todo = [r for r in records if r.id not in done]

    rec = _Recorder(writer, config, pipe)
    settings = config.run_settings()
    handles = []
    with progress_bar_disabled(pipe):
        try:
            handles.append(transformer.register_forward_pre_hook(rec.transformer_pre_hook, with_kwargs=True))
            for s, (m, layout) in modules.items():
                handles.append(m.register_forward_hook(rec.site_hook(s, layout)))
            for p in tqdm(todo, desc=f"capture {len(sites)} site(s)", unit="prompt", disable=not progress):
                rec.begin(p)
                try:
                    run_prompt(pipe, settings, prompt_seed(p, config.seed), prompt=p.prompt,
                               embeddings=p.load_embeddings())
                    missing = (rec.steps or set()) - rec.steps_recorded
                    if missing or not rec.steps_recorded:
                        raise RuntimeError(f"prompt {p.id!r}: the pipeline never reached step(s) "
                                           f"{sorted(missing) or 'any'} "
                                           f"(it ran {rec.step + 1} step(s)); check steps and num_inference_steps")
                except BaseException:
                    writer.discard_prompt(p.id)
                    raise
                finally:
                    rec.prompt = None
                writer.finish_prompt(p.id, p.label)
            writer.close()
        except BaseException:
            # Keep every prompt that finished before the failure; its tensors may still be buffered.
            try:
                writer.flush()
            except Exception:
                pass
            raise
        finally:
            for h in handles:
                h.remove()
    return ActivationStore(out_dir)
