"""On-disk activation store: sharded safetensors files plus a JSON manifest.

Layout of a capture directory::

    manifest.json                 the index (below), rewritten atomically after every shard
    shard-000000.safetensors      tensors "e0", "e1", ... each [tokens, d]; its header metadata
    shard-000001.safetensors      ("safedig_activations", a JSON string) repeats its entries

`manifest.json`::

    {"format": "safedig-activations", "version": 1,
     "config": {...},                       # capture settings; a resume must match them
     "completed": {"<prompt id>": {"label": "unsafe/nudity", "run": "<run id>"}},
     "shards": [{"file": "shard-000000.safetensors", "run": "<run id>", "nbytes": 123,
                 "entries": [{"key": "e0", "site": "single_transformer_blocks.3", "stream": "image",
                              "step": 0, "timestep": 1000.0, "call": 0, "prompt_id": "p0",
                              "label": "safe", "shape": [64, 3072], "dtype": "bfloat16",
                              "tokens_total": 4096, "crc32": 2882339208}]}]}

`crc32` is `zlib.crc32` of the tensor's bytes as the shard stores them (row-major, little-endian,
in `dtype`), an unsigned 32-bit int. The writer records it in the entry, in the shard header and
in the manifest alike, and every read of the tensor (`iter_entries`, `iter_prompts`, `load`, ...)
recomputes it and raises `ShardError` naming the shard, tensor key, prompt and site when the
bytes differ: a damaged shard never loads as silently wrong (e.g. non-finite) activations. Entries
of stores written before checksums existed have no `crc32` key; they stay readable, unverified.
Opening a store also checks that the manifest and the shard header record the same checksum
(an entry whose shard header has one and whose manifest record has none is refused).

A prompt counts once all its entries are on disk: its id goes into `completed` together with
the id of the run (one writer session) that captured it, in the same atomic step as its last
shard. Entries of a prompt that a run began but did not finish stay in their shard but are
ignored (their run differs from the completed one), so resuming never duplicates data. Each
shard's header repeats its entries and the completions it committed, so `rebuild_manifest`
recovers a lost or corrupt manifest from the shards alone.

Reading for training at scale: `ActivationStore.stream` selects the same tokens as `load` (the
same per-entry subsample under `max_tokens`) but returns an `ActivationStream` that reads one
tensor at a time (`safe_open(...).get_tensor`, checksum verified), never the whole site. Given
`rank` and `num_ranks` it holds only that process's share of the entries (`partition_entries`:
disjoint, together all of them), so under torchrun each process reads only its own tokens.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import uuid
import warnings
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch
from safetensors import safe_open

from .._io import (
    DTYPES,
    atomic_save_safetensors,
    atomic_write_json,
    dtype_name,
    loads_json,
    read_json,
    safetensors_dtype_name,
)
from ..integrations.diffusers.sites import SiteSpec
from .prompts import LabelSelector, label_matches, parse_labels

FORMAT = "safedig-activations"
VERSION = 1
MANIFEST = "manifest.json"
SHARD_META_KEY = "safedig_activations"
SHARD_GLOB = "shard-*.safetensors"
_SHARD_RE = re.compile(r"^shard-(\d{6,})\.safetensors$")

PathLike = Union[str, Path]

logger = logging.getLogger(__name__)


class ManifestError(ValueError):
    """The manifest of a capture directory is missing, unreadable or inconsistent."""


class ShardError(ValueError):
    """A shard file does not match what the manifest says about it."""


@dataclass(frozen=True)
class Entry:
    """One recorded tensor: activations `[tokens, d]` of one prompt at one site and step."""

    shard: str
    key: str
    site: str
    stream: str
    step: int
    timestep: Optional[float]
    call: int
    prompt_id: str
    label: str
    shape: tuple[int, ...]
    dtype: str
    tokens_total: int
    crc32: Optional[int] = None  # zlib.crc32 of the stored bytes; None in stores written before checksums

    @property
    def site_key(self) -> str:
        return f"{self.site}:{self.stream}"

    def record(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        del d["shard"]
        d["shape"] = list(self.shape)
        if self.crc32 is None:  # an entry of an older store keeps the record it had
            del d["crc32"]
        return d


_ENTRY_FIELDS = {f.name for f in dataclasses.fields(Entry)} - {"shard"}
_ENTRY_FIELDS_V0 = _ENTRY_FIELDS - {"crc32"}  # stores written before checksums


def _entry_from_record(rec: Any, shard: str, where: str) -> Entry:
    if not isinstance(rec, dict) or set(rec) not in (_ENTRY_FIELDS, _ENTRY_FIELDS_V0):
        got = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
        raise ManifestError(f"{where}: an entry of {shard} must have the keys {sorted(_ENTRY_FIELDS)} "
                            f"('crc32' may be absent in stores written before checksums), got {got}")
    crc = rec.get("crc32")
    if crc is not None and (isinstance(crc, bool) or not isinstance(crc, int) or not 0 <= crc < 1 << 32):
        raise ManifestError(f"{where}: entry {rec.get('key')!r} of {shard}: 'crc32' must be an unsigned 32-bit "
                            f"int, got {crc!r}")
    try:
        return Entry(shard=shard, key=str(rec["key"]), site=str(rec["site"]), stream=str(rec["stream"]),
                     step=int(rec["step"]), timestep=None if rec["timestep"] is None else float(rec["timestep"]),
                     call=int(rec["call"]), prompt_id=str(rec["prompt_id"]), label=str(rec["label"]),
                     shape=tuple(int(s) for s in rec["shape"]), dtype=str(rec["dtype"]),
                     tokens_total=int(rec["tokens_total"]), crc32=crc)
    except (TypeError, ValueError) as e:
        raise ManifestError(f"{where}: malformed entry {rec!r} of {shard}: {e}") from None


def tensor_crc32(t: torch.Tensor) -> int:
    """`zlib.crc32` of a CPU tensor's bytes as safetensors stores them (row-major, native byte
    order, which is little-endian on every platform torch ships for)."""
    return zlib.crc32(t.detach().contiguous().view(-1).view(torch.uint8).numpy())


def _verified(path: Path, e: Entry, t: torch.Tensor) -> torch.Tensor:
    """`t`, read from `path` for entry `e`, after checking it against the entry's checksum."""
    if e.crc32 is not None:
        got = tensor_crc32(t)
        if got != e.crc32:
            raise ShardError(f"shard {path}, tensor {e.key!r} (prompt {e.prompt_id!r}, site {e.site_key}, step "
                             f"{e.step}): checksum mismatch, recorded crc32 {e.crc32:#010x}, the data read has "
                             f"{got:#010x}; the shard's bytes changed after capture wrote them (disk or copy "
                             f"damage); re-capture into a new directory or restore the shard from a copy")
    return t


def _shard_header(path: Path) -> dict[str, Any]:
    """The JSON a shard carries in its safetensors metadata, plus its tensors' shapes/dtypes."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise ShardError(f"shard {path} is not a readable safetensors file ({e})") from None
    if SHARD_META_KEY not in meta:
        raise ShardError(f"shard {path} has no '{SHARD_META_KEY}' metadata: not written by safedig capture")
    try:
        header = loads_json(meta[SHARD_META_KEY])
    except json.JSONDecodeError as e:
        raise ShardError(f"shard {path}: its '{SHARD_META_KEY}' metadata is not valid JSON ({e.msg})") from None
    header["_tensors"] = tensors
    header["config"] = _config_as_read(header.get("config"))
    return header


def _check_entries_in_shard(path: Path, entries: Sequence[Entry], tensors: dict[str, tuple],
                            header_entries: Optional[Sequence[Any]] = None) -> None:
    header_crc = {}
    for r in header_entries or ():
        if isinstance(r, dict) and r.get("crc32") is not None:
            header_crc[r.get("key")] = r["crc32"]
    for e in entries:
        if e.key not in tensors:
            raise ShardError(f"shard {path} lacks tensor {e.key!r} that the manifest lists "
                             f"(prompt {e.prompt_id!r}, site {e.site_key}, step {e.step})")
        shape, st_dtype = tensors[e.key]
        if shape != e.shape or safetensors_dtype_name(st_dtype) != e.dtype:
            raise ShardError(f"shard {path}, tensor {e.key!r}: "
                             f"the manifest says shape {list(e.shape)} dtype {e.dtype}, "
                             f"the file holds shape {list(shape)} dtype {safetensors_dtype_name(st_dtype)}")
        if e.crc32 is None and e.key in header_crc:  # verification must not be turned off by an edit
            raise ShardError(f"shard {path}, tensor {e.key!r} (prompt {e.prompt_id!r}, site {e.site_key}, step "
                             f"{e.step}): the shard header records a crc32 but the manifest entry has none: "
                             f"the manifest was edited")
        if e.crc32 is not None and e.key in header_crc and header_crc[e.key] != e.crc32:
            h = header_crc[e.key]
            h = f"{h:#010x}" if isinstance(h, int) else repr(h)
            raise ShardError(f"shard {path}, tensor {e.key!r} (prompt {e.prompt_id!r}, site {e.site_key}, step "
                             f"{e.step}): the manifest records crc32 {e.crc32:#010x}, the shard header {h}: "
                             f"the file was replaced or the manifest edited")


def _shard_index(name: str) -> int:
    m = _SHARD_RE.match(name)
    return int(m.group(1)) if m else -1


# Captures made before capture named its CFG halves as steering does (workflow/capture.py) record
# cfg "all" for what is now "both": every row of every call. A store on disk is data, so it reads
# as today's word, and a resume with cfg="both" continues it.
_CFG_WORDS_OF_OLD_STORES = {"all": "both"}


def _config_as_read(config: Any) -> Any:
    """A capture config read from a manifest or shard header, in today's words."""
    if isinstance(config, dict) and config.get("cfg") in _CFG_WORDS_OF_OLD_STORES:
        return {**config, "cfg": _CFG_WORDS_OF_OLD_STORES[config["cfg"]]}
    return config


def _new_manifest(config: dict[str, Any]) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "config": config, "completed": {}, "shards": []}


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        m = read_json(path, "activation manifest")
    except ValueError as e:
        raise ManifestError(f"{e}. The shards next to it are untouched; rebuild it from them with "
                            f"safedig_kernels.workflow.store.rebuild_manifest({str(directory)!r}) "
                            f"or `safedig capture --rebuild-manifest --out {directory}`") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ManifestError(f"activation manifest {path}: expected a JSON object with \"format\": \"{FORMAT}\", "
                            f"got {str(m)[:80]!r}")
    if m.get("version") != VERSION:
        raise ManifestError(f"activation manifest {path}: version {m.get('version')!r} is not supported "
                            f"(this reader knows version {VERSION})")
    for key, typ in (("config", dict), ("completed", dict), ("shards", list)):
        if not isinstance(m.get(key), typ):
            raise ManifestError(f"activation manifest {path}: '{key}' must be a JSON {typ.__name__}, "
                                f"got {type(m.get(key)).__name__}")
    m["config"] = _config_as_read(m["config"])
    for i, s in enumerate(m["shards"]):
        if not isinstance(s, dict) or not {"file", "run", "entries"} <= set(s) or not isinstance(s["entries"], list):
            raise ManifestError(f"activation manifest {path}: shards[{i}] must have 'file', 'run' and a list "
                                f"'entries', got {str(s)[:120]!r}")
    for pid, c in m["completed"].items():
        if not isinstance(c, dict) or not {"label", "run"} <= set(c):
            raise ManifestError(f"activation manifest {path}: completed[{pid!r}] must be "
                                f"{{\"label\": ..., \"run\": ...}}, got {c!r}")
    return m


def _config_diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    keys = sorted(set(a) | set(b))
    return "; ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k))


class ActivationWriter:
    """Appends entries to a capture directory in shards of about `shard_bytes`.

    Use `add` for each recorded tensor, `finish_prompt` when every tensor of a prompt has been
    added, and `close` (or `flush`) at the end. With `resume=True` an existing directory with the
    same `config` is continued: its completed prompts are in `completed` and shards written but
    not yet indexed by an interrupted run are adopted.
    """

    def __init__(self, directory: PathLike, config: dict[str, Any], *, shard_bytes: int = 256 << 20,
                 resume: bool = True):
        if not isinstance(shard_bytes, int) or shard_bytes < 1:
            raise ValueError(f"shard_bytes must be a positive int, got {shard_bytes!r}")
        self.dir = Path(directory)
        self.config = json.loads(json.dumps(config))  # normalised as it will read back from JSON
        self.shard_bytes = shard_bytes
        self.run = uuid.uuid4().hex[:12]
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest_path = self.dir / MANIFEST
        on_disk = sorted(p.name for p in self.dir.glob(SHARD_GLOB) if _SHARD_RE.match(p.name))
        if manifest_path.exists():
            if not resume:
                raise FileExistsError(f"{self.dir} already holds a capture ({MANIFEST}); resume it or choose "
                                      f"an empty output directory (nothing was changed)")
            self.manifest = _read_manifest(self.dir)
            if self.manifest["config"] != self.config:
                raise ValueError(f"{self.dir} holds a capture made with other settings "
                                 f"({_config_diff(self.manifest['config'], self.config)}); use the same settings "
                                 f"to resume it, or another output directory (nothing was changed)")
            self._adopt_orphans(on_disk)
        elif on_disk:
            raise ManifestError(f"{self.dir} has {len(on_disk)} shard files but no {MANIFEST}; recover it with "
                                f"rebuild_manifest({str(self.dir)!r}) or `safedig capture --rebuild-manifest "
                                f"--out {self.dir}`, or choose an empty directory (nothing was changed)")
        else:
            self.manifest = _new_manifest(self.config)
            atomic_write_json(manifest_path, self.manifest)
        known = [_shard_index(s["file"]) for s in self.manifest["shards"]] + [_shard_index(n) for n in on_disk]
        self._next_index = max(known, default=-1) + 1
        self._buffer: list[tuple[dict[str, Any], torch.Tensor]] = []
        self._buffer_bytes = 0
        self._pending_done: dict[str, str] = {}

    @property
    def completed(self) -> dict[str, str]:
        """Prompt id -> label of every prompt whose activations are all on disk."""
        return {pid: c["label"] for pid, c in self.manifest["completed"].items()}

    def _adopt_orphans(self, on_disk: Sequence[str]) -> None:
        # A crash between renaming a shard into place and rewriting the manifest leaves a
        # complete shard the manifest does not list; its header says everything needed to adopt it.
        listed = {s["file"] for s in self.manifest["shards"]}
        adopted = []
        for name in on_disk:
            if name in listed:
                continue
            header = _shard_header(self.dir / name)
            if header.get("config") != self.config:
                raise ShardError(f"shard {self.dir / name} is not indexed by {MANIFEST} and was written with other "
                                 f"settings ({_config_diff(header.get('config') or {}, self.config)}); move it "
                                 f"away to resume (nothing was changed)")
            self._append_shard_record(name, header)
            adopted.append(name)
        if adopted:
            warnings.warn(f"{self.dir}: adopted {len(adopted)} shard(s) an interrupted run wrote but did not index: "
                          f"{adopted}")
            atomic_write_json(self.dir / MANIFEST, self.manifest)

    def _append_shard_record(self, name: str, header: dict[str, Any]) -> None:
        entries = [_entry_from_record(r, name, str(self.dir / name)) for r in header.get("entries", [])]
        _check_entries_in_shard(self.dir / name, entries, header["_tensors"])
        self.manifest["shards"].append({"file": name, "run": header["run"],
                                        "nbytes": (self.dir / name).stat().st_size,
                                        "entries": [e.record() for e in entries]})
        for pid, label in header.get("completed", {}).items():
            self.manifest["completed"][pid] = {"label": label, "run": header["run"]}

    def add(self, tensor: torch.Tensor, *, site: SiteSpec, step: int, prompt_id: str, label: str,
            timestep: Optional[float] = None, call: int = 0, tokens_total: Optional[int] = None) -> None:
        """Buffer activations `[tokens, d]`; writes a shard once the buffer reaches `shard_bytes`."""
        if tensor.dim() != 2:
            raise ValueError(f"activations must be [tokens, d], got shape {tuple(tensor.shape)}")
        t = tensor.detach().to("cpu", copy=True).contiguous()
        rec = {"key": "", "site": site.module, "stream": site.stream, "step": int(step),
               "timestep": None if timestep is None else float(timestep), "call": int(call),
               "prompt_id": prompt_id, "label": label, "shape": list(t.shape), "dtype": dtype_name(t.dtype),
               "tokens_total": int(tokens_total if tokens_total is not None else t.shape[0]),
               "crc32": tensor_crc32(t)}
        self._buffer.append((rec, t))
        self._buffer_bytes += t.numel() * t.element_size()
        if self._buffer_bytes >= self.shard_bytes:
            self.flush()

    def finish_prompt(self, prompt_id: str, label: str) -> None:
        """Mark `prompt_id` complete; it becomes durable with the next shard written."""
        self._pending_done[prompt_id] = label

    def discard_prompt(self, prompt_id: str) -> None:
        """Drop buffered (not yet written) tensors of an unfinished prompt."""
        kept = [(r, t) for r, t in self._buffer if r["prompt_id"] != prompt_id]
        self._buffer = kept
        self._buffer_bytes = sum(t.numel() * t.element_size() for _, t in kept)

    def flush(self) -> None:
        """Write buffered tensors and pending completions as one shard, then the manifest."""
        if not self._buffer and not self._pending_done:
            return
        name = f"shard-{self._next_index:06d}.safetensors"
        tensors, records = {}, []
        for i, (rec, t) in enumerate(self._buffer):
            rec = dict(rec, key=f"e{i}")
            tensors[rec["key"]] = t
            records.append(rec)
        header = {"format": FORMAT, "version": VERSION, "run": self.run, "config": self.config,
                  "entries": records, "completed": dict(self._pending_done)}
        atomic_save_safetensors(self.dir / name, tensors, {SHARD_META_KEY: json.dumps(header)})
        self._next_index += 1
        self.manifest["shards"].append({"file": name, "run": self.run,
                                        "nbytes": (self.dir / name).stat().st_size, "entries": records})
        for pid, label in self._pending_done.items():
            self.manifest["completed"][pid] = {"label": label, "run": self.run}
        atomic_write_json(self.dir / MANIFEST, self.manifest)
        self._buffer, self._buffer_bytes, self._pending_done = [], 0, {}

    def close(self) -> None:
        self.flush()


def rebuild_manifest(directory: PathLike) -> Path:
    """Recreate `manifest.json` of a capture directory from its shards' headers.

    A manifest already there is kept as `manifest.json.corrupt` (never deleted). Returns the
    manifest's path.
    """
    d = Path(directory)
    names = sorted((p.name for p in d.glob(SHARD_GLOB) if _SHARD_RE.match(p.name)), key=_shard_index)
    if not names:
        raise ValueError(f"{d} holds no shard files ({SHARD_GLOB}); nothing to rebuild a manifest from")
    headers = [(n, _shard_header(d / n)) for n in names]
    config = headers[0][1].get("config")
    for n, h in headers[1:]:
        if h.get("config") != config:
            raise ShardError(f"shards {names[0]} and {n} in {d} were written with different settings "
                             f"({_config_diff(config or {}, h.get('config') or {})}); move the foreign ones away")
    writer = ActivationWriter.__new__(ActivationWriter)
    writer.dir, writer.manifest = d, _new_manifest(config)
    for n, h in headers:
        writer._append_shard_record(n, h)
    path = d / MANIFEST
    if path.exists():
        path.replace(d / (MANIFEST + ".corrupt"))
    atomic_write_json(path, writer.manifest)
    return path


class ActivationStore:
    """Read-only view of a capture directory, checked against its shards when opened.

    Only entries of completed prompts are visible; a `site` argument is a `SiteSpec` or its
    string form (`"transformer_blocks.1:text"`); `labels` selects by label prefix.
    """

    def __init__(self, directory: PathLike, validate: bool = True):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"activation directory {self.dir} does not exist")
        m = _read_manifest(self.dir)
        self.config: dict[str, Any] = m["config"]
        self.prompts: dict[str, str] = {pid: c["label"] for pid, c in m["completed"].items()}
        done_run = {pid: c["run"] for pid, c in m["completed"].items()}
        entries: list[Entry] = []
        for s in m["shards"]:
            shard_entries = [_entry_from_record(r, s["file"], str(self.dir / MANIFEST)) for r in s["entries"]]
            visible = [e for e in shard_entries if done_run.get(e.prompt_id) == s["run"]]
            if validate and visible:
                path = self.dir / s["file"]
                if not path.exists():
                    raise ShardError(f"shard {path} listed in {self.dir / MANIFEST} is missing")
                header = _shard_header(path)
                if header.get("run") != s["run"]:
                    raise ShardError(f"shard {path} was written by run {header.get('run')!r}, the manifest "
                                     f"says run {s['run']!r}: the file was replaced")
                _check_entries_in_shard(path, visible, header["_tensors"], header.get("entries"))
            entries.extend(visible)
        seen: dict[tuple, Entry] = {}
        widths: dict[str, int] = {}
        for e in entries:
            ident = (e.prompt_id, e.site_key, e.step, e.call)
            if ident in seen:
                raise ShardError(f"{self.dir}: prompt {e.prompt_id!r} site {e.site_key} step {e.step} is recorded "
                                 f"twice ({seen[ident].shard} and {e.shard})")
            seen[ident] = e
            if len(e.shape) != 2:
                raise ShardError(f"shard {self.dir / e.shard}, tensor {e.key!r}: expected [tokens, d], "
                                 f"got shape {list(e.shape)}")
            if widths.setdefault(e.site_key, e.shape[1]) != e.shape[1]:
                raise ShardError(f"{self.dir}: site {e.site_key} has entries of width {widths[e.site_key]} and "
                                 f"{e.shape[1]} (shard {e.shard}, tensor {e.key!r})")
        self._entries = entries
        self._widths = widths

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.dir)!r}, prompts={len(self.prompts)}, sites={self.sites}, "
                f"entries={len(self._entries)})")

    @property
    def sites(self) -> list[str]:
        return sorted(self._widths)

    @property
    def labels(self) -> list[str]:
        return sorted(set(self.prompts.values()))

    def width(self, site: Union[str, SiteSpec]) -> int:
        return self._widths[self._site_key(site)]

    def _site_key(self, site: Union[str, SiteSpec]) -> str:
        key = SiteSpec.parse(site).key
        if key not in self._widths:
            raise ValueError(f"site {key!r} is not in {self.dir}; recorded sites: {self.sites}")
        return key

    def entries(self, site: Union[str, SiteSpec, None] = None, labels: LabelSelector = None,
                steps: Optional[Iterable[int]] = None) -> list[Entry]:
        key = None if site is None else self._site_key(site)
        steps = None if steps is None else set(steps)
        return [e for e in self._entries if (key is None or e.site_key == key) and label_matches(e.label, labels)
                and (steps is None or e.step in steps)]

    def iter_entries(self, site: Union[str, SiteSpec, None] = None, labels: LabelSelector = None,
                     steps: Optional[Iterable[int]] = None,
                     dtype: Optional[torch.dtype] = None) -> Iterator[tuple[Entry, torch.Tensor]]:
        """(entry, activations `[tokens, d]`) in shard order, one shard open at a time; each tensor
        is checked against its checksum (`ShardError` when the shard's bytes changed)."""
        by_shard: dict[str, list[Entry]] = defaultdict(list)
        for e in self.entries(site, labels, steps):
            by_shard[e.shard].append(e)
        for shard, es in by_shard.items():
            path = self.dir / shard
            with safe_open(str(path), "pt") as f:
                for e in es:
                    t = _verified(path, e, f.get_tensor(e.key))
                    yield e, (t if dtype is None else t.to(dtype))

    def iter_prompts(self, site: Union[str, SiteSpec], labels: LabelSelector = None,
                     steps: Optional[Iterable[int]] = None,
                     dtype: Optional[torch.dtype] = torch.float32) -> Iterator[tuple[str, str, torch.Tensor]]:
        """(prompt id, label, activations `[tokens over the chosen steps, d]`) per prompt."""
        by_prompt: dict[str, list[Entry]] = defaultdict(list)
        for e in self.entries(site, labels, steps):
            by_prompt[e.prompt_id].append(e)
        for pid, es in by_prompt.items():
            # One open per shard and prompt: opening a shard parses its whole header, which lists
            # every tensor of the capture (thousands), so opening it per entry dominated the time.
            read: dict[int, torch.Tensor] = {}
            for shard in dict.fromkeys(e.shard for e in es):
                path = self.dir / shard
                with safe_open(str(path), "pt") as f:
                    for e in es:
                        if e.shard == shard:
                            read[id(e)] = _verified(path, e, f.get_tensor(e.key))
            parts = [read[id(e)] for e in sorted(es, key=lambda e: (e.step, e.call))]
            yield pid, es[0].label, torch.cat([t if dtype is None else t.to(dtype) for t in parts])

    def prompt_activations(self, site: Union[str, SiteSpec], labels: LabelSelector = None,
                           steps: Optional[Iterable[int]] = None) -> Iterator[torch.Tensor]:
        """Activations `[tokens, d]` (fp32) of each matching prompt, one prompt at a time."""
        return (x for _, _, x in self.iter_prompts(site, labels, steps))

    def _select(self, site: Union[str, SiteSpec], labels: LabelSelector, steps: Optional[Iterable[int]],
                max_tokens: Optional[int]) -> tuple[str, list[Entry], Optional[list[int]]]:
        """(site key, matching entries in store order, rows kept per entry or None for all rows)."""
        key = self._site_key(site)
        steps = None if steps is None else list(steps)
        es = self.entries(key, labels, steps)
        if not es:
            raise ValueError(f"{self.dir}: no activations for site {key} with labels {parse_labels(labels)} and "
                             f"steps {None if steps is None else sorted(steps)}; labels present: {self.labels}")
        sizes = torch.tensor([e.shape[0] for e in es], dtype=torch.float64)
        total = int(sizes.sum())
        if max_tokens is None or max_tokens >= total:
            return key, es, None
        # Largest-remainder rounding: proportional shares that add up to max_tokens exactly.
        exact = sizes * (max_tokens / total)
        quota = exact.floor().long()
        short = max_tokens - int(quota.sum())
        quota[torch.sort(-(exact - quota), stable=True).indices[:short]] += 1
        return key, es, [int(q) for q in quota]

    def load(self, site: Union[str, SiteSpec], labels: LabelSelector = None, steps: Optional[Iterable[int]] = None,
             max_tokens: Optional[int] = None, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
        """All matching activations as one tensor `[N, d]`.

        `max_tokens` keeps a seeded random subset of exactly `min(max_tokens, N)` tokens, drawn
        from every entry in proportion to its size so no prompt is favoured.
        """
        steps = None if steps is None else list(steps)
        key, es, quota = self._select(site, labels, steps, max_tokens)
        keep = None if quota is None else {(e.shard, e.key): q for e, q in zip(es, quota)}
        parts = []
        for e, t in self.iter_entries(key, labels, steps, dtype=dtype):
            if keep is not None:
                t = _subsample(e, t, keep[(e.shard, e.key)], seed)
            parts.append(t)
        return torch.cat(parts)

    def stream(self, site: Union[str, SiteSpec], labels: LabelSelector = None, steps: Optional[Iterable[int]] = None,
               max_tokens: Optional[int] = None, seed: int = 0, rank: int = 0,
               num_ranks: int = 1) -> "ActivationStream":
        """The tokens `load` would return (same selection, same subsample under `max_tokens` and
        `seed`), as a stream that reads one tensor at a time; it holds process `rank`'s share of
        the entries out of `num_ranks` (`partition_entries`). Reads nothing until iterated."""
        for name, v in (("rank", rank), ("num_ranks", num_ranks), ("seed", seed)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{name} must be an int, got {v!r}")
        if num_ranks < 1 or not 0 <= rank < num_ranks:
            raise ValueError(f"rank must be in [0, num_ranks) with num_ranks >= 1, got rank {rank} and "
                             f"num_ranks {num_ranks}")
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                       or max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
        key, es, quota = self._select(site, labels, steps, max_tokens)
        rows = [e.shape[0] for e in es] if quota is None else quota
        stream = ActivationStream(self.dir, key, self._widths[key], es, rows, None if quota is None else seed,
                                  rank, num_ranks)
        logger.debug("%r", stream)
        return stream


def _subsample(e: Entry, t: torch.Tensor, keep: int, seed: int) -> torch.Tensor:
    """The `keep` rows of entry `e` that `load(max_tokens=...)` keeps, in their stored order."""
    g = torch.Generator().manual_seed(seed ^ zlib.crc32(f"{e.shard}/{e.key}".encode()))
    return t[torch.randperm(t.shape[0], generator=g)[:keep].sort().values]


def _identity(e: Entry) -> tuple[str, str, int, int]:
    return (e.prompt_id, e.site_key, e.step, e.call)  # unique within a store (checked when it is opened)


def partition_entries(entries: Sequence[Entry], rank: int, num_ranks: int) -> list[Entry]:
    """Process `rank`'s share of `entries` out of `num_ranks`, in the order given.

    Entries are ordered by a hash of their identity (prompt, site, step, call) and dealt out in
    turn, so the shares are disjoint, together hold every entry, differ in count by at most one,
    and do not follow the capture order (dealing in store order would hand all of one step, or
    of one label, to one process). The share depends only on the entries, not on shard files.
    """
    if num_ranks < 1 or not 0 <= rank < num_ranks:
        raise ValueError(f"rank must be in [0, num_ranks) with num_ranks >= 1, got rank {rank} and "
                         f"num_ranks {num_ranks}")
    owner = _deal(entries, num_ranks)
    return [e for e, r in zip(entries, owner) if r == rank]


def _deal(entries: Sequence[Entry], num_ranks: int) -> list[int]:
    """The process each entry goes to (see `partition_entries`)."""
    order = sorted(range(len(entries)),
                   key=lambda i: (zlib.crc32(json.dumps(_identity(entries[i])).encode()), _identity(entries[i])))
    owner = [0] * len(entries)
    for turn, i in enumerate(order):
        owner[i] = turn % num_ranks
    return owner


class ActivationStream:
    """One site's selected tokens, read one tensor at a time (made by `ActivationStore.stream`).

    `entries` is this process's share, in store order, and `rows(e)` how many tokens of entry
    `e` are used (all of them unless `max_tokens` subsampled). `read(e)` returns those tokens as
    float32 `[rows, d]`, checksum verified; `chunks()` yields them entry by entry. Only the
    manifest (already in memory) is needed for the sizes and `fingerprint()`; tensors are read
    from the shards when asked for, one at a time, so reading holds one entry's tensor (two while
    the caller still has the previous one), never the site.
    """

    def __init__(self, directory: Path, site_key: str, d: int, entries: Sequence[Entry], rows: Sequence[int],
                 seed: Optional[int], rank: int, num_ranks: int):
        self.dir, self.site_key, self.d = directory, site_key, d
        self.rank, self.num_ranks = rank, num_ranks
        self._seed = seed  # None: every row of every entry is used
        self._rows = {(e.shard, e.key): int(r) for e, r in zip(entries, rows)}
        self._all = list(entries)
        owner = _deal(self._all, num_ranks)
        self.entries = [e for e, r in zip(self._all, owner) if r == rank]  # partition_entries' share
        # Every share's size, known to every process from the manifest alone, so a share too small to
        # train on is refused by all processes alike instead of leaving the others in a collective.
        self.share_tokens = [0] * num_ranks
        for e, r in zip(self._all, owner):
            self.share_tokens[r] += self.rows(e)
        self.num_tokens = self.share_tokens[rank]
        self.total_tokens = sum(self._rows.values())
        # The largest tensor a read holds, as stored: what reading costs in memory, whatever the subsample.
        self.max_read_rows = max(e.shape[0] for e in self._all)
        self.max_read_bytes = max(e.shape[0] * e.shape[1] * _itemsize(e.dtype) for e in self._all)

    def __repr__(self) -> str:
        return (f"ActivationStream({str(self.dir)!r}, site={self.site_key}, d={self.d}, rank={self.rank}/"
                f"{self.num_ranks}, entries={len(self.entries)}/{len(self._all)}, tokens={self.num_tokens}/"
                f"{self.total_tokens})")

    def rows(self, e: Entry) -> int:
        return self._rows[(e.shard, e.key)]

    def fingerprint(self) -> int:
        """CRC32 over every selected entry (all shares): identity, shape, dtype, recorded checksum and
        rows kept. Stands for the data in a training checkpoint without reading it: a changed
        tensor changes its recorded crc32 (stores without checksums: only its identity counts)."""
        rec = [[*_identity(e), list(e.shape), e.dtype, e.crc32, self.rows(e)] for e in self._all]
        return zlib.crc32(json.dumps([self._seed, sorted(rec, key=json.dumps)]).encode())

    def read(self, e: Entry) -> torch.Tensor:
        """The used rows of entry `e` (float32 `[rows, d]`), read and checksum verified."""
        ((_, t),) = self.read_many([e])
        return t

    def read_many(self, entries: Iterable[Entry]) -> Iterator[tuple[Entry, torch.Tensor]]:
        """(entry, float32 `[rows, d]`) for each of `entries`, in the order given. A shard stays open
        across consecutive entries of it, but is reopened after two tensors' worth of bytes, so a
        safetensors build that memory-maps never keeps a whole shard's pages resident."""
        run: list[Entry] = []
        run_bytes = 0
        for e in entries:
            nbytes = e.shape[0] * e.shape[1] * _itemsize(e.dtype)
            if run and (e.shard != run[0].shard or run_bytes + nbytes > 2 * self.max_read_bytes):
                yield from self._read_run(run)
                run, run_bytes = [], 0
            run.append(e)
            run_bytes += nbytes
        if run:
            yield from self._read_run(run)

    def _read_run(self, run: Sequence[Entry]) -> Iterator[tuple[Entry, torch.Tensor]]:
        path = self.dir / run[0].shard
        with safe_open(str(path), "pt") as f:
            for e in run:
                t = _verified(path, e, f.get_tensor(e.key)).to(torch.float32)
                if self._seed is not None and self.rows(e) < e.shape[0]:
                    t = _subsample(e, t, self.rows(e), self._seed)
                yield e, t
                del t  # before the next read: the caller's reference is the only one left

    def chunks(self) -> Iterator[torch.Tensor]:
        """This share's tokens, one entry at a time, in store order."""
        return (t for _, t in self.read_many(self.entries))

    def load(self) -> torch.Tensor:
        """This share as one tensor (for tests and small data: it holds everything at once)."""
        return torch.cat(list(self.chunks()))


def _itemsize(dtype: str) -> int:
    return DTYPES[dtype].itemsize if dtype in DTYPES else 8
