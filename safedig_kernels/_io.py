"""Files and names every layer shares: the one atomic write, the one dtype table, JSON reading.

An atomic write puts the bytes in a hidden temporary file next to the destination, fsyncs it,
renames it over the destination (`os.replace`) and fsyncs the folder. A reader sees the old file
or the new one, never part of one; once the call returns, a crash loses nothing. The new file
gets the permission bits of the file it replaces, or those a plain `open()` would give it. An
interrupted write removes its temporary file; a killed process may leave one behind, named
`.<name>.<pid>.<random>.tmp`, which no reader of this package ever opens.

Every reader of a user-given file goes through `regular_file` before opening it (a FIFO would
block the open forever, a device reads as empty or endless) and parses JSON with `loads_json`,
which refuses nesting deeper than `MAX_JSON_DEPTH` instead of overflowing the stack.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import stat
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
from safetensors.torch import save_file

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "write_json_and_table", "atomic_save_safetensors",
           "read_json", "regular_file", "loads_json", "json_too_deep", "MAX_JSON_DEPTH",
           "DTYPES", "dtype_from_name", "dtype_name", "safetensors_dtype_name"]


# -- atomic writes ------------------------------------------------------------------------------

def atomic_write(path: PathLike, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` to fill a temporary file, then move it over `path` atomically. A `path`
    that exists and is not a regular file (a device such as /dev/null, a FIFO, a folder) is
    refused: the rename would replace the special file itself."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise FileExistsError(f"{path} exists and is not a regular file (a device, FIFO or folder); "
                              f"refusing to replace it")
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    mode = os.fstat(fd).st_mode & 0o7777  # 0o666 less the umask, as open() would give
    os.close(fd)
    try:
        if path.is_file():
            mode = path.stat().st_mode & 0o7777
        write(tmp)
        os.chmod(tmp, mode)  # some writers (safetensors 0.8) create their files 0o600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt: the half-written temporary file must not linger.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable on POSIX. Best effort: the new file is already in place,
    # and some filesystems refuse to fsync a directory.
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: PathLike, obj: Any, indent: Optional[int] = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def write_json_and_table(path: PathLike, doc: Any, table: str) -> tuple[Path, Path]:
    """A report as `path` (JSON) and the same name with `.txt` (its table), both atomic; the
    folder is made if needed. Returns both paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, doc)
    txt = path.with_suffix(".txt")
    atomic_write_text(txt, table + "\n")
    return path, txt


def atomic_save_safetensors(path: PathLike, tensors: Mapping[str, torch.Tensor],
                            metadata: Optional[Mapping[str, str]] = None) -> None:
    """`safetensors.torch.save_file` made atomic; tensors are copied to the CPU, contiguous."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=dict(metadata) if metadata else None))


def read_json(path: PathLike, what: str) -> Any:
    """Parse JSON at `path`; errors name the file, what it was meant to be and where it broke."""
    path = regular_file(path, what)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return loads_json(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


# -- checks every reader of a user-given file makes ---------------------------------------------

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def regular_file(path: PathLike, what: str, error: Optional[Callable[[Path, str], Exception]] = None) -> Path:
    """`path` as a Path, once it names an existing regular file (symlinks followed).

    Checked before anything opens the file: opening a FIFO blocks until another process writes
    to it (a hang), a device reads as empty or endless, a directory cannot be read at all.
    Missing: FileNotFoundError "`what` `path` does not exist". Anything but a regular file:
    ValueError "`what` `path` is not a regular file (it is a FIFO ...)", or the exception
    `error(path, "`what` is not a regular file (...)")` of a loader with its own error type."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except NotADirectoryError:  # a component of the path is a file
        raise FileNotFoundError(f"{what} {path} does not exist (a parent of it is not a directory)") from None
    if stat.S_ISREG(mode):
        return path
    kind = next((name for test, name in _KINDS if test(mode)), f"file type {stat.S_IFMT(mode):#o}")
    if error is not None:
        raise error(path, f"{what} is not a regular file (it is {kind})")
    raise ValueError(f"{what} {path} is not a regular file (it is {kind})")


# Deeper JSON than any file of this package needs. json.loads itself overflows the stack near
# sys.getrecursionlimit() levels, and values a few hundred levels deep still break the
# dataclass copies, reprs and dumps that follow a load.
MAX_JSON_DEPTH = 100
_TOO_DEEP = f"nested too deeply (more than {MAX_JSON_DEPTH} levels of arrays and objects)"


def loads_json(text: str) -> Any:
    """`json.loads`, raising `json.JSONDecodeError` (with a position) for what it would parse
    or fail on otherwise: nesting deeper than `MAX_JSON_DEPTH` (RecursionError near 1000 levels)
    and integers longer than Python converts (a plain ValueError, from Python 3.11)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        obj = None  # too deep: located below
    except ValueError as e:
        limit = getattr(sys, "get_int_max_str_digits", lambda: 0)()
        m = re.search(r"\d{%d,}" % (limit + 1), text) if limit else None
        raise json.JSONDecodeError(f"an integer too long to read ({e})", text, m.start() if m else 0) from None
    else:
        if not json_too_deep(obj):
            return obj
    raise json.JSONDecodeError(_TOO_DEEP, text, _deep_position(text)) from None


def json_too_deep(obj: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether lists and dicts in `obj` nest more than `limit` levels (iterative, so any depth)."""
    level = [obj]
    for _ in range(limit):
        level = [v for o in level for v in (o.values() if isinstance(o, dict) else o if isinstance(o, list) else ())
                 if isinstance(v, (dict, list))]
        if not level:
            return False
    return True


def _deep_position(text: str) -> int:
    """Where the text first opens an array or object deeper than `MAX_JSON_DEPTH` (0 if nowhere)."""
    depth = 0
    for m in re.finditer(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return m.start()
        elif c in "]}":
            depth -= 1
    return 0


# -- dtype names --------------------------------------------------------------------------------

# Canonical names (what files and reports write) and the short names users type.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
}
_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
            "fp64": "float64", "double": "float64"}
# safetensors' own codes for the same dtypes, as its file headers spell them
_SAFETENSORS = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def dtype_from_name(name: Union[str, torch.dtype], argument: str = "dtype",
                    allowed: Optional[tuple[torch.dtype, ...]] = None) -> torch.dtype:
    """`"bfloat16"`, `"bf16"`, `"torch.bfloat16"` or `torch.bfloat16` itself -> `torch.bfloat16`.
    `allowed` narrows the accepted dtypes; errors name `argument` and list what it may be."""
    accepted = tuple(DTYPES.values()) if allowed is None else allowed
    choices = ", ".join(dtype_name(d) for d in accepted)
    if isinstance(name, torch.dtype):
        dtype = name
    elif isinstance(name, str):
        key = name.removeprefix("torch.")
        key = _ALIASES.get(key, key)
        if key not in DTYPES:
            raise ValueError(f"{argument} must be one of {choices} (or fp32, fp16, bf16, ...), got {name!r}")
        dtype = DTYPES[key]
    else:
        raise TypeError(f"{argument} must be a torch.dtype or a dtype name, got {type(name).__name__}")
    if dtype not in accepted:
        raise TypeError(f"{argument} must be one of {choices}, got {dtype}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name: `torch.bfloat16` -> `"bfloat16"`."""
    return str(dtype).removeprefix("torch.")


def safetensors_dtype_name(code: str) -> str:
    """safetensors' header code (`"BF16"`) as a canonical name (`"bfloat16"`); others as given."""
    return _SAFETENSORS.get(code, code)
