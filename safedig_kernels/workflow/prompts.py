"""Labelled prompt sets: the prompt file, its records and the label rules.

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

Labels are `safe` or `unsafe/<category>`; a label selector (`"unsafe"`, or a comma-separated
list) matches itself and its sub-labels.

Every error names the prompt file and line. The prompt file and each embeddings file must be
regular files (`_io.regular_file`: a FIFO would hang the read), and a line nested deeper than
`_io.MAX_JSON_DEPTH` is refused.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from safetensors import safe_open

from .._io import loads_json, regular_file

__all__ = ["PromptRecord", "load_prompts", "prompt_seed", "EMBEDDING_KEYS", "LabelSelector", "check_label",
           "parse_labels", "label_matches"]

EMBEDDING_KEYS = ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds")
_POOLED = ("pooled_prompt_embeds", "negative_pooled_prompt_embeds")
_LABEL_RE = re.compile(r"^(safe|unsafe)(/[A-Za-z0-9_.\-]+)?$")
_SEEDS = (-2 ** 63, 2 ** 64)  # what torch.Generator.manual_seed accepts

PathLike = Union[str, Path]
LabelSelector = Optional[Union[str, Sequence[str]]]


def check_label(label: Any, where: str) -> str:
    if not isinstance(label, str) or not _LABEL_RE.match(label):
        raise ValueError(f"{where}: label must be 'safe' or 'unsafe/<category>' (letters, digits, '_', '.', '-'), "
                         f"got {label!r}")
    return label


def parse_labels(labels: LabelSelector) -> Optional[list[str]]:
    if labels is None:
        return None
    if isinstance(labels, str):
        labels = [s for s in labels.split(",") if s.strip()]
    return [s.strip() for s in labels]


def label_matches(label: str, labels: LabelSelector) -> bool:
    """`labels` None matches all; a selector matches itself and its sub-labels
    (`"unsafe"` matches `"unsafe/nudity"`)."""
    sel = parse_labels(labels)
    if sel is None:
        return True
    return any(label == s or label.startswith(s + "/") for s in sel)


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
    path = regular_file(path, "prompt file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        lineno = e.object[:e.start].count(b"\n") + 1
        raise ValueError(f"prompt file {path}, line {lineno}: not UTF-8 text ({e.reason})") from None
    records: list[PromptRecord] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"prompt file {path}, line {lineno}"
        try:
            obj = loads_json(line)  # also refuses lines nested too deeply
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
        prefix = obj.get("embeddings_prefix")
        for key, value in (("embeddings", emb), ("prompt", prompt), ("embeddings_prefix", prefix)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
        seed = obj.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"{where}: 'seed' must be an int, got {seed!r}")
        if seed is not None and not _SEEDS[0] <= seed < _SEEDS[1]:
            raise ValueError(f"{where}: 'seed' must lie in [-2**63, 2**64) (torch's seed range), "
                             f"got an integer of {len(str(abs(seed)))} digits")
        rec = PromptRecord(id=pid, label=label, index=len(records), prompt=prompt, seed=seed,
                           embeddings_prefix=prefix or "")
        if emb is not None:
            rec.embeddings = regular_file(path.parent / emb, f"{where}: embeddings file").resolve()
            try:
                with safe_open(str(rec.embeddings), "pt") as f:
                    keys = set(f.keys())
            except Exception as e:  # safetensors raises its own error types for truncated/garbled files
                raise ValueError(f"{where}: embeddings file {rec.embeddings} is not a readable safetensors "
                                 f"file ({type(e).__name__}: {e})") from None
            if rec.embeddings_prefix + "prompt_embeds" not in keys:
                raise ValueError(f"{where}: {rec.embeddings} has no tensor "
                                 f"{rec.embeddings_prefix + 'prompt_embeds'!r}")
        records.append(rec)
    if not records:
        raise ValueError(f"prompt file {path} holds no prompts; expected one JSON object per line such as "
                         '{"id": "p0", "label": "safe", "embeddings": "embeds.safetensors"}')
    return records


def prompt_seed(p: PromptRecord, base_seed: int) -> int:
    """A prompt's noise seed: its own, else the run's base seed plus its line index."""
    return p.seed if p.seed is not None else base_seed + p.index
