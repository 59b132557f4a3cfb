"""Reading the files a checkpoint is made of, with `CheckpointError`s that name the file: a
safetensors header without the data, its tensors, and JSON objects. Every file is checked to be a
regular file before it is opened (`_io.regular_file`: a FIFO would hang the open), JSON nested
deeper than `_io.MAX_JSON_DEPTH` and overlong integers are refused (`_io.loads_json`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import safetensors
import torch
from safetensors import safe_open

from .._io import loads_json, regular_file
from ._checks import CheckpointError

# safetensors < 0.4.2 did not export its error type at the top level.
_SafetensorError = getattr(safetensors, "SafetensorError", RuntimeError)


def _unreadable(path: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(path, None, f"not a readable safetensors file (truncated or corrupted?): "
                                       f"{type(e).__name__}: {e}")


def require_regular_file(path: Path, what: str) -> Path:
    """`_io.regular_file`, refusing a FIFO, device or directory with a CheckpointError."""
    return regular_file(path, what, error=lambda p, problem: CheckpointError(p, None, problem))


def read_header(path: Path) -> tuple[dict[str, str], list[str]]:
    """The header metadata and tensor names of a safetensors file, without reading the data.
    Opening validates the whole header against the file size, so truncated files and corrupted
    headers or offsets fail here."""
    require_regular_file(path, "checkpoint file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {}), list(f.keys())
    except (_SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _unreadable(path, e) from e


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (_SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _unreadable(path, e) from e


def parse_json(text: str, path: Path, key: Optional[str]) -> dict[str, Any]:
    try:
        obj = loads_json(text)  # also refuses JSON nested too deeply and overlong integers
    except json.JSONDecodeError as e:
        raise CheckpointError(path, key, f"malformed JSON: {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(path, key, f"expected a JSON object, found {type(obj).__name__}")
    return obj


def read_json(path: Path, what: str) -> dict[str, Any]:
    require_regular_file(path, what)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(path, None, f"not UTF-8 text: {e}") from e
    return parse_json(text, path, None)

