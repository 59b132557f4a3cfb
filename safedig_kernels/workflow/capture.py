"""Record transformer activations of a diffusers pipeline over a labelled prompt set.

Prompt file (JSON Lines, one object per line, blank lines ignored)::

    {"id": "p0", "label": "unsafe/nudity", "embeddings": "embeds.safetensors", "embeddings_prefix": "p0."}
    {"id": "p1", "label": "safe", "prompt": "a red bicycle", "seed": 7}

- `id` (unique string) and `label` (`safe` or `unsafe/<category>`) are required;
- `embeddings`: a safetensors file, relative to the prompt file's folder, holding
  `<prefix>prompt_embeds` `[T, D]` and, for FLUX/SD3, `<prefix>pooled_prompt_embeds` `[P]`
  (a leading batch dimension of 1 is accepted); `negative_prompt_embeds` and
  `negative_pooled_prompt_embeds` are passed on when present (SD3 with CFG needs them when the
  pipeline has no text encoders);
- `prompt`: text, used when there are no embeddings (the pipeline needs its text encoders);
- `seed`: the prompt's noise seed (default: the capture seed plus the line's index).

Each prompt runs through the pipeline once (`output_type="latent"`, no VAE decode). Plain
forward hooks copy the chosen stream of each site's output at the chosen denoising steps into an
`ActivationWriter` (see `store.py` for the directory format). Steps are counted from the
`timestep` the transformer receives: a call with a new timestep starts a new step, a repeated one
is another call in the same step (FLUX true-CFG calls the transformer twice per step). With
`cfg="cond"` only the conditional branch is kept: the first call of a step, and the second half
of a batch that holds two rows per prompt (SD3 concatenates [negative, positive]).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from safetensors import safe_open

from ._io import dtype_from_name
from .store import ActivationStore, ActivationWriter, PathLike, SiteSpec, check_label

EMBEDDING_KEYS = ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds")
_POOLED = ("pooled_prompt_embeds", "negative_pooled_prompt_embeds")


@dataclass
class PromptRecord:
    """One line of a prompt file. `embeddings` is resolved to an absolute path."""

    id: str
    label: str
    index: int
    prompt: Optional[str] = None
    embeddings: Optional[Path] = None
    embeddings_prefix: str = ""
    seed: Optional[int] = None

    def load_embeddings(self) -> dict[str, torch.Tensor]:
        """Pipeline keyword arguments with a batch dimension of 1 (`[1, T, D]`, `[1, P]`)."""
        if self.embeddings is None:
            return {}
        out = {}
        with safe_open(str(self.embeddings), "pt") as f:
            keys = set(f.keys())
            for name in EMBEDDING_KEYS:
                if self.embeddings_prefix + name in keys:
                    t = f.get_tensor(self.embeddings_prefix + name)
                    want = 1 if name in _POOLED else 2
                    out[name] = t.unsqueeze(0) if t.dim() == want else t
        return out


def load_prompts(path: PathLike) -> list[PromptRecord]:
    """Parse and check a prompt file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    records: list[PromptRecord] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"prompt file {path}, line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        unknown = set(obj) - {"id", "label", "prompt", "embeddings", "embeddings_prefix", "seed"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        pid = obj.get("id")
        if not isinstance(pid, str) or not pid:
            raise ValueError(f"{where}: 'id' must be a non-empty string, got {pid!r}")
        if pid in seen:
            raise ValueError(f"{where}: id {pid!r} is already used on line {seen[pid]}")
        seen[pid] = lineno
        label = check_label(obj.get("label"), where)
        emb = obj.get("embeddings")
        prompt = obj.get("prompt")
        if emb is None and not isinstance(prompt, str):
            raise ValueError(f"{where}: needs 'embeddings' (a safetensors file) or 'prompt' (text)")
        seed = obj.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"{where}: 'seed' must be an int, got {seed!r}")
        rec = PromptRecord(id=pid, label=label, index=len(records), prompt=prompt, seed=seed,
                           embeddings_prefix=str(obj.get("embeddings_prefix", "")))
        if emb is not None:
            rec.embeddings = (path.parent / str(emb)).resolve()
            if not rec.embeddings.is_file():
                raise FileNotFoundError(f"{where}: embeddings file {rec.embeddings} does not exist")
            with safe_open(str(rec.embeddings), "pt") as f:
                if rec.embeddings_prefix + "prompt_embeds" not in set(f.keys()):
                    raise ValueError(f"{where}: {rec.embeddings} has no tensor "
                                     f"{rec.embeddings_prefix + 'prompt_embeds'!r}")
        records.append(rec)
    if not records:
        raise ValueError(f"prompt file {path} holds no prompts; expected one JSON object per line such as "
                         '{"id": "p0", "label": "safe", "embeddings": "embeds.safetensors"}')
    return records


@dataclass
class CaptureConfig:
    """What to record and how to run the pipeline.

    `steps`: denoising step indices to record (None: all). `dtype`: storage dtype name (None:
    the activations' own). `token_stride` keeps every n-th token, then `max_tokens` a seeded
    random subset of at most that many tokens per (prompt, site, step). `shard_bytes` bounds the
    memory held before a shard is written; it may differ between a run and its resume.
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
        if self.cfg not in ("cond", "all"):
            raise ValueError(f"cfg must be 'cond' (conditional branch only) or 'all', got {self.cfg!r}")
        return sites

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed capture must share (everything except `shard_bytes`)."""
        d = dataclasses.asdict(self)
        del d["shard_bytes"]
        d["sites"] = [SiteSpec.parse(s).key for s in self.sites]
        d["steps"] = None if self.steps is None else sorted(set(self.steps))
        return d


def _block_ranges(transformer: torch.nn.Module) -> str:
    parts = []
    for name, child in transformer.named_children():
        if isinstance(child, torch.nn.ModuleList) and len(child):
            parts.append(f"{name}.0..{len(child) - 1}")
    return ", ".join(parts) or "no block lists"


def resolve_site(transformer: torch.nn.Module, site: SiteSpec) -> torch.nn.Module:
    try:
        return transformer.get_submodule(site.module)
    except AttributeError:
        raise ValueError(f"unknown site {site.key!r}: {type(transformer).__name__} has no submodule "
                         f"{site.module!r} (it has {_block_ranges(transformer)})") from None


def _stream(output: Any, site: SiteSpec) -> torch.Tensor:
    # Blocks return (encoder_hidden_states, hidden_states) in diffusers >= 0.35 (SPEC §4).
    if isinstance(output, torch.Tensor):
        if site.stream != "image":
            raise ValueError(f"site {site.key}: the module returns one tensor, so it has no text stream")
        return output
    if isinstance(output, (tuple, list)) and len(output) == 2:
        t = output[1] if site.stream == "image" else output[0]
        if isinstance(t, torch.Tensor):
            return t
        raise ValueError(f"site {site.key}: the {site.stream} stream of this block's output is "
                         f"{type(t).__name__} (SD3's last joint block has no text stream)")
    raise ValueError(f"site {site.key}: expected a tensor or an (encoder_hidden_states, hidden_states) pair, "
                     f"got {type(output).__name__}")


class _Recorder:
    """Hook state: which prompt and step the pipeline is at, and where to put activations."""

    def __init__(self, writer: ActivationWriter, config: CaptureConfig):
        self.writer = writer
        self.config = config
        self.steps = None if config.steps is None else set(config.steps)
        self.dtype = None if config.dtype is None else dtype_from_name(config.dtype)
        self.prompt: Optional[PromptRecord] = None
        self.step = -1
        self.call = 0
        self.last_t: Optional[float] = None
        self.steps_recorded: set[int] = set()

    def begin(self, prompt: PromptRecord) -> None:
        self.prompt, self.step, self.call, self.last_t = prompt, -1, 0, None
        self.steps_recorded = set()

    def transformer_pre_hook(self, module, args, kwargs) -> None:
        t = kwargs.get("timestep")
        value = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else None
        if value is None or value != self.last_t:
            self.step, self.call = self.step + 1, 0
        else:
            self.call += 1
        self.last_t = value

    def site_hook(self, site: SiteSpec):
        def hook(module, args, output) -> None:
            p = self.prompt
            if p is None or (self.steps is not None and self.step not in self.steps):
                return
            if self.config.cfg == "cond" and self.call != 0:
                return
            x = _stream(output, site)
            if x.dim() != 3:
                raise ValueError(f"site {site.key}: expected a [B, T, d] activation, got shape {tuple(x.shape)}")
            if self.config.cfg == "cond":
                if x.shape[0] == 2:
                    x = x[1:]
                elif x.shape[0] != 1:
                    raise ValueError(f"site {site.key}: one prompt per pipeline call should give a batch of 1 "
                                     f"(or 2 with CFG), got {x.shape[0]}")
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


def _pipeline_device(pipe) -> torch.device:
    dev = getattr(pipe, "_execution_device", None)
    return dev if isinstance(dev, torch.device) else next(pipe.transformer.parameters()).device


def _run_prompt(pipe, p: PromptRecord, config: CaptureConfig) -> None:
    device = _pipeline_device(pipe)
    dtype = next(pipe.transformer.parameters()).dtype
    kwargs: dict[str, Any] = dict(num_inference_steps=config.num_inference_steps, height=config.height,
                                  width=config.width, guidance_scale=config.guidance_scale, output_type="latent")
    kwargs.update(config.pipeline_kwargs)
    seed = p.seed if p.seed is not None else config.seed + p.index
    # A CPU generator gives the same noise on every device, so captures are reproducible.
    kwargs["generator"] = torch.Generator().manual_seed(seed)
    emb = p.load_embeddings()
    if emb:
        kwargs.update({k: v.to(device, dtype) for k, v in emb.items()})
    else:
        kwargs["prompt"] = p.prompt
    pipe(**kwargs)



@contextlib.contextmanager
def progress_bar_disabled(pipe) -> Iterator[None]:
    """Silence a diffusers pipeline's own per-step progress bar, restoring its setting after."""
    old = getattr(pipe, "_progress_bar_config", None)
    try:
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        yield
    finally:
        if old is not None:
            pipe._progress_bar_config = old
        elif hasattr(pipe, "_progress_bar_config"):
            del pipe._progress_bar_config

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
    modules = {s: resolve_site(transformer, s) for s in sites}
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

    rec = _Recorder(writer, config)
    handles = []
    with progress_bar_disabled(pipe):
        try:
            handles.append(transformer.register_forward_pre_hook(rec.transformer_pre_hook, with_kwargs=True))
            for s, m in modules.items():
                handles.append(m.register_forward_hook(rec.site_hook(s)))
            for p in tqdm(todo, desc=f"capture {len(sites)} site(s)", unit="prompt", disable=not progress):
                rec.begin(p)
                try:
                    with torch.inference_mode():
                        _run_prompt(pipe, p, config)
                    missing = (rec.steps or set()) - rec.steps_recorded
                    if missing or not rec.steps_recorded:
                        raise RuntimeError(f"prompt {p.id!r}: the pipeline never reached step(s) {sorted(missing) or 'any'} "
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


def load_pipeline(model: str, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32):
    """`"tiny-flux"` (seeded random tiny FLUX, see `synthetic.py`) or a diffusers pipeline
    directory / model id. Components a saved directory lists as null (e.g. text encoders
    left out for embedding-only prompts) are passed as None."""
    if model == "tiny-flux":
        from .synthetic import tiny_flux_pipeline

        return tiny_flux_pipeline(dtype=dtype).to(device)
    from diffusers import DiffusionPipeline
    from diffusers.pipelines import pipeline_utils

    # diffusers 0.42 renamed torch_dtype to dtype (the old name warns); older releases ignore `dtype`.
    kwargs: dict[str, Any] = {"dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype": dtype}
    index = Path(model) / "model_index.json"
    if index.is_file():
        spec = json.loads(index.read_text())
        kwargs.update({k: None for k, v in spec.items() if isinstance(v, list) and v == [None, None]})
    elif Path(model).exists():
        raise ValueError(f"--model {model}: a local pipeline directory must contain model_index.json")
    return DiffusionPipeline.from_pretrained(model, **kwargs).to(device)
