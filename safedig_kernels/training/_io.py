"""Crash-safe file writes shared by capture, training checkpoints and reports.

A file is written next to its destination under a temporary name, flushed to disk and then
renamed over the destination: a reader sees the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors.torch import save_file


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _replace(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    # The rename itself must reach the disk before anything that depends on it is written.
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path, text: str) -> None:
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def atomic_save_safetensors(path, tensors: Mapping[str, torch.Tensor],
                            metadata: Optional[Mapping[str, str]] = None) -> None:
    """`safetensors.torch.save_file` through a temporary file; tensors are made contiguous."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata=dict(metadata) if metadata else None)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path, what: str) -> Any:
    """Parse JSON at `path`; errors name the file, what it was meant to be and where it broke."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
}


def dtype_from_name(name: str, argument: str = "dtype") -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"{argument} must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    for k, v in DTYPES.items():
        if v == dtype:
            return k
    raise ValueError(f"unsupported dtype {dtype}; expected one of {sorted(DTYPES)}")
